"""What a vLLM engine leaves once llmfast has stopped or killed it: none of the shared memory it made (/dev/shm/psm_*,
its MessageQueues), while segments it did not make (the user's, another engine's) stay; no descriptors in a caller's
process that calls `bench offline` again and again; and a server object that was never started leaves no file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from multiprocessing import shared_memory
from pathlib import Path

import pytest

from conftest import REPO

SHM = Path("/dev/shm")

# A stand-in engine for the kill paths: a process group (a leader and a child of it, as vLLM's engine core and its
# worker) where each makes a segment and holds it, and the leader also holds the caller's segment FIRST, made before
# it started, and a spawn context's lock (sem.mp-*, as tqdm's in vLLM's worker). What they made is printed; then they
# wait to be killed.
_ENGINE = """
import os, subprocess, sys, time
from multiprocessing import get_context, resource_tracker, shared_memory
os.setpgid(0, 0)
register, resource_tracker.register = resource_tracker.register, lambda *a: None  # attached: not its to unlink
held = shared_memory.SharedMemory(name=sys.argv[1])  # (vLLM attaches so too)
resource_tracker.register = register
own = shared_memory.SharedMemory(create=True, size=4096)
child = subprocess.Popen([sys.executable, "-c", "from multiprocessing import shared_memory; import time; "
                          "s = shared_memory.SharedMemory(create=True, size=4096); print(s.name, flush=True); "
                          "time.sleep(300)"], stdout=subprocess.PIPE, text=True)
lock = get_context("spawn").Lock()  # glibc names it "sem.XXXXXX (deleted)" in this process's maps
print(own.name, child.stdout.readline().strip(), "sem." + lock._semlock.name.lstrip("/"), flush=True)
time.sleep(300)
"""


def _segment(name: str) -> Path:
    return SHM / name.lstrip("/")


def _stand_in_engine(first: str) -> tuple[subprocess.Popen, list[str]]:
    engine = subprocess.Popen([sys.executable, "-c", _ENGINE, first], stdout=subprocess.PIPE, text=True)
    made = engine.stdout.readline().split()  # type: ignore[union-attr]
    assert len(made) == 3 and all(_segment(m).exists() for m in made), made
    return engine, made


@pytest.fixture
def users_segment():
    """A segment of the user's own, made (its ctime set) a second before an engine starts."""
    seg = shared_memory.SharedMemory(create=True, size=4096)
    time.sleep(1)  # engine_segments keeps segments older than the engine's first process, read to a clock tick
    yield seg
    seg.close()
    seg.unlink()


def test_a_killed_engine_groups_segments_go_and_no_others(users_segment):
    """`kill_engine_groups` (Ctrl-C during `bench offline --engine vllm`) SIGKILLed the engine's group, taking its
    resource tracker with it: what its processes made stayed in /dev/shm for good. Now those go, a semaphore too
    (its maker maps it under the temporary name sem_open gave it); the segment the engine held but did not make,
    and one another engine made meanwhile (not held by this one), stay."""
    from llmfast.scratch import kill_engine_groups

    engine, made = _stand_in_engine(users_segment.name)
    other = shared_memory.SharedMemory(create=True, size=4096)  # another engine's, made while this one runs
    try:
        dropped = kill_engine_groups([engine.pid])
        engine.wait(10)
        assert not any(_segment(m).exists() for m in made), made
        assert sorted(dropped) == sorted(str(_segment(m)) for m in made)
        assert _segment(users_segment.name).exists() and _segment(other.name).exists()
    finally:
        other.close()
        other.unlink()
        for m in made:
            _segment(m).unlink(missing_ok=True)
        _reap(engine)


def _reap(engine: subprocess.Popen) -> None:
    if engine.poll() is None:
        os.killpg(engine.pid, signal.SIGKILL)
        engine.wait(10)
    engine.stdout.close()  # type: ignore[union-attr]


def _hold_a_segment(ready, stop) -> None:  # a caller's own child process: makes a segment and keeps it
    seg = shared_memory.SharedMemory(create=True, size=4096)
    ready.put(seg.name)
    stop.wait(60)
    seg.close()
    seg.unlink()


def test_in_process_bench_offline_takes_only_vllms_engine_cores_for_its_own():
    """bench offline in a caller's process stops its engine and unlinks the shared memory the engine made; it took
    every child started while it ran for the engine's, so a caller's own child started meanwhile from another thread
    (a ProcessPoolExecutor's worker) had its segments unlinked under it and was waited for. vLLM names the
    processes it creates for its engine cores; those alone are the engine's."""
    import multiprocessing

    from llmfast.bench.engines.vllm_offline import _engine_processes

    ctx = multiprocessing.get_context("spawn")
    others = {p.pid for p in multiprocessing.active_children()}
    ready, stop = ctx.Queue(), ctx.Event()
    users = ctx.Process(target=_hold_a_segment, args=(ready, stop))
    engine = ctx.Process(target=time.sleep, args=(60,), name="EngineCore")  # as vLLM names it
    users.start()
    engine.start()
    try:
        ready.get(timeout=60)  # the caller's child is up, its segment made
        assert [p.pid for p in _engine_processes(others)] == [engine.pid]
    finally:
        stop.set()
        engine.kill()
        users.join(30)
        engine.join(30)


def test_stopping_a_server_unlinks_what_its_processes_made(tmp_path, tiny_dir, users_segment):
    """`VllmServer.stop` ends with SIGKILL of the server's group (its leader killed for memory, or deaf to SIGINT),
    the resource tracker in it too: vLLM's psm_* segments stayed. A stand-in group here (a real start: the slow test
    below)."""
    from llmfast.serve.server import ServerSpec, VllmServer

    srv = VllmServer(ServerSpec(model=tiny_dir, port=0), log_path=tmp_path / "log")
    srv.proc, made = _stand_in_engine(users_segment.name)
    try:
        os.kill(srv.proc.pid, signal.SIGKILL)  # the leader dies first; its child is left, as vLLM's engine is
        srv.proc.wait(10)
        srv.stop()
        assert not _segment(made[1]).exists()  # the child's: the leader, killed before the stop, held it no more
        assert _segment(users_segment.name).exists()
    finally:
        for m in made:
            _segment(m).unlink(missing_ok=True)
        srv.proc.stdout.close()  # type: ignore[union-attr]


def test_a_server_never_started_leaves_no_log_and_the_callers_spec_as_it_was(tmp_path, tiny_dir, monkeypatch):
    """VllmServer made its temporary log file as it was created, so one never started (a spec refused later, a
    library user's object) left an empty vllm-server-*.log in $TMPDIR; and `port=0` was replaced in the caller's
    spec, so a second server made from that spec took the first one's port (in use: refused)."""
    import socket
    import tempfile

    from llmfast.errors import UserError
    from llmfast.serve.server import ServerSpec, VllmServer

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    spec = ServerSpec(model=tiny_dir, port=0)
    first = VllmServer(spec)
    assert spec.port == 0 and first.spec.port > 0 and first.spec is not spec
    assert first.log_path.parent == tmp_path and first.log_path.name.startswith("vllm-server-")
    assert list(tmp_path.iterdir()) == []  # not started: no log
    second = VllmServer(spec)
    assert second.spec.port > 0
    with socket.socket() as busy:  # a start refused for its port leaves nothing either
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = VllmServer(ServerSpec(model=tiny_dir, port=busy.getsockname()[1]))
        with pytest.raises(UserError, match="in use"):
            taken.start()
    assert list(tmp_path.iterdir()) == []


def _shm_held(pids) -> dict[int, str]:
    """{inode: name} of the /dev/shm files these processes map or hold open (read here, not by llmfast's code): by
    inode, as a semaphore's maker maps it under sem_open's temporary name."""
    inodes = set()
    for pid in pids:
        try:
            inodes.update(int(f[4]) for f in (line.split(maxsplit=5) for line in open(f"/proc/{pid}/maps"))
                          if len(f) == 6 and f[5].startswith("/dev/shm/"))
            inodes.update(os.stat(f"/proc/{pid}/fd/{fd}").st_ino for fd in os.listdir(f"/proc/{pid}/fd")
                          if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/dev/shm/"))
        except OSError:
            pass
    return {e.inode(): e.name for e in os.scandir(SHM) if e.inode() in inodes}


def _group(pgid: int) -> list[str]:
    return [pid for pid in filter(str.isdigit, os.listdir("/proc"))
            if _stat_pgid(pid) == str(pgid)]


def _stat_pgid(pid: str) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2]
    except OSError:
        return None


@pytest.mark.slow
def test_a_real_server_killed_under_llmfast_leaves_no_shared_memory(tmp_path, tiny_dir, users_segment):
    """A real vLLM server whose API process was SIGKILLed (as the OOM killer does) and which llmfast then stopped:
    its engine core's and worker's MessageQueue segments (psm_*) stayed in /dev/shm (93 MB of them after a day of
    tests here), and its worker's tqdm lock (sem.mp-*, the group's resource tracker killed with it); now they go,
    and the user's segment stays."""
    pytest.importorskip("vllm")
    from llmfast.serve.server import ServerSpec, VllmServer

    srv = VllmServer(ServerSpec(model=tiny_dir, port=0), log_path=tmp_path / "log")
    with srv:
        held = _shm_held(_group(srv.proc.pid)).values()  # type: ignore[union-attr]
        assert {n[:4] for n in held} >= {"psm_", "sem."}, f"{held}: vLLM's engine holds none of these to check"
        os.kill(srv.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
        srv.proc.wait(10)  # type: ignore[union-attr]
    assert [n for n in held if _segment(n).exists()] == []
    assert _segment(users_segment.name).exists()


_OFFLINE_TWICE = """
import json, os, sys, threading, time
from llmfast.cli import main

def fds():
    return sorted(os.listdir("/proc/self/fd"))

def processes():  # {{parent: [(pid, state)]}} of every process, from /proc/PID/stat
    found = {{}}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            state, parent = open(f"/proc/{{pid}}/stat").read().rsplit(")", 1)[1].split()[:2]
        except OSError:  # ended while looked at
            continue
        found.setdefault(parent, []).append((pid, state))
    return found

def ours():  # the processes this script started (vLLM's engine core and its worker), however deep
    tree, found, todo = processes(), [], [str(os.getpid())]
    while todo:
        kids = [pid for pid, _ in tree.get(todo.pop(), [])]
        found += kids
        todo += kids
    return found

held, done = {{}}, threading.Event()
def watch():  # what the engine's processes map or hold in /dev/shm while they run, by inode (read as the test does)
    while not done.wait(0.5):
        held.update({shm_held}(ours()))
{shm_src}
watcher = threading.Thread(target=watch, name="watch", daemon=True)
watcher.start()
def alive():  # this script's children that have not exited (a zombie waits to be reaped), by command line
    found = set()
    for pid, state in processes().get(str(os.getpid()), []):
        if state != "Z":
            try:
                found.add(open(f"/proc/{{pid}}/cmdline").read().replace("\\0", " ").strip())
            except OSError:  # ended while looked at
                pass
    return found

environ, threads, children = dict(os.environ), {{t.name for t in threading.enumerate()}}, alive()
args = ["bench", "offline", {model!r}, "--num-prompts", "2", "--random-input-len", "8", "--random-output-len", "4"]
codes = [main(args)]
after_one = fds()  # what a first call opens for good (imports, vLLM's zmq context)
for _ in range(30):  # a stopped engine's process takes a moment to exit (its command line is empty meanwhile)
    engine = sorted(c for c in alive() - children if "resource_tracker" not in c)  # multiprocessing's own
    if not engine:
        break
    time.sleep(0.5)
first = {{"engine": engine, "threads": sorted({{t.name for t in threading.enumerate()}} - threads - {{"watch"}}),
         "environ": sorted(k for k in set(os.environ) | set(environ) if os.environ.get(k) != environ.get(k))}}
codes.append(main(args))
done.set()
watcher.join()
left = sorted(e.name for e in os.scandir("/dev/shm") if held.get(e.inode()) == e.name)
print("RESULT " + json.dumps({{"codes": codes, "grown": sorted(set(fds()) - set(after_one)), "shm": left,
                              "held": sorted(set(held.values())), "first": first}}))
"""


@pytest.mark.slow
def test_bench_offline_called_in_process_again_and_again_leaves_no_descriptors_or_shared_memory():
    """A script calling main(["bench", "offline", ...]) 20 times: each call left two pipe descriptors open (the
    sentinel of vLLM's engine core process, never closed) and vLLM's psm_* segments in /dev/shm until the script
    ended (its engine killed after a 5 s wait for a worker that never exits), and its worker's tqdm lock (sem.mp-*).
    Here the second call adds no descriptor, and nothing the engine held in /dev/shm is left while the script runs.
    And after the first call (s55, library use): vLLM's LLM stopped its engine only once collected, which its
    reference cycles put off, so a call from a script or a notebook returned with vLLM's EngineCore still running
    (its KV cache held), the client's threads open, and os.environ holding what vLLM and the machine defaults set for
    the engine's processes (LD_PRELOAD of torch's libgomp among them), passed on to whatever the caller ran next.
    The script is a process of its own: vLLM imported into a test worker would stay there for the files after."""
    pytest.importorskip("vllm")
    import inspect

    from llmfast.testing import build_tiny_llama

    model = build_tiny_llama(Path(os.environ.get("TMPDIR", "/tmp")) / f"lf-twice-{os.getpid()}")
    code = _OFFLINE_TWICE.format(model=str(model), shm_held=_shm_held.__name__,
                                 shm_src=inspect.getsource(_shm_held).replace("SHM", '"/dev/shm"'))
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, cwd=REPO)
    finally:
        import shutil

        shutil.rmtree(model, ignore_errors=True)
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-3000:]
    r = json.loads(lines[-1][len("RESULT "):])
    assert r["codes"] == [0, 0] and r["grown"] == [] and r["shm"] == [], r
    assert "Output token throughput" in p.stdout  # the table, printed by each call
    first = r["first"]
    assert first["engine"] == [] and set(first["threads"]) <= {"tqdm_monitor"} and first["environ"] == [], first
    assert {n[:4] for n in r["held"]} >= {"psm_", "sem."}, r  # what there was to leave
    assert "Traceback" not in p.stderr and "resource_tracker" not in p.stderr, p.stderr[-3000:]
