"""Peak memory: of this process (every verb's metrics), and of a process tree sampled in a thread (vLLM's engine
runs in child processes)."""

from __future__ import annotations

import os
import resource
import threading


def peak_memory_gib(device: str = "cpu") -> float:
    """Peak GPU memory allocated by torch on CUDA; elsewhere this process's peak resident memory, in GiB.

    The process peak covers the whole process: when `llmfast run` chains stages in one process, a later stage's
    figure includes the earlier stages' peak.
    """
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


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
