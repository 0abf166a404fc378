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


def traced_peak_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """(fn's result, the most bytes Python's and numpy's allocators held at once while fn ran, beyond before);
    tracemalloc counts every numpy array's data (numpy reports them to it)."""
    import tracemalloc

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = fn()
        return result, tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def test_a_ties_merge_holds_a_few_bytes_per_entry_of_its_largest_tensor(tmp_path, monkeypatch) -> None:
    """A TIES merge of two fine-tunes whose 4M-entry embedding ties in bulk at the trim threshold (float32: mergekit's
    tie order replayed): the most bytes held at once per embedding entry. The whole-tensor trim held ~39 in float32
    and ~20 in bfloat16 here (every task vector, its magnitudes, numpy's partition copy, masks, the sum, the
    divisor); the blockwise one holds the output, the replay's magnitudes and index arrays, and blocks. In float32
    also TIES with `rescale: true` and dare_ties on numpy's path (no C kernel), which were whole-tensor merges."""
    import shutil

    import torch
    import yaml
    from safetensors.torch import load_file, save_file

    from llmfast.merge import merge as merge_mod
    from llmfast.testing import build_tiny_llama
    from tests.conftest import run_cli

    f32 = build_tiny_llama(tmp_path / "base-f32", num_layers=1, model_vocab_size=32768)
    sd = load_file(f32 / "model.safetensors")
    emb = next(k for k in sd if "embed" in k)
    n = sd[emb].numel()
    assert n == 32768 * 128
    for dtype, bound in ((torch.float32, 16), (torch.bfloat16, 6)):  # measured 12.3 and 3.6 (whole-tensor: 38.6, 20.1)
        tag = str(dtype).removeprefix("torch.")
        paths = []
        for i in range(3):
            d = shutil.copytree(f32, tmp_path / f"{tag}-{i}")
            g = torch.Generator().manual_seed(i)
            step = torch.randint(-4, 5, sd[emb].shape, generator=g).float() * 2.0**-10 if i else 0
            save_file({k: ((v + step) if k == emb else v).to(dtype) for k, v in sd.items()}, d / "model.safetensors",
                      metadata={"format": "pt"})
            paths.append(d)
        # measured 12.2 and 5.1 (whole-tensor: 25.8, 16.1)
        extra = [("ties", {"rescale": True}, 16), ("dare_ties", {}, 6)] if dtype == torch.float32 else []
        for method, shared, limit in [("ties", {}, bound), *extra]:
            cfg = tmp_path / f"{tag}-{method}-{len(shared)}.yaml"
            cfg.write_text(yaml.safe_dump({"merge_method": method, "base_model": str(paths[0]), "parameters": shared,
                                           "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.5}}
                                                      for p in paths[1:]]}))
            with monkeypatch.context() as m:
                m.setattr(merge_mod, "merge_kernel", lambda: None)  # DARE on numpy's path, as without a C compiler
                (code, _out, err), peak = traced_peak_bytes(lambda: run_cli(
                    "merge", str(cfg), str(tmp_path / f"out-{cfg.stem}"), "--no-progress", "--threads", "1"))
            assert code == 0, err
            assert peak / n < limit, (tag, method, shared, peak / n)
