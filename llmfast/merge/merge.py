"""The streaming merge: for each tensor, read it from every input, merge, write it, let it go.

Peak memory is a few tensors (the base's, one per input, the result, for the tensors in flight, see
`pipeline`) whatever the number and size of the models; the output directory appears only when complete
(`atomic_dir`). Adapter inputs give their task vector one layer at a time (scale * B @ A). With
`--adapter-rank`, adapters merge into an adapter instead (`adapter_output`).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import Any, Iterator

from llmfast.errors import UserError
from llmfast.memory import peak_memory_gib
from llmfast.merge.plan import MergePlan, plan_merge
from llmfast.merge import trim_blocks
from llmfast.merge.native_merge import merge_kernel
from llmfast.merge.steps import (default_threads, map_inputs, merge_blocks, merge_counting, merges_by_blocks,
                                 open_readers, prepare_inputs, progress_bar, write_merge_manifest)


def run_merge(plan: MergePlan, out_dir: str | Path, shard_size: str = "5G", adapter_rank: str | None = None,
              progress: bool = True, threads: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Merge per `plan` into `out_dir` (atomically); return the metrics written into its manifest.

    `threads` tensors are merged at once, each on one thread (None: `default_threads()`). Full models merge
    in numpy alone; LoRA adapters' task vectors (B @ A) and SVDs are torch's, on one torch thread each.
    """
    from llmfast.merge.io import parse_size

    threads = default_threads() if threads is None else threads
    if threads < 1:
        raise UserError(f"--threads {threads}: give a positive number of threads")
    max_bytes = parse_size(shard_size)
    with _one_torch_thread(adapter_rank is not None or any(s.kind == "adapter" for s in plan.inputs)):
        if adapter_rank is not None:
            from llmfast.merge.adapter_output import run_adapter_merge

            return run_adapter_merge(plan, Path(out_dir), adapter_rank, progress, overwrite)
        return _run_model_merge(plan, Path(out_dir), max_bytes, progress, threads, overwrite)


@contextlib.contextmanager
def _one_torch_thread(needed: bool) -> Iterator[None]:
    """torch on one thread while the merge's own threads work across tensors (only when torch is used at all)."""
    if not needed:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_model_merge(plan: MergePlan, out_dir: Path, max_bytes: int, progress: bool, threads: int,
                     overwrite: bool) -> dict[str, Any]:
    from llmfast.artifacts import atomic_dir, check_space
    from llmfast.merge import io as mio
    from llmfast.merge.pipeline import ordered_map

    start = time.perf_counter()
    base_reader, readers = open_readers(plan)
    layout = [(n, shape, out_dtype(plan, tag)) for n, shape, tag in plan.tensors]
    stats: dict[str, Any] = {}
    with atomic_dir(out_dir, overwrite=overwrite, inputs=plan.input_paths(), guard=True) as tmp:
        writer = mio.ShardedWriter(tmp, layout, max_bytes)
        check_space(out_dir, writer.total_bytes)  # before the first tensor is merged
        bar = progress_bar(len(layout), f"merge ({plan.method.name})", progress)
        items = [(n, mio.numel(shape)) for n, shape, _dt in layout]
        dtypes = {n: dt for n, _shape, dt in layout}
        kernel = merge_kernel()
        native = kernel is not None and kernel.takes_plan(plan)
        blocked = merges_by_blocks(plan)
        trimmed = trim_blocks.takes(plan)

        def merge(n: str, got: Any) -> tuple[Any, dict[str, int], bool]:
            """(merged tensor, counts, whether it is already in its stored form)."""
            if native and dtypes[n] in ("float32", "bfloat16") and kernel.takes(plan, got):  # one C pass
                merged, counts = kernel.merge(plan, n, got, dtypes[n])
                return merged, {**counts, "native": 1}, True
            if blocked:  # the merge converts block by block
                return merge_blocks(plan, n, got, dtypes[n]), {}, True
            if trimmed and (done := trim_blocks.merge_trimmed(plan, n, got, dtypes[n])) is not None:
                return (*done, True)  # trimmed block by block: not every task vector whole in memory
            return (*merge_counting(plan, n, prepare_inputs(plan, n, *got)), False)

        # Mapping is all the reading; conversions happen in the merging threads.
        read = lambda n: map_inputs(plan, n, base_reader, readers)  # noqa: E731
        try:
            for name, (merged, counts, stored) in ordered_map(items, read, merge, threads):
                writer.write(name, merged, stored=stored)
                del merged
                for key, value in counts.items():  # summed here, in one thread
                    stats[key] = stats.get(key, 0) + value
                bar.update()
        finally:
            bar.close()
            writer.close()
        files = writer.finish()
        mio.copy_model_files(plan.reference, tmp, plan.out_dtype)
        metrics = {"method": plan.method.name, "tensors": len(layout), "output_bytes": writer.total_bytes,
                   "shards": len(files), "threads": threads,
                   "native_tensors": stats.get("native", 0), "seconds": round(time.perf_counter() - start, 2),
                   "peak_rss_gib": round(peak_memory_gib(), 3)}
        if stats.get("nonzero"):
            metrics["kept_fraction"] = round(stats["kept"] / stats["nonzero"], 5)
        write_merge_manifest(plan, tmp, metrics, "model")
    return metrics


def out_dtype(plan: MergePlan, tag: str) -> str:
    """The dtype a tensor stored as `tag` in the reference model is written in: `out_dtype` (or `dtype`) where the
    config sets one; else its own stored float dtype, so a model that keeps its norms in float32 beside bfloat16
    linears keeps them so (rounded to the model's majority dtype they would change). Integers stay as stored."""
    from llmfast.merge import io as mio

    if tag not in ("F32", "BF16", "F16", "F64"):
        return mio.st_dtype_name(tag)
    if plan.config.out_dtype or plan.config.dtype or tag == "F64":
        return plan.out_dtype
    return mio.st_dtype_name(tag)


def check_arguments(args: argparse.Namespace) -> None:
    """The flags that need no model: a bad one fails before the config is even read."""
    from llmfast.merge.io import parse_size

    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads {args.threads}: give a positive number of threads (default: "
                        f"{default_threads()}, the cores available, at most 4)")
    parse_size(args.out_shard_size)
    if args.adapter_rank is not None and args.adapter_rank != "concat":
        try:
            rank = int(args.adapter_rank)
        except ValueError:
            raise UserError(f"--adapter-rank '{args.adapter_rank}': give 'concat' or a positive integer rank") from None
        if rank <= 0:
            raise UserError(f"--adapter-rank {rank}: the rank must be positive")


def run_merge_cli(args: argparse.Namespace) -> int:
    from llmfast.artifacts import check_output

    from llmfast.memory import give_back_freed_memory, keep_freed_memory_for_reuse

    check_arguments(args)
    plan = plan_merge(args.config, args.overrides, seed=args.seed)
    from llmfast.merge.io import numel

    if max(numel(shape) for _n, shape, _t in plan.tensors) * 4 > 32 * 2**20:
        # Tensors past glibc's 32 MB mmap threshold would each get fresh pages; this process only merges.
        keep_freed_memory_for_reuse()
    try:
        check_output(args.output, args.overwrite, plan.input_paths())
        metrics = run_merge(plan, args.output, shard_size=args.out_shard_size, adapter_rank=args.adapter_rank,
                            progress=not args.no_progress, threads=args.threads, overwrite=args.overwrite)
    finally:  # a script's main(["merge", ...]) goes on in this process: its heap is given back as glibc would
        give_back_freed_memory()
    print(_summary(args.output, metrics))
    return 0


def _summary(output: str, metrics: dict[str, Any]) -> str:
    what = "adapter" if metrics.get("output_kind") == "adapter" else "model"
    line = (f"merged {what}: {output}  method: {metrics['method']}  seconds: {metrics['seconds']}  "
            f"peak RSS: {metrics['peak_rss_gib']:.2f} GiB")
    if "svd_relative_frobenius_error" in metrics:
        line += (f"  rank: {metrics['rank']}  SVD relative Frobenius error: "
                 f"{metrics['svd_relative_frobenius_error']:.4g}"
                 f" (worst module {metrics['svd_worst_module_error']:.4g})")
    elif metrics.get("rank_mode") == "concat":
        line += f"  rank: {metrics['rank']} (concatenated, exact)"
    if "kept_fraction" in metrics:
        line += f"  kept fraction: {metrics['kept_fraction']:.4f}"
    return line
