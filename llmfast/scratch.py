"""What an engine's processes (vLLM's server) leave behind: a private temporary folder, removed when they are done,
and no server once the llmfast that started it is gone.

vLLM leaves its IPC sockets (a UUID each, seven a start) and its distributed-init file (vllm_dist_*) in $TMPDIR
and removes none of them: 800 sockets and 90 files in /tmp after a day of runs here. Its processes get a $TMPDIR of
their own instead, which goes with them. A lock file in it is held by the engine's process (the descriptor is
passed on), so a folder left by a run that was killed (SIGKILL: no clean-up ran) is removed by the next run only
once no process holds it.

A server is a session of its own (Ctrl-C reaches only llmfast, which stops it in order), so a SIGKILLed `llmfast
serve` left it serving on its port, orphaned, for good: it is told to stop when the process that started it dies.
vLLM's offline engine starts its engine core itself (multiprocessing), where no `preexec_fn` can be given: the engine
core puts itself and what it starts in a process group of its own, which goes when llmfast does (`die_with_parent`).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

PREFIX = "llmfast-vllm-"
LOCK = ".held"
_YOUNG_S = 3600.0  # a folder without its lock file is one being made, unless older than this
# vLLM's IPC sockets are named by a UUID (36 characters) in $TMPDIR, and a socket's path holds at most 107 bytes
_SOCKET_PATH_MAX = 107 - 1 - 36


def make_scratch() -> tuple[Path, int] | None:
    """A new private folder in $TMPDIR and the descriptor of its held lock (pass it to the processes that use the
    folder, close it when they are done); stale folders of runs that were killed are removed first. None where
    $TMPDIR is too long a path for vLLM's sockets in a folder below it (they stay in $TMPDIR then, as before)."""
    reap_scratch()
    if len(os.fsencode(tempfile.gettempdir())) + len(f"/{PREFIX}12345678") > _SOCKET_PATH_MAX:
        return None
    path = Path(tempfile.mkdtemp(prefix=PREFIX))
    # locked before it has its name: another run's reap_scratch must not find it unlocked and remove the folder
    fd = os.open(path / f"{LOCK}-new", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(path / f"{LOCK}-new", path / LOCK)
    return path, fd


def drop_scratch(path: Path, fd: int) -> None:
    """Release the lock and remove the folder (its processes have exited)."""
    with contextlib.suppress(OSError):
        os.close(fd)
    shutil.rmtree(path, ignore_errors=True)


def reap_scratch() -> list[Path]:
    """Remove the scratch folders in $TMPDIR that no process holds any more; return them."""
    removed = []
    for path in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        if path.is_symlink() or not path.is_dir():
            continue
        try:
            fd = os.open(path / LOCK, os.O_RDWR)
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                if time.time() - path.stat().st_mtime > _YOUNG_S:
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
            continue
        except OSError:  # another user's (mkdtemp makes it private): theirs to remove
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its engine is running
            os.close(fd)
            continue
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)
        removed.append(path)
    return removed


def engine_env(path: Path) -> dict[str, str]:
    """The environment additions that send an engine's temporary files to `path`; torch.compile's kernel cache,
    which is meant to outlive a run, stays where it was ($TORCHINDUCTOR_CACHE_DIR, else torch's default in the
    real $TMPDIR). torch's precompiled header (150 MB, a g++ run of up to a minute at vLLM's start) goes to
    $TMPDIR/torchinductor_USER whatever $TORCHINDUCTOR_CACHE_DIR says (_HEADER_DIR in torch/_inductor/codecache.py):
    in `path` it was made again at every start and removed after, so `path` gets a link to the real folder (once
    torch made it: a link to none would fail torch's makedirs)."""
    env = {"TMPDIR": str(path)}
    default = _inductor_default()
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        env["TORCHINDUCTOR_CACHE_DIR"] = default
    if os.path.isdir(default):
        with contextlib.suppress(OSError):  # no link: the header is made in `path`, as before
            (path / Path(default).name).symlink_to(default, target_is_directory=True)
    return env


def _inductor_default() -> str:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # a private module: where an older or newer torch has none, its rule as torch 2.13 has it
        import getpass
        import re

        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = f"uid_{os.getuid()}"
        return os.path.join(tempfile.gettempdir(), "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user))
    return default_cache_dir()


def stop_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` for Popen: the child gets SIGTERM (vLLM's server then stops its engine) when the thread that
    started it dies (Linux's PR_SET_PDEATHSIG), which is the process's end only for the main thread; None in another
    thread (a server started by a user's worker thread was stopped as that thread ended, mid-use), or where there is
    no prctl. Looked up before the fork, so the child only calls it."""
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # died between the fork and the prctl: nothing would tell us now
            os._exit(1)

    return preexec


def die_with_parent(parent: int) -> None:
    """Called first in an engine process started by `parent` (llmfast) without `stop_with_parent`: this process and
    those it starts become a process group of their own, killed whole when `parent` is gone (SIGKILLed: nothing of
    llmfast's ran). A thread watches, since vLLM's engine core only notes SIGTERM while it starts, and its workers and
    compilers would outlive it. A group also keeps a terminal's Ctrl-C from llmfast's engine, which llmfast stops."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    own_group = os.getpgid(0) == os.getpid()  # never the group it came from: a shell's job, `| tee` in it

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        if own_group:
            os.killpg(0, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="llmfast-parent-watch", daemon=True).start()


def kill_engine_groups(pids: list[int]) -> None:
    """SIGKILL these child processes, each with its process group where it made one (`die_with_parent`)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:  # not yet in a group of its own: still starting, so nothing of its own started yet either
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def scratch_env() -> Iterator[tuple[dict[str, str], tuple[int, ...]]]:
    """For processes started in the block: the environment additions that give them a scratch $TMPDIR, and the
    descriptor of its lock to pass on (none where `make_scratch` makes none); the folder goes when the block ends."""
    made = make_scratch()
    if made is None:
        yield {}, ()
        return
    try:
        yield engine_env(made[0]), (made[1],)
    finally:
        drop_scratch(*made)


@contextlib.contextmanager
def scratch_tmpdir() -> Iterator[None]:
    """This process's $TMPDIR, and that of the processes it starts, a scratch folder for the block: an engine run
    in this process (vLLM's offline engine), whose folder goes when the block ends."""
    with scratch_env() as (env, _):
        if not env:
            yield
            return
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # the kernel cache's own place, from the real $TMPDIR
        before, tempfile.tempdir = tempfile.tempdir, env["TMPDIR"]  # gettempdir() keeps what it found first
        try:
            yield
        finally:
            tempfile.tempdir = before
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
