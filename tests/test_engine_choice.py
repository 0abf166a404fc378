"""Bench engines are chosen by their registered names (`bench offline --engine`, a bench recipe's `engine:`), the
sparsifiers `sparsify --help` lists come from their registry, and vLLM's offline engine stops with llmfast: on
Ctrl-C while it starts, and when llmfast is SIGKILLed, in a $TMPDIR of its own however it is called."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO
from test_extension_docs import llmfast, one_line, with_example


def test_engine_words_come_from_the_registry():
    """`vllm` is the server's name and lends its word to the in-process vLLM engine on bench offline, which bench
    run refuses (it measures vLLM served)."""
    from llmfast.bench.engine_names import offline_engine, offline_words, run_engine_word, run_words
    from llmfast.bench.engines import ENGINES
    from llmfast.errors import UserError

    assert offline_words() == ["hf", "hf-sparse", "vllm"]
    assert offline_engine("vllm") == offline_engine("vllm-offline") == ("vllm", ENGINES.get("vllm-offline"))
    assert offline_engine("hf-sparse") == ("hf-sparse", ENGINES.get("hf-sparse"))
    assert run_words() == ["auto", "hf", "hf-sparse", "vllm"]
    with pytest.raises(UserError, match=r"^--engine vlm: unknown engine \(did you mean 'vllm'\?\); choose from hf, "):
        offline_engine("vlm")
    with pytest.raises(ValueError, match="for `llmfast bench offline` only"):
        run_engine_word("vllm-offline")


def test_listing_engines_and_methods_imports_no_heavy_library():
    """Every command line builds the whole parser: the engines' names cost no vLLM or torch import, and the
    sparsifiers (pydantic schemas) are imported only when `sparsify --help` is shown."""
    code = ("import sys; from llmfast.cli import build_parser; build_parser(); "
            "print([m for m in ('vllm', 'torch', 'transformers', 'llmfast.sparse') if m in sys.modules])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.stdout.strip() == "[]", p.stderr[-2000:]


def test_an_engine_registered_as_the_docs_say_is_chosen_by_its_name(tmp_path, tiny_dir):
    """docs/bench.md's hf-serial, added as one file: bench offline and a bench recipe take it by name (bench run
    measured `hf` in its place: the runner looked engines up by family), misspelt it is one line."""
    root = with_example("bench", tmp_path / "pkg")
    assert "hf-serial" in llmfast(root, "bench", "offline", "--help").stdout
    out = tmp_path / "offline.json"
    p = llmfast(root, "bench", "offline", str(tiny_dir), "--engine", "hf-serial", "--num-prompts", "2",
                "--random-input-len", "8", "--random-output-len", "3", "--ignore-eos", "--output", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["engine"] == "hf-serial" and r["completed"] == 2 and r["total_output_tokens"] == 6
    assert "Offline (hf-serial) Benchmark Result" in p.stdout
    one_line(llmfast(root, "bench", "offline", str(tiny_dir), "--engine", "hf-seral"), "did you mean 'hf-serial'?")

    recipe = tmp_path / "bench.yaml"
    recipe.write_text(f"variants:\n  - name: serial\n    model: {tiny_dir}\n    engine: hf-serial\n"
                      "workload: {num_prompts: 2, input_len: 8, output_len: 3, max_concurrency: [2]}\n"
                      f"baseline: none\noutput: {tmp_path / 'report'}\n")
    p = llmfast(root, "bench", "run", str(recipe))
    assert p.returncode == 0, p.stderr[-3000:]
    (variant,) = json.loads((tmp_path / "report" / "results.json").read_text())["variants"]
    assert variant["engine"] == "hf-serial" and variant["points"][0]["completed"] == 2
    assert "| serial | hf-serial |" in (tmp_path / "report" / "report.md").read_text()
    typo = tmp_path / "typo.yaml"
    typo.write_text(recipe.read_text().replace("engine: hf-serial", "engine: hf-seriel"))
    one_line(llmfast(root, "bench", "run", str(typo)),
             f"{typo}:4: variants.0.engine: unknown bench engine (did you mean 'hf-serial'?); choose from auto, hf, "
             "hf-serial, hf-sparse, vllm (got 'hf-seriel')")
    one_line(llmfast(root, "bench", "run", str(recipe), "--set", "variants.0.engine=vllm-offline"),
             "an engine in this process, for `llmfast bench offline` only")


def test_sparsify_help_lists_a_method_registered_as_the_docs_say(tmp_path):
    root = with_example("sparsify", tmp_path / "pkg")
    text = " ".join(llmfast(root, "sparsify", "--help").stdout.split())
    assert "teal_down (Liu et al. 2024, Training-Free Activation Sparsity" in text
    assert "relufy (Mirzadeh et al. 2023" in text and "it trains: --resume continues it" in text


# ---------------------------------------------------------------- vLLM's engine starting (one start each, cut short)
def _session(sid: int) -> list[tuple[int, int, str]]:
    """(pid, process group, command) of every process in session `sid`."""
    out = subprocess.run(["ps", "-eo", "pid=,pgid=,sid=,args="], capture_output=True, text=True).stdout
    return [(int(f[0]), int(f[1]), " ".join(f[3:])) for f in (line.split() for line in out.splitlines())
            if len(f) > 3 and int(f[2]) == sid]


def _wait_for(what: str, sid: int, timeout: float = 300.0) -> int:
    """The pid of the first process in session `sid` whose command holds `what` (vLLM's titles: VLLM::EngineCore)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := [pid for pid, _, cmd in _session(sid) if what in cmd]:
            return found[0]
        time.sleep(0.5)
    pytest.fail(f"no {what} in {_session(sid)} after {timeout} s")


def _gone(sid: int, timeout: float = 30.0) -> list[tuple[int, int, str]]:
    deadline = time.monotonic() + timeout
    while (left := _session(sid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _start(args: list[str], tmpdir: Path) -> subprocess.Popen:
    """A session of its own (what it leaves is found by it), SIGINT handled as in a terminal's foreground job, and a
    $TMPDIR of its own (short: vLLM's socket paths must fit below it)."""
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(REPO)}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _tmpdir_of(pid: int) -> str:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next(v.decode()[7:] for v in env if v.startswith(b"TMPDIR="))


@pytest.mark.slow
def test_ctrl_c_while_vllm_starts_ends_bench_offline(tiny_dir):
    """vLLM waits for its engine core in a poll that lost the KeyboardInterrupt: Ctrl-C did nothing until the engine
    was up (minutes for a large model). Now the engine's processes are killed, and llmfast says it was interrupted;
    nothing is left: no process, no scratch folder, no log."""
    tmpdir = Path(tempfile.mkdtemp(prefix="llmfast-t", dir="/tmp"))
    proc = _start([sys.executable, "-m", "llmfast", "bench", "offline", str(tiny_dir), "--engine", "vllm",
                   "--num-prompts", "2", "--random-input-len", "8", "--random-output-len", "3"], tmpdir)
    try:
        core = _wait_for("VLLM::EngineCore", proc.pid)  # its title, set as it starts building the engine
        time.sleep(2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and err.strip().splitlines()[-1] == "llmfast: interrupted", err[-3000:]
        assert out == ""
        assert _gone(proc.pid) == [], "the engine's processes went with it"
        assert not os.path.exists(f"/proc/{core}")
        assert list(tmpdir.iterdir()) == [], "its scratch $TMPDIR and its log were removed"
    finally:
        for pid, _, _ in _session(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.wait()
        subprocess.run(["rm", "-rf", str(tmpdir)])


@pytest.mark.slow
def test_the_offline_engine_called_from_python_uses_a_scratch_tmpdir_and_dies_with_its_caller(tiny_dir):
    """`ENGINES.get("vllm-offline").generate(...)` itself (a user's script, any verb) gives vLLM a scratch $TMPDIR,
    which bench offline alone did; and SIGKILLed, the process that called it left vLLM's engine core and its worker
    running, orphaned, for good."""
    code = (f"from llmfast.bench.engines import ENGINES, resolve_variant\n"
            f"from llmfast.bench.workload import Request\n"
            f"v = resolve_variant('tiny', {str(tiny_dir)!r}, None, None)\n"
            f"ENGINES.get('vllm-offline').generate(v, [Request('a b', 3, 4, [5, 6, 7])], dtype='float32', "
            f"batch_size=1, ignore_eos=True)\n")
    tmpdir = Path(tempfile.mkdtemp(prefix="llmfast-t", dir="/tmp"))
    proc = _start([sys.executable, "-c", code], tmpdir)
    try:
        core = _wait_for("VLLM::EngineCore", proc.pid)
        scratch = Path(_tmpdir_of(core))
        assert scratch.parent == tmpdir and scratch.name.startswith("llmfast-vllm-")
        _wait_for("VLLM::Worker", proc.pid)  # the engine core's own child: it must go too
        proc.kill()
        proc.wait()
        assert _gone(proc.pid) == [], "vLLM's processes died with the process that started them"
    finally:
        for pid, _, _ in _session(proc.pid):
            os.kill(pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", str(tmpdir)])


def test_a_scratch_tmpdir_keeps_torchs_precompiled_header(monkeypatch):
    """torch writes its precompiled header (150 MB, g++ for up to a minute as vLLM starts) to
    $TMPDIR/torchinductor_USER whatever TORCHINDUCTOR_CACHE_DIR says: under a scratch $TMPDIR every vLLM start made
    it again, and dropped it. The engine's processes find the real folder there."""
    from llmfast.scratch import _inductor_default, scratch_tmpdir

    short = Path(tempfile.mkdtemp(prefix="llmfast-t", dir="/tmp"))
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(short))
        monkeypatch.setenv("TMPDIR", str(short))
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        real = Path(_inductor_default())
        (real / "precompiled_headers").mkdir(parents=True)  # torch made it at an earlier start
        code = "import os; from torch._inductor.codecache import _HEADER_DIR; print(os.path.realpath(_HEADER_DIR))"
        with scratch_tmpdir():
            assert Path(tempfile.gettempdir()).parent == short
            got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert got.strip() == str(real / "precompiled_headers")
        assert sorted(p.name for p in short.iterdir()) == [real.name], "the scratch folder went, the header stays"
    finally:
        subprocess.run(["rm", "-rf", str(short)])
