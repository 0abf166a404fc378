"""Float rounding for Triton kernels that must agree with torch bit for bit, on a GPU and under the interpreter.

Importing this module needs the `triton` package; only GPU code paths (and tests under `TRITON_INTERPRET=1`) do.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to(v, dtype: tl.constexpr):  # no typing annotations: Triton's compiler resolves them
    """float32 `v` rounded to the nearest value of `dtype` (ties to even), kept as float32. Spelled out in bits for
    bfloat16 because Triton's interpreter truncates there, where a GPU rounds to nearest."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True)
    elif dtype == tl.float16:
        return v.to(tl.float16).to(tl.float32)
    else:
        return v


@triton.jit
def round_half_even(v):
    """torch.round of float32 `v` for |v| < 2^22: adding 1.5 * 2^23 leaves no fraction bits, and takes them back."""
    return (v + 12582912.0) - 12582912.0
