"""One llmfast process at a time per output.

The verbs that train write into their run or work folder for minutes or hours (finetune's OUTPUT, sparsify's and
quantize's OUTPUT.checkpoints) and check the output only when they start, so two runs started with the same
output both passed the check: their checkpoints and logs interleaved, a fresh start deleted the other run's work
folder, and the last to finish replaced the first's result. `output_lock` is held for the whole run: an `flock` on
a file in llmfast's cache named after the output's real path (a link or a relative path to it is the same output),
so nothing is written beside the user's files, not even for a run refused a moment later. The kernel releases the
lock however the process ends, SIGKILL included, so a killed run never blocks its `--resume`; a second run is
refused in one line naming the holder's PID. `llmfast run` holds one for its run folder too (its stages' verbs lock
their own outputs inside it). Where the cache cannot be written, runs go unlocked, as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterator

from llmfast.errors import UserError


def lock_path(final: str | os.PathLike[str]) -> Path:
    """The lock file of output `final`: in the cache, named after the output's real path."""
    from llmfast.cache import cache_dir

    real = str(Path(final).expanduser().resolve())
    return cache_dir() / "locks" / f"{hashlib.sha256(os.fsencode(real)).hexdigest()[:32]}.lock"


def _take(path: Path, final: Path) -> int | None:
    """The locked descriptor of `path`; None where the lock file cannot be made (an unwritable cache)."""
    import fcntl

    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 20, 0).decode(errors="replace").split("\n")[0].strip()
            os.close(fd)
            raise UserError(f"output {final} is being written by another llmfast run"
                            f"{f' (pid {holder})' if holder.isdigit() else ''}: wait for it to end, or choose another "
                            "output") from None
        # Its holder may have removed the file between our open and our lock (it removes it on the way out): a lock
        # on a file no longer at `path` guards nothing, so take the one there now.
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return fd
        os.close(fd)


@contextlib.contextmanager
def output_lock(final: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the lock of output `final` while the block runs (see the module's docstring)."""
    final = Path(final).expanduser()
    path = lock_path(final)
    fd = _take(path, final)
    if fd is None:
        yield
        return
    try:
        with contextlib.suppress(OSError):  # the holder's PID and output, for a refused run's message and for people
            os.ftruncate(fd, 0)
            os.pwrite(fd, os.fsencode(f"{os.getpid()}\n{final.resolve()}\n"), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # before the lock goes: a run that opened it meanwhile finds it gone and retries
        os.close(fd)
