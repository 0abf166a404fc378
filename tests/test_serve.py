"""Serving pieces that need no running server: metrics by vLLM's definitions, arrivals, prompts, the server's
command line and defaults, adapter checks and bad input (one line, exit code 2, before anything starts)."""

import json
import math

import numpy as np
import pytest

from conftest import run_cli
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


def test_jsonl_prompts_and_their_errors(tmp_path, tiny):
    _, tok = tiny
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "hello there"}\n{"prompt": "bye", "output_len": 3}\n')
    reqs = jsonl_requests(good, tok, output_len=9)
    assert [r.output_len for r in reqs] == [9, 3]
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
    # on CUDA vLLM's own defaults: no CPU binding or KV-space variables, dtype auto
    gpu = Machine(cuda=True, cores=[0, 1], cpu_flags=frozenset({"avx2"}), available_gib=100.0)
    assert vllm_defaults(gpu) == ({}, ["--dtype", "auto"])


def _adapter(tmp_path, **cfg):
    d = tmp_path / "adapter"
    d.mkdir(exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, **cfg}))
    return d


def test_server_command(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "1")  # the user's setting wins over ours
    ad = check_lora("a", _adapter(tmp_path, r=24))
    spec = ServerSpec(model=tiny_dir, loras=[ad], port=9001, api_key="s3cret", tensor_parallel_size=2,
                      extra_args=["--max-num-seqs", "32"])
    m = Machine(cuda=False, cores=[0, 1], cpu_flags=frozenset(), available_gib=8.0)
    argv, env = server_command(spec, m)
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(argv)
    assert "--host 127.0.0.1 --port 9001" in joined and "--dtype float32" in joined
    assert "--enable-lora --max-lora-rank 32 --max-loras 1 --lora-modules a=" in joined
    assert "--tensor-parallel-size 2" in joined and argv[-2:] == ["--max-num-seqs", "32"]
    assert "s3cret" not in joined and env["VLLM_API_KEY"] == "s3cret"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in env and env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    (tmp_path / "small").mkdir()
    assert max_lora_rank([check_lora("b", _adapter(tmp_path / "small", r=1))]) == 1
    assert max_lora_rank([ad, check_lora("b", _adapter(tmp_path / "small", r=1))]) == 32


def test_serve_passes_everything_after_double_dash_to_vllm():
    from llmfast.cli import parse_args

    args = parse_args(["serve", "m", "--port", "8001", "--api-key", "k", "--", "--max-num-seqs", "128", "--port", "9"])
    assert (args.model, args.port, args.api_key) == ("m", 8001, "k")
    assert args.vllm_args == ["--max-num-seqs", "128", "--port", "9"]
    assert parse_args(["serve", "m", "--"]).vllm_args == []
    assert parse_args(["serve", "m", "--lora", "a=b"]).vllm_args == []


@pytest.mark.parametrize("cfg,msg", [
    ({"r": 1024}, "rank 1024 .* not supported by vLLM"),
    ({"use_dora": True}, "DoRA adapter, which vLLM cannot serve"),
    ({"peft_type": "IA3"}, "IA3 adapter; vLLM serves LoRA only"),
])
def test_serve_refuses_adapters_vllm_cannot_load(tmp_path, tiny_dir, cfg, msg):
    code, out, err = run_cli("serve", str(tiny_dir), "--lora", f"x={_adapter(tmp_path, **cfg)}")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert __import__("re").search(msg, err), err


def test_serve_and_bench_bad_input(tmp_path, tiny_dir):
    code, _, err = run_cli("serve", str(tmp_path))
    assert code == 2 and "not a Hugging Face model" in err
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


def test_hf_engine_times_every_token(tiny):
    from llmfast.bench.engines.hf import run_hf

    model, tok = tiny
    reqs = random_requests(tok, 5, input_len=12, output_len=6, seed=0)
    results, duration = run_hf(model, tok, reqs, batch_size=2)
    assert [r.output_tokens for r in results] == [6] * 5 and all(r.success for r in results)
    for r in results:
        assert len(r.itl) == 5 and r.latency == pytest.approx(r.ttft + sum(r.itl))
        assert 0 < r.ttft <= r.latency <= duration
    # Static batches: the third batch starts after the first two finished.
    assert results[4].ttft > results[1].latency
    # Greedy decoding of the same prompt alone gives the same text (batching and padding change nothing).
    import torch

    ids = torch.tensor([reqs[3].prompt_ids])
    with torch.inference_mode():
        alone = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                               do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(alone[0, ids.shape[1]:], skip_special_tokens=True) == results[3].generated_text


# ---------------------------------------------------------------- engines, endpoints and bad servers
import http.server
import socket
import threading

from llmfast.bench.engines import ENGINES, OfflineEngine, Variant


@pytest.mark.parametrize("name", ENGINES.names())
def test_every_engine_conforms(name, tiny_dir, tiny):
    """Each registered engine: its name and family, `can_run` deciding 4-bit by the quantization method, and
    (for engines that need no vLLM start) generation with one result per request in order."""
    from llmfast.quant import engines_for

    engine = ENGINES.get(name)
    assert engine.name == name and engine.family in ("vllm", "hf")
    assert engine.can_run(Variant("plain", tiny_dir)) is None
    nf4 = engine.can_run(Variant("q", tiny_dir, quantization="nf4"))
    assert (nf4 is None) == (engine.family in engines_for("nf4"))
    assert nf4 is None or "nf4" in nf4
    if isinstance(engine, OfflineEngine) and engine.family != "vllm":  # vLLM engines run in test_serve_vllm.py
        _, tok = tiny
        reqs = random_requests(tok, 3, input_len=6, output_len=4, seed=0)
        results, duration = engine.generate(Variant("plain", tiny_dir), reqs, dtype="float32", batch_size=2,
                                            ignore_eos=True)
        assert [r.output_tokens for r in results] == [4, 4, 4] and all(r.success for r in results)
        assert [r.prompt_len for r in results] == [6, 6, 6] and duration > 0


class _Fake(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible server in a thread: /health, /v1/models naming `model`, and streamed completions
    of `tokens` tokens; with `stall`, one token and then nothing (until the test ends)."""

    def log_message(self, *a):
        pass

    def _json(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        srv = self.server
        if self.path == "/health":
            self._json({})
        elif self.path == "/v1/models":
            self._json({"data": [{"id": m, "root": str(srv.root)} for m in srv.models]})
        else:
            self.send_error(404)

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv.seen.append((self.path, dict(self.headers), body))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        chat = self.path.endswith("chat/completions")
        n = 1 if srv.stall else body.get("max_tokens") or body.get("max_completion_tokens")
        for _ in range(n):
            choice = {"delta": {"content": "a"}} if chat else {"text": "a"}
            self.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
            self.wfile.flush()
        if srv.stall:
            srv.release.wait(60)
            return
        usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": n}}
        self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())


@pytest.fixture
def fake_server(tiny_dir):
    servers = []

    def start(models=("m",), stall=False):
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
        srv.daemon_threads = True
        srv.models, srv.root, srv.stall, srv.seen, srv.release = list(models), tiny_dir, stall, [], threading.Event()
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv, f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for srv in servers:
        srv.release.set()
        srv.shutdown()
        srv.server_close()


def test_serve_refuses_a_port_another_server_answers_on(fake_server, tiny_dir):
    """Another HTTP server answers /health on the port: no `ready:`, one line naming the port, before vLLM starts."""
    srv, url = fake_server()
    port = srv.server_address[1]
    code, out, err = run_cli("serve", str(tiny_dir), "--port", str(port))
    assert code == 2 and "ready:" not in out
    assert f"port {port} on 127.0.0.1 is in use" in err.strip().splitlines()[-1]


def test_ready_means_our_model_is_served(fake_server):
    """/health alone is not ready: the server must list the model asked for, and our process must be alive."""
    from llmfast.serve.endpoint import wait_ready

    _, url = fake_server(models=("someone-else",))
    with pytest.raises(TimeoutError, match="did not serve 'tiny'"):
        wait_ready(url, "tiny", alive=lambda: True, timeout=1.5)
    with pytest.raises(UserError, match="exited"):
        wait_ready(url, "someone-else", alive=lambda: False, timeout=5, why_dead=lambda: "it exited")
    wait_ready(url, "someone-else", alive=lambda: True, timeout=5)


def test_bench_serve_bad_urls_servers_and_result_dirs(tmp_path):
    """Each is one line, exit 2; a result folder that is a file is refused before any request is sent."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def not_http():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
            conn.close()

    threading.Thread(target=not_http, daemon=True).start()
    port = listener.getsockname()[1]
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = {("--base-url", "not a url"): "--base-url 'not a url': expected a URL such as http://127.0.0.1:8000",
             ("--base-url", "http://127.0.0.1:notaport"): "the port is not a number",
             ("--base-url", f"http://127.0.0.1:{port}"): "did not answer in HTTP",
             ("--save-result", "--result-dir", str(a_file)): "is a file, not a folder",
             ("--save-result", "--result-dir", str(a_file / "sub")): "is a file, not a folder"}
    try:
        for argv, msg in cases.items():
            code, out, err = run_cli("bench", "serve", "--port", "9", *argv, "--num-prompts", "2")
            assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, (argv, err)
            assert "Traceback" not in err
    finally:
        listener.close()
    assert a_file.read_text() == "x"


def test_bench_serve_fails_a_stalled_stream(fake_server, tmp_path):
    """A server that stops sending tokens fails the requests after --stall-timeout, not the request timeout."""
    _, url = fake_server(stall=True)
    code, out, err = run_cli("bench", "serve", "--base-url", url, "--num-prompts", "2", "--random-input-len", "8",
                             "--random-output-len", "4", "--stall-timeout", "1", "--request-timeout", "120",
                             "--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json")
    assert code == 1, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["status"] == "failed" and r["failed"] == 2
    assert r["error_counts"] == {"no token from the server for 1 s (--stall-timeout)": 2}


def test_bench_serve_sends_what_vllm_flags_ask(fake_server, tmp_path):
    """The chat backend, headers, sampling flags, --extra-body, LoRA modules round-robin, the served name."""
    srv, url = fake_server(models=("base", "l1", "l2"))
    code, out, err = run_cli(
        "bench", "serve", "--base-url", url, "--model", "base", "--backend", "openai-chat", "--num-prompts", "4",
        "--random-input-len", "8", "--random-output-len", "3", "--header", "x-team=a", "--top-p", "0.5",
        "--top-k", "7", "--temperature", "0", "--extra-body", '{"top_k": 9, "foo": 1}', "--ignore-eos",
        "--lora-modules", "l1", "l2", "--lora-assignment", "round-robin", "--num-warmups", "1", "--disable-tqdm",
        "--metadata", "run=x", "--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json")
    assert code == 0, err
    assert len(srv.seen) == 5  # one warm-up, four measured
    for path, headers, body in srv.seen:
        assert path == "/v1/chat/completions" and headers["x-team"] == "a"
        assert body["messages"][0]["role"] == "user" and body["max_completion_tokens"] == 3
        assert (body["top_p"], body["top_k"], body["temperature"], body["foo"]) == (0.5, 9, 0, 1)
        assert body["stream"] is True and body["ignore_eos"] is True
    assert sorted(b["model"] for _, _, b in srv.seen[1:]) == ["l1", "l1", "l2", "l2"]  # round-robin; any arrival order
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["completed"] == 4 and r["total_output_tokens"] == 12 and r["backend"] == "openai-chat"
    assert r["model_id"] == "base" and r["run"] == "x" and VLLM_KEYS <= r.keys()


# vLLM command lines (as users paste them) and what llmfast answers: None runs (parses), else the error.
VLLM_LINES = {
    "--backend vllm --model m --dataset-name random --random-input-len 32 --random-output-len 8 --num-prompts 4": None,
    "--backend openai-chat --endpoint /v1/chat/completions --served-model-name x --num-warmups 2": None,
    "--dataset-name sharegpt --dataset-path sg.json --sharegpt-output-len 16 --disable-shuffle": None,
    "--random-prefix-len 16 --random-range-ratio 0.3 --top-p 0.9 --top-k 5 --min-p 0.1 --seed 3": None,
    "--ramp-up-strategy linear --ramp-up-start-rps 1 --ramp-up-end-rps 8 --header a=b c=d --disable-tqdm": None,
    "--extra-body {} --lora-modules a b --tokenizer t --label l --metadata k=v --save-detailed": None,
    "--no-stream": "--no-stream does not apply to llmfast bench serve: TTFT",
    "--trust-remote-code --num-prompts 3": "--trust-remote-code does not apply",
    "--hf-split train": "--hf-split does not apply to llmfast bench serve: datasets are read from local files",
    "--random-mm-bucket-config {} --num-prompts 3": "--random-mm-bucket-config does not apply",
    "--profile": "--profile does not apply",
    "--plot-timeline": "--plot-timeline does not apply",
}


@pytest.mark.parametrize("line", VLLM_LINES)
def test_vllm_command_lines_parse_or_name_the_flag(line):
    from llmfast.cli import parse_args

    want = VLLM_LINES[line]
    if want is None:
        args = parse_args(["bench", "serve", *line.split()])
        assert args.func.__name__ == "cmd_bench_serve"
    else:
        with pytest.raises(UserError, match=want.replace("(", r"\(")):
            parse_args(["bench", "serve", *line.split()])


@pytest.mark.parametrize("argv,msg", [
    (["--backend", "openai-embeddings"], "--backend openai-embeddings does not apply to llmfast bench serve"),
    (["--dataset-name", "hf"], "--dataset-name hf does not apply to llmfast bench serve: datasets are read from"),
    (["--dataset-name", "burstgpt"], "--dataset-name burstgpt does not apply"),
    (["--backend", "openai-chat"], None),
])
def test_vllm_choices_that_do_not_apply(argv, msg):
    code, _, err = run_cli("bench", "serve", "--port", "9", "--num-prompts", "2", *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert (msg or "cannot reach") in err, err


def test_every_vllm_bench_serve_flag_is_known():
    """Every flag of the installed vLLM's `bench serve` is either honoured or refused by name (none unknown)."""
    serve = pytest.importorskip("vllm.benchmarks.serve")
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from llmfast.cli import build_parser

    theirs = FlexibleArgumentParser()
    serve.add_cli_args(theirs)
    ours = build_parser()._subparsers._group_actions[0].choices["bench"]._subparsers._group_actions[0].choices["serve"]
    known = {o for a in ours._actions for o in a.option_strings}
    missing = sorted(o for a in theirs._actions for o in a.option_strings if o not in known)
    assert missing == []
