"""Trimming and dropping merges (ties, magnitude_prune, dare_linear, dare_ties) of full models block by block: the
output and a few blocks in memory.

The whole-tensor path (`GeneralizedTaskArithmetic.merge`) holds every task vector of a tensor in float32 with its
magnitudes, numpy's partition copy and masks: 20-32 bytes per entry of the largest tensor (an 8B Llama's
embedding: 13 GiB). Here the task vectors are recomputed from the mapped inputs a block at a time, in passes:

1. per input, count the nonzero entries and the high 16 bits of each magnitude's float32 bit pattern (a
   nonnegative float orders as its bits): the bucket that holds the k-th largest magnitude; for DARE, the kept
   entries; with `rescale`, the L1 norm (and a drop's after it);
2. count the low 16 bits of the magnitudes in that bucket: the k-th largest exactly (the threshold), and how
   many entries lie above it and at it; with `rescale`, one more pass for the L1 norm of what the trim keeps;
3. trim or drop, rescale, weigh, elect signs and merge each block, written in the output's stored form.

Entries tied at the threshold are kept as `sparsify._top` keeps them: all of them when they fit; else the first
ones by position; or, where the merge replays mergekit's sort (float32, `exact_ties`), those the sort puts first,
found by `_replay_introsort_ties` on the task vector's magnitudes: 4 bytes per entry, 8 per tied entry (their
indices and places) and a part of one partition step's positions, one task vector at a time, freed before the
output is allocated. DARE draws its PCG64 stream a block at a time (the same draws as `drop_at_random`'s one
call), and the L1 norms are summed as numpy groups the whole sum (`L1Sum`). The element-wise steps are the
whole-tensor path's, in its order (`combine`), so the output has its bits (tested). Tensors under `WHOLE_BELOW`
entries, a trimmed task vector holding NaN, float64 and a tie replay past the sort's depth limit take the
whole-tensor path; DARE's float32 and bfloat16 tensors go to the C kernel (`native_merge`) first where it is built.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from llmfast.merge.methods.sparsify import kept_count, trim_count

if TYPE_CHECKING:
    import numpy as np

    from llmfast.merge.plan import MergePlan

BLOCK = 1 << 18  # entries per block: large enough that the per-block numpy calls cost little, small enough for L2
# Smaller tensors take the whole-tensor path: its ~30 bytes per entry are at most 60 MB there, and its one
# computation of each task vector beats this module's passes (a 135M model's TIES merge took ~18% longer blockwise).
WHOLE_BELOW = 1 << 21
_BUCKETS = 1 << 16  # 16 bits of a float32's bit pattern per counting pass
_NAN_BUCKETS = 0x7F81  # high halves above inf's (0x7F80): NaN


@dataclasses.dataclass
class _Trim:
    """How one input's task vector is trimmed. `mode`: "skip" (a zero task vector, left out), "all" (nothing
    trimmed), "none" (everything trimmed: density 0), ">=" (the entries at or above the threshold are exactly k),
    "first" (ties by position), "chosen" (the ties mergekit's sort keeps: `chosen`, sorted indices); "pending"
    between the two counting passes."""

    density: float
    index: int = 0  # the input's place in the merge (DARE's stream is seeded by it)
    nonzero: int = 0
    mode: str = "all"
    bits: int = 0  # the threshold's float32 bit pattern
    quota: int = 0  # "first": tied entries still to keep
    chosen: Any = None
    hist: Any = None
    kept: int = 0  # "drop": the nonzero entries DARE keeps
    stream: Any = None  # "drop": the PCG64 generator, drawn from block by block as the whole path draws it at once
    before: Any = None  # `rescale`: the L1 norms before and after the trim or drop (L1Sum), and the factor (float32)
    after: Any = None
    scale: Any = None


def takes(plan: "MergePlan") -> bool:
    """Whether this merge trims by magnitude or drops at random (DARE, where the C kernel does not take the tensor)
    over full models only (each tensor is checked by `merge_trimmed`)."""
    from llmfast.merge.methods.task_arithmetic import GeneralizedTaskArithmetic

    method = plan.method
    return (isinstance(method, GeneralizedTaskArithmetic) and method.sparsify in ("magnitude", "random")
            and plan.base is not None and all(s.kind == "model" for s in plan.inputs))


def merge_trimmed(plan: "MergePlan", name: str, mapped: tuple[Any, list[Any]],
                  out_dtype: str) -> "tuple[np.ndarray, dict[str, int]] | None":
    """(the merged tensor in `out_dtype`'s stored form, counts of nonzero and kept entries), or None where the
    whole-tensor path must merge it."""
    import numpy as np

    from llmfast.merge.io import numel

    base_stored, stored = mapped
    shared = plan.shared_for(name)
    if base_stored is None or any(st is None for st in stored):
        return None
    shape = base_stored[0].shape
    n = numel(shape)
    if n < WHOLE_BELOW:
        return None
    params = [table[name] for table in plan.per_input]
    trims = [_Trim(float(p.get("density", 1.0)), i) for i, p in enumerate(params)]
    with np.errstate(over="ignore", invalid="ignore"):
        for i, t in enumerate(trims):
            zero = _zero(plan, name, mapped, i, n)
            if zero is None:
                return None
            t.mode = "skip" if zero else ""  # a zero task vector is left out, as `prepare_inputs` leaves it out
        if not _survey(plan, name, mapped, trims, n):
            return None
        for i, t in enumerate(trims):
            if t.mode == "pending" and not _settle(plan, name, mapped, i, t, n):
                return None
        if shared.get("rescale", False):
            _rescale_factors(plan, name, mapped, trims, n)
        counts: dict[str, int] = {}
        for t in trims:
            if t.nonzero and t.density < 1:  # what `_sparsify` counts
                counts["nonzero"] = counts.get("nonzero", 0) + t.nonzero
                kept = t.kept if t.mode == "drop" else kept_count(t.nonzero, t.density, n)
                counts["kept"] = counts.get("kept", 0) + kept
        return _merge_pass(plan, name, mapped, trims, params, shared, out_dtype, n).reshape(shape), counts


def _blocks(n: int) -> "list[slice]":
    step = BLOCK + (BLOCK & 1)  # even: a block's DARE draws are whole 64-bit outputs, two entries each
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]


def _deltas(plan: "MergePlan", name: str, mapped: tuple[Any, list[Any]], which: list[int],
            block: slice) -> "tuple[np.ndarray, list[np.ndarray]] | None":
    """(the base in float, the task vectors of inputs `which`) on a block; None where they are not float32."""
    import numpy as np

    from llmfast.merge.methods.base import float_work
    from llmfast.merge.steps import prepare_inputs

    base_stored, stored = mapped
    # A subset of the inputs: prepare_inputs pairs them with plan.inputs only to tell adapters, and there are none.
    base, deltas = prepare_inputs(plan, name, base_stored, [stored[i] for i in which], block, keep_zero=True)
    work = float_work(base)
    if work.dtype != np.float32 or any(d.dtype != np.float32 for d in deltas):
        return None
    return work, deltas


def _zero(plan: "MergePlan", name: str, mapped: tuple[Any, list[Any]], i: int, n: int) -> bool | None:
    """Whether input i's task vector is zero (NaN is not; it stops at the first nonzero block: an untouched
    embedding costs one pass, a changed tensor little); None where it is not float32."""
    for block in _blocks(n):
        got = _deltas(plan, name, mapped, [i], block)
        if got is None:
            return None
        if got[1][0].any():
            return False
    return True


def _survey(plan: "MergePlan", name: str, mapped: tuple[Any, list[Any]], trims: list[_Trim], n: int) -> bool:
    """Pass 1: each input's nonzero count; for those that trim, the bucket of the k-th largest magnitude (the high 16
    bits of its pattern); for those that drop, the kept count; with `rescale`, the L1 norm before (and after a drop).
    False where the whole-tensor path must run (NaN in a trimmed task vector)."""
    import numpy as np

    from llmfast.merge.methods.task_arithmetic import L1Sum

    which = [i for i, t in enumerate(trims) if t.mode != "skip"]
    if not which:
        return True
    random, rescale = plan.method.sparsify == "random", bool(plan.shared_for(name).get("rescale", False))
    for t in trims:
        if t.density < 1 and t.mode != "skip":  # where `_sparsify` trims or drops
            if random:
                _restart(plan, name, t)
            elif t.density > 0:
                t.hist = np.zeros(_BUCKETS, dtype=np.int64)
            if rescale:
                t.before, t.after = L1Sum(), (L1Sum() if random else None)
    mag = np.empty(min(BLOCK + 1, n), dtype=np.float32)
    for block in _blocks(n):
        got = _deltas(plan, name, mapped, which, block)
        if got is None:
            return False
        for t, d in zip([trims[i] for i in which], got[1]):
            t.nonzero += int(np.count_nonzero(d))
            if t.hist is None and t.before is None and t.stream is None:
                continue
            m = np.abs(d, out=mag[: d.size])
            if t.before is not None:
                t.before.add(m)
            if t.hist is not None:
                t.hist += np.bincount(m.view(np.uint32) >> 16, minlength=_BUCKETS)
            if t.stream is not None:
                _drop(t, d)
                t.kept += int(np.count_nonzero(d))
                if t.after is not None:
                    t.after.add(np.abs(d, out=m))
    for t in trims:
        k = trim_count(t.density, n)
        if t.mode == "skip" or t.density >= 1:
            t.mode = t.mode or "all"
        elif random:
            t.mode = "drop"
        elif t.density <= 0:
            t.mode = "none"
        elif t.hist[_NAN_BUCKETS:].any():
            return False  # NaN magnitudes: `_top` sorts like mergekit there
        elif t.nonzero <= k:
            t.mode = "all"  # no nonzero entry to trim
        else:
            high, above = _bucket_of(t.hist, k)
            t.bits, t.quota, t.mode = high << 16, k - above, "pending"
    return True


def _bucket_of(hist: "np.ndarray", k: int) -> tuple[int, int]:
    """(the bucket holding the k-th largest entry, how many entries lie in the buckets above it)."""
    import numpy as np

    from_top = np.cumsum(hist[::-1])
    j = int(np.searchsorted(from_top, k))  # the first count from the top that reaches k
    bucket = hist.size - 1 - j
    return bucket, int(from_top[j] - hist[bucket])


def _settle(plan: "MergePlan", name: str, mapped: tuple[Any, list[Any]], i: int, t: _Trim, n: int) -> bool:
    """Pass 2 for input i: the threshold from the low 16 bits within its bucket, and how its ties are kept. False
    where the whole-tensor path must run (the tie replay reached the sort's depth limit)."""
    import numpy as np

    high = t.bits >> 16
    low = np.zeros(_BUCKETS, dtype=np.int64)
    mag = np.empty(min(BLOCK + 1, n), dtype=np.float32)
    for block in _blocks(n):
        _work, (d,) = _deltas(plan, name, mapped, [i], block)  # type: ignore[misc]
        m = np.abs(d, out=mag[: d.size]).view(np.uint32)
        low += np.bincount(m[(m >> 16) == high] & 0xFFFF, minlength=_BUCKETS)
    bucket, above = _bucket_of(low, t.quota)
    t.bits |= bucket
    t.quota -= above  # the tied entries to keep
    k = trim_count(t.density, n)
    if t.quota == low[bucket]:
        t.mode = ">="
    elif not plan.computes_like_mergekit(name):
        t.mode = "first"
    else:
        from llmfast.merge.methods.sparsify import _replay_introsort_ties

        whole = np.empty(n, dtype=np.float32)
        for block in _blocks(n):
            _work, (d,) = _deltas(plan, name, mapped, [i], block)  # type: ignore[misc]
            np.abs(d, out=whole[block])
        threshold = np.array(t.bits, dtype=np.uint32).view(np.float32)[()]
        t.chosen = _replay_introsort_ties(whole, k, threshold, copy=False)
        del whole
        if t.chosen is None:
            return False
        t.chosen.sort()
        t.mode = "chosen"
    t.hist = None
    return True


def _rescale_factors(plan: "MergePlan", name: str, mapped: tuple[Any, list[Any]], trims: list[_Trim], n: int) -> None:
    """`rescale`: each trimmed or dropped task vector's factor, L1 before / after as `_sparsify` computes it; one
    more pass sums the magnitude trims' kept entries (a drop's were summed in pass 1)."""
    import numpy as np

    from llmfast.merge.methods.task_arithmetic import L1Sum, rescales

    again = [i for i, t in enumerate(trims) if t.mode in (">=", "first", "chosen")]
    for i, t in enumerate(trims):
        if t.mode == "all":
            t.after = t.before  # nothing trimmed: the same sum (None where nothing is rescaled: density 1, skipped)
        elif t.mode != "drop":
            t.after = L1Sum()  # "none": 0, never rescaled; the others are summed below
    quotas = [trims[i].quota for i in again]  # `_trim_block` spends "first"'s quota: restored for the merge pass
    for block in _blocks(n) if again else []:
        _work, deltas = _deltas(plan, name, mapped, again, block)  # type: ignore[misc]
        for i, d in zip(again, deltas):
            _trim_block(trims[i], d, block)
            trims[i].after.add(np.abs(d, out=d))
    for i, quota in zip(again, quotas):
        trims[i].quota = quota
    for t in trims:
        if t.before is not None and t.after is not None:
            before, after = t.before.value(), t.after.value()
            if rescales(before, after):
                t.scale = np.float32(before / after)  # `_sparsify`'s values.dtype.type(before / after)


def _merge_pass(plan: "MergePlan", name: str, mapped: tuple[Any, list[Any]], trims: list[_Trim],
                params: list[dict[str, Any]], shared: dict[str, Any], out_dtype: str, n: int) -> "np.ndarray":
    """Pass 3: trim or drop, rescale, weigh and combine each block, as `GeneralizedTaskArithmetic.merge` does the
    whole tensor."""
    import numpy as np

    from llmfast.merge.io import stored_bytes, stored_dtype
    from llmfast.merge.methods.task_arithmetic import combine

    out = np.empty(n, dtype=stored_dtype(out_dtype))
    active = [i for i, t in enumerate(trims) if t.mode != "skip"]  # a zero task vector is left out
    weights = [params[i]["weight"] for i in active]
    consensus = bool(plan.method.consensus)  # type: ignore[attr-defined]
    for t in trims:
        if t.mode == "drop":
            _restart(plan, name, t)  # the same draws as in pass 1
    for block in _blocks(n):
        work, deltas = _deltas(plan, name, mapped, active, block)  # type: ignore[misc]
        for i, d in zip(active, deltas):
            _trim_block(trims[i], d, block)
            if trims[i].scale is not None:
                np.multiply(d, trims[i].scale, out=d)
            if params[i]["weight"] != 1:  # x * 1 is x exactly: skip the pass
                np.multiply(d, params[i]["weight"], out=d)
        out[block] = stored_bytes(combine(consensus, deltas, weights, work, params, shared), out_dtype, name)
    return out


def _trim_block(t: _Trim, d: "np.ndarray", block: slice) -> None:
    """Zero, in place, the entries of a block of a task vector that its trim drops (`sparsify.trim`'s product)."""
    import numpy as np

    if t.mode == "all":
        return
    if t.mode == "drop":
        _drop(t, d)
        return
    if t.mode == "none":
        keep = np.zeros(d.size, dtype=bool)
    else:
        bits = np.abs(d).view(np.uint32)
        keep = bits >= t.bits if t.mode == ">=" else bits > t.bits
        if t.mode == "first" and t.quota > 0:
            tied = np.flatnonzero(bits == t.bits)[: t.quota]
            keep[tied] = True
            t.quota -= tied.size
        elif t.mode == "chosen":
            lo, hi = np.searchsorted(t.chosen, [block.start, block.stop])
            keep[t.chosen[lo:hi] - block.start] = True
    np.multiply(d, keep, out=d)  # x * 1 is x exactly; dropped entries become (signed) zeros


def _restart(plan: "MergePlan", name: str, t: _Trim) -> None:
    from llmfast.merge.methods.sparsify import drop_stream

    t.stream = drop_stream(plan.seed, name, t.index)


def _drop(t: _Trim, d: "np.ndarray") -> None:
    """DARE's drop of the next block of a task vector, in place: `sparsify.drop_at_random` with its draws taken a
    block at a time from the same stream (blocks have an even size, so each takes whole 64-bit outputs)."""
    import numpy as np

    from llmfast.merge.methods.sparsify import keep_below

    bits = t.stream.random_raw((d.size + 1) // 2).view(np.uint32)[: d.size]
    np.multiply(d, bits < np.uint32(keep_below(t.density)), out=d)
