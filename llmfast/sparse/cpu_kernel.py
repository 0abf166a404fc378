"""The sparse runtime's CPU kernel (`gather_gemv.c`), called through ctypes: for one token, the product of a
stacked W^T with a sparse vector, reading only the kept rows, the columns split over torch's threads; and the
kept rows of W times a dense vector (`rows`: Deja Vu's gate and up, ReLU's up), the rows split over the threads.

It replaces the torch path of `kernels.py` (threshold, nonzero, index_select and embedding_bag: a dozen small
operations per product, which ate the gain at the built-in model's shapes) for float32 and bfloat16 on a CPU
(bfloat16: read as such, half the bytes, multiplied and summed in float32, the result rounded to bfloat16 once);
float64, float16 and machines without a C compiler keep the torch path. Same numbers as the dense product of the
zeroed vector up to float32 summation order (and, for bfloat16, the one rounding of the result).
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


DTYPES = {torch.float32: "", torch.bfloat16: "_bf16"}  # the weight/vector types it runs, and their C suffixes


class GatherKernel:
    dense_above = DENSE_ABOVE

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._threshold, self._gather, self._dot = {}, {}, {}
        for dtype, suffix in DTYPES.items():
            f = self._threshold[dtype] = getattr(lib, "threshold_gemv" + suffix)
            f.restype, f.argtypes = _i64, [_ptr, _i64, ctypes.c_float, _ptr, _i64, _ptr, _i64, _i64]
            f = self._gather[dtype] = getattr(lib, "gather_gemv" + suffix)
            f.restype, f.argtypes = ctypes.c_int, [_ptr, _ptr, _i64, _ptr, _i64, _ptr, _i64]
            f = self._dot[dtype] = getattr(lib, "gather_dot" + suffix)
            f.restype, f.argtypes = None, [_ptr, _i64, _ptr, _i64, _i64, _ptr, _ptr, _i64]

    @staticmethod
    def holds(wt: torch.Tensor, dims: tuple[int, ...] = (2,)) -> bool:
        """Whether it runs products with these weights: float32 or bfloat16, on a CPU, contiguous, of `dims`
        dimensions (checked once per layout)."""
        return wt.dtype in DTYPES and wt.device.type == "cpu" and wt.is_contiguous() and wt.dim() in dims

    @staticmethod
    def takes(v: torch.Tensor) -> bool:
        """Whether it takes this vector: float32 or bfloat16 on a CPU, contiguous, no gradient wanted (inference
        only). Each product then wants the vector in its weights' type (as torch's products do)."""
        return (v.dtype in DTYPES and v.device.type == "cpu" and v.is_contiguous()
                and not (v.requires_grad and torch.is_grad_enabled()))

    def threshold(self, v: torch.Tensor, t: float, wt: torch.Tensor, max_kept: int) -> torch.Tensor | None:
        """sum over j with |v[j]| > t of v[j] * wt[j], in wt's type; None (nothing computed) when more than
        `max_kept` are kept."""
        n, out = wt.shape
        if v.numel() != n:
            raise ValueError(f"sparse kernel: the vector has {v.numel()} entries, the weights {n} rows")
        _same_type(v, wt)
        t = _in_type(t, wt.dtype)
        y = torch.empty(out, dtype=torch.float32)
        kept = self._threshold[wt.dtype](v.data_ptr(), n, t, wt.data_ptr(), out, y.data_ptr(), max_kept,
                                         torch.get_num_threads())
        if kept < -n - 1:
            raise MemoryError("sparse kernel: out of memory for the kept indices or partial sums")
        return None if kept < 0 else y.to(wt.dtype)

    def gather(self, idx: torch.Tensor, vals: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
        """sum over k of vals[k] * wt[idx[k]] in wt's type (idx int64 in [0, rows of wt), vals float32 or bfloat16,
        both 1-d)."""
        if idx.dtype != torch.int64 or vals.dtype not in DTYPES or idx.numel() != vals.numel():
            raise ValueError(f"sparse kernel: indices ({idx.dtype}, {idx.numel()}) and values ({vals.dtype}, "
                             f"{vals.numel()}) must be int64 and float32 or bfloat16 of one length")
        _same_type(vals, wt)
        y = torch.empty(wt.shape[1], dtype=torch.float32)
        idx, vals = idx.contiguous(), vals.contiguous()
        if self._gather[wt.dtype](idx.data_ptr(), vals.data_ptr(), idx.numel(), wt.data_ptr(), wt.shape[1],
                                  y.data_ptr(), torch.get_num_threads()):
            raise MemoryError("sparse kernel: out of memory for the threads' partial sums")
        return y.to(wt.dtype)

    def rows(self, idx: torch.Tensor, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(kept, width) in w's type: w[idx[k], r] . v for r < width, with w (rows, width, in) float32 or bfloat16
        contiguous (or (rows, in): width 1), reading only the kept rows; idx int64 in [0, rows), v of `in` entries."""
        if not self.holds(w, dims=(2, 3)):
            raise ValueError(f"sparse kernel: rows takes contiguous float32 or bfloat16 CPU weights of 2 or 3 "
                             f"dimensions, not {w.dtype} {tuple(w.shape)}")
        if idx.dtype != torch.int64 or idx.dim() != 1 or v.dtype not in DTYPES or v.numel() != w.shape[-1]:
            raise ValueError(f"sparse kernel: rows takes int64 indices ({idx.dtype}) and a float32 or bfloat16 vector "
                             f"of {w.shape[-1]} entries ({v.dtype}, {v.numel()})")
        _same_type(v, w)
        width = w.shape[1] if w.dim() == 3 else 1
        idx, v = idx.contiguous(), v.contiguous()
        y = torch.empty(idx.numel(), width, dtype=torch.float32)
        self._dot[w.dtype](idx.data_ptr(), idx.numel(), w.data_ptr(), width, w.shape[-1], v.data_ptr(), y.data_ptr(),
                           torch.get_num_threads())
        return y.to(w.dtype)


@lru_cache(maxsize=4096)  # a model's thresholds, looked up on every one-token product: rounded once each
def _in_type(t: float, dtype: torch.dtype) -> float:
    """t as |v| is compared with it, in v's type, as torch compares a tensor with a Python number (and the hook
    model rounds its threshold tensor): a bfloat16 entry equal to bfloat16(t) is dropped even where it exceeds t."""
    return float(torch.tensor(t, dtype=dtype))


def _same_type(v: torch.Tensor, w: torch.Tensor) -> None:
    if v.dtype != w.dtype:
        raise ValueError(f"sparse kernel: a {v.dtype} vector with {w.dtype} weights: give both one type")


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
