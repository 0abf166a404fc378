"""One llmfast process at a time per output.

The verbs that train write into their run or work folder for minutes or hours (finetune's OUTPUT, sparsify's and
quantize's OUTPUT.checkpoints) and check the output only when they start, so two runs started with the same
output both passed the check: their checkpoints and logs interleaved, a fresh start deleted the other run's work
folder, and the last to finish replaced the first's result. `output_lock` is held for the whole run: an `flock`
on the sibling file `.NAME.lock` of the output's real path (the kernel releases it however the process ends, SIGKILL
included, so a killed run never blocks its `--resume`); a second run is refused in one line naming the holder's PID.
`llmfast run` holds one for its run folder too (its stages' verbs lock their own outputs inside it).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from llmfast.errors import UserError


def lock_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.lock")


def _created_parents(final: Path) -> list[Path]:
    """Make `final`'s parent folders; return those this call created, deepest first."""
    made, p = [], final.parent
    while not p.exists():
        made.append(p)
        p = p.parent
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write {final}: {e.strerror or e}") from None
    return made


def _take(path: Path, final: Path) -> int:
    import fcntl

    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot write {final}: {path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 20, 0).decode(errors="replace").strip()
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
    """Hold the lock of output `final` while the block runs (see the module's docstring); the lock file, and parent
    folders made for it that stay empty, are removed on the way out."""
    final = Path(final).expanduser()
    made = _created_parents(final)
    # beside the folder itself, however it is named: a path through a link, or a relative one, locks the same file
    real = final.resolve() if final.is_symlink() else final.parent.resolve() / final.name
    path = lock_path(real)
    fd = _take(path, final)
    try:
        with contextlib.suppress(OSError):  # the holder's PID, for the message of a run refused (a full disk: none)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # before the lock goes: a run that opened it meanwhile finds it gone and retries
        os.close(fd)
        for p in made:  # a refused run leaves no folder behind
            with contextlib.suppress(OSError):
                p.rmdir()
