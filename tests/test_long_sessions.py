"""Long sessions: what one chain stage, bench variant or served model takes is given back, and figures measured
for one are its own, not an earlier one's."""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import pytest
import yaml

from llmfast.cli import main
from llmfast.testing import build_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("long") / "base")


def _rss_gib() -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 2**20


def _merge_chain(tmp_path: Path, model: Path) -> None:
    """`llmfast run` in this process of a one-stage chain (m: a linear merge of `model` with itself) into tmp/run."""
    merge = {"merge_method": "linear", "models": [{"model": str(model), "parameters": {"weight": 1.0}},
                                                  {"model": str(model), "parameters": {"weight": 1.0}}]}
    recipe = tmp_path / "chain.yaml"
    recipe.write_text(yaml.safe_dump({"output": str(tmp_path / "run"), "stages": {"m": {"type": "merge",
                                                                                        "with": merge}}}))
    assert main(["run", str(recipe)]) == 0


def test_a_chain_stages_peak_memory_is_its_own_not_an_earlier_ones(tiny: Path, tmp_path: Path) -> None:
    """Stages run in the chain's process: a merge stage after something held 1.5 GiB (an earlier stage, here a
    mapping touched and dropped) reported the process's peak, 1.5 GiB above anything the merge of a tiny model
    needs. Reference: the process's RSS as the chain starts, plus the merge's own few MiB."""
    ballast = mmap.mmap(-1, 1536 * 2**20)
    for i in range(0, len(ballast), mmap.PAGESIZE):  # touched: resident, the high-water mark goes up by 1.5 GiB
        ballast[i] = 1
    ballast.close()  # unmapped: RSS back down
    start = _rss_gib()
    _merge_chain(tmp_path, tiny)
    peak = json.loads((tmp_path / "run" / "m" / "llmfast.json").read_text())["metrics"]["peak_rss_gib"]
    assert start - 0.05 <= peak < start + 0.5, (peak, start)


def _alive(pid: int) -> bool:
    """Running, not a zombie (a killed child of ours stays one until reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_stopping_a_server_whose_leader_died_ends_the_engine_processes_it_left(tmp_path: Path, tiny: Path) -> None:
    """A vLLM API server killed mid-run (the OOM killer, a crash) leaves its EngineCore and worker processes
    running in its process group (seen with vLLM on this machine: EngineCore and Worker still there 15 s after the
    leader's SIGKILL); `stop()` returned at once for a dead leader, so they held their memory and cores while bench
    run measured the next variants. The group stands in for vLLM's (a real start takes a minute or two here): a
    leader, killed, and its child."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from llmfast.serve.server import ServerSpec, VllmServer

    leader = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
              "time.sleep(300)']); print(p.pid, flush=True); time.sleep(300)")
    srv = VllmServer(ServerSpec(model=tiny, port=0), log_path=tmp_path / "log")
    srv.proc = subprocess.Popen([sys.executable, "-c", leader], stdout=subprocess.PIPE, start_new_session=True)
    engine = int(srv.proc.stdout.readline())  # type: ignore[union-attr]
    try:
        os.kill(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait(10)
        assert _alive(engine)  # what the dead leader left
        srv.stop()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(engine):
            time.sleep(0.1)
        assert not _alive(engine), "the engine process outlived stop()"
        srv.stop()  # a second stop (a `with` block's after an explicit one) does nothing
    finally:
        srv.proc.stdout.close()  # type: ignore[union-attr]
        if _alive(engine):
            os.kill(engine, signal.SIGKILL)


@pytest.mark.parametrize("how", ["chain", "verb"])
def test_the_heap_a_merge_stage_keeps_is_given_back_for_the_stages_after_it(tmp_path: Path, how: str) -> None:
    """`merge` makes glibc keep every freed block for reuse (no unmapping below 1 GiB, no trim below 2 GiB), which
    is right while it merges; a chain's merge stage left it so for the stages after it in the same process: the
    merge's peak heap stayed resident (166 against 62 MiB after merging the built-in 135M model), and so did whatever
    a later stage freed. So did a script's own `main(["merge", ...])` for the rest of the script. Here: a 256 MiB
    block freed after the chain (or the verb) must leave RSS."""
    if not __import__("llmfast.memory", fromlist=["_libc"])._libc():
        pytest.skip("glibc's malloc only")
    # a tiny model with a real model's vocabulary: its embedding (78 MB) is over what makes merge keep its heap
    big = build_tiny_llama(tmp_path / "big", model_vocab_size=151_936)
    if how == "chain":
        _merge_chain(tmp_path, big)
    else:
        config = tmp_path / "merge.yaml"
        config.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
            {"model": str(big), "parameters": {"weight": 1.0}}, {"model": str(big), "parameters": {"weight": 1.0}}]}))
        assert main(["merge", str(config), str(tmp_path / "merged")]) == 0
    import ctypes

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 256 * 2**20
    before = _rss_gib()
    block = libc.malloc(size)
    assert block
    ctypes.memset(block, 1, size)  # touched: resident
    assert _rss_gib() - before > 0.2
    libc.free(block)
    assert _rss_gib() - before < 0.1  # given back to the system, as glibc does by default with a block this large
