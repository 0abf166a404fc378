"""The sparse runtime's CPU kernel (`gather_gemv.c`), called through ctypes: for one token, the product of a
stacked W^T with a sparse vector, reading only the kept rows, the columns split over torch's threads; and the
kept rows of W times a dense vector (`rows`: Deja Vu's gate and up, ReLU's up), the rows split over the threads.

It replaces the torch path of `kernels.py` (threshold, nonzero, index_select and embedding_bag: a dozen small
operations per product, which ate the gain at the built-in model's shapes) for float32 on a CPU; float64 and
machines without a C compiler keep the torch path. Same numbers up to float32 summation order.
"""

from __future__ import annotations

import ctypes
import sys
from functools import lru_cache
from pathlib import Path

import torch

from llmfast.native import load_kernel

SOURCE = Path(__file__).with_name("gather_gemv.c")
# Kept fraction above which the dense product wins against this kernel: it reads kept / all of the bytes, and at
# 90% kept the two were even at 576 -> 2 x 1536 with 2 threads (100% kept: dense 9% faster).
DENSE_ABOVE = 0.9

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class GatherKernel:
    dense_above = DENSE_ABOVE

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._threshold = lib.threshold_gemv
        self._threshold.restype = _i64
        self._threshold.argtypes = [_ptr, _i64, ctypes.c_float, _ptr, _i64, _ptr, _i64, _i64]
        self._gather = lib.gather_gemv
        self._gather.restype = ctypes.c_int
        self._gather.argtypes = [_ptr, _ptr, _i64, _ptr, _i64, _ptr, _i64]
        self._dot = lib.gather_dot
        self._dot.restype = None
        self._dot.argtypes = [_ptr, _i64, _ptr, _i64, _i64, _ptr, _ptr, _i64]

    @staticmethod
    def holds(wt: torch.Tensor, dims: tuple[int, ...] = (2,)) -> bool:
        """Whether it runs products with these weights: float32, on a CPU, contiguous, of `dims` dimensions (checked
        once per layout)."""
        return wt.dtype == torch.float32 and wt.device.type == "cpu" and wt.is_contiguous() and wt.dim() in dims

    @staticmethod
    def takes(v: torch.Tensor) -> bool:
        """Whether it takes this vector: float32 on a CPU, contiguous, no gradient wanted (inference only)."""
        return (v.dtype == torch.float32 and v.device.type == "cpu" and v.is_contiguous()
                and not (v.requires_grad and torch.is_grad_enabled()))

    def threshold(self, v: torch.Tensor, t: float, wt: torch.Tensor, max_kept: int) -> torch.Tensor | None:
        """sum over j with |v[j]| > t of v[j] * wt[j]; None (nothing computed) when more than `max_kept` are kept."""
        n, out = wt.shape
        if v.numel() != n:
            raise ValueError(f"sparse kernel: the vector has {v.numel()} entries, the weights {n} rows")
        y = torch.empty(out, dtype=torch.float32)
        kept = self._threshold(v.data_ptr(), n, t, wt.data_ptr(), out, y.data_ptr(), max_kept,
                               torch.get_num_threads())
        if kept < -n - 1:
            raise MemoryError("sparse kernel: out of memory for the kept indices or partial sums")
        return None if kept < 0 else y

    def gather(self, idx: torch.Tensor, vals: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
        """sum over k of vals[k] * wt[idx[k]] (idx int64 in [0, rows of wt), vals float32, both 1-d)."""
        if idx.dtype != torch.int64 or vals.dtype != torch.float32 or idx.numel() != vals.numel():
            raise ValueError(f"sparse kernel: indices ({idx.dtype}, {idx.numel()}) and values ({vals.dtype}, "
                             f"{vals.numel()}) must be int64 and float32 of one length")
        y = torch.empty(wt.shape[1], dtype=torch.float32)
        idx, vals = idx.contiguous(), vals.contiguous()
        if self._gather(idx.data_ptr(), vals.data_ptr(), idx.numel(), wt.data_ptr(), wt.shape[1], y.data_ptr(),
                        torch.get_num_threads()):
            raise MemoryError("sparse kernel: out of memory for the threads' partial sums")
        return y

    def rows(self, idx: torch.Tensor, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(kept, width): w[idx[k], r] . v for r < width, with w (rows, width, in) float32 contiguous (or (rows, in):
        width 1), reading only the kept rows; idx int64 in [0, rows), v float32 of `in` entries."""
        if not self.holds(w, dims=(2, 3)):
            raise ValueError(f"sparse kernel: rows takes contiguous float32 CPU weights of 2 or 3 dimensions, not "
                             f"{w.dtype} {tuple(w.shape)}")
        if idx.dtype != torch.int64 or idx.dim() != 1 or v.dtype != torch.float32 or v.numel() != w.shape[-1]:
            raise ValueError(f"sparse kernel: rows takes int64 indices ({idx.dtype}) and a float32 vector of "
                             f"{w.shape[-1]} entries ({v.dtype}, {v.numel()})")
        width = w.shape[1] if w.dim() == 3 else 1
        idx, v = idx.contiguous(), v.contiguous()
        y = torch.empty(idx.numel(), width, dtype=torch.float32)
        self._dot(idx.data_ptr(), idx.numel(), w.data_ptr(), width, w.shape[-1], v.data_ptr(), y.data_ptr(),
                  torch.get_num_threads())
        return y


def _openmp_runtimes() -> set[str]:
    """The OpenMP runtimes mapped into this process (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps") as maps:
            return {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}
    except OSError:
        return set()


@lru_cache(maxsize=None)
def gather_kernel() -> GatherKernel | None:
    """The kernel built for this machine, or None where it cannot be built (the torch path runs)."""
    before = _openmp_runtimes()  # torch is imported above: its libgomp is already mapped
    lib = load_kernel(SOURCE, ("-fopenmp",))
    if lib is None:
        return None
    added = _openmp_runtimes() - before
    if before and added:  # a second OpenMP runtime: two thread pools fighting over the cores
        print(f"llmfast: {SOURCE.name} loaded a second OpenMP runtime ({', '.join(sorted(added))}) beside torch's: "
              "the sparse runtime keeps its torch path", flush=True, file=sys.stderr)
        return None
    return GatherKernel(lib)
