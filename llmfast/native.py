"""Small C kernels compiled on the user's machine at first use, cached, loaded with ctypes.

A kernel is one C file shipped inside the package. It is compiled with the machine's C compiler (`$CC`, else
`cc`) for this very CPU (`-march=native`), into the llmfast cache (`$LLMFAST_CACHE/kernels`, default
`~/.cache/llmfast/kernels`), under a name that hashes the source, the flags, the compiler's version and the CPU's
feature flags, so a home directory shared by different machines never loads code built for another CPU, and ends
with the hash of the library's own bytes, checked before it is loaded: dlopen maps a truncated file (a copy cut
short, a crash before the disk caught up) without a word and the process died of SIGBUS at the first call. No
compiler, a failed build, or `LLMFAST_NATIVE=0`: `load_kernel` returns None once, says why on stderr (unless
the variable asked for it) and callers keep their torch path. Floating point is compiled strictly (no fast-math,
no FMA contraction), so a kernel can promise the same bits as torch. Built and tested with gcc on Linux x86-64;
elsewhere a build that fails (Apple's clang has no `-fopenmp`) only keeps the torch path. `$CC` may carry flags:
`CC="cc -mno-avx512f"` builds, and caches apart, what an AVX2-only CPU would build (gcc's explicit -mno-... win over
-march=native whatever their order), which is how the kernels' tests are run for CPUs this one is not.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path

from llmfast.cache import cache_dir
from llmfast.cpu_info import cpu_info

_BUILD_TIMEOUT_S = 300
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC", "-pthread")


def _cpu_flags() -> str:
    # sorted, so the key is the feature set whatever the kernel's order (the whole cpuinfo line before 2026-12-07)
    flags = cpu_info().flags
    if flags:
        return " ".join(sorted(flags))
    import platform

    return platform.processor() or platform.machine()


def _compiler() -> list[str] | None:
    """The compiler's command line: `$CC` may carry words (`ccache gcc`, `gcc -m64`)."""
    try:
        words = shlex.split(os.environ.get("CC") or "cc")
    except ValueError as e:  # an unbalanced quote: no command to run, as with no compiler
        _say(f"$CC {os.environ.get('CC')!r} is not a command line ({e})")
        return None
    path = shutil.which(words[0]) if words else None
    return None if path is None else [path, *words[1:]]


def _say(message: str) -> None:
    """The note on a line of its own: a kernel is first built mid-run (eval's first forward), where a progress bar
    is open on stderr and a plain print was appended to the bar's line."""
    std = sys.modules.get("tqdm.std")
    if std is not None and getattr(std.tqdm, "_instances", None):
        std.tqdm.write(f"llmfast: {message}", file=sys.stderr)  # clears the bars, writes, repaints them
    else:
        print(f"llmfast: {message}", file=sys.stderr, flush=True)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _verified(directory: Path, prefix: str) -> Path | None:
    """A library built earlier under `prefix` whose bytes are those it was built with (its name ends with their
    hash); one that is not (cut short, spoiled) is removed, best effort, and built again by the caller."""
    for path in sorted(directory.glob(f"{prefix}-*.so")):
        try:
            whole = _digest(path.read_bytes()) == path.stem[len(prefix) + 1:]
        except OSError:  # unreadable here (another user's file in a shared cache): neither used nor removed
            continue
        if whole:
            return path
        with contextlib.suppress(OSError):
            path.unlink()
    return None


def _build(cc: list[str], flags: tuple[str, ...], source: Path, directory: Path, prefix: str) -> Path | None:
    """Compile `source` into `directory`, named `prefix`-HASH.so; says why and returns None when it cannot."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _reap_dead_builds(directory, source.stem)
        # Build beside the target and rename: two processes building at once both end with a whole file.
        fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so", dir=directory)
        os.close(fd)
    except OSError as e:
        _say(f"cannot write llmfast's kernel cache {directory} ({e.strerror or e}): set LLMFAST_CACHE to a folder "
             f"you may write; {source.stem} runs on its slower torch path")
        return None
    try:
        # the absolute path: a source may include itself once per type (`#include __FILE__`)
        done = subprocess.run([*cc, *flags, str(source.resolve()), "-o", tmp, "-lm"], capture_output=True,
                              text=True, timeout=_BUILD_TIMEOUT_S)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["no message"]
            # the line that says what failed ("Assembler messages:" came first where the assembler met a full TMPDIR)
            first = next((line for line in lines if "error" in line.lower()), lines[0])
            _say(f"building {source.name} failed ({first}): {source.stem} runs on its slower torch path")
            return None
        data = Path(tmp).read_bytes()
        if not data.startswith(b"\x7fELF"):  # `CC=true` exits 0 and writes nothing
            _say(f"building {source.name} with {cc[0]} wrote no library: {source.stem} runs on its slower torch path")
            return None
        os.chmod(tmp, 0o755)  # mkstemp made it 0600; a shared cache must be loadable by its other users
        target = directory / f"{prefix}-{_digest(data)}.so"
        os.replace(tmp, target)
        return target
    except (OSError, subprocess.SubprocessError) as e:
        _say(f"building {source.name} failed ({e}): {source.stem} runs on its slower torch path")
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _reap_dead_builds(directory: Path, stem: str) -> None:
    """Remove the temporary files of builds that were killed (SIGKILL: their `finally` never ran), each left in the
    cache for good: those older than a build may take (its timeout), so never one that another process is writing.
    Built libraries of other keys stay: another CPU sharing this home folder, or another `$CC`, loads them."""
    for path in directory.glob(f".{glob.escape(stem)}-*.so"):
        with contextlib.suppress(OSError):
            if time.time() - path.stat().st_mtime > 2 * _BUILD_TIMEOUT_S:
                path.unlink()


@lru_cache(maxsize=None)
def load_kernel(source: Path, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The compiled library of the C file `source`, built once per machine; None where it cannot be built.

    `extra_flags` go after the defaults (tests build the narrower instruction-set paths with `-mno-...`)."""
    if os.environ.get("LLMFAST_NATIVE", "1") == "0":
        return None
    cc = _compiler()
    if cc is None:
        _say(f"no C compiler (set CC or install cc): {source.stem} runs on its slower torch path")
        return None
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        _say(f"{cc[0]} --version failed ({e}): {source.stem} runs on its slower torch path")
        return None
    try:
        text = source.read_bytes()
    except OSError as e:
        _say(f"cannot read {source} ({e.strerror}): {source.stem} runs on its slower torch path")
        return None
    flags = (*FLAGS, *extra_flags)
    key = hashlib.sha256(b"\0".join([text, " ".join([*cc[1:], *flags]).encode(), version.encode(),
                                      _cpu_flags().encode()]))
    directory = cache_dir() / "kernels"
    prefix = f"{source.stem}-{key.hexdigest()[:16]}"
    target = _verified(directory, prefix) or _build(cc, flags, source, directory, prefix)
    if target is None:
        return None
    try:
        return ctypes.CDLL(str(target))
    except OSError as e:  # whole bytes that do not load (a cache on a noexec mount): building again would not help
        _say(f"loading {target} failed ({e}): {source.stem} runs on its slower torch path")
        return None
