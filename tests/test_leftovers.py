"""What llmfast, and its own test sessions, leave on disk: nothing in $TMPDIR once they end, and a user's folders
never removed."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli

REPO = Path(__file__).resolve().parent.parent
PROBE = "LLMFAST_TEST_SESSION_PROBE"  # set only by the tests below, for the session they start


def test_session_folders_probe():
    """Run only inside a session started by the tests below: records the folders the session was given."""
    if not os.environ.get(PROBE):
        pytest.skip("only inside the sessions the tests of conftest's clean-up start")
    Path(os.environ[PROBE]).write_text(json.dumps({v: os.environ.get(v) for v in
                                                   ("LLMFAST_CACHE", "TORCHINDUCTOR_CACHE_DIR")}))


def _session(tmp_path: Path, *args: str, **env: str) -> tuple[dict[str, str], Path]:
    """Start a test session of the probe above with an empty $TMPDIR; return what it recorded and that $TMPDIR."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    record = tmp_path / "record.json"
    base = {k: v for k, v in os.environ.items()
            if k not in ("LLMFAST_CACHE", "TORCHINDUCTOR_CACHE_DIR", "LLMFAST_TEST_REUSE_CACHE")
            and not k.startswith(("PYTEST_", "XDIST_"))}
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args,
                        f"{Path(__file__).relative_to(REPO)}::test_session_folders_probe"],
                       cwd=REPO, env={**base, "TMPDIR": str(tmp), PROBE: str(record), "PYTHONPATH": str(REPO),
                                      **env}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "1 passed" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    return json.loads(record.read_text()), tmp


def test_a_session_removes_the_folders_it_made(tmp_path):
    """The session's own model cache and torch.compile cache (each session made them in /tmp and left them: 12 GB
    there after a day of runs) are gone when it ends."""
    seen, tmp = _session(tmp_path)
    for variable in ("LLMFAST_CACHE", "TORCHINDUCTOR_CACHE_DIR"):
        assert Path(seen[variable]).parent == tmp, seen  # made for the session, in $TMPDIR
    assert list(tmp.iterdir()) == []


def test_a_session_keeps_the_folders_it_was_given(tmp_path):
    """A cache the user gave (LLMFAST_TEST_REUSE_CACHE=1 keeps $LLMFAST_CACHE) and a kernel cache they set stay."""
    cache, inductor = tmp_path / "cache", tmp_path / "inductor"
    for folder in (cache, inductor):
        folder.mkdir()
        (folder / "kept").write_text("x")
    seen, tmp = _session(tmp_path, LLMFAST_TEST_REUSE_CACHE="1", LLMFAST_CACHE=str(cache),
                         TORCHINDUCTOR_CACHE_DIR=str(inductor))
    assert seen == {"LLMFAST_CACHE": str(cache), "TORCHINDUCTOR_CACHE_DIR": str(inductor)}
    assert (cache / "kept").is_file() and (inductor / "kept").is_file() and list(tmp.iterdir()) == []


@pytest.mark.slow
def test_a_session_with_workers_removes_the_folders_it_made(tmp_path, builtin_dir):
    """Under pytest-xdist (`make test`) the controller makes the session's folders and the workers use them: each
    worker made a kernel cache of its own too (never used) and nothing removed any of them."""
    from llmfast.cache import cache_dir

    # the built-in model converted already (builtin_dir), in this session's cache: the controller converts nothing
    seen, tmp = _session(tmp_path, "-n", "2", LLMFAST_TEST_REUSE_CACHE="1", LLMFAST_CACHE=str(cache_dir()))
    assert Path(seen["TORCHINDUCTOR_CACHE_DIR"]).parent == tmp, seen
    assert [p.name for p in tmp.iterdir() if not p.name.startswith("pytest-of-")] == []  # pytest's: it keeps 3


@pytest.fixture
def short_tmp():
    """A folder with a short path (vLLM's socket paths below a scratch folder in it must fit in 107 bytes)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="lf-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_scratch_folder_goes_once_no_process_holds_it(short_tmp, monkeypatch):
    """An engine's $TMPDIR left by a killed run is removed by the next run, but only once the engine's own processes
    (which hold its lock) are gone: an orphaned server keeps its sockets."""
    import tempfile

    from llmfast.scratch import make_scratch, reap_scratch

    monkeypatch.setattr(tempfile, "tempdir", str(short_tmp))
    path, fd = make_scratch()
    (path / "socket-like").write_text("")
    engine = subprocess.Popen(["sleep", "60"], pass_fds=(fd,))
    try:
        os.close(fd)  # the run that made it is gone (SIGKILL: it removed nothing); its engine is not
        assert reap_scratch() == [] and path.is_dir()
    finally:
        engine.kill()
        engine.wait()
    assert reap_scratch() == [path] and not path.exists()


def test_shared_memory_noted_in_a_scratch_folder_goes_with_it_after_a_kill_of_the_whole_group(short_tmp,
                                                                                               monkeypatch):
    """An engine group SIGKILLed whole (the OOM killer, `kill -9 -PGID`) holds nothing any more to read its shared
    memory from: its segments (420 MB of vLLM's after each test run) stayed for good. Noted in its scratch folder
    while it runs, they go when the folder does: at the next run's reap, or at its own stop. Another process's
    segment, and a noted name that is now another file, stay."""
    import tempfile
    import uuid

    from llmfast.scratch import SEGMENTS, drop_scratch, make_scratch, note_segments, reap_scratch

    monkeypatch.setattr(tempfile, "tempdir", str(short_tmp))
    tag = uuid.uuid4().hex[:8]
    # a segment as shm_open makes one (a file in /dev/shm), held open by the process that made it
    make = "import sys, time; f = open(sys.argv[1], 'wb'); print(1, flush=True); time.sleep(60)"
    ours, other = f"/dev/shm/lf-engine-{tag}", f"/dev/shm/lf-other-{tag}"
    Path(other).write_bytes(b"")
    engines = []
    try:
        for stop in (False, True):
            made = make_scratch()
            engine = subprocess.Popen([sys.executable, "-c", make, ours + str(stop)],
                                      stdout=subprocess.PIPE, text=True)
            engines.append(engine)
            assert engine.stdout.readline() == "1\n"
            note_segments(made, [engine.pid])
            noted = json.loads((made[0] / SEGMENTS).read_text())
            assert list(noted) == [ours + str(stop)], noted
            engine.kill()
            engine.wait()
            if stop:  # its own stop: the folder and what is noted in it
                drop_scratch(*made)
            else:  # killed with its llmfast: nothing ran; the next run's reap
                os.close(made[1])
                assert reap_scratch() == [made[0]]
            assert not Path(ours + str(stop)).exists() and Path(other).exists()
        # a noted name that is another file now (same name, other inode) is not taken for the segment
        made = make_scratch()
        Path(ours).write_bytes(b"x")
        st = os.stat(ours)
        (made[0] / SEGMENTS).write_text(json.dumps({ours: [st.st_dev, st.st_ino + 1], "/etc/passwd": [0, 0]}))
        drop_scratch(*made)
        assert Path(ours).exists()
    finally:
        for e in engines:
            e.kill()
            e.wait()
        for f in (ours, other, ours + "False", ours + "True"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f)


def test_a_group_member_that_exited_does_not_hide_the_others_segments():
    """Fixed: engine_segments read every listed process's start time in one try, so one that had exited since it
    was listed (a short-lived child of the server at its ready) made it find nothing, and a group killed whole
    later left its shared memory behind again."""
    import uuid

    from llmfast.scratch import engine_segments

    seg = f"/dev/shm/lf-held-{uuid.uuid4().hex[:8]}"
    holder = subprocess.Popen([sys.executable, "-c", f"f = open({seg!r}, 'wb'); print(1, flush=True); "
                               "import time; time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    gone = subprocess.Popen(["true"])
    gone.wait()
    try:
        assert holder.stdout.readline() == "1\n"
        st = os.stat(seg)
        assert engine_segments([holder.pid, gone.pid]) == {seg: (st.st_dev, st.st_ino)}
        assert engine_segments([gone.pid]) == {}
    finally:
        holder.kill()
        holder.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(seg)


def _stale_scratch(parent: Path, name: str, lock: bool = False) -> Path:
    """A scratch folder as a killed run leaves it (a socket-like file, its lock file or none), older than a start."""
    from llmfast.scratch import LOCK, PREFIX

    path = parent / f"{PREFIX}{name}"
    path.mkdir(mode=0o700)
    (path / "socket-like").write_text("")
    if lock:
        (path / LOCK).write_text("")
    os.utime(path, (time.time() - 2 * 3600,) * 2)
    return path


def test_another_users_scratch_folder_is_left_to_them(short_tmp, monkeypatch):
    """Fixed: run as root, a run removed another user's stale scratch folders (theirs to remove), with or without
    their lock file. Only this user's go."""
    import tempfile

    from llmfast.scratch import reap_scratch

    if os.geteuid() != 0:
        pytest.skip("only root can make a folder owned by another user")
    monkeypatch.setattr(tempfile, "tempdir", str(short_tmp))
    mine = _stale_scratch(short_tmp, "mine")
    theirs = [_stale_scratch(short_tmp, "theirs", lock=False), _stale_scratch(short_tmp, "theirs-locked", lock=True)]
    for path in theirs:
        os.chown(path, 4321, 4321)
    assert reap_scratch() == [mine] and not mine.exists()
    assert all(sorted(p.iterdir()) for p in theirs)  # their files too


def test_a_scratch_folder_that_could_not_be_removed_is_not_listed(short_tmp, tmp_path):
    """Fixed: a stale folder rmtree could not remove (here: a file in a read-only folder inside it) was listed as
    removed."""
    from conftest import file_modes_prefix

    prefix = file_modes_prefix(tmp_path)  # root removes it anyway
    gone, stuck = _stale_scratch(short_tmp, "gone"), _stale_scratch(short_tmp, "stuck")
    (stuck / "read-only").mkdir()
    (stuck / "read-only" / "file").write_text("")
    (stuck / "read-only").chmod(0o555)
    os.utime(stuck, (time.time() - 2 * 3600,) * 2)
    try:
        p = subprocess.run([*prefix, sys.executable, "-c", "from llmfast.scratch import reap_scratch; "
                            "print(reap_scratch())"], env={**os.environ, "TMPDIR": str(short_tmp),
                                                           "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    finally:
        (stuck / "read-only").chmod(0o755)
    assert (p.returncode, p.stdout) == (0, f"[PosixPath('{gone}')]\n"), p.stderr
    assert sorted(f.name for f in stuck.rglob("*")) == ["file", "read-only"]


def test_an_in_process_engine_runs_in_a_scratch_tmpdir(short_tmp, monkeypatch):
    """vLLM's offline engine (in this process) left its IPC sockets in $TMPDIR: in the block, this process and those
    it starts have a $TMPDIR of their own, which goes when it ends; the real one is back."""
    import tempfile

    from llmfast.scratch import scratch_tmpdir

    monkeypatch.setattr(tempfile, "tempdir", str(short_tmp))
    monkeypatch.setenv("TMPDIR", str(short_tmp))
    with scratch_tmpdir():
        inside = Path(tempfile.gettempdir())
        assert inside.parent == short_tmp and inside.name.startswith("llmfast-vllm-")
        child = subprocess.run([sys.executable, "-c", "import tempfile; print(tempfile.gettempdir())"],
                               capture_output=True, text=True).stdout.strip()
        assert child == str(inside)
        (inside / "3bddd59d-87fd-442e-9394-f65033bfa055").write_text("")  # a socket vLLM does not remove
    assert tempfile.gettempdir() == os.environ["TMPDIR"] == str(short_tmp) and list(short_tmp.iterdir()) == []


def test_no_scratch_folder_where_vllms_sockets_would_not_fit_below_it(tmp_path, monkeypatch):
    """A socket's path holds 107 bytes: below a long $TMPDIR vLLM's start failed (ZMQError), so it is used as it is."""
    import tempfile

    from llmfast.scratch import make_scratch

    long = tmp_path / ("x" * 50)
    long.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long))
    assert make_scratch() is None and list(long.iterdir()) == []


@pytest.mark.slow
def test_a_killed_serve_stops_vllm_and_its_temporary_files_go(tiny_dir, tmp_path):
    """vLLM leaves its IPC sockets and vllm_dist_* file in $TMPDIR (800 and 90 of them in /tmp here): they go to a
    folder of the server's own. `llmfast serve` killed with SIGKILL (no clean-up of its own) left the server serving,
    orphaned; now it stops, and the next run removes that folder."""
    import shutil
    import tempfile
    import uuid

    tmp = Path(tempfile.mkdtemp(prefix="lf-", dir="/tmp"))  # short: vLLM's socket paths below it hold 107 bytes
    name = f"kill-{uuid.uuid4().hex[:8]}"  # only the vLLM server started here has this in its command line
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = subprocess.Popen([sys.executable, "-m", "llmfast.cli", "serve", str(tiny_dir), "--port", "0",
                             "--served-model-name", name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready: "), proc.stderr.read()[-2000:]
        proc.kill()
        proc.wait()
        for _ in range(120):  # vLLM's shutdown takes a few seconds
            if subprocess.run(["pgrep", "-f", name], capture_output=True).returncode == 1:
                break
            time.sleep(1)
        else:
            pytest.fail("the vLLM server outlived its killed `llmfast serve`")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
        found = subprocess.run(["pgrep", "-f", name], capture_output=True, text=True).stdout.split()
        for pid in found:  # only the server started here has that name
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)
    left = sorted(p.name for p in tmp.iterdir() if not p.name.startswith("torchinductor_"))
    assert len(left) == 2 and left[0].startswith("llmfast-vllm-") and left[1].startswith("vllm-server-"), left
    p = subprocess.run([sys.executable, "-c", "from llmfast.scratch import reap_scratch; print(reap_scratch())"],
                       env=env, capture_output=True, text=True)
    assert p.returncode == 0 and left[0] in p.stdout, p.stderr
    # the server's log stays (it says why it stopped; a run that was killed could not tell whether it was needed)
    assert sorted(p.name for p in tmp.iterdir() if not p.name.startswith("torchinductor_")) == left[1:]
    shutil.rmtree(tmp)


def test_a_server_started_in_a_worker_thread_outlives_that_thread():
    """PR_SET_PDEATHSIG fires when the THREAD that started the child ends: a server a user's worker thread started
    (a notebook's or a web app's) was sent SIGTERM as that thread returned, mid-use. Set from the main thread only,
    whose end is the process's: a child of a killed process still stops."""
    import threading

    from llmfast.scratch import stop_with_parent

    started = {}
    worker = threading.Thread(target=lambda: started.update(
        proc=subprocess.Popen(["sleep", "60"], preexec_fn=stop_with_parent())))
    worker.start()
    worker.join()
    try:
        time.sleep(0.5)
        assert started["proc"].poll() is None
    finally:
        started["proc"].kill()
        started["proc"].wait()
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time\n"
                               "from llmfast.scratch import stop_with_parent\n"
                               "p = subprocess.Popen(['sleep', '60'], preexec_fn=stop_with_parent())\n"
                               "print(p.pid, flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    for _ in range(50):
        if not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        os.kill(child, 9)
        pytest.fail("the child of a killed process outlived it")


@pytest.mark.parametrize("mark", ["", "{\"run\": {\"model\": \"/m", "[]"])
def test_a_work_folder_whose_mark_is_empty_or_cut_short_is_not_deleted(tmp_path, mark):
    """OUTPUT.checkpoints is removed on its mark's word: a mark `touch`ed by hand (or cut short) in a folder of a
    user's files let quantize --overwrite delete them all."""
    from llmfast.work_dir import WORK_MARK

    base = build_tiny(tmp_path)
    out = tmp_path / "q"
    work = tmp_path / "q.checkpoints"
    work.mkdir()
    (work / WORK_MARK).write_text(mark)
    (work / "notes.txt").write_text("mine")
    recipe = tmp_path / "q.yaml"
    recipe.write_text(json.dumps({"model": str(base), "output": str(out),
                                  "quantization": {"method": "w4", "group_size": 32},
                                  "data": {"text": str(REPO / "eval" / "text" / "persuasion.txt"),
                                           "calibration_tokens": 1024, "window": 128}}))
    code, _, err = run_cli("quantize", str(recipe), "--overwrite")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{work} holds files and its mark {WORK_MARK} is empty or not llmfast's" in err
    assert (work / "notes.txt").read_text() == "mine" and not out.exists()


def test_work_folder_marks_llmfast_writes_are_trusted(tmp_path):
    """llmfast's own marks are never empty: one that records no run (distill's) is a JSON object too; a folder that
    holds nothing but an empty mark holds nothing of a user's."""
    from llmfast.work_dir import WORK_MARK, check_work_dir, mark_work_dir

    work = mark_work_dir(tmp_path / "d.checkpoints")
    assert json.loads((work / WORK_MARK).read_text()) == {"run": None}
    (work / "step-1").mkdir()
    check_work_dir(work)
    bare = tmp_path / "bare.checkpoints"
    bare.mkdir()
    (bare / WORK_MARK).write_text("")
    check_work_dir(bare)


def build_tiny(tmp_path: Path) -> Path:
    from llmfast.testing import build_tiny_llama

    return build_tiny_llama(tmp_path / "tiny")


def test_a_killed_kernel_build_leaves_no_file_for_good(tmp_path, monkeypatch):
    """A build killed mid-way (SIGKILL) left its temporary `.NAME-*.so` in the kernel cache for good: the next build
    removes those older than a build may take, and never a build under way (or another key's library)."""
    import shutil

    from llmfast.native import load_kernel

    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("LLMFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LLMFAST_NATIVE", "1")
    source = tmp_path / "one.c"
    source.write_text("int one(void) { return 1; }\n")
    kernels = tmp_path / "cache" / "kernels"
    kernels.mkdir(parents=True)
    dead, building, other = kernels / ".one-dead1234.so", kernels / ".one-live5678.so", kernels / "one-0123-4567.so"
    for path in (dead, building, other):
        path.write_bytes(b"\x7fELF")
    os.utime(dead, (time.time() - 3600, time.time() - 3600))
    assert load_kernel(source).one() == 1
    assert not dead.exists() and building.exists() and other.exists()


@pytest.mark.slow
def test_a_chain_stage_under_torchrun_leaves_nothing_in_tmpdir(tiny_dir, tmp_path, short_tmp, monkeypatch):
    """torchrun makes a torchelastic_* folder in $TMPDIR for its workers' logs and never removes it (150 in /tmp
    here): a stage's launcher runs in a $TMPDIR of its own."""
    import tempfile

    from llmfast.cli import main
    from test_chain import chain, write

    monkeypatch.setenv("TMPDIR", str(short_tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(short_tmp))
    out = tmp_path / "run"
    recipe = chain(tiny_dir, out)
    stages = {k: recipe["stages"][k] for k in ("data", "lora")}
    stages["lora"]["launch"] = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]
    stages["lora"]["with"]["export_merged"] = False
    assert main(["run", str(write(tmp_path / "ddp.yaml", {"output": str(out), "stages": stages}))]) == 0
    assert (out / "lora" / "adapter" / "adapter_config.json").is_file()
    assert [p.name for p in short_tmp.iterdir() if not p.name.startswith("torchinductor_")] == []
