"""Adapters in, one LoRA adapter out (`llmfast merge --adapter-rank`): concatenated ranks or an SVD.

'concat' stacks the ranks, exact for methods whose result is base + sum(c_i * delta_i) (the method's
`coefficients`); an integer re-ranks each merged delta by SVD and reports the relative Frobenius error.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from llmfast.errors import UserError
from llmfast.merge.plan import MergePlan


def run_adapter_merge(plan: MergePlan, out_dir: Path, adapter_rank: str, progress: bool,
                      overwrite: bool) -> dict[str, Any]:
    from llmfast.artifacts import atomic_dir
    from llmfast.merge import io as mio
    from llmfast.merge.adapters import adapter_config_for
    from llmfast.memory import peak_memory_gib
    from llmfast.merge.steps import progress_bar, write_merge_manifest

    start = time.perf_counter()
    adapters = [s for s in plan.inputs if s.kind == "adapter"]
    if not plan.adapters_only or not adapters:
        raise UserError("--adapter-rank needs every model in the config to be a LoRA adapter on base_model")
    concat = adapter_rank == "concat"
    targets = sorted({n for s in adapters for n in s.adapter.modules})
    if any(m.transposed for s in adapters for m in s.adapter.modules.values()):
        raise UserError("adapters on embeddings cannot be written as a merged adapter yet, nor adapters of GPT-2's "
                        "Conv1D layers (fan_in_fan_out): merge into a full model (leave out --adapter-rank)")
    coeffs = _coefficients(plan, targets) if concat else {}
    rank = sum(max(m.rank for m in s.adapter.modules.values()) for s in adapters) if concat else int(adapter_rank)
    shapes = {n: shape for n, shape, _ in plan.tensors}
    full = max(min(shapes[n]) for n in targets)  # beyond a layer's min(in, out), an SVD has only zeros to add
    if not concat and rank > full:
        raise UserError(f"--adapter-rank {rank}: the adapters' largest layer has full rank {full}, so a higher rank "
                        f"only pads the adapter with zeros: give --adapter-rank {full} or less")
    layout = []
    for n in targets:
        out_f, in_f = shapes[n]
        key = "base_model.model." + n.removesuffix(".weight")
        layout += [(f"{key}.lora_A.weight", (rank, in_f), plan.out_dtype),
                   (f"{key}.lora_B.weight", (out_f, rank), plan.out_dtype)]
    errors = _SvdErrors()
    base_reader = mio.TensorReader(plan.base.path)
    with atomic_dir(out_dir, overwrite=overwrite, inputs=plan.input_paths(), guard=True) as tmp:
        writer = mio.ShardedWriter(tmp, layout, 2**62, prefix="adapter_model")
        bar = progress_bar(len(targets), f"merge adapters ({plan.method.name}, rank {adapter_rank})", progress)
        try:
            for n in targets:
                a_out, b_out = _concat(plan, n, coeffs[n], shapes[n]) if concat else _svd(plan, n, rank, base_reader, errors)
                key = f"base_model.model.{n.removesuffix('.weight')}"
                writer.write(f"{key}.lora_A.weight", a_out)
                writer.write(f"{key}.lora_B.weight", b_out)
                bar.update()
        finally:
            bar.close()
            writer.close()
        writer.finish()
        cfg = adapter_config_for(adapters[0].adapter, plan.base.path, rank, targets, list(shapes))
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        for name in mio.COPY_FILES:
            src_file = plan.base.path / name
            if src_file.is_file() and name != "generation_config.json":
                (tmp / name).write_bytes(src_file.read_bytes())
        metrics: dict[str, Any] = {"method": plan.method.name, "output_kind": "adapter", "rank": rank,
                                   "rank_mode": "concat" if concat else "svd", "modules": len(targets),
                                   "seconds": round(time.perf_counter() - start, 2)}
        if not concat:
            metrics.update(errors.metrics())
        metrics["peak_rss_gib"] = round(peak_memory_gib(), 3)
        write_merge_manifest(plan, tmp, metrics, "adapter", base_model_path=str(plan.base.path))
    return metrics


def _coefficients(plan: MergePlan, targets: list[str]) -> dict[str, list[float]]:
    """Each target's c_i, checked before anything is written: a method not linear in the task vectors is refused."""
    out = {}
    for n in targets:
        params = [table[n] for table in plan.per_input]
        try:
            c = plan.method.coefficients(params, plan.shared_for(n), [s.is_base for s in plan.inputs])
        except ValueError as e:
            raise UserError(f"{plan.config_path}: {e}") from None
        if c is None:
            raise UserError(f"merge_method '{plan.method.name}' trims, drops or elects signs, so its result is not "
                            "a sum of the adapters: concatenating ranks cannot express it; give --adapter-rank R "
                            "(an SVD to rank R)")
        out[n] = c
    return out


def _concat(plan: MergePlan, n: str, coeffs: list[float], shape: tuple[int, ...]) -> tuple[Any, Any]:
    """A and B of sum_i c_i * s_i * B_i @ A_i as one adapter: [c_1 s_1 B_1 | ...] @ [A_1; ...] (exact)."""
    import torch

    out_f, in_f = shape
    a_parts, b_parts = [], []
    for src, c in zip(plan.inputs, coeffs):
        if src.is_base:
            continue
        width = max(m.rank for m in src.adapter.modules.values())
        f = src.adapter.factors(n)
        if f is None:
            a, b = torch.zeros(width, in_f), torch.zeros(out_f, width)
        else:
            a, b, scale = f
            b = b * (scale * c)
            if a.shape[0] < width:  # pad a smaller rank (rank_pattern) with zeros
                a = torch.cat([a, a.new_zeros(width - a.shape[0], in_f)])
                b = torch.cat([b, b.new_zeros(out_f, width - b.shape[1])], dim=1)
        a_parts.append(a)
        b_parts.append(b)
    return torch.cat(a_parts, 0), torch.cat(b_parts, 1)


class _SvdErrors:
    """The Frobenius energy the re-rank left out, overall and for the worst module."""

    def __init__(self) -> None:
        self.tail = self.total = self.worst = 0.0

    def add(self, tail: float, total: float) -> None:
        self.tail += tail
        self.total += total
        if total > 0:
            self.worst = max(self.worst, math.sqrt(tail / total))

    def metrics(self) -> dict[str, float]:
        overall = math.sqrt(self.tail / self.total) if self.total > 0 else 0.0
        return {"svd_relative_frobenius_error": round(overall, 6), "svd_worst_module_error": round(self.worst, 6)}


def _svd(plan: MergePlan, n: str, rank: int, base_reader: Any, errors: _SvdErrors) -> tuple[Any, Any]:
    """The merged delta of module `n` (from the adapters' task vectors) brought to `rank` by a truncated SVD."""
    from llmfast.merge.adapters import svd_rerank
    from llmfast.merge.steps import merge_tensor, read_inputs

    import torch

    # linear averages a base_model that is not among the models in as one more input: it is read from the base
    base, deltas = read_inputs(plan, n, base_reader, [base_reader if s.is_base else None for s in plan.inputs])
    merged = merge_tensor(plan, n, base, deltas)
    delta = torch.from_numpy(merged - base.astype(merged.dtype))
    del merged
    a_out, b_out, tail, total = svd_rerank(delta, rank)
    errors.add(tail, total)
    return a_out, b_out
