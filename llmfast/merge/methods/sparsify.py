"""Sparsification shared by the task-vector methods: TIES's magnitude trim and DARE's random drop.

The magnitude trim keeps the k = max(1, int(density * n)) entries largest in magnitude. mergekit takes
them as the first k of `torch.argsort(|delta|, descending=True)`, an unstable sort (libstdc++'s
introsort on the CPU), so *which* of several entries tied at the threshold it keeps depends on how
that sort happens to move them. Fine-tuned float32 deltas tie often (they sit on the base weights' ulp
grid), and the choice shows in the output. To agree bit for bit without paying for a full sort:

1. find the threshold by selection (numpy's introselect, linear time) and count the entries above it;
   when the tied entries all fit (or the threshold is 0, where ties only add zeros), the mask is
   `|delta| >= threshold` and no order is needed;
2. otherwise replay the sort's partitioning, but only along the one path of ranges that contains the
   k-th position (the other ranges fall wholly inside or outside the top k): each partition step is
   vectorized (see `_partition`), so the work is a few linear passes, not n log n.

`select_top_k` is checked against `torch.argsort` on tie-heavy data in the tests; where the replay
cannot be exact (NaNs; the sort's depth limit, which switches to heapsort) it sorts like mergekit.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

_INSERTION_THRESHOLD = 16  # libstdc++'s _S_threshold: ranges this small are left to the final insertion sort


def magnitude_mask(delta: "torch.Tensor", density: float) -> "torch.Tensor | None":
    """Boolean mask of the `density` fraction of entries largest in magnitude (None: keep all).

    Where the k-th largest magnitude is 0, every zero is marked kept: zeros add nothing either way.
    """
    import torch

    n = delta.numel()
    if density >= 1:
        return None
    if density <= 0 or n == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    k = max(1, int(density * n))
    mag = delta.abs().reshape(-1)
    if mag.dtype not in (torch.float32, torch.float64):
        mag = mag.float()
    keep = select_top_k(mag, k)
    if isinstance(keep, float):
        return (mag >= keep).reshape(delta.shape)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[keep] = True
    return mask.reshape(delta.shape)


def select_top_k(mag: "torch.Tensor", k: int) -> "float | torch.Tensor":
    """The first k of `torch.argsort(mag, descending=True)` as a set: a threshold (keep `mag >= t`) when the
    ties do not matter, else the kept indices."""
    import numpy as np
    import torch

    values = mag.numpy()
    n = values.size
    threshold = values.dtype.type(np.partition(values, n - k)[n - k])
    if threshold > 0:
        above = int(np.count_nonzero(values > threshold))
        if above + int(np.count_nonzero(values == threshold)) != k:
            if np.isnan(values).any():
                return torch.argsort(mag, descending=True)[:k]
            order = _replay_introsort_prefix(values, k)
            return torch.argsort(mag, descending=True)[:k] if order is None else torch.from_numpy(order)
    return float(threshold)


def _replay_introsort_prefix(values: "np.ndarray", k: int) -> "np.ndarray | None":
    """The indices std::sort(descending) puts in its first k positions, or None past its depth limit."""
    import numpy as np

    vals = values.copy()
    idx = np.arange(vals.size, dtype=np.int64)
    first, last = 0, vals.size
    depth = 2 * (int(vals.size).bit_length() - 1)
    while last - first > _INSERTION_THRESHOLD:
        if depth == 0:
            return None  # libstdc++ heapsorts this range: not replayed here
        depth -= 1
        cut = _partition(vals, idx, first, last)
        if cut == k:
            return idx[:k]
        if cut < k:
            first = cut
        else:
            last = cut
    # The final insertion sort moves an entry left only past strictly smaller ones: a stable sort per range.
    chunk = np.argsort(-vals[first:last], kind="stable")
    idx[first:last] = idx[first:last][chunk]
    return idx[:k]


def _partition(vals: "np.ndarray", idx: "np.ndarray", first: int, last: int) -> int:
    """libstdc++'s __unguarded_partition_pivot on [first, last) for the comparator `a > b`, in place; the cut.

    The median of (first+1, mid, last-1) is swapped to `first` and is the pivot p. The scan from the left
    stops at entries <= p, the one from the right at entries >= p, and the i-th left stop is swapped
    with the i-th right stop while it lies left of it: so the whole step is two nonzero() passes and one
    fancy-indexed swap. A left scan that runs past its last partner stops at the partner's old place.
    """
    import numpy as np

    mid = first + (last - first) // 2
    a, b, c = first + 1, mid, last - 1
    va, vb, vc = vals[a], vals[b], vals[c]
    if va > vb:
        m = b if vb > vc else (c if va > vc else a)
    else:
        m = a if va > vc else (c if vb > vc else b)
    _swap(vals, idx, np.array([first]), np.array([m]))
    p = vals[first]
    seg = vals[first + 1:last]
    lefts = np.flatnonzero(seg <= p) + (first + 1)
    rights = np.flatnonzero(seg >= p)[::-1] + (first + 1)
    pairs = min(lefts.size, rights.size)
    crossed = np.flatnonzero(lefts[:pairs] >= rights[:pairs])
    m = int(crossed[0]) if crossed.size else pairs
    cut = int(lefts[m]) if m < lefts.size else last
    if m > 0:
        cut = min(cut, int(rights[m - 1]))
        _swap(vals, idx, lefts[:m], rights[:m])
    return cut


def _swap(vals: "np.ndarray", idx: "np.ndarray", i: "np.ndarray", j: "np.ndarray") -> None:
    vals[i], vals[j] = vals[j], vals[i].copy()
    idx[i], idx[j] = idx[j], idx[i].copy()


def random_mask(shape: "torch.Size", density: float, generator: "torch.Generator") -> "torch.Tensor | None":
    """DARE's drop: keep each entry with probability `density` (None: keep all)."""
    import torch

    if density >= 1:
        return None
    return torch.rand(shape, generator=generator, dtype=torch.float32) < density


def tensor_generator(seed: int, tensor_name: str, index: int) -> "torch.Generator":
    """A generator per (seed, tensor, input): the same drop whatever order tensors are merged in."""
    import torch

    digest = hashlib.sha256(f"{seed}\0{tensor_name}\0{index}".encode()).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g
