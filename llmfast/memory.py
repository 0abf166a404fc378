"""Peak memory: of this process (every verb's metrics), and of a process tree sampled in a thread (vLLM's engine
runs in child processes)."""

from __future__ import annotations

import os
import resource
import threading
from typing import Any


def peak_memory_gib(device: str = "cpu") -> float:
    """Peak GPU memory allocated by torch on CUDA; elsewhere this process's peak resident memory, in GiB.

    Both count from the process's start or the last `reset_peak_memory` (`llmfast run` calls it before each
    stage it runs in its process, so a stage's figure is its own and not an earlier stage's peak).
    """
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    try:  # the kernel's high-water mark, which reset_peak_memory lowers (ru_maxrss may keep an earlier peak)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20  # kB
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def reset_peak_memory() -> None:
    """Start `peak_memory_gib`'s figures afresh: the process's high-water mark (Linux: /proc/self/clear_refs)
    drops to its present RSS, and torch's CUDA peaks to what is allocated now."""
    import sys

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or a kernel before 4.0: the figure stays the process's
        pass
    torch = sys.modules.get("torch")  # not imported: nothing of it to reset
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def peak_reserved_gib(device: str = "cpu") -> float | None:
    """Peak GPU memory held by torch's caching allocator on CUDA (what Unsloth and `nvidia-smi`-style figures show:
    allocated plus the allocator's cache), in GiB; None elsewhere (a process's RSS has no such split)."""
    if device != "cuda":
        return None
    import torch

    return torch.cuda.max_memory_reserved() / 2**30


class PeakRss:
    """`with PeakRss(pid) as m: ...; m.peak_gib` — the largest summed RSS of pid and its descendants seen."""

    def __init__(self, pid: int | None = None, interval: float = 0.2) -> None:
        self.pid = pid or os.getpid()
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
        self.peak_bytes = max(self.peak_bytes, total)
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRss":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # mallopt's parameters, from glibc's malloc.h
_kept = False  # keep_freed_memory_for_reuse is in force


def _libc() -> Any:
    """glibc's functions, or None where this is not glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and libc.mallopt and libc.malloc_trim else None
    except (OSError, AttributeError):
        return None


def keep_freed_memory_for_reuse() -> bool:
    """Make glibc's malloc keep large freed blocks for reuse instead of returning them to the system.

    A streaming merge allocates and frees arrays of the same few sizes for every tensor. By default glibc
    maps each block over 32 MB afresh and unmaps it on free, so every tensor faults in and zeroes new
    pages: at the 1.7B shape that was a third of a TIES merge's CPU time (37 s of system time), and ~0
    with this. One arena for all threads (a thread's own arena cannot hold blocks over 64 MB) and no
    mmap or trim below 1-2 GB. The process keeps its peak heap until `give_back_freed_memory` (`llmfast run`
    calls it after each stage: the `merge` command's process goes on to other stages there). Returns False where
    it does not apply (not glibc).
    """
    global _kept
    libc = _libc()
    if libc is None:
        return False
    _kept = bool(libc.mallopt(_M_ARENA_MAX, 1) and libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
                 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 31))
    return _kept


def give_back_freed_memory() -> None:
    """Undo `keep_freed_memory_for_reuse` where it is in force: blocks over 32 MiB mapped and unmapped again, and
    the heap trimmed above 64 MiB (where glibc's own thresholds settle after large frees), and what the heap kept
    returned to the system now. The one arena stays (glibc fixes the arena limit when it first needs it)."""
    global _kept
    libc = _libc() if _kept else None
    if libc is None:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
    libc.malloc_trim(0)
    _kept = False
