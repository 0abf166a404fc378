"""The one exception type for mistakes a user can fix.

The CLI prints its message as a single line on stderr and exits with code 2; anything else is a bug and
keeps its traceback. Messages name the file, key or row at fault and say what to do. A full disk, a file this
user may not read or write and memory too small for what was asked are the other errors a user fixes: `no_space`
and `out_of_memory` recognise the first and the last in the errors libraries raise, and the CLI turns any of them
that no check caught first into one line (`as_user_error`).
"""

import errno
import os
import re
import sys


class UserError(Exception):
    """Bad input, a missing file or package, an impossible request: shown as one line, exit code 2."""

    def __init__(self, message: str) -> None:
        # One line, always: a multi-line message from a library is folded so the contract holds.
        super().__init__(" ".join(str(message).split()))


def _chain(e: BaseException | None, handling: bool = True) -> list[BaseException]:
    """`e` and the exceptions it was raised from (and, with `handling`, while handling), outermost first."""
    found: list[BaseException] = []
    while e is not None and all(e is not f for f in found):
        found.append(e)
        e = e.__cause__ or (e.__context__ if handling else None)
    return found


def no_space(e: BaseException | None) -> bool:
    """Whether `e`, or an exception it was raised from, is a write that found its file system full: an OSError of
    ENOSPC or EDQUOT, or a library's error carrying that message (safetensors' Rust I/O error says "No space left on
    device (os error 28)")."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(m in str(x) for m in ("No space left on device", "Disk quota exceeded")):
            return True
    return False


def out_of_memory(e: BaseException | None) -> str | None:
    """How much a failed allocation in `e`'s chain asked for (' of SIZE', or '' where the error does not say), or None
    if the chain holds none: Python's MemoryError (numpy's 'Unable to allocate'), torch's CPU allocator ("can't
    allocate memory: you tried to allocate N bytes", a RuntimeError) and torch.OutOfMemoryError (CUDA)."""
    for x in _chain(e):
        text = str(x)
        if isinstance(x, MemoryError) or type(x).__name__ == "OutOfMemoryError" or "can't allocate memory" in text:
            if found := re.search(r"allocate (\d+) bytes", text):
                size, unit = float(found.group(1)), "B"
                for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
                    if size < 1024 or unit == "PiB":
                        break
                    size /= 1024
                return f" of {size:.1f} {unit}"
            found = re.search(r"allocate ([\d.]+ ?[KMGTPE]?i?B)", text, re.IGNORECASE)
            return f" of {found.group(1)}" if found else ""
    return None


def error_filenames(e: BaseException | None) -> list[str]:
    """The file names the OSErrors in `e`'s chain carry (`filename`, and `filename2` of a copy's target)."""
    return [str(f) for x in _chain(e) if isinstance(x, OSError) for f in (x.filename, x.filename2) if f]


def as_user_error(e: BaseException) -> UserError | None:
    """`e` as the CLI's one-line error: a UserError as it is, a failed allocation as one saying how much it asked for,
    a file this user may not use as one naming it, a full disk (met outside the atomic writes, which name their
    output) as one naming the folder of the file it was writing; None for anything else (a bug: its traceback
    stays)."""
    if isinstance(e, UserError):
        return e
    if (asked := out_of_memory(e)) is not None:
        where = "GPU memory" if any(type(x).__name__ == "OutOfMemoryError" for x in _chain(e)) else "memory"
        return UserError(f"out of {where}: an allocation{asked} failed: lower the sizes asked for (batch size, "
                         "lengths, ranks, tokens) or free memory, and run again")
    if not no_space(e):
        return _denied(e)
    named = error_filenames(e)
    where = f" of {os.path.dirname(os.path.abspath(named[-1]))}" if named else ""
    return UserError(f"no space left on the device{where}: free some space there (or write elsewhere) and run again")


def _denied(e: BaseException) -> UserError | None:
    """A file this user may not read or write (EACCES, EPERM) or a read-only file system (EROFS), met where no
    check came first, as one line naming the file; None if `e`'s chain holds no such error."""
    # `e` and what it was raised *from*, not what it was raised while handling: an error met while handling a
    # denied file (a fallback that failed otherwise, a bug in an except block) is not a permission problem.
    for x in _chain(e, handling=False):
        named = [str(f) for f in (x.filename, x.filename2) if f] if isinstance(x, OSError) else []
        # Only with a file named: an EPERM of a process call (a signal, setsid) is not the user's file.
        if named and x.errno == errno.ENAMETOOLONG:  # a flag's or a positional's path (a recipe's are checked first)
            # the path that is too long (a rename names two), its start and its end: the end may be a name llmfast
            # derived from the user's (a temporary file beside an output)
            path = max(named, key=lambda f: max((len(os.fsencode(n)) for n in f.split(os.sep)), default=0))
            shown = path if len(path) <= 80 else f"{path[:40]}...{path[-37:]}"
            return UserError(f"{shown}: {x.strerror}: a file system takes at most 255 bytes per name and "
                             "4096 per path: give a shorter one")
        if named and x.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return UserError(f"{' or '.join(named)}: {x.strerror or x}: give this user permission to use it (or "
                             "use another path) and run again")
    return None


def print_error(e: UserError | str) -> None:
    """`llmfast: error: ...` (or, given a str, that line as it is) on stderr, on a line of its own and the last: the
    progress bars an error or a Ctrl-C left open are closed first (an open bar is repainted over the line when it is
    collected at exit)."""
    std = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(std, "tqdm", None), "_instances", ())):
        bar.close()
    print(e if isinstance(e, str) else f"llmfast: error: {e}", file=sys.stderr)
