"""Ternary weights in transformers' BitNet storage format.

transformers (`integrations/bitnet.py`) stores a ternary matrix W (out x in, values -1/0/1) as uint8 of shape
(out/4, in): the values are shifted to 0/1/2 and packed four to a byte along the OUTPUT dimension, block-wise:
byte row r holds W rows r, r + out/4, r + 2*out/4 and r + 3*out/4 in bits 0-1, 2-3, 4-5 and 6-7. Its `BitLinear`
computes y = (x_q @ W^T) / (input_scale * weight_scale) with x_q = round(x * input_scale), so `weight_scale`
is the reciprocal of the per-tensor absmean step: W_real = W / weight_scale. Both conventions are pinned by
tests against transformers' own functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

VALUES_PER_BYTE = 4


def pack_ternary(ternary: "torch.Tensor") -> "torch.Tensor":
    """(out, in) values in {-1, 0, 1} -> (out/4, in) uint8 in transformers' layout. `out` must divide by 4."""
    import torch

    out = ternary.shape[0]
    if out % VALUES_PER_BYTE:
        raise ValueError(f"ternary packing needs the output size to divide by 4, got {out}")
    shifted = (ternary.to(torch.int16) + 1).to(torch.uint8).reshape(VALUES_PER_BYTE, out // VALUES_PER_BYTE,
                                                                       *ternary.shape[1:])
    packed = shifted[0].clone()
    for block in range(1, VALUES_PER_BYTE):
        packed |= shifted[block] << (2 * block)
    return packed


def unpack_ternary(packed: "torch.Tensor", dtype: "torch.dtype | None" = None) -> "torch.Tensor":
    """The inverse of `pack_ternary`: (out/4, in) uint8 -> (out, in) values in {-1, 0, 1} (int8 by default)."""
    import torch

    blocks = [((packed >> (2 * block)) & 3) for block in range(VALUES_PER_BYTE)]
    ternary = torch.cat(blocks, dim=0).to(torch.int8) - 1
    return ternary if dtype is None else ternary.to(dtype)
