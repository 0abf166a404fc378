"""Bench engines and the online benchmark against servers that misbehave, no vLLM start: the engine registry's
conformance, readiness, bad URLs and ports, a stalled stream, what vLLM's flags send, and vLLM command lines
(each runs, or names the flag that does not apply)."""

import contextlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from llmfast.bench.engines import ENGINES, OfflineEngine, Variant
from llmfast.bench.workload import random_requests
from llmfast.errors import UserError
from test_serve import VLLM_KEYS

@pytest.mark.parametrize("name", ENGINES.names())
def test_every_engine_conforms(name, tiny_dir, tiny):
    """Each registered engine: its name and family, `can_run` deciding 4-bit by the quantization method, and
    (for engines that need no vLLM start) generation with one result per request in order."""
    from llmfast.quant import engines_for

    engine = ENGINES.get(name)
    assert engine.name == name and engine.family in ("vllm", "hf", "hf-sparse")
    if engine.family == "hf-sparse":  # sparse artifacts only: it generates in tests/test_sparse_runtime.py
        assert "not a sparse artifact" in engine.can_run(Variant("plain", tiny_dir))
        return
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
    """An OpenAI-compatible server in a thread: /health, /v1/models naming `model` (with `max_model_len` when set)
    and `loras` (each with its parent and its adapter folder as root),
    and streamed completions of `tokens` tokens, `per_chunk` to a chunk, with the usage (prompt_tokens 5) last when
    the request asks for it (stream_options.include_usage, as vLLM); with
    `stall`, one token and then nothing (until the test ends); with `empty`, the usage and no token."""

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
            extra = {"max_model_len": srv.max_model_len} if srv.max_model_len else {}
            self._json({"data": [{"id": m, "root": str(srv.root), **extra} for m in srv.models] + [
                {"id": name, "root": str(root), "parent": parent} for name, (parent, root) in srv.loras.items()]})
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
        with srv.lock if srv.gap else contextlib.nullcontext():  # with a gap: one request at a time, slowly
            for sent in range(0, 0 if srv.empty else n, srv.per_chunk):
                time.sleep(srv.gap)
                text = "a" * min(srv.per_chunk, n - sent)
                choice = {"delta": {"content": text}} if chat else {"text": text}
                self.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
                self.wfile.flush()
        if srv.stall:
            srv.release.wait(60)
            return
        usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 0 if srv.empty else n}}
        if (body.get("stream_options") or {}).get("include_usage"):
            self.wfile.write(f"data: {json.dumps(usage)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture
def fake_server(tiny_dir):
    servers = []

    def start(models=("m",), stall=False, gap=0.0, per_chunk=1, empty=False, max_model_len=None, loras=None):
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
        srv.daemon_threads = True
        srv.models, srv.root, srv.stall, srv.seen, srv.release = list(models), tiny_dir, stall, [], threading.Event()
        srv.gap, srv.lock, srv.per_chunk, srv.empty, srv.max_model_len = gap, threading.Lock(), per_chunk, empty, \
            max_model_len
        srv.loras = loras or {}  # name -> (parent, root), as vLLM lists a LoRA adapter
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
    log = err.split("(log: ")[1].split(",")[0]
    assert not Path(log).exists()  # no temporary log left behind


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
             # named the --base-url the user never gave, and called 70000 not a number (fuzz pass 10, F2)
             ("--port", "70000"): "--host/--port 'http://127.0.0.1:70000': the port is not a number from 0 to 65535",
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


def test_bench_serve_refuses_a_result_folder_it_cannot_write(tmp_path):
    """A --result-dir under a folder this user cannot write is one line before any request (the results of minutes of
    load were lost at the end); run as this user, and as root without its file-mode override (s45's mutation audit:
    untested)."""
    from conftest import file_modes_prefix

    prefix = file_modes_prefix(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        proc = subprocess.run([*prefix, sys.executable, "-m", "llmfast.cli", "bench", "serve", "--port", "9",
                               "--num-prompts", "2", "--save-result", "--result-dir", str(locked / "sub")],
                              capture_output=True, text=True, timeout=300, cwd=REPO)
    finally:
        locked.chmod(0o755)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"llmfast: error: --result-dir {locked / 'sub'}: {locked} is not writable"


def test_bench_serve_refuses_a_model_the_server_does_not_serve_and_a_mismatched_endpoint(fake_server):
    """A --model, --served-model-name or LoRA module the server does not list, and an --endpoint that does not fit the
    backend, are one line before the first request (every request failed with HTTP 404, or a chat body went to the
    completions route). s45's mutation audit: neither check was tested."""
    srv, url = fake_server(models=("m", "l1"))
    cases = {("--model", "nope"): f"model 'nope' is not served by {url}: it serves m, l1",
             ("--served-model-name", "nope"): f"model 'nope' is not served by {url}: it serves m, l1",
             ("--lora-modules", "l1", "l9"): f"model 'l9' is not served by {url}: it serves m, l1",
             ("--backend", "openai-chat", "--endpoint", "/v1/completions"):
                 "--endpoint /v1/completions does not fit --backend openai-chat",
             ("--endpoint", "/v1/chat/completions"): "--endpoint /v1/chat/completions does not fit --backend openai"}
    for argv, msg in cases.items():
        code, out, err = run_cli("bench", "serve", "--base-url", url, "--num-prompts", "2", "--random-input-len", "8",
                                 "--random-output-len", "2", *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and msg in err, (argv, err)
    assert srv.seen == []


def test_bench_serve_refuses_a_label_or_date_that_would_name_a_file_elsewhere(fake_server, tmp_path):
    """vLLM's default result name is LABEL-RATEqps-MODEL-DATE.json in --result-dir: a label (or --metadata date) with
    '/' wrote it elsewhere (`--label ../../x`), one over 255 bytes failed after the whole run. One line, before the
    first request, nothing written."""
    srv, url = fake_server()
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    cases = {("--label", "../../x"): "--label '../../x': names the result file, so it may not hold '/'",
             ("--metadata", "date=2026/12/07"): "--metadata date='2026/12/07': names the result file",
             ("--label", "x" * 250): "would be 2"}
    for argv, msg in cases.items():
        code, _, err = run_cli("bench", "serve", "--base-url", url, "--num-prompts", "2", "--random-input-len", "8",
                               "--random-output-len", "2", "--save-result", "--result-dir", str(out_dir), *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and msg in err, (argv, err)
    assert srv.seen == [] and list(out_dir.iterdir()) == [] and list(tmp_path.iterdir()) == [out_dir]


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
    assert r["failure_cause"] == "no token from the server for 1 s (--stall-timeout)"  # it answers /health


def test_a_queue_is_not_a_stall(fake_server, tmp_path):
    """A server that serves one request at a time, a token every 0.2 s: the last of four requests waits about
    2.4 s for its first token, longer than --stall-timeout 2, but the server kept producing tokens: all succeed."""
    _, url = fake_server(gap=0.2)
    code, out, err = run_cli("bench", "serve", "--base-url", url, "--num-prompts", "4", "--random-input-len", "8",
                             "--random-output-len", "4", "--stall-timeout", "2", "--save-result",
                             "--result-dir", str(tmp_path), "--result-filename", "r.json")
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["completed"] == 4 and r["failed"] == 0


def test_bench_serve_saves_its_result_before_a_closed_pipe_ends_it(fake_server, tmp_path):
    """`llmfast bench serve ... --save-result | head -1`: the summary's first line closes the pipe, which ends the
    process (status 141); the result was saved after the summary was printed, so it was never written."""
    _, url = fake_server()
    r, w = os.pipe()
    os.close(r)  # the reader has left before the first line
    try:
        p = subprocess.run([sys.executable, "-m", "llmfast", "bench", "serve", "--base-url", url, "--num-prompts", "2",
                            "--random-input-len", "8", "--random-output-len", "2", "--disable-tqdm", "--save-result",
                            "--result-dir", str(tmp_path), "--result-filename", "r.json"], stdout=w,
                           stderr=subprocess.PIPE, text=True, timeout=300,
                           # unbuffered, the summary's print meets the closed pipe (buffered, it waited for the exit)
                           env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})
    finally:
        os.close(w)
    assert (p.returncode, p.stderr) == (141, "")
    assert json.loads((tmp_path / "r.json").read_text())["completed"] == 2


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


def test_token_counts_are_the_servers(fake_server, tmp_path):
    """Input and output token counts are the server's (its usage: prompt_tokens 5, not the 8 tokens of our prompt
    before a template; 5 completion tokens streamed two to a chunk, not 3 chunks), and TPOT divides by them; a
    stream that ends without a token fails its request, with that cause (the server is healthy: it is not said to
    have stopped). s45's mutation audit: none of these held."""
    import numpy as np

    srv, url = fake_server(per_chunk=2)
    common = ("bench", "serve", "--base-url", url, "--num-prompts", "3", "--random-input-len", "8",
              "--random-output-len", "5", "--disable-tqdm", "--save-result", "--result-dir", str(tmp_path))
    code, out, err = run_cli(*common, "--percentile-metrics", "ttft,tpot,itl,e2el", "--save-detailed",
                             "--result-filename", "r.json")
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert (r["completed"], r["total_input_tokens"], r["total_output_tokens"]) == (3, 15, 15)
    assert r["input_lens"] == r["output_lens"] == [5, 5, 5] and [len(i) for i in r["itls"]] == [2, 2, 2]
    tpots = [(e2el - ttft) / (5 - 1) for e2el, ttft in zip(r["latencies"], r["ttfts"])]
    assert r["mean_tpot_ms"] == pytest.approx(1000 * np.mean(tpots), rel=1e-9)
    srv, url = fake_server(empty=True)
    code, out, err = run_cli(*common[:3], url, *common[4:], "--result-filename", "empty.json")
    assert code == 1, err
    r = json.loads((tmp_path / "empty.json").read_text())
    assert (r["status"], r["completed"], r["failed"]) == ("failed", 0, 3)
    assert r["failure_cause"] == "the stream ended without a token"


def test_metadata_cannot_replace_what_the_run_measured(fake_server, tmp_path):
    """--metadata adds keys to the result and may replace its setup (label, as vLLM lets it), not what the run measured:
    `status=ok` made a failed run's result say ok and exit 0, `duration=long` replaced the duration (found by s45's
    audit; vLLM merges its measured results over the metadata)."""
    _, url = fake_server(empty=True)
    code, out, err = run_cli("bench", "serve", "--base-url", url, "--num-prompts", "2", "--random-input-len", "8",
                             "--random-output-len", "2", "--disable-tqdm", "--metadata", "status=ok", "duration=long",
                             "completed=2", "label=mine", "run=x", "--save-result", "--result-dir", str(tmp_path),
                             "--result-filename", "r.json")
    assert code == 1, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert (r["status"], r["completed"], r["failed"]) == ("failed", 0, 2) and isinstance(r["duration"], float)
    assert (r["label"], r["run"]) == ("mine", "x")


def test_a_lora_model_is_benchmarked_with_its_base_models_tokenizer(fake_server, tmp_path):
    """vLLM lists a LoRA adapter with its own folder as root and its base model as parent: the prompts are built with
    the parent's tokenizer, as an adapter folder need not hold one (s45's mutation audit: untested)."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    srv, url = fake_server(loras={"l1": ("m", adapter)})
    code, out, err = run_cli("bench", "serve", "--base-url", url, "--model", "l1", "--num-prompts", "2",
                             "--random-input-len", "8", "--random-output-len", "2", "--disable-tqdm", "--save-result",
                             "--result-dir", str(tmp_path), "--result-filename", "r.json")
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert (r["completed"], r["tokenizer_id"], r["model_id"]) == (2, str(srv.root), "l1")
    assert [b["model"] for _, _, b in srv.seen] == ["l1", "l1"]


def test_requests_are_checked_against_the_servers_max_model_len(fake_server, tmp_path):
    """The longest request (prompt and output: 8 + 4 tokens) may fill the server's max_model_len exactly, not one
    token more (s45's mutation audit: the boundary was not tested outside vLLM's own, slow test)."""
    common = ("--num-prompts", "2", "--random-input-len", "8", "--random-output-len", "4", "--disable-tqdm")
    _, url = fake_server(max_model_len=12)
    code, out, err = run_cli("bench", "serve", "--base-url", url, *common)
    assert code == 0 and "Successful requests:" in out, err
    srv, url = fake_server(max_model_len=11)
    code, out, err = run_cli("bench", "serve", "--base-url", url, *common)
    assert code == 2 and "the longest request is 12 tokens (prompt and output), beyond the 11" in err, err
    assert srv.seen == []  # refused before the first request


def test_a_sweep_writes_one_result_per_point_and_stall_timeout_0_never_fails(fake_server, tmp_path):
    """Every --request-rate times every --max-concurrency has its own result file, named -rRATE-cCONC, holding that
    point; --stall-timeout 0 turns the stall clock off (it failed every request at once). s45's mutation audit: both
    were tested only against vLLM, or not at all."""
    _, url = fake_server(gap=0.02)
    code, out, err = run_cli("bench", "serve", "--base-url", url, "--num-prompts", "2", "--random-input-len", "8",
                             "--random-output-len", "3", "--request-rate", "50,inf", "--max-concurrency", "1,2",
                             "--stall-timeout", "0", "--disable-tqdm", "--save-result", "--result-dir", str(tmp_path),
                             "--result-filename", "r.json")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r-r50.0-c1.json", "r-r50.0-c2.json", "r-rinf-c1.json",
                                                           "r-rinf-c2.json"]
    for rate in (50.0, "inf"):
        for conc in (1, 2):
            r = json.loads((tmp_path / f"r-r{rate}-c{conc}.json").read_text())
            assert (r["request_rate"], r["max_concurrency"], r["completed"], r["failed"]) == (rate, conc, 2, 0)


def test_bench_offline_runs_the_batch_size_asked_for(tiny_dir, tmp_path):
    """--batch-size reaches the transformers engine and the result (s45's mutation audit: ignored, it ran all prompts
    as one batch and said so)."""
    out = tmp_path / "r.json"
    code, _, err = run_cli("bench", "offline", str(tiny_dir), "--engine", "hf", "--num-prompts", "3",
                           "--random-input-len", "6", "--random-output-len", "2", "--ignore-eos", "--batch-size", "2",
                           "--output", str(out))
    assert code == 0, err
    r = json.loads(out.read_text())
    assert (r["batch_size"], r["completed"], r["total_output_tokens"]) == (2, 3, 6)


def test_bench_offline_keeps_a_result_another_run_wrote_at_its_output_meanwhile(tiny_dir, tmp_path, monkeypatch):
    """--output was checked free before the run and written over at its end: a second run into the same path that
    finished first lost its result. Now that one stays and this run's goes beside it, said on stderr and stdout."""
    from llmfast.bench.engines import ENGINES
    from llmfast.bench.engines.hf import HfEngine
    from llmfast.cli import main

    out = tmp_path / "r.json"

    class FinishedSecond(HfEngine):  # another run into the same --output ends while this one generates
        name = "hf-second"

        def generate(self, *args, **kwargs):
            out.write_text('{"the other run": true}\n')
            return super().generate(*args, **kwargs)

    monkeypatch.setitem(ENGINES._items, "hf-second", FinishedSecond())
    assert main(["bench", "offline", str(tiny_dir), "--engine", "hf-second", "--num-prompts", "2",
                 "--random-input-len", "6", "--random-output-len", "2", "--output", str(out)]) == 0
    assert json.loads(out.read_text()) == {"the other run": True}
    assert json.loads((tmp_path / "r-2.json").read_text())["completed"] == 2


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
    (["--ramp-up-strategy", "linear", "--ramp-up-start-rps", "8", "--ramp-up-end-rps", "2"], "0 <= start <= end"),
    (["--request-timeout", "0"], "--request-timeout positive"),
    # s48: NaN passed the checks (a NaN stall timeout never fires), and an infinite request timeout failed every request
    (["--request-timeout", "inf"], "--request-timeout positive and finite"),
    (["--stall-timeout", "nan"], "--stall-timeout and --ready-check-timeout-sec must be 0 or more"),
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


def test_ramp_up_rates_follow_vllms_schedule():
    """Linear 1 -> 9 req/s over n requests: the expected total time is the sum of 1/rate_i (gamma gaps, mean
    1/rate); over 4000 requests the sum's standard deviation is about 2% of it, so 10% is five sigma."""
    import numpy as np

    from llmfast.bench.loadgen import RampUp, arrival_times

    n, ramp = 4000, RampUp("linear", 1.0, 9.0)
    assert [ramp.rate(i, 5) for i in range(5)] == [1.0, 3.0, 5.0, 7.0, 9.0]
    assert RampUp("exponential", 1.0, 16.0).rate(2, 5) == pytest.approx(4.0)  # 1 * 16 ** (2/4)
    t = arrival_times(n, float("inf"), seed=1, ramp_up=ramp)
    expected = sum(1 / ramp.rate(i, n) for i in range(1, n))  # the first request goes at 0
    assert t[-1] == pytest.approx(expected, rel=0.10)
    gaps = np.diff(t)
    assert gaps[: n // 5].mean() > 3 * gaps[-n // 5 :].mean()


def test_prefix_and_sharegpt_prompts(tmp_path, tiny):
    from llmfast.bench.workload import build_requests

    _, tok = tiny
    reqs = build_requests(tok, num_prompts=5, input_len=10, output_len=3, prefix_len=12, seed=2)
    prefixes = {r.prompt[:20] for r in reqs}
    assert len(prefixes) == 1 and len({r.prompt for r in reqs}) == 5  # one shared start, different prompts
    assert all(21 <= r.prompt_len <= 22 for r in reqs)  # 12 + 10 tokens, the seam may merge one pair
    conv = [{"conversations": [{"from": "human", "value": f"question number {i} " * 3},
                               {"from": "gpt", "value": "a fairly long answer " * (i + 1)}]} for i in range(6)]
    conv.append({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})  # too short
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(conv))
    got = build_requests(tok, dataset_name="sharegpt", dataset_path=str(path), num_prompts=10, seed=0)
    assert len(got) == 6 and all(r.prompt.startswith("question number") for r in got)
    assert sorted(r.output_len for r in got) == sorted(
        len(tok.encode("a fairly long answer " * (i + 1), add_special_tokens=False)) for i in range(6))
    fixed = build_requests(tok, dataset_name="sharegpt", dataset_path=str(path), num_prompts=3,
                           sharegpt_output_len=5, shuffle=False)
    assert [r.output_len for r in fixed] == [5, 5, 5] and fixed[0].prompt.startswith("question number 0")
    path.write_text('{"not": "a list"}')
    with pytest.raises(UserError, match="a ShareGPT file is a JSON list"):
        build_requests(tok, dataset_name="sharegpt", dataset_path=str(path), num_prompts=3)


def test_sharegpt_keeps_vllms_length_bounds(tmp_path, tiny):
    """vLLM's ShareGPT filter: a prompt and a reply of 4 tokens or more (the reply's bound only when its length is
    the output length), a prompt of at most 1024 tokens, at most 2048 together; each bound is kept exactly and the
    pair one token past it is skipped (s45's mutation audit: no test was at a bound)."""
    from llmfast.bench.workload import build_requests

    _, tok = tiny

    def text(n, seed):  # a text of exactly n tokens
        got = random_requests(tok, 1, input_len=n, output_len=1, seed=seed)[0]
        assert got.prompt_len == n
        return got.prompt

    pairs = {"kept 4+4": (4, 4), "prompt 3": (3, 10), "reply 3": (10, 3), "kept 1024+1024": (1024, 1024),
             "prompt 1025": (1025, 4), "2049 in all": (1000, 1049), "kept 1000+1048": (1000, 1048)}
    conv = [{"conversations": [{"from": "human", "value": text(a, 2 * i)}, {"from": "gpt", "value": text(b, 2 * i + 1)}]}
            for i, (a, b) in enumerate(pairs.values())]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(conv))
    got = build_requests(tok, dataset_name="sharegpt", dataset_path=str(path), num_prompts=10, shuffle=False)
    assert [(r.prompt_len, r.output_len) for r in got] == [(4, 4), (1024, 1024), (1000, 1048)]
    fixed = build_requests(tok, dataset_name="sharegpt", dataset_path=str(path), num_prompts=10, shuffle=False,
                           sharegpt_output_len=2)  # a fixed output length: the reply's own length does not count
    assert [r.prompt_len for r in fixed] == [4, 10, 1024, 1000, 1000]


def _result(name, engine, ppl, tok1, tok16, linear, logs=None):
    pts = [{"max_concurrency": c, "output_throughput": t, "request_throughput": 1.0, "total_token_throughput": t,
            "median_ttft_ms": 10.0, "median_tpot_ms": 5.0, "p99_e2el_ms": 99.0, "p50_e2el_ms": 50.0,
            "p90_e2el_ms": 90.0, "failed": 0, "status": "ok"} for c, t in ((1, tok1), (16, tok16))]
    return {"name": name, "engine": engine, "points": pts, "peak_rss_gib": 1.0, "notes": [],
            "quality": {"perplexity": {"ppl": ppl}, "tasks": {"dates": {"accuracy": 0.5}}},
            "size": {"linear_weight_bytes": linear, "file_bytes": 2 * linear},
            "lineage": [{"stage": "quantize", "path": f"/r/{name}", "parents": ["/r/merged"]}],
            "training_logs": logs or {}}


def test_report_has_one_row_per_variant_a_pareto_front_and_its_plots(tmp_path):
    from llmfast.bench.report import _pareto, markdown, plots

    assert _pareto([(1, 10), (2, 12), (3, 11), (0.5, 9)]) == [(0.5, 9), (1, 10), (3, 11)]
    results = {"name": "t", "date": "d", "machine": "m", "comparisons": [],
               "workload": {"num_prompts": 4, "input_len": 8, "output_len": 8, "ignore_eos": True,
                            "request_rate": "inf", "max_concurrency": [1, 16], "percentiles": [50, 90]},
               "variants": [_result("merged", "vllm", 20.0, 30.0, 200.0, 100 * 2**20,
                                    {"lora-dates": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]}),
                            _result("int4", "vllm", 21.0, 40.0, 180.0, 25 * 2**20),
                            _result("ternary", "hf", 90.0, 10.0, 60.0, 7 * 2**20)]}
    text = markdown(results)
    summary = text.split("## Variants")[1].split("## Every load level")[0]
    rows = [line for line in summary.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["merged", "int4", "ternary"]
    assert "| quantize of merged | 21.00 | 50% | 40.0 | 180.0 |" in rows[1] and "| 25.0 | 50.0 |" in rows[1]
    paths = {p.name for p in plots(results, tmp_path)}
    assert paths == {"throughput.png", "latency.png", "frontier.png", "accuracy.png", "loss.png"}
    assert all((tmp_path / p).stat().st_size > 1000 for p in paths)
    assert all(f"]({p})" in text for p in paths)


def test_each_load_level_row_and_comparison_shows_its_own_numbers(tmp_path):
    """The "every load level" table puts each number under its own header (TTFT and TPOT medians, E2EL p99 and not
    p90, failures), and the comparison's ratio is vLLM's throughput over transformers' at the same concurrency, with
    the transformers batch it ran (s45's mutation audit: swapped columns and an inverted ratio passed the fast tests)."""
    from llmfast.bench.report import markdown
    from llmfast.bench.runner import Measured, _comparisons

    v = _result("int4", "vllm", 21.0, 40.0, 180.0, 25 * 2**20)
    v["points"][0].update(request_throughput=2.5, total_token_throughput=77.0, median_ttft_ms=12.0, median_tpot_ms=3.0,
                          failed=1, status="failed")
    vllm = Measured(Variant("int4", tmp_path), "vllm", "int4", points=v["points"])
    assert vllm.status == "failed"  # one failed load level fails the variant
    hf = Measured(Variant("int4", tmp_path), "hf", "int4 (transformers baseline)",
                  points=[{"max_concurrency": 1, "output_throughput": 16.0, "batch_size": 1},
                          {"max_concurrency": 16, "output_throughput": 60.0, "batch_size": 4}])
    comparisons = _comparisons(vllm, hf)
    assert [(c["max_concurrency"], c["hf_batch_size"], c["ratio"]) for c in comparisons] == [(1, 1, 2.5), (16, 4, 3.0)]
    results = {"name": "t", "date": "d", "machine": "m", "comparisons": comparisons, "variants": [v],
               "workload": {"num_prompts": 4, "input_len": 8, "output_len": 8, "ignore_eos": True,
                            "request_rate": "inf", "max_concurrency": [1, 16], "percentiles": [50, 90, 99]}}
    text = markdown(results, [])
    levels = text.split("## Every load level")[1].split("## vLLM against transformers")[0]
    assert "| int4 | vllm | 1 | 2.50 | 40.0 | 77.0 | 12.0 | 3.0 | 99.0 | 1 | 1.00 | 21.000 | 50% |" in levels
    assert "|  |  | 16 | 1.00 | 180.0 | 180.0 | 10.0 | 5.0 | 99.0 | 0 |  |  |  |" in levels
    assert "| int4 | 16 | 180.0 | 4 | 60.0 | **3.00x** |" in text.split("## vLLM against transformers")[1]


def test_a_variant_whose_server_never_started_does_not_sink_the_report(tmp_path):
    """A vLLM variant whose server failed to start has no points (bench run notes why and goes on): the report and
    every plot are still written for the variants that ran; the latency plot indexed its last point, an IndexError
    after every other variant had been measured, and the whole output was lost (found by s45's mutation audit)."""
    from llmfast.bench.report import markdown, plot_names, plots

    dead = {**_result("repeat", "vllm", 20.0, 30.0, 200.0, 100 * 2**20), "points": [],  # its quality was measured
            "notes": ["repeat: server failed to start: boom"]}
    results = {"name": "t", "date": "d", "machine": "m", "comparisons": [],
               "variants": [_result("base", "vllm", 20.0, 30.0, 200.0, 100 * 2**20), dead],
               "workload": {"num_prompts": 4, "input_len": 8, "output_len": 8, "ignore_eos": True,
                            "request_rate": "inf", "max_concurrency": [1, 16], "percentiles": [50, 90]}}
    names = sorted(p.name for p in plots(results, tmp_path))
    assert names == sorted(plot_names(results)) and all((tmp_path / n).stat().st_size > 1000 for n in names)
    text = markdown(results, names)
    assert "- repeat: server failed to start: boom" in text and "| repeat | vllm | quantize of merged | 20.00 | 50% | - | - | - |" in text


def test_a_variant_named_baseline_is_a_variant_and_only_written_plots_are_linked(tmp_path):
    """The runner's transformers rows are told apart by their label's suffix, not by "baseline" anywhere in a name
    (a variant the user named `baseline` vanished from the summary and the plots); without quality the report
    links no frontier or accuracy plot, as none is written."""
    from llmfast.bench.report import BASELINE_SUFFIX, markdown, plot_names, plots

    workload = {"num_prompts": 4, "input_len": 8, "output_len": 8, "ignore_eos": True, "request_rate": "inf",
                "max_concurrency": [1, 16], "percentiles": [50, 90]}
    results = {"name": "t", "date": "d", "machine": "m", "comparisons": [], "workload": workload,
               "variants": [_result("baseline", "hf", 20.0, 30.0, 200.0, 100 * 2**20),
                            _result("fp32-baseline", "vllm", 20.0, 31.0, 210.0, 100 * 2**20),
                            _result(f"fp32-baseline{BASELINE_SUFFIX}", "hf", 20.0, 29.0, 190.0, 100 * 2**20)]}
    summary = markdown(results).split("## Variants")[1].split("## Every load level")[0]
    rows = [line for line in summary.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["baseline", "fp32-baseline"]
    for v in results["variants"]:
        v["quality"] = None
    names = {p.name for p in plots(results, tmp_path)}
    assert names == set(plot_names(results)) == {"throughput.png", "latency.png"}
    text = markdown(results, sorted(names))
    assert "(throughput.png)" in text and "frontier.png" not in text and "accuracy.png" not in text


def test_a_one_level_report_names_the_adapter_that_made_a_variant(tmp_path):
    """"made by" names a fine-tune's adapter by its run folder (every adapter is called adapter/), and a sweep of one
    concurrency has one speed column, not the same one twice (s45's mutation audit)."""
    from llmfast.bench.report import markdown

    v = _result("merged", "vllm", 20.0, 30.0, 200.0, 100 * 2**20)
    v["points"] = v["points"][:1]
    v["lineage"] = [{"stage": "merge", "path": "/r/merged", "parents": ["/r/lora-dates/adapter", "/r/base"]}]
    results = {"name": "t", "date": "d", "machine": "m", "comparisons": [], "variants": [v],
               "workload": {"num_prompts": 4, "input_len": 8, "output_len": 8, "ignore_eos": True,
                            "request_rate": "inf", "max_concurrency": [1], "percentiles": [50]}}
    summary = markdown(results, []).split("## Variants")[1].split("## Every load level")[0]
    head, _, row = [line for line in summary.splitlines() if line.startswith("|")]
    assert head.count("out tok/s c=1") == 1 and "c=16" not in head
    assert "| merged | vllm | merge of lora-dates/adapter, base | 20.00 | 50% | 30.0 | 10.0 | 5.0 |" in row


def test_training_curves_come_from_the_runs_that_trained(tmp_path):
    """A fine-tune's train_log.jsonl gives the loss curve from its loss records only (not its evaluations'); an
    artifact's own held-out curve is shown only when it trained (train_tokens): a Deja Vu artifact links its relufy
    source's train_log.jsonl, which is not its curve (s45's mutation audit: neither was tested)."""
    from llmfast.artifacts import write_manifest
    from llmfast.bench.lineage import compression, lineage, training_logs

    run = tmp_path / "lora-dates"
    (run / "adapter").mkdir(parents=True)
    (run / "train_log.jsonl").write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "eval_loss": 1.5}\n'
                                         '{"step": 2, "loss": 1.0}\n')
    merged = tmp_path / "merged"
    merged.mkdir()
    write_manifest(merged, stage="merge", parents=[str(run / "adapter")])
    logs = training_logs(lineage(merged))
    assert logs == {"lora-dates": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]}
    art = tmp_path / "dejavu"
    art.mkdir()
    (art / "train_log.jsonl").write_text('{"step": 0, "tokens": 0, "heldout_kl": 0.5, "heldout_ppl": 9.0}\n')
    write_manifest(art, stage="sparsify", sparsity={"method": "dejavu"}, metrics={})
    assert compression(art)["method"] == "dejavu" and "curve" not in compression(art)
    write_manifest(art, stage="sparsify", sparsity={"method": "relufy"}, metrics={"train_tokens": 512})
    assert compression(art)["curve"] == [{"step": 0, "tokens": 0, "heldout_kl": 0.5, "heldout_ppl": 9.0}]


def test_model_size_counts_linear_tensors_from_headers(tmp_path):
    import json as _json

    from safetensors.torch import save_file
    import torch

    from llmfast.bench.lineage import lineage, model_size

    tensors = {"model.embed_tokens.weight": torch.zeros(10, 4), "model.layers.0.mlp.up_proj.weight": torch.zeros(8, 4),
               "model.layers.0.mlp.up_proj.weight_scale": torch.zeros(1), "model.layers.0.input_layernorm.weight":
               torch.zeros(4), "model.layers.0.self_attn.q_proj.qweight": torch.zeros(2, 4, dtype=torch.int32)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    size = model_size(tmp_path)
    assert size["linear_weight_bytes"] == 8 * 4 * 4 + 4 + 2 * 4 * 4
    assert size["file_bytes"] == (tmp_path / "model.safetensors").stat().st_size
    (tmp_path / "llmfast.json").write_text(_json.dumps({"stage": "quantize", "parents": [str(tmp_path / "nope")]}))
    assert lineage(tmp_path) == [{"stage": "quantize", "path": str(tmp_path), "parents": [str(tmp_path / "nope")]}]


def test_a_sparse_artifact_runs_on_transformers_and_says_why_not_vllm(tmp_path, tiny_dir):
    import json as _json
    import shutil

    from llmfast.bench.engines import ENGINES, resolve_variant
    from llmfast.bench.runner import choose_engine

    art = tmp_path / "teal"
    shutil.copytree(tiny_dir, art)
    (art / "llmfast.json").write_text(_json.dumps({"stage": "sparsify", "parents": [str(tiny_dir)],
                                                   "sparsity": {"method": "teal", "config": {"target": 0.5}}}))
    v = resolve_variant("teal", str(art), None, None)
    assert v.sparsity == "teal" and v.families == ("hf-sparse", "hf")
    assert choose_engine(v, "auto").family == "hf-sparse"  # transformers with the sparse MLP
    assert choose_engine(v, "hf").family == "hf"  # and the dense-with-zeros comparison
    assert "teal weights cannot run on the vllm engine" in ENGINES.get("vllm").can_run(v)
    plain = resolve_variant("plain", str(tiny_dir), None, None)
    assert plain.families[0] == "vllm" and choose_engine(plain, "auto").family == "vllm"
    # MLP biases: the sparse MLP refused them mid-run (a traceback, 0 tok/s); refused up front, auto takes hf
    cfg = _json.loads((art / "config.json").read_text())
    (art / "config.json").write_text(_json.dumps({**cfg, "mlp_bias": True}))
    biased = resolve_variant("teal", str(art), None, None)
    assert "this model has mlp_bias" in ENGINES.get("hf-sparse").can_run(biased)
    assert choose_engine(biased, "auto").family == "hf"


def test_a_request_started_after_a_long_quiet_is_not_a_stall():
    """The stall clock counts from max(a request's start, the last token): a request sent long after the server's
    last token (slow arrivals, a queue just freed) is not cancelled at once as stalled; one that has waited the
    whole limit with no token is (s44's mutation audit)."""
    import asyncio

    from llmfast.bench.loadgen import Progress

    async def go():
        progress = Progress(stall_timeout=5.0)
        progress.last = time.perf_counter() - 100  # no token from the server for 100 s

        async def request(started, seconds):
            progress.inflight[asyncio.current_task()] = started
            try:
                await asyncio.sleep(seconds)
                return "done"
            finally:
                progress.inflight.pop(asyncio.current_task(), None)

        watchdog = asyncio.ensure_future(progress.watch())
        try:
            fresh = asyncio.ensure_future(request(time.perf_counter(), 1.5))
            waited = asyncio.ensure_future(request(time.perf_counter() - 100, 60))
            got = await asyncio.gather(fresh, waited, return_exceptions=True)
        finally:
            watchdog.cancel()
        return got, progress.stalled == {waited}

    (fresh, waited), stalled = asyncio.run(go())
    assert fresh == "done" and isinstance(waited, asyncio.CancelledError) and stalled


@pytest.fixture
def hf_batches(monkeypatch):
    """The batch sizes bench run's transformers engine runs, in order: its process (a pool of one) is a thread here,
    so the real `hf_point` runs and is counted."""
    import concurrent.futures

    import llmfast.bench.runner as runner

    class InProcess(concurrent.futures.ThreadPoolExecutor):
        def __init__(self, max_workers=None, mp_context=None):
            super().__init__(max_workers)

    batches = []
    real = runner.hf_point

    def hf_point(variant, requests, batch_size, *args):
        batches.append(batch_size)
        return real(variant, requests, batch_size, *args)

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", InProcess)
    monkeypatch.setattr(runner, "hf_point", hf_point)
    return batches


@pytest.mark.parametrize("hf_batch_size,expected", [(3, [3]), (None, [2, 6])])
def test_the_transformers_engine_runs_the_workloads_batch_size(hf_batch_size, expected, tiny_dir, tiny, tmp_path,
                                                               hf_batches):
    """`workload.hf_batch_size` fixes the transformers batch size for every concurrency of the sweep (run once,
    shown at each); without it each concurrency is the batch size (s44's mutation audit)."""
    import llmfast.bench.runner as runner
    from llmfast.recipe import BenchRecipe

    recipe = BenchRecipe.model_validate({"variants": [{"name": "plain", "model": str(tiny_dir)}], "workload": {
        "num_prompts": 3, "input_len": 6, "output_len": 4, "max_concurrency": [2, 6], "hf_batch_size": hf_batch_size,
        "percentiles": [50]}})
    m = runner.Measured(Variant("plain", tiny_dir), "hf", "plain")
    reqs = random_requests(tiny[1], 3, input_len=6, output_len=4, seed=0)
    runner._measure_hf(recipe, m, reqs, tmp_path)
    assert hf_batches == expected
    assert [(p["max_concurrency"], p["batch_size"], p["status"]) for p in m.points] == [
        (2, hf_batch_size or 2, "ok"), (6, hf_batch_size or 6, "ok")]


def test_a_variant_with_another_tokenizer_gets_the_prompts_in_its_own_tokens(tmp_path, tiny_dir, tiny):
    """bench run builds its prompts once, with its first variant's tokenizer; a transformers variant of another model
    gets their text in its own tokens, as vLLM's server tokenizes the text it is sent. It got the first tokenizer's ids:
    past its vocabulary an IndexError (a failed point), within it another text (found by s45's audit)."""
    from llmfast.bench import runner
    from llmfast.models import load_tokenizer
    from llmfast.recipe import BenchRecipe
    from llmfast.testing import build_tiny_llama

    first = build_tiny_llama(tmp_path / "vocab2048", vocab_size=2048)
    reqs = random_requests(load_tokenizer(first), 3, input_len=8, output_len=2, seed=0)
    assert max(max(r.prompt_ids) for r in reqs) >= 1024  # beyond the tiny model's vocabulary
    recipe = BenchRecipe.model_validate({
        "variants": [{"name": "first", "model": str(first)}, {"name": "tiny", "model": str(tiny_dir), "engine": "hf"}],
        "workload": {"num_prompts": 3, "input_len": 8, "output_len": 2, "max_concurrency": [3], "percentiles": [50],
                     "ignore_eos": True}})
    m = runner.Measured(Variant("tiny", tiny_dir), "hf", "tiny")
    runner._measure_hf(recipe, m, reqs, tmp_path)  # in a process of its own, as bench run runs it
    (point,) = m.points
    assert point["status"] == "ok" and point["completed"] == 3, point.get("failure_cause")
    own = [tiny[1].encode(r.prompt, add_special_tokens=False) for r in reqs]
    assert point["total_input_tokens"] == sum(map(len, own)) and point["total_output_tokens"] == 6


def test_a_transformers_run_that_fails_is_a_failed_point_with_its_cause(tmp_path, tiny_dir, tiny):
    """The engine's process failing (here: weights cut short after the plan checked them) is a failed point: every
    prompt failed, the cause and its log named in the point and the variant's notes, and the sweep goes on (s45's
    mutation audit: the failure point was untested)."""
    import shutil

    from llmfast.bench import runner
    from llmfast.recipe import BenchRecipe

    broken = Path(shutil.copytree(tiny_dir, tmp_path / "broken"))
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    recipe = BenchRecipe.model_validate({"variants": [{"name": "b", "model": str(tiny_dir)}], "workload": {
        "num_prompts": 3, "input_len": 6, "output_len": 2, "max_concurrency": [1, 3], "percentiles": [50]}})
    m = runner.Measured(Variant("b", broken), "hf", "b")
    runner._measure_hf(recipe, m, random_requests(tiny[1], 3, input_len=6, output_len=2, seed=0), tmp_path)
    assert [(p["max_concurrency"], p["status"], p["failed"], p["completed"]) for p in m.points] == [
        (1, "failed", 3, 0), (3, "failed", 3, 0)] and m.status == "failed"
    causes = [p["failure_cause"] for p in m.points]
    assert all(c.startswith("transformers engine failed: ") and f"(log: {tmp_path / 'hf-b-c'}" in c for c in causes)
    assert m.notes == [f"b c={p['max_concurrency']}: {p['failure_cause']}" for p in m.points]


def test_lineage_is_breadth_first(tmp_path):
    """A merge of two models, each made from another: its lineage lists the merge, its parents, then theirs (newest
    first, level by level), and `depth` cuts the oldest (s44's mutation audit: depth first lost a parent)."""
    from llmfast.artifacts import write_manifest
    from llmfast.bench.lineage import lineage

    made = {"merged": ("merge", ["ft-a", "ft-b"]), "ft-a": ("finetune", ["base-a"]), "ft-b": ("finetune", ["base-b"]),
            "base-a": ("quantize", []), "base-b": ("sparsify", [])}
    for name in made:
        (tmp_path / name).mkdir()
    for name, (stage, parents) in made.items():
        write_manifest(tmp_path / name, stage=stage, parents=[str(tmp_path / p) for p in parents])
    order = ["merged", "ft-a", "ft-b", "base-a", "base-b"]
    expected = [{"stage": made[n][0], "path": str(tmp_path / n), "parents": [str(tmp_path / p) for p in made[n][1]]}
                for n in order]
    assert lineage(tmp_path / "merged", depth=5) == expected
    assert lineage(tmp_path / "merged") == expected[:4]


def test_which_artifacts_were_fitted_to_data(tmp_path):
    """A quantizer used its data when it trained (train_tokens), trained its scales (scale_train_tokens) or tuned its
    rounding over calibration windows (w4 iters > 0), not when it rounded to nearest (iters 0) however many windows it
    was given; every sparsify method does. The report's compression row says so (s44's mutation audit)."""
    from llmfast.artifacts import write_manifest
    from llmfast.bench.lineage import compression
    from llmfast.calibration import used_data

    assert used_data("quantize", {"calibration_windows": 8, "iters": 0}) is False
    assert used_data("quantize", {"calibration_windows": 8, "iters": 5}) is True
    assert used_data("quantize", {"calibration_windows": 0, "iters": 5}) is False
    assert used_data("quantize", {"iters": 5}) is False
    assert used_data("quantize", {}) is False
    assert used_data("quantize", {"train_tokens": 1024}) is True
    assert used_data("quantize", {"scale_train_tokens": 512, "calibration_windows": 8, "iters": 0}) is True
    assert used_data("sparsify", {}) is True
    write_manifest(tmp_path, stage="quantize", quantization={"method": "w4"},
                   metrics={"calibration_windows": 8, "iters": 0})
    assert compression(tmp_path)["data"] is False
    write_manifest(tmp_path, stage="quantize", quantization={"method": "w4"},
                   metrics={"calibration_windows": 8, "iters": 200})
    assert compression(tmp_path)["data"] is True


def test_bench_serve_refuses_lengths_of_0_and_too_many_prompts(fake_server, tmp_path):
    """--output-len 0 and --input-len 0 were taken as 'not given' (the defaults, 128 output tokens, ran with exit 0);
    --sharegpt-output-len 0 became the replies' lengths; --num-prompts 2**63 was numpy's traceback (fuzz pass 10, F2)."""
    srv, url = fake_server()
    share = tmp_path / "sg.json"
    share.write_text(json.dumps([{"conversations": [{"value": "hello there my friend how are you"},
                                                    {"value": "I am fine thank you very much"}]}]))
    cases = {("--output-len", "0"): "--output-len/--random-output-len (0)",
             ("--input-len", "0"): "--input-len/--random-input-len (0)",
             ("--num-prompts", str(2**63 - 1)): f"--num-prompts {2**63 - 1}: at most 1,000,000 random prompts",
             ("--dataset-name", "sharegpt", "--dataset-path", str(share), "--sharegpt-output-len", "0"):
                 "--sharegpt-output-len 0: must be at least 1"}
    for argv, msg in cases.items():
        code, out, err = run_cli("bench", "serve", "--base-url", url, "--random-input-len", "8",
                                 "--random-output-len", "2", "--num-prompts", "2", *argv, "--save-result",
                                 "--result-dir", str(tmp_path / "r"))
        assert code == 2 and len(err.strip().splitlines()) == 1 and msg in err, (argv, err)
    assert srv.seen == [] and not (tmp_path / "r").exists()


def test_a_bench_recipe_of_more_prompts_than_are_made_is_refused_by_key(tmp_path):
    from llmfast.errors import UserError
    from llmfast.recipe import BenchRecipe, validate

    with pytest.raises(UserError, match="workload.num_prompts: Input should be less than or equal to 1000000"):
        validate({"variants": [{"name": "a", "model": "m"}], "workload": {"num_prompts": 2**63}}, BenchRecipe, "b.yaml")


def test_bench_serve_refuses_a_negative_ready_check_timeout(fake_server):
    """--ready-check-timeout-sec -1 was taken as 0 (fuzz pass 10, F2)."""
    srv, url = fake_server()
    code, _, err = run_cli("bench", "serve", "--base-url", url, "--num-prompts", "2", "--random-input-len", "8",
                           "--random-output-len", "2", "--ready-check-timeout-sec", "-1")
    assert code == 2 and "--ready-check-timeout-sec must be 0 or more" in err and len(err.strip().splitlines()) == 1
    assert srv.seen == []


def test_a_bench_recipe_without_percentiles_is_refused_by_key():
    """workload.percentiles: [] ran, with matplotlib's 'No artists with labels' warning and an empty latency plot
    (fuzz pass 10, F2); `bench serve --metric-percentiles ''` was already refused."""
    from llmfast.errors import UserError
    from llmfast.recipe import BenchRecipe, validate

    with pytest.raises(UserError, match="workload.percentiles: an empty list: give at least 1 entry"):
        validate({"variants": [{"name": "a", "model": "m"}], "workload": {"percentiles": []}}, BenchRecipe, "b.yaml")


def test_variants_of_the_same_weights_share_one_transformers_baseline(tmp_path, tiny_dir, tiny, hf_batches):
    """bench run measures the transformers baseline of some weights once, for the first variant of them that has one;
    a later variant reuses that run. Before s48 only the first variant's baseline was remembered: after a variant of
    the same weights without one (its server failed to start), each later variant ran transformers again."""
    import llmfast.bench.runner as runner
    from llmfast.bench.report import BASELINE_SUFFIX
    from llmfast.recipe import BenchRecipe

    names = ("failed", "tp2", "pp2")
    recipe = BenchRecipe.model_validate({"variants": [{"name": n, "model": str(tiny_dir)} for n in names],
                                         "baseline": "all", "workload": {"num_prompts": 2, "input_len": 6,
                                         "output_len": 2, "max_concurrency": [2], "percentiles": [50]}})
    served = {"max_concurrency": 2, "status": "ok", "output_throughput": 10.0}  # what a vLLM server measured
    measured = [runner.Measured(Variant(n, tiny_dir), "vllm", n, points=[] if n == "failed" else [dict(served)])
                for n in names]
    reqs = random_requests(tiny[1], 2, input_len=6, output_len=2, seed=0)
    rows, comparisons = runner._rows(recipe, measured, recipe.variants, measured[1:], reqs, tmp_path)
    assert hf_batches == [2]  # one transformers run
    assert [r.label for r in rows] == ["failed", "tp2", f"tp2{BASELINE_SUFFIX}", "pp2", f"pp2{BASELINE_SUFFIX}"]
    assert rows[4].points == rows[2].points and rows[4].notes == [
        f"the same transformers run as tp2{BASELINE_SUFFIX}'s (the same weights)"]
    assert [c["variant"] for c in comparisons] == ["tp2", "pp2"]


class _KeepAlive(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive as uvicorn does it, made deterministic: a request that arrives on a connection idle
    for `idle_close` seconds or more is the one that crossed the server's close of that connection, and gets no
    answer (the connection closes). Answers are streamed completions of max_tokens 'a' tokens."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def handle(self):
        idle_since = time.monotonic()
        while True:
            self.raw_requestline = self.rfile.readline(65537)
            if not self.raw_requestline:
                return
            if time.monotonic() - idle_since >= self.server.idle_close:
                self.server.dropped += 1
                return
            if not self.parse_request():
                return
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            events = [{"choices": [{"text": "a"}]}] * body["max_tokens"] + [
                {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": body["max_tokens"]}}]
            out = b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
            self.wfile.flush()
            idle_since = time.monotonic()


def test_load_generator_does_not_reuse_a_connection_the_server_may_be_closing():
    """Two requests 3.5 s apart on one connection slot, to a server that closes connections idle for 3 s (vLLM's
    uvicorn: 5 s): the second goes on a new connection and succeeds. With aiohttp's default keep-alive (15 s) it was
    sent on the pooled connection and failed "Server disconnected" (a bench run's base-tp2 point did, in CI)."""
    import asyncio

    from llmfast.bench.loadgen import KEEPALIVE_S, run_load
    from llmfast.bench.workload import Request

    assert KEEPALIVE_S < 3.0
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _KeepAlive)
    srv.daemon_threads, srv.idle_close, srv.dropped = True, 3.0, 0
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        reqs = [Request("hi", 1, 3), Request("hi", 1, 3)]
        # burstiness 1e6: the gamma gap is 1/rate to within a millisecond
        results, duration = asyncio.run(run_load(f"http://127.0.0.1:{srv.server_address[1]}", "m", reqs,
                                                 request_rate=1 / 3.5, burstiness=1e6, max_concurrency=1))
    finally:
        srv.shutdown()
        srv.server_close()
    assert [r.error for r in results] == ["", ""] and [r.output_tokens for r in results] == [3, 3]
    assert duration >= 3.4 and srv.dropped == 0
