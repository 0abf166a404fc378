"""The figures a fine-tuning run records in metrics.json (and its adapter's llmfast.json)."""

from __future__ import annotations

import math
from typing import Any

from llmfast.finetune import fsdp as sharding
from llmfast.memory import peak_memory_gib, peak_reserved_gib


def steady_tokens_per_s(tokens: int, seconds: float, first_tokens: int, first_seconds: float) -> float | None:
    """Tokens per second over an invocation's steps after its first: the first (of a fresh run or of a --resume
    alike) also pays for allocation, lazy initialisation and on CUDA the kernels' autotuning, which a long run pays
    once; other kits' figures and our benchmark scripts leave such warm-up out. `tokens`, `seconds`: every step's
    so far; `first_*`: the first step's alone. With only the first step run, its own speed, the only figure there
    is; None before any."""
    if seconds > first_seconds:  # a later step ran (each takes time: perf_counter only moves forward)
        return (tokens - first_tokens) / (seconds - first_seconds)
    return tokens / seconds if seconds else None


def run_metrics(run: Any, loop: dict[str, Any], eval_loss: float | None, wall: float, resume: bool) -> dict[str, Any]:
    """`run` is trainer.Run; `loop` what its loop measured; `eval_loss` the final held-out loss (None: no eval set)."""
    secs, tokens, device = loop["train_seconds"], loop["tokens_seen"], run.acc.device
    steady = steady_tokens_per_s(tokens, secs, loop["first_step_tokens"], loop["first_step_seconds"])
    # A resumed run trained on the steps before its checkpoint too: its adapter's record counts them (the stream of
    # micro-batches is the same every time), while its speed is this invocation's.
    before = sum(b.real_tokens for step in range(run.start_step) for b in run.step_batches(step))
    return {
        "train_tokens_per_s": None if steady is None else round(steady, 1),  # after the warm-up step, where >1 ran
        "train_tokens_per_s_all_steps": round(tokens / secs, 1) if secs else None,  # the warm-up step too
        "first_step_seconds": round(loop["first_step_seconds"], 4),
        "train_tokens": before + tokens,
        "peak_memory_gib": round(peak_memory_gib(device.type), 3),
        # process 0's own: under torchrun each process has its peak (and its device), the others' are not gathered
        "memory_kind": ("cuda max allocated" if device.type == "cuda" else "process peak RSS")
        + (" (process 0)" if run.world > 1 else ""),
        # CUDA only: the caching allocator's peak, the figure other fine-tuning kits print beside (or instead of) ours
        "peak_memory_reserved_gib": (None if (r := peak_reserved_gib(device.type)) is None else round(r, 3)),
        "final_train_loss": round(loop["last_loss"], 6) if math.isfinite(loop["last_loss"]) else None,
        "final_eval_loss": round(eval_loss, 6) if eval_loss is not None else None,
        "wall_seconds": round(wall, 1),
        "steps": run.total_steps,
        "resumed_from_step": run.start_step if resume and run.start_step else None,  # None: it started afresh
        "trainable_params": run.trainable,
        "total_params": run.total_params,
        "processes": run.world,
        "fsdp": run.fsdp,
        "param_bytes_per_process": sharding.local_param_bytes(run.model),
        "device": device.type,
        "dtype": run.dtype,
    }
