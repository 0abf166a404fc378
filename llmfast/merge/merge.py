"""The streaming merge: for each tensor, read it from every input, merge, write it, let it go.

Peak memory is a few tensors (the base's, one per input, the result) whatever the number and size of
the models; the output directory appears only when complete (`atomic_dir`). Adapter inputs give their
task vector one layer at a time (scale * B @ A). With `--adapter-rank`, adapters merge into an adapter:
'concat' stacks the ranks (exact, for methods linear in the task vectors), an integer re-ranks each
merged delta by SVD and reports the relative Frobenius error.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from typing import Any

from llmfast.errors import UserError
from llmfast.merge.config import MergePlan, plan_merge


def peak_rss_gib() -> float:
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, leave=False, file=sys.stderr)


def merge_tensor(plan: MergePlan, name: str, base_reader: Any, readers: list[Any],
                 stats: dict[str, Any] | None = None) -> "Any":
    """The merged value of one tensor, in float32 (float64 stays float64)."""
    import torch

    method = plan.method
    params = [table[name] for table in plan.per_input]
    base = base_reader.get(name) if base_reader is not None else None
    if plan.config.dtype:  # mergekit reads every input in `dtype` before merging
        cast = getattr(torch, plan.config.dtype.removeprefix("torch."))
        base = base.to(cast) if base is not None else None
    else:
        cast = None
    if method.domain == "raw":
        tensors = []
        for src, reader in zip(plan.inputs, readers):
            if src.kind == "adapter":
                d = src.adapter.delta(name)
                t = base.float() if d is None else base.float() + d
            else:
                t = reader.get(name)
            tensors.append(t.to(cast) if cast is not None else t)
        return method.fn(base, tensors, params, plan.shared_for(name))
    assert base is not None
    deltas: list[Any] = []
    for src, reader in zip(plan.inputs, readers):
        if src.kind == "adapter":
            deltas.append(src.adapter.delta(name))  # None: untouched, a zero task vector
            continue
        t = reader.get(name)
        if cast is not None:
            t = t.to(cast)
        if torch.equal(t, base):
            deltas.append(None)  # skip the work for a zero task vector (norms, embeddings of LoRA merges)
        else:
            deltas.append(t.float() - base.float() if t.dtype not in (torch.float32, torch.float64) else t - base)
        del t
    if all(d is None for d in deltas):
        return base.float() if base.dtype not in (torch.float32, torch.float64) else base
    return method.fn(base, deltas, params, plan.shared_for(name), tensor_name=name, seed=plan.seed, stats=stats)


def run_merge(plan: MergePlan, out_dir: str | Path, shard_size: str = "5G", adapter_rank: str | None = None,
              progress: bool = True, threads: int | None = 1) -> dict[str, Any]:
    """Merge per `plan` into `out_dir` (atomically); return the metrics written into its manifest."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_merge(plan, out_dir, shard_size, adapter_rank, progress)
    finally:
        torch.set_num_threads(before)


def _run_merge(plan: MergePlan, out_dir: str | Path, shard_size: str, adapter_rank: str | None,
               progress: bool) -> dict[str, Any]:
    from llmfast.artifacts import atomic_dir, write_manifest
    from llmfast.merge import io as mio
    from llmfast.recipe import recipe_dict

    start = time.perf_counter()
    out_dir = Path(out_dir)
    if adapter_rank is not None:
        return _run_adapter_merge(plan, out_dir, adapter_rank, progress, start)
    base_reader = mio.TensorReader(plan.base.path) if plan.base is not None else None
    readers = [None if s.kind == "adapter" else
               (base_reader if (s.is_base and base_reader is not None) else mio.TensorReader(s.path))
               for s in plan.inputs]
    layout = [(n, shape, plan.out_dtype if tag in ("F32", "BF16", "F16", "F64") else mio.st_dtype_name(tag))
              for n, shape, tag in plan.tensors]
    stats: dict[str, Any] = {}
    with atomic_dir(out_dir, overwrite=True) as tmp:
        writer = mio.ShardedWriter(tmp, layout, mio.parse_size(shard_size))
        bar = _progress(len(layout), f"merge ({plan.method.name})", progress)
        try:
            for name, _shape, _dt in layout:
                try:
                    merged = merge_tensor(plan, name, base_reader, readers, stats)
                except ValueError as e:
                    raise UserError(f"{plan.config_path}: tensor {name}: {e}") from None
                writer.write(name, merged)
                del merged
                bar.update()
        finally:
            bar.close()
            writer.close()
        files = writer.finish()
        mio.copy_model_files(plan.reference, tmp, plan.out_dtype)
        metrics = {
            "method": plan.method.name,
            "tensors": len(layout),
            "output_bytes": writer.total_bytes,
            "shards": len(files),
            "seconds": round(time.perf_counter() - start, 2),
            "peak_rss_gib": round(peak_rss_gib(), 3),
        }
        if stats.get("nonzero"):
            metrics["kept_fraction"] = round(stats["kept"] / stats["nonzero"], 5)
        write_manifest(tmp, stage="merge", parents=[s.spec for s in plan.inputs] +
                       ([plan.config.base_model] if plan.config.base_model and not any(s.is_base for s in plan.inputs)
                        else []),
                       recipe=recipe_dict(plan.config), metrics=metrics, output_kind="model", seed=plan.seed)
    return metrics


def _run_adapter_merge(plan: MergePlan, out_dir: Path, adapter_rank: str, progress: bool, start: float) -> dict:
    """Adapters in, one LoRA adapter out: concatenated ranks (exact) or an SVD to a fixed rank."""
    import json
    import math

    import torch

    from llmfast.artifacts import atomic_dir, write_manifest
    from llmfast.merge import io as mio
    from llmfast.merge.adapters import adapter_config_for, svd_rerank
    from llmfast.merge.methods import linear_coefficients
    from llmfast.recipe import recipe_dict

    adapters = [s for s in plan.inputs if s.kind == "adapter"]
    if not plan.adapters_only or not adapters:
        raise UserError("--adapter-rank needs every model in the config to be a LoRA adapter on base_model")
    method = plan.method
    concat = adapter_rank == "concat"
    if not concat:
        try:
            rank = int(adapter_rank)
        except ValueError:
            raise UserError(f"--adapter-rank '{adapter_rank}': give 'concat' or a positive integer rank") from None
        if rank <= 0:
            raise UserError(f"--adapter-rank {rank}: the rank must be positive")
    elif not method.linear_in_deltas:
        raise UserError(f"merge_method '{method.name}' trims, drops or elects signs, so its result is not a sum of "
                        "the adapters: concatenating ranks cannot express it; give --adapter-rank R (an SVD to rank R)")
    targets = sorted({n for s in adapters for n in s.adapter.modules})
    if any(m.embedding for s in adapters for m in s.adapter.modules.values()):
        raise UserError("adapters on embeddings cannot be written as a merged adapter yet: merge into a full model")
    if concat:
        rank = sum(max(m.rank for m in s.adapter.modules.values()) for s in adapters)
    base_reader = mio.TensorReader(plan.base.path) if plan.base is not None else None
    shapes = {n: shape for n, shape, _ in plan.tensors}
    layout = []
    for n in targets:
        out_f, in_f = shapes[n]
        key = "base_model.model." + n.removesuffix(".weight")
        layout += [(f"{key}.lora_A.weight", (rank, in_f), plan.out_dtype),
                   (f"{key}.lora_B.weight", (out_f, rank), plan.out_dtype)]
    tail = total = 0.0
    worst = 0.0
    with atomic_dir(out_dir, overwrite=True) as tmp:
        writer = mio.ShardedWriter(tmp, layout, 2**62, prefix="adapter_model")
        bar = _progress(len(targets), f"merge adapters ({method.name}, rank {'concat' if concat else rank})", progress)
        try:
            for n in targets:
                params = [table[n] for table in plan.per_input]
                if concat:
                    coeffs = linear_coefficients(method, params, plan.shared_for(n), [s.is_base for s in plan.inputs])
                    a_parts, b_parts = [], []
                    for src, c in zip(plan.inputs, coeffs):
                        if src.is_base:
                            continue
                        width = max(m.rank for m in src.adapter.modules.values())
                        f = src.adapter.factors(n)
                        out_f, in_f = shapes[n]
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
                    a_out, b_out = torch.cat(a_parts, 0), torch.cat(b_parts, 1)
                else:
                    merged = merge_tensor(plan, n, base_reader, [None] * len(plan.inputs))
                    delta = merged - base_reader.get(n).to(merged.dtype)
                    del merged
                    a_out, b_out, t, tot = svd_rerank(delta, rank)
                    tail += t
                    total += tot
                    if tot > 0:
                        worst = max(worst, math.sqrt(t / tot))
                    del delta
                writer.write(f"base_model.model.{n.removesuffix('.weight')}.lora_A.weight", a_out)
                writer.write(f"base_model.model.{n.removesuffix('.weight')}.lora_B.weight", b_out)
                bar.update()
        finally:
            bar.close()
            writer.close()
        writer.finish()
        cfg = adapter_config_for(adapters[0].adapter, plan.base.path, rank, targets)
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        for name in mio.COPY_FILES:
            src_file = plan.base.path / name
            if src_file.is_file() and name != "generation_config.json":
                (tmp / name).write_bytes(src_file.read_bytes())
        metrics: dict[str, Any] = {
            "method": method.name,
            "output_kind": "adapter",
            "rank": rank,
            "rank_mode": "concat" if concat else "svd",
            "modules": len(targets),
            "seconds": round(time.perf_counter() - start, 2),
            "peak_rss_gib": round(peak_rss_gib(), 3),
        }
        if not concat:
            metrics["svd_relative_frobenius_error"] = round(math.sqrt(tail / total), 6) if total > 0 else 0.0
            metrics["svd_worst_module_error"] = round(worst, 6)
        write_manifest(tmp, stage="merge", parents=[s.spec for s in adapters], recipe=recipe_dict(plan.config),
                       metrics=metrics, output_kind="adapter", base_model_path=str(plan.base.path), seed=plan.seed)
    return metrics


def run_merge_cli(args: argparse.Namespace) -> int:
    plan = plan_merge(args.config, args.overrides, seed=args.seed)
    metrics = run_merge(plan, args.output, shard_size=args.out_shard_size, adapter_rank=args.adapter_rank,
                        progress=not args.no_progress, threads=args.threads)
    what = "adapter" if metrics.get("output_kind") == "adapter" else "model"
    line = (f"merged {what}: {args.output}  method: {metrics['method']}  seconds: {metrics['seconds']}  "
            f"peak RSS: {metrics['peak_rss_gib']:.2f} GiB")
    if "svd_relative_frobenius_error" in metrics:
        line += (f"  rank: {metrics['rank']}  SVD relative Frobenius error: "
                 f"{metrics['svd_relative_frobenius_error']:.4g}"
                 f" (worst module {metrics['svd_worst_module_error']:.4g})")
    elif metrics.get("rank_mode") == "concat":
        line += f"  rank: {metrics['rank']} (concatenated, exact)"
    if "kept_fraction" in metrics:
        line += f"  kept fraction: {metrics['kept_fraction']:.4f}"
    print(line)
    return 0
