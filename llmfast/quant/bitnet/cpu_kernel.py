"""The fused CPU kernel for ternary layers at decode time (`ternary_gemv.c`), called through ctypes.

One call quantizes the rows of x to int8, takes the byte dot products with the ternary weights and scales the
sums back: the same bits as `TernaryLinear`'s torch path. It pays at the few rows of a decode step; prefill
(many rows) stays on oneDNN's GEMM, which reuses each weight over the rows. The weights are laid out once per
layer in the kernel's 2-bit blocks (a quarter of the layer's own int8 buffer).
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

import torch

from llmfast.native import load_kernel

SOURCE = Path(__file__).with_name("ternary_gemv.c")
MAX_ROWS = 8  # above this oneDNN's GEMM wins (scripts/bench_ternary.py --rows)
MAX_INPUTS = (1 << 17) - 1  # int32 sums of in * 128 * 128 stay exact below this (ternary_gemv.c)
THREADED_WEIGHTS = 1 << 21  # weights from which the kernel splits the output rows over torch's threads

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class PackedTernary:
    """One layer's weights in the kernel's layout, with what each call needs besides x."""

    __slots__ = ("packed", "weight_scale", "out_features", "in_features", "threads")

    def __init__(self, packed: torch.Tensor, weight_scale: float, out_features: int, in_features: int,
                 threads: bool) -> None:
        self.packed, self.weight_scale = packed, weight_scale
        self.out_features, self.in_features, self.threads = out_features, in_features, threads


class TernaryKernel:
    """`pack` a layer's int8 weights once, then call with float32 or bfloat16 x (rows x in) for TernaryLinear's
    output."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        lib.ternary_path.restype = ctypes.c_char_p
        self.path: str = lib.ternary_path().decode()  # the instruction set it was built for: avx512-vnni, avx2, c
        self._bytes = lib.ternary_packed_bytes
        self._bytes.restype, self._bytes.argtypes = _i64, [_i64, _i64]
        self._pack = lib.ternary_pack
        self._pack.restype, self._pack.argtypes = None, [_ptr, _i64, _i64, _ptr]
        self._fns = {torch.float32: lib.ternary_linear, torch.bfloat16: lib.ternary_linear_bf16}
        for fn in self._fns.values():
            fn.restype = ctypes.c_int
            fn.argtypes = [_ptr, _i64, _i64, _ptr, _i64, ctypes.c_float, _ptr, _i64]

    def pack(self, weight: torch.Tensor, weight_scale: float) -> PackedTernary:
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise TypeError(f"ternary kernel packs 2-d int8 weights, got {weight.dtype} {tuple(weight.shape)}")
        weight = weight.detach().contiguous()
        out, k = weight.shape
        if weight.numel() and (weight.min() < -1 or weight.max() > 1):
            raise ValueError("ternary kernel: weights must be -1, 0 or 1")
        packed = torch.empty(self._bytes(out, k), dtype=torch.uint8)
        self._pack(weight.data_ptr(), out, k, packed.data_ptr())
        return PackedTernary(packed, float(weight_scale), out, k, weight.numel() >= THREADED_WEIGHTS)

    def __call__(self, x: torch.Tensor, w: PackedTernary, threads: int | None = None) -> torch.Tensor:
        """x: contiguous float32 or bfloat16 (..., in_features) -> the same dtype (..., out_features) (bfloat16:
        `w`'s scale must be a bfloat16 value). `threads`: the default is torch's thread count for large layers and 1
        for small ones (starting threads costs more than they save)."""
        fn = self._fns.get(x.dtype)
        if x.shape[-1:] != (w.in_features,) or fn is None or not x.is_contiguous():
            raise ValueError(f"ternary kernel: x must be contiguous float32 or bfloat16 (..., {w.in_features}), "
                             f"got {x.dtype} {tuple(x.shape)}")
        if threads is None:
            threads = torch.get_num_threads() if w.threads else 1
        y = torch.empty(x.shape[:-1] + (w.out_features,), dtype=x.dtype)
        if fn(x.data_ptr(), x.numel() // w.in_features, w.in_features, w.packed.data_ptr(), w.out_features,
              w.weight_scale, y.data_ptr(), threads):
            raise MemoryError("ternary kernel: out of memory for the activation codes")
        return y


@lru_cache(maxsize=None)
def ternary_kernel(extra_flags: tuple[str, ...] = ()) -> TernaryKernel | None:
    """The kernel built for this machine, or None where no C compiler can build it (the torch path runs)."""
    lib = load_kernel(SOURCE, extra_flags)
    return None if lib is None else TernaryKernel(lib)
