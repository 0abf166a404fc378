"""Sparsification shared by the task-vector methods: TIES's magnitude trim and DARE's random drop.

The magnitude trim keeps the k = max(1, int(density * n)) entries largest in magnitude. mergekit takes
them as the first k of `torch.argsort(|delta|, descending=True)`, an unstable sort (libstdc++'s
introsort on the CPU), so *which* of several entries tied at the threshold it keeps depends on how
that sort happens to move them. Fine-tuned float32 deltas tie often (they sit on the base weights' ulp
grid), and the choice shows in the output. To agree bit for bit without paying for a full sort:

1. when no more than k entries are nonzero, nothing is trimmed (one count; bfloat16 fine-tunes leave
   most entries exactly as they were);
2. find the threshold by selection (numpy's introselect, linear time; over the nonzero entries when
   zeros are many, as one repeated value slows it ~10x) and count the entries above it; when the
   tied entries all fit, the mask is `|delta| >= threshold` and no order is needed;
3. otherwise replay the sort's partitioning, but only along the one path of ranges that contains the
   k-th position (the other ranges fall wholly inside or outside the top k): each partition step is
   vectorized (see `_partition`), so the work is a few linear passes, not n log n. The values move as
   the sort moves them; of the indices only the tied entries' are followed (2-3x faster than carrying
   a permutation of every index).

Step 3 is only worth its cost where mergekit's output is ours bit for bit: float32 merges. In bfloat16
mergekit subtracts in bfloat16 (rounding each task vector) and we in float32 (exactly), so the tied sets
differ anyway: there the first tied entries by position are kept (`exact_ties=False`).

`top_magnitudes` is checked against `torch.argsort` on tie-heavy data in the tests; where the replay
cannot be exact (NaNs; the sort's depth limit, which switches to heapsort) it sorts like mergekit.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import numpy as np
    import torch

_INSERTION_THRESHOLD = 16  # libstdc++'s _S_threshold: ranges this small are left to the final insertion sort


def magnitude_mask(delta: "torch.Tensor", density: float) -> "torch.Tensor | None":
    """Boolean mask of the `density` fraction of entries largest in magnitude (None: keep all).

    Where the k-th largest magnitude is 0, every zero is marked kept: zeros add nothing either way.
    """
    import numpy as np
    import torch

    if density >= 1:
        return None
    values = delta.detach().reshape(-1).float().numpy() if delta.dtype != torch.float64 else delta.reshape(-1).numpy()
    keep = top_magnitudes(np.abs(values), density)
    return torch.from_numpy(keep).reshape(delta.shape)


def trim(values: "np.ndarray", density: float, exact_ties: bool = True, nonzero: int | None = None) -> None:
    """Zero, in place, all but the `density` fraction of the flat float array `values` largest in magnitude.

    Entries tied at the threshold are chosen as mergekit's sort chooses them (`exact_ties`) or by position.
    `nonzero`: the count of nonzero entries when the caller has it. Afterwards min(nonzero, k) are nonzero.
    """
    import numpy as np

    if density >= 1:
        return
    keep = _top(np.abs(values), density, exact_ties, nonzero)
    if keep is not None:
        np.multiply(values, keep, out=values)  # x * 1 is x exactly; dropped entries become (signed) zeros


def trim_count(density: float, n: int) -> int:
    """k: how many of `n` entries the magnitude trim keeps (mergekit's int(density * n), at least one)."""
    return max(1, int(density * n))


def kept_count(nonzero: int, density: float, n: int) -> int:
    """How many of a task vector's `nonzero` entries (of `n`) its magnitude trim keeps, as the manifest counts."""
    return min(nonzero, trim_count(density, n)) if density > 0 else 0


def top_magnitudes(mag: "np.ndarray", density: float) -> "np.ndarray":
    """Boolean mask of the first k = max(1, int(density * n)) entries of `torch.argsort(mag, descending=True)`.

    Where the k-th largest magnitude is 0, every zero is marked kept: zeros add nothing either way.
    """
    import numpy as np

    keep = _top(mag, density)
    if keep is None:  # every nonzero entry is kept, and the zeros too when there are fewer than k of those
        keep = mag != 0
        if np.count_nonzero(keep) < trim_count(density, mag.size):
            keep = mag >= 0
    return keep


def _top(mag: "np.ndarray", density: float, exact_ties: bool = True,
         nonzero: int | None = None) -> "np.ndarray | None":
    """`top_magnitudes`, or None when it keeps every entry that is not 0 (fewer than k are)."""
    import numpy as np

    n = mag.size
    if density <= 0 or n == 0:
        return np.zeros(n, dtype=bool)
    k = trim_count(density, n)
    nonzero = int(np.count_nonzero(mag)) if nonzero is None else nonzero
    if nonzero <= k:  # no nonzero entry to trim (bfloat16 fine-tunes leave most entries unchanged)
        return None
    # numpy's introselect finds the k-th largest magnitude in linear time, but slows down ~10x when one
    # value fills much of the array: zeros, where a fine-tune left entries unchanged, are left out first.
    if nonzero < n - n * 3 // 10:
        candidates = mag[mag != 0]
        threshold = np.partition(candidates, nonzero - k)[nonzero - k]
        del candidates
    else:
        threshold = np.partition(mag, n - k)[n - k]  # (a copy of `mag`)
    keep = mag >= threshold
    if np.count_nonzero(keep) != k and not exact_ties:  # the first tied entries by position
        keep = mag > threshold
        keep[np.flatnonzero(mag == threshold)[: k - int(np.count_nonzero(keep))]] = True
    elif np.count_nonzero(keep) != k:
        # Entries tied at the threshold and not all kept: which ones is the unstable sort's choice.
        chosen = None if np.isnan(mag).any() else _replay_introsort_ties(mag, k, threshold)
        if chosen is None:
            import torch

            keep = np.zeros(n, dtype=bool)
            keep[torch.argsort(torch.from_numpy(mag), descending=True)[:k].numpy()] = True
        else:
            keep = mag > threshold
            keep[chosen] = True
    return keep


def _replay_introsort_ties(values: "np.ndarray", k: int, threshold: float, copy: bool = True) -> "np.ndarray | None":
    """Which entries equal to `threshold` std::sort(descending) puts in its first k positions (their indices),
    or None past its depth limit. `copy=False`: `values` is the caller's to lose (the replay moves them).

    The values are moved as the sort moves them, but of the indices only those of the tied entries are
    followed (every other entry's side of k is settled by its value): a few searches per step, not a
    permutation of every index. Beyond the values and the tied entries' indices a step holds at most
    `_PART` swapped pairs' positions (see `_partition`).
    """
    import numpy as np

    tied = _positions(values, np.equal, threshold)
    vals = values.copy() if copy else values
    pos = tied.copy()  # where each tied entry is now
    first, last = 0, vals.size
    depth = 2 * (int(vals.size).bit_length() - 1)
    while last - first > _INSERTION_THRESHOLD:
        if depth == 0:
            return None  # libstdc++ heapsorts this range: not replayed here
        depth -= 1
        # A tied entry holds the threshold: it can be a left stop only if threshold <= p, a right one if >=.
        cut = first + _partition(vals[first:last], lambda m: _follow_pivot(pos, first, m),
                                 lambda lefts, rights, p: _follow(pos, first, lefts, rights,
                                                                  threshold <= p, threshold >= p))
        if cut == k:
            return tied[pos < k]
        if cut < k:
            first = cut
        else:
            last = cut
    # The final insertion sort moves an entry left only past strictly smaller ones: a stable sort per range.
    order = np.argsort(-vals[first:last], kind="stable")
    new_place = np.empty_like(order)
    new_place[order] = np.arange(order.size)
    inside = np.flatnonzero((pos >= first) & (pos < last))
    pos[inside] = first + new_place[pos[inside] - first]
    return tied[pos < k]


def _follow_pivot(pos: "np.ndarray", first: int, pivot: int) -> None:
    """The tied entries' positions `pos` after the pivot's swap (range position 0 with `pivot`), in place."""
    for at in range(0, pos.size, _CHUNK):
        here = pos[at: at + _CHUNK]
        at_0, at_pivot = here == first, here == first + pivot
        here[at_0], here[at_pivot] = first + pivot, first


def _follow(pos: "np.ndarray", first: int, lefts: "np.ndarray", rights: "np.ndarray", left: bool,
            right: bool) -> None:
    """The tied entries' positions `pos` after the swaps of the pairs (lefts rising, rights falling: positions in
    the range starting at `first`), in place. Only entries between the pairs' extremes are searched, on the sides
    (`left`, `right`) where a tied entry can stop."""
    if not lefts.size or not (left or right):
        return
    lo, hi, rlo, rhi = first + int(lefts[0]), first + int(lefts[-1]), first + int(rights[-1]), first + int(rights[0])
    for at in range(0, pos.size, _CHUNK):  # a chunk at a time: `_moved` makes several arrays of its input's size
        here = pos[at: at + _CHUNK]
        if left and right:
            hit = ((here >= lo) & (here <= hi)) | ((here >= rlo) & (here <= rhi))
        else:
            hit = (here >= lo) & (here <= hi) if left else (here >= rlo) & (here <= rhi)
        if hit.any():
            here[hit] = first + _moved(here[hit] - first, lefts, rights)


def _moved(where: "np.ndarray", lefts: "np.ndarray", rights: "np.ndarray") -> "np.ndarray":
    """Positions (within the range) after the swaps of each left/right pair."""
    import numpy as np

    if lefts.size:
        t = np.minimum(np.searchsorted(lefts, where), lefts.size - 1)
        from_left = lefts[t] == where
        up = rights[::-1]  # rights fall: searched reversed
        u = np.minimum(np.searchsorted(up, where), up.size - 1)
        from_right = up[u] == where
        where = np.where(from_left, rights[t], np.where(from_right, lefts[lefts.size - 1 - u], where))
    return where


def _partition(vals: "np.ndarray", on_pivot: "Callable[[int], None]",
               on_pairs: "Callable[[np.ndarray, np.ndarray, float], None]") -> int:
    """libstdc++'s __unguarded_partition_pivot on a whole (view of a) range for the comparator `a > b`, in place.

    The median of (1, mid, last) is swapped to position 0 and is the pivot p (`on_pivot` gets where it came
    from). The scan from the left stops at entries <= p, the one from the right at entries >= p, and the i-th
    left stop is swapped with the i-th right stop while it lies left of it: so the whole step is two nonzero()
    passes and one fancy-indexed swap. A left scan that runs past its last partner stops at the partner's old
    place. `on_pairs` gets the swapped positions (left rising, right falling) and p, in parts of at most `_PART`
    pairs on ranges over `_SCAN_WHOLE`. Returns the cut: the first position of the right part.
    """
    n = vals.size
    a, b, c = 1, n // 2, n - 1
    va, vb, vc = vals[a], vals[b], vals[c]
    if va > vb:
        m = b if vb > vc else (c if va > vc else a)
    else:
        m = a if va > vc else (c if vb > vc else b)
    vals[0], vals[m] = vals[m], vals[0]
    on_pivot(m)
    p = vals[0]
    seg = vals[1:]
    if seg.size > _SCAN_WHOLE:
        return _partition_in_parts(vals, p, on_pairs) + 1
    import numpy as np

    # The crossing lies between G and G + E (G entries > p, E equal to p): the left stops that get swapped
    # are before it and the right ones after it, so each scan is taken over its side's window only.
    above = _count(seg, np.greater, p)
    window = above + _count(seg, np.equal, p) + 1
    lefts = _positions(seg[:window], np.less_equal, p)
    start = max(above - 1, 0)
    rights = _positions(seg[start:], np.greater_equal, p, start)[::-1]
    # lefts rise and rights fall, so the first i with lefts[i] >= rights[i] is found by bisection.
    pairs = _first_crossing(lefts, rights)
    if pairs == lefts.size or pairs == rights.size:  # a window ran out: scan the whole range (exact, slower)
        del lefts, rights
        lefts = _positions(seg, np.less_equal, p)
        rights = _positions(seg, np.greater_equal, p)[::-1]
        pairs = _first_crossing(lefts, rights)
    cut = int(lefts[pairs]) if pairs < lefts.size else n - 1
    if pairs > 0:
        cut = min(cut, int(rights[pairs - 1]))
    _swap(vals, lefts[:pairs], rights[:pairs], lambda i, j: on_pairs(i, j, p))
    return cut + 1


def _swap(vals: "np.ndarray", lefts: "np.ndarray", rights: "np.ndarray",
          on_pairs: "Callable[[np.ndarray, np.ndarray], None]") -> None:
    """Swap the pairs of positions of `vals[1:]` (made positions of `vals`, in place), after telling `on_pairs`."""
    lefts += 1  # positions in `vals` (in place: the scans are not needed any more)
    rights += 1
    on_pairs(lefts, rights)
    # Every left stop swapped lies before every right one, so the swaps are disjoint and go a chunk at a time.
    for at in range(0, lefts.size, _CHUNK):
        ic, jc = lefts[at: at + _CHUNK], rights[at: at + _CHUNK]
        vi = vals[ic]
        vals[ic] = vals[jc]
        vals[jc] = vi


def _partition_in_parts(vals: "np.ndarray", p: float,
                        on_pairs: "Callable[[np.ndarray, np.ndarray, float], None]") -> int:
    """`_partition`'s scans and swaps over a large range `vals` (its pivot at 0) without every stop's
    position at once: the stops are counted per chunk, the crossing found by bisection on those counts, and the
    pairs then scanned and swapped `_PART` at a time. A part's left stops lie before every later part's and its right
    stops after them, so each part's scans read values no earlier part has swapped. Returns the cut (in vals[1:])."""
    import numpy as np

    seg = vals[1:]
    left_stops = _Stops(seg, np.less_equal, p, from_end=False)
    right_stops = _Stops(seg, np.greater_equal, p, from_end=True)
    lo, hi = 0, min(left_stops.total, right_stops.total)  # the first r with lefts[r] >= rights[r]
    while lo < hi:
        mid = (lo + hi) // 2
        if left_stops.at(mid) >= right_stops.at(mid):
            hi = mid
        else:
            lo = mid + 1
    pairs = lo
    cut = left_stops.at(pairs) if pairs < left_stops.total else seg.size
    if pairs > 0:
        cut = min(cut, right_stops.at(pairs - 1))
    # Every part's bounds before any swap: a swap changes the values that `_Stops` rescans.
    bounds = [(left_stops.at(r0), left_stops.at(min(r0 + _PART, pairs) - 1),
               right_stops.at(min(r0 + _PART, pairs) - 1), right_stops.at(r0)) for r0 in range(0, pairs, _PART)]
    for a, b, c, d in bounds:
        lefts = _positions(seg[a: b + 1], np.less_equal, p, a)
        rights = _positions(seg[c: d + 1], np.greater_equal, p, c)[::-1]
        _swap(vals, lefts, rights, lambda i, j: on_pairs(i, j, p))
    return cut


_CHUNK = 1 << 16  # entries per step of the replay's scans and moves: their temporaries stay small
# swapped pairs per part of a large range's partition: their positions take 16 MB, not 2-3 bytes per entry
_PART = 1 << 21


class _Stops:
    """Where a scan of `seg` stops (the entries with op(entry, p)), from the start or from the end: counted per
    `_CHUNK` at once, the r-th found by rescanning one chunk."""

    def __init__(self, seg: "np.ndarray", op: "np.ufunc", p: float, from_end: bool) -> None:
        import numpy as np

        self.seg, self.op, self.p, self.from_end = seg, op, p, from_end
        counts = np.array([np.count_nonzero(op(seg[at: at + _CHUNK], p)) for at in range(0, seg.size, _CHUNK)],
                          dtype=np.int64)
        self.before = np.concatenate(([0], np.cumsum(counts[::-1] if from_end else counts)))
        self.total = int(self.before[-1])

    def at(self, r: int) -> int:
        """The position of the r-th stop (0-based; from the end: the r-th from the last)."""
        import numpy as np

        c = int(np.searchsorted(self.before, r, side="right")) - 1  # chunks (from that side) wholly before it
        chunk = (self.before.size - 2 - c) if self.from_end else c
        found = np.flatnonzero(self.op(self.seg[chunk * _CHUNK: (chunk + 1) * _CHUNK], self.p))
        r -= int(self.before[c])
        return chunk * _CHUNK + int(found[found.size - 1 - r] if self.from_end else found[r])
_SCAN_WHOLE = 1 << 21  # ranges up to this size are scanned at once (chunks cost time; there they save little)


def _count(values: "np.ndarray", op: "np.ufunc", p: float) -> int:
    """How many entries have op(entry, p) true, without a mask of the whole array."""
    import numpy as np

    if values.size <= _SCAN_WHOLE:
        return int(np.count_nonzero(op(values, p)))
    return sum(int(np.count_nonzero(op(values[at: at + _CHUNK], p))) for at in range(0, values.size, _CHUNK))


def _positions(values: "np.ndarray", op: "np.ufunc", p: float, offset: int = 0) -> "np.ndarray":
    """np.flatnonzero(op(values, p)) + offset, rising; over `_SCAN_WHOLE` entries without a mask of the whole array
    and in int32 where positions fit (half np.flatnonzero's memory). A replay's tied positions and its scans of
    large ranges then share that width, so `_moved`'s searchsorted converts only its small input, not the scan."""
    import numpy as np

    if values.size <= _SCAN_WHOLE:  # one scan, as np.flatnonzero gives it (a small range's temporaries cost little)
        found = np.flatnonzero(op(values, p))
        return found + offset if offset else found
    out = np.empty(_count(values, op, p), dtype=np.int32 if values.size + offset < 2**31 else np.int64)
    filled = 0
    for at in range(0, values.size, _CHUNK):
        found = np.flatnonzero(op(values[at: at + _CHUNK], p))
        np.add(found, at + offset, out=out[filled: filled + found.size], casting="unsafe")
        filled += found.size
    return out


def drop_at_random(values: "np.ndarray", density: float, seed: int, tensor_name: str, index: int) -> None:
    """DARE's drop, in place: keep each entry with probability `density`.

    The stream is seeded per (seed, tensor, input), so the drop does not depend on the order tensors are
    merged in. Each entry takes 32 raw bits of numpy's PCG64 (kept below density * 2^32): 5x faster than
    drawing floats, and several times faster than torch's Mersenne twister.
    """
    import numpy as np

    if density >= 1:
        return
    bits = drop_stream(seed, tensor_name, index).random_raw((values.size + 1) // 2)
    keep = bits.view(np.uint32)[: values.size] < np.uint32(keep_below(density))
    np.multiply(values, keep, out=values)


def drop_stream(seed: int, tensor_name: str, index: int) -> "np.random.PCG64":
    """The PCG64 generator whose raw 32-bit halves decide DARE's drop of one input of one tensor."""
    import numpy as np

    digest = hashlib.sha256(f"{seed}\0{tensor_name}\0{index}".encode()).digest()
    return np.random.PCG64(int.from_bytes(digest[:8], "little"))


def keep_below(density: float) -> int:
    """An entry is kept when its 32 raw bits are below this."""
    return min(int(density * 2**32), 2**32 - 1)


def _first_crossing(lefts: "np.ndarray", rights: "np.ndarray") -> int:
    """The first i with lefts[i] >= rights[i] (lefts rise and rights fall), by bisection; their length if none."""
    lo, hi = 0, min(lefts.size, rights.size)
    while lo < hi:
        mid = (lo + hi) // 2
        if lefts[mid] >= rights[mid]:
            hi = mid
        else:
            lo = mid + 1
    return lo
