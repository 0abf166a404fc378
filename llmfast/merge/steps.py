"""The steps of merging one tensor, shared by the model and the adapter outputs: read, merge, record."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from llmfast.errors import UserError
from llmfast.merge.methods.base import TensorContext
from llmfast.merge.plan import MergePlan


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    # `disable` only to switch it off: passed False, it overrode tqdm's TQDM_DISABLE=1
    return tqdm(total=total, desc=desc, unit="tensor", leave=False, file=sys.stderr,
                **({} if enabled else {"disable": True}))


def default_threads() -> int:
    """The cores this process may use, at most 4 (beyond that the merge is bound by memory bandwidth)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


# Entries merged at a time by an element-wise method: its passes then run in the core's cache.
BLOCK = 1 << 16


def read_inputs(plan: MergePlan, name: str, base_reader: Any, readers: list[Any]) -> tuple[Any, list[Any]]:
    """(base, inputs) of one tensor as numpy arrays: whole weights for a "raw" method, else task vectors (None: zero).

    Whole weights are read-only views of the files; task vectors are fresh float arrays the method may change.
    """
    return prepare_inputs(plan, name, *map_inputs(plan, name, base_reader, readers))


def map_inputs(plan: MergePlan, name: str, base_reader: Any, readers: list[Any]) -> tuple[Any, list[Any]]:
    """The tensor as stored in each input, mapped and not yet converted: (array, safetensors tag); None for adapters."""
    base = base_reader.stored_array(name) if base_reader is not None else None
    return base, [None if src.kind == "adapter" else reader.stored_array(name)
                  for src, reader in zip(plan.inputs, readers)]


def prepare_inputs(plan: MergePlan, name: str, base_stored: Any, stored: list[Any],
                   block: slice | None = None, keep_zero: bool = False) -> tuple[Any, list[Any]]:
    """`read_inputs` from mapped arrays, for the whole tensor or a `block` of its flattened entries.

    `keep_zero`: a task vector that is zero here stays an array (the caller decides over the whole tensor)."""
    import numpy as np

    from llmfast.merge.io import round_to, stored_values
    from llmfast.merge.methods.base import float_work

    base = stored_values(*base_stored, block) if base_stored is not None else None
    cast = plan.config.dtype  # mergekit reads every input in `dtype` before merging
    if cast is not None and base is not None and not stored_as(base_stored[1], cast):
        base = round_to(base, cast)
    if plan.method.domain == "raw":
        tensors = []
        for src, st in zip(plan.inputs, stored):
            if src.kind == "adapter":
                assert block is None, "adapters are merged whole"
                d = src.adapter.delta(name)
                t = float_work(base) if d is None else float_work(base) + d.numpy()
                tensors.append(round_to(t, cast) if cast is not None else t)
            else:
                t = stored_values(*st, block)
                tensors.append(round_to(t, cast) if cast is not None and not stored_as(st[1], cast) else t)
        return base, tensors
    assert base is not None
    work_base = float_work(base)
    deltas: list[Any] = []
    for src, st in zip(plan.inputs, stored):
        if src.kind == "adapter":
            assert block is None, "adapters are merged whole"
            d = src.adapter.delta(name)  # None: untouched, a zero task vector
            deltas.append(None if d is None else d.numpy())
            continue
        t = stored_values(*st, block)
        if cast is not None and not stored_as(st[1], cast):
            t = round_to(t, cast)
        t = float_work(t)
        # Into `t` itself when it is a copy of ours (a widened or rounded read), else a fresh array.
        delta = np.subtract(t, work_base, out=t if t.flags.writeable and t.dtype == work_base.dtype else None)
        # A zero task vector (norms, embeddings of LoRA merges) skips the method's work.
        deltas.append(delta if keep_zero or delta.any() else None)
        del t, delta
    return base, deltas


def stored_as(tag: str, dtype: str) -> bool:
    """Whether values stored with safetensors `tag` are already in `dtype` (so rounding to it changes nothing)."""
    from llmfast.merge.io import st_dtype_name

    return st_dtype_name(tag) == dtype.removeprefix("torch.")


def merges_by_blocks(plan: MergePlan) -> bool:
    """Whether tensors merge block by block: an element-wise method on full models (adapters' B @ A come whole)."""
    return plan.method.elementwise and not any(s.kind == "adapter" for s in plan.inputs)


def merge_blocks(plan: MergePlan, name: str, mapped: tuple[Any, list[Any]], out_dtype: str) -> Any:
    """The merged tensor already in `out_dtype`'s stored form (bfloat16 as bits), merged `BLOCK` entries at a time.

    For an element-wise method each block of the result is the merge of that block of the inputs, so the
    conversions, task vectors and sums stay in cache instead of streaming whole tensors through memory.
    """
    import numpy as np

    from llmfast.merge.io import numel, stored_bytes, stored_dtype

    base_stored, stored = mapped
    shape = next(st for st in [base_stored, *stored] if st is not None)[0].shape
    n = numel(shape)
    out = np.empty(n, dtype=stored_dtype(out_dtype))
    for start in range(0, n, BLOCK):
        block = slice(start, min(start + BLOCK, n))
        base, inputs = prepare_inputs(plan, name, base_stored, stored, block)
        out[block] = stored_bytes(merge_tensor(plan, name, base, inputs), out_dtype, name)
    return out.reshape(shape)


def merge_tensor(plan: MergePlan, name: str, base: Any, inputs: list[Any], stats: dict[str, Any] | None = None) -> Any:
    """The merged value of one tensor as a numpy array, in float32 (float64 stays float64)."""
    from llmfast.merge.methods.base import float_work

    if plan.method.domain == "delta" and all(d is None for d in inputs):
        return float_work(base)
    params = [table[name] for table in plan.per_input]
    ctx = TensorContext(name=name, seed=plan.seed, stats=stats, exact_ties=plan.computes_like_mergekit(name))
    import numpy as np

    try:
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused by name where it is written
            return plan.method.merge(base, inputs, params, plan.shared_for(name), ctx)
    except ValueError as e:
        raise UserError(f"{plan.config_path}: tensor {name}: {e}") from None


def open_readers(plan: MergePlan) -> tuple[Any, list[Any]]:
    from llmfast.merge import io as mio

    base_reader = mio.TensorReader(plan.base.path) if plan.base is not None else None
    readers = [None if s.kind == "adapter" else
               (base_reader if (s.is_base and base_reader is not None) else mio.TensorReader(s.path))
               for s in plan.inputs]
    return base_reader, readers


def merge_counting(plan: MergePlan, name: str, got: tuple[Any, list[Any]]) -> tuple[Any, dict[str, int]]:
    counts: dict[str, int] = {}
    return merge_tensor(plan, name, got[0], got[1], counts), counts


def write_merge_manifest(plan: MergePlan, tmp: Path, metrics: dict[str, Any], kind: str, **extra: Any) -> None:
    from llmfast.artifacts import write_manifest
    from llmfast.recipe import recipe_dict

    parents = [s.spec for s in plan.inputs if kind == "model" or s.kind == "adapter"]
    if kind == "model" and plan.config.base_model and not any(s.is_base for s in plan.inputs):
        parents.append(plan.config.base_model)
    if kind == "model":  # relufy models (plan.py refuses differing activations or cuts): the merge is one too
        from llmfast.sparse.derived import carried_sparsity

        models = [s.path for s in plan.inputs if s.kind == "model"]
        extra |= carried_sparsity([*models, *([plan.base.path] if plan.base is not None else [])], tmp)
    write_manifest(tmp, stage="merge", parents=parents, recipe=recipe_dict(plan.config), metrics=metrics,
                   output_kind=kind, seed=plan.seed, **extra)
