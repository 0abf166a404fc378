"""How many copies of a model its loaders hold: the bytes torch allocates on the CPU, counted allocation by
allocation by torch's profiler (deterministic, unlike a process's RSS), against the loaded model's own bytes."""

from __future__ import annotations

from typing import Any, Callable


def torch_peak_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """(fn's result, the most bytes torch's CPU allocator held at once while fn ran, beyond what it held before)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    live = peak = 0
    # every allocation is an op's own (self) memory, every free a "[memory]" event: in time order, the live total
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return result, peak


def model_bytes(model: Any) -> int:
    """The bytes of a model's parameters and buffers, each tensor once (a tied head is the embedding)."""
    seen = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in seen.values())


def test_the_count_follows_allocations_and_frees() -> None:
    import torch

    def work() -> torch.Tensor:
        a = torch.empty(1000, 1000)  # 4 MB
        b = torch.empty(1000, 1000)
        del a
        c = b.to(torch.bfloat16)  # 2 MB while b's 4 MB live: the peak is a and b, 8 MB
        return c

    got, peak = torch_peak_bytes(work)
    assert got.dtype == torch.bfloat16 and peak == 8_000_000
