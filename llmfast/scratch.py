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

vLLM's engine also makes POSIX shared memory (/dev/shm/psm_*: the MessageQueues between its engine core and its
workers), unlinked by the process that made it as it exits cleanly, else by multiprocessing's resource tracker; a
killed engine's group takes its tracker with it, and the segments stayed for good (93 MB here after a day of tests).
Whoever kills an engine reads first which segments its processes hold, and unlinks those after (`engine_segments`).
A server's are also noted in its scratch folder once it is ready (`note_segments`): a group SIGKILLed whole (the OOM
killer, a user's `kill -9 -PGID`, llmfast itself killed) holds nothing to read any more (420 MB stayed in /dev/shm
after each test run), and whoever removes the folder, its own stop or the next run's reap, unlinks those.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import shutil
import signal
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

PREFIX = "llmfast-vllm-"
LOCK = ".held"
SEGMENTS = "segments.json"  # the engine's shared memory (note_segments)
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
    """Release the lock and remove the folder (its processes have exited), with the segments noted in it."""
    with contextlib.suppress(OSError):
        os.close(fd)
    drop_segments(_noted_segments(path))
    shutil.rmtree(path, ignore_errors=True)


def note_segments(scratch: tuple[Path, int] | None, pids: Iterable[int]) -> None:
    """Note in the scratch folder the shared memory these processes (its engine's, running) made (`engine_segments`),
    for whoever removes the folder after a kill that left no process to read them from. Replaced whole."""
    if scratch is None:
        return
    new = scratch[0] / f"{SEGMENTS}.new"
    new.write_text(json.dumps({p: list(ident) for p, ident in engine_segments(pids).items()}), encoding="utf-8")
    os.replace(new, scratch[0] / SEGMENTS)


def _noted_segments(path: Path) -> dict[str, tuple[int, int]]:
    """What `note_segments` wrote in `path`: only names directly in /dev/shm with a (device, inode) pair each (a
    segment is unlinked only where it is still that file); {} for none or anything else."""
    try:
        noted = json.loads((path / SEGMENTS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(noted, dict):
        return {}
    return {k: (v[0], v[1]) for k, v in noted.items() if os.path.dirname(k) == _SHM and isinstance(v, list)
            and len(v) == 2 and all(type(x) is int for x in v)}


def reap_scratch() -> list[Path]:
    """Remove this user's scratch folders in $TMPDIR that no process holds any more; return those that went (one
    rmtree could not remove, say below a read-only parent, stays off the list). Another user's folder is theirs to
    remove, even where this user could (root)."""
    removed = []
    for path in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        try:
            st = path.lstat()
        except OSError:  # gone meanwhile
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():  # a link, a file, or another user's
            continue
        try:
            fd = os.open(path / LOCK, os.O_RDWR)
        except FileNotFoundError:
            if time.time() - st.st_mtime > _YOUNG_S:
                removed += _removed(path)
            continue
        except OSError:  # a lock it cannot open (made unreadable): not taken for one no process holds
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its engine is running
            os.close(fd)
            continue
        removed += _removed(path)
        os.close(fd)
    return removed


def _removed(path: Path) -> list[Path]:
    """[path] where rmtree removed it; [] where something in it, or the folder itself, stayed. The segments noted
    in it go first: its engine's processes are gone (none holds the lock)."""
    drop_segments(_noted_segments(path))
    shutil.rmtree(path, ignore_errors=True)
    return [] if os.path.lexists(path) else [path]


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


def kill_engine_groups(pids: list[int]) -> list[str]:
    """SIGKILL these child processes, each with its process group where it made one (`die_with_parent`), and unlink
    the shared memory they held (`engine_segments`); return that."""
    dropped: list[str] = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) == pid:
                segments = engine_segments(group_members(pid))
                os.killpg(pid, signal.SIGKILL)
            else:  # not yet in a group of its own: still starting, so nothing of its own started yet either
                segments = engine_segments([pid])
                os.kill(pid, signal.SIGKILL)
            dropped += drop_segments(segments)
    return dropped


_SHM = "/dev/shm"  # where glibc's shm_open (Python's SharedMemory, sem_open) puts its segments on Linux


def group_members(pgid: int) -> list[int]:
    """The processes of process group `pgid` now."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int(_stat_fields(int(entry))[2]) == pgid:
                    members.append(int(entry))
    return members


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command's name (which may hold spaces and parentheses): state first."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _started(pid: int) -> float:
    """When process `pid` started, as a time.time(), to a clock tick (/proc/stat's boot time is a whole second)."""
    ago = float(Path("/proc/uptime").read_text().split()[0]) - int(_stat_fields(pid)[19]) / os.sysconf("SC_CLK_TCK")
    return time.time() - ago


def engine_segments(pids: Iterable[int]) -> dict[str, tuple[int, int]]:
    """The shared-memory segments in /dev/shm that these processes (an engine's, still running) map or hold open,
    that are this user's and were made after the first of them started: the engine's own, with their (device,
    inode). Not a segment another process made and shares with them, nor another engine's, which these processes
    do not hold. Read before a kill: a dead process holds nothing. Known by inode, not name: glibc's sem_open makes
    a semaphore under a temporary name, maps it, then links it to its own (sem.mp-*, multiprocessing's), so its
    maker's maps name "sem.XXXXXX (deleted)"; a worker's tqdm lock, held by it alone, stayed after every kill."""
    pids = list(pids)
    starts = []
    for pid in pids:  # one that exited since it was listed (a short-lived child) holds nothing: the others still do
        with contextlib.suppress(OSError, ValueError, IndexError):
            starts.append(_started(pid))
    try:
        since = min(starts) - 0.1  # file times lag the clock by up to a tick
        shm_dev = os.stat(_SHM).st_dev
    except (OSError, ValueError):  # all gone already, or no /proc
        return {}
    held: set[int] = set()
    for pid in pids:
        held.update(_mapped_inodes(pid, shm_dev))
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(_SHM + "/"):
                        st = os.stat(f"/proc/{pid}/fd/{fd}")  # the open file itself, whatever its name now
                        if st.st_dev == shm_dev:
                            held.add(st.st_ino)
    found = {}
    with contextlib.suppress(OSError), os.scandir(_SHM) as entries:
        for entry in entries:
            if entry.inode() not in held:
                continue
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and st.st_ctime >= since:
                    found[entry.path] = (st.st_dev, st.st_ino)
    return found


def _mapped_inodes(pid: int, dev: int) -> set[int]:
    """The inodes of the files on device `dev` (/dev/shm's) that process `pid` maps."""
    inodes = set()
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="surrogateescape") as maps:
            for line in maps:
                f = line.split(maxsplit=5)  # address, perms, offset, major:minor (hex), inode, path
                if len(f) == 6 and f[5].startswith(_SHM + "/"):
                    major, minor = (int(x, 16) for x in f[3].split(":"))
                    if os.makedev(major, minor) == dev:
                        inodes.add(int(f[4]))
    return inodes


def drop_segments(segments: dict[str, tuple[int, int]]) -> list[str]:
    """Unlink these segments (from `engine_segments`) where they are still the same files; return those unlinked
    here (not by their engine as it stopped). Their memory goes once the last process using them has."""
    dropped = []
    for path, ident in segments.items():
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == ident:
                os.unlink(path)
                dropped.append(path)
    return dropped


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
