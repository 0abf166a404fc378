"""A Triton kernel for BitNet b1.58 decode on GPUs: packed 2-bit ternary weights times int8 activations.

One launch does what `TernaryLinear` does in several: per-token absmax int8 quantization of the input, the
integer product with the weights as transformers stores them (four 2-bit values per byte along the output
dimension, `pack.py`), and the scaling back, `y = (codes @ W^T) / (input_scale * weight_scale)`. A decode step
is bound by the bytes it reads, and these weights are an eighth of bfloat16's: that is the whole point of
1.58 bits. Each program reads the input rows (2 bytes x in per token in bfloat16, from L2 after the first
program: cheap at one token, a real cost at 16 tokens with many programs) to find their absmax, then
streams its block of packed weight rows once, unpacking the four output rows a byte holds in registers and
summing int8 x int8 products in int32 (`tl.dot`, exact). With `split_k` > 1 the input dimension is split
across programs too (for matrices with few output rows, such as a down projection), which add their scaled
partial outputs into a float32 buffer atomically (the order of those float additions varies run to run).

The arithmetic follows `quantize_activations` in the input's dtype (each product rounded to it, as torch does
for bfloat16 tensors), so the int8 codes are the ones `TernaryLinear` computes; the integer sums are exact,
where a bfloat16 matmul rounds them. The divisions are IEEE (`div_rn`; Triton's `/` is approximate on GPUs) and
the product x * scale is rounded before round() (the launch turns FMA fusion off), so float32 inputs give the
same bits as `TernaryLinear`: tested under Triton's interpreter on a CPU (`TRITON_INTERPRET=1`), and checked on
a GPU by `scripts/gpu_compression_checks.py`, which also measures the speed (not yet run: no GPU was lent when
this was written). Importing this module needs the `triton` package (CUDA builds of torch
bring it); callers import it only when they run on a GPU.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from llmfast.triton_math import round_half_even, round_to

MAX_ROWS = 16  # tl.dot's smallest tile: up to 16 tokens share one pass over the weights
# layers.py's ACT_MAX (127, in the kernel) and SCALE_FLOOR (not imported: layers.py imports this module); the
# tests compare with TernaryLinear bit for bit, so a change there shows here
SCALE_FLOOR = 1e-5


@triton.jit
def _write(acc, denom, b_ptr, y_ptr, rn, col_ok, out_ok, base, pid_k,  # untyped: Triton resolves annotations
           HAS_BIAS: tl.constexpr, LOW_PRECISION: tl.constexpr, SPLIT_K: tl.constexpr, dtype: tl.constexpr):
    y = tl.math.div_rn(acc.to(tl.float32), denom[:, None])  # IEEE division, as torch's (`/` is approximate)
    if LOW_PRECISION and SPLIT_K == 1:  # split partial sums are rounded once, after they are added
        y = round_to(y, dtype)
    if HAS_BIAS:
        bias = tl.load(b_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)
        y = y + bias[None, :] * (pid_k == 0)
    if SPLIT_K == 1:
        tl.store(base, round_to(y, dtype).to(y_ptr.dtype.element_ty), mask=out_ok)
    else:
        tl.atomic_add(base, y, mask=out_ok)

@triton.jit(do_not_specialize=["M"])  # one compile for 1 to 16 tokens
def ternary_gemv(x_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, M, N4, K, floor, stride_xm, stride_wn, stride_ym,
                 HAS_BIAS: tl.constexpr, LOW_PRECISION: tl.constexpr, SPLIT_K: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # packed byte rows: outputs rn + j * N4, j = 0..3
    row_ok = rm < M
    dtype = x_ptr.dtype.element_ty
    # Pass 1: each token's absmax over the whole input (every program needs the same scale).
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + ks[None, :], mask=row_ok[:, None] & (ks[None, :] < K),
                    other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
    # scale = ACT_MAX / amax.clamp(min=SCALE_FLOOR) as torch computes it: reciprocal, then times 127 (int / tensor
    # is reciprocal() * int in torch), each rounded to the input's dtype
    inv = round_to(tl.math.div_rn(tl.full((BLOCK_M,), 1.0, tl.float32), tl.maximum(amax, floor)), dtype)
    scale = round_to(inv * 127.0, dtype)
    acc0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    for k0 in range(pid_k * span, tl.minimum(K, (pid_k + 1) * span), BLOCK_K):
        ks = k0 + rk
        k_ok = ks < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        prod = x * scale[:, None]
        if LOW_PRECISION:  # torch rounds x * scale to the tensor's dtype before round()
            prod = round_to(prod, dtype)
        codes = tl.minimum(tl.maximum(round_half_even(prod), -128.0), 127.0).to(tl.int8)
        packed = tl.load(w_ptr + rn[:, None] * stride_wn + ks[None, :], mask=(rn[:, None] < N4) & k_ok[None, :],
                         other=0x55)  # 0x55: four zero weights
        acc0 += tl.dot(codes, tl.trans(((packed & 3).to(tl.int8) - 1)))
        acc1 += tl.dot(codes, tl.trans((((packed >> 2) & 3).to(tl.int8) - 1)))
        acc2 += tl.dot(codes, tl.trans((((packed >> 4) & 3).to(tl.int8) - 1)))
        acc3 += tl.dot(codes, tl.trans((((packed >> 6) & 3).to(tl.int8) - 1)))
    # y = sums / (weight_scale * input_scale): the product in the input's dtype, as TernaryLinear computes it
    denom = tl.load(ws_ptr).to(tl.float32) * scale
    if LOW_PRECISION:
        denom = round_to(denom, dtype)
    col_ok = rn < N4
    out_ok = row_ok[:, None] & col_ok[None, :]
    base = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    _write(acc0, denom, b_ptr, y_ptr, rn, col_ok, out_ok, base, pid_k, HAS_BIAS, LOW_PRECISION, SPLIT_K, dtype)
    _write(acc1, denom, b_ptr + N4, y_ptr, rn, col_ok, out_ok, base + N4, pid_k, HAS_BIAS, LOW_PRECISION, SPLIT_K, dtype)
    _write(acc2, denom, b_ptr + 2 * N4, y_ptr, rn, col_ok, out_ok, base + 2 * N4, pid_k, HAS_BIAS, LOW_PRECISION, SPLIT_K,
           dtype)
    _write(acc3, denom, b_ptr + 3 * N4, y_ptr, rn, col_ok, out_ok, base + 3 * N4, pid_k, HAS_BIAS, LOW_PRECISION, SPLIT_K,
           dtype)



def ternary_matmul(x: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
                   *, block_n: int = 16, block_k: int = 256, split_k: int = 1, num_warps: int = 4) -> torch.Tensor:
    """`TernaryLinear`'s output for `x` (..., in) of at most MAX_ROWS tokens, from transformers-packed weights
    (out/4, in) uint8 and the per-tensor `weight_scale`, in one Triton launch."""
    k = x.shape[-1]
    n4 = packed.shape[0]
    if packed.dtype != torch.uint8 or packed.shape[1] != k or weight_scale.numel() != 1:
        raise ValueError(f"ternary_matmul: packed weights {tuple(packed.shape)} {packed.dtype} and scale of "
                         f"{weight_scale.numel()} values do not fit an input of {k} features")
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"ternary_matmul: {m} rows; the decode kernel takes at most {MAX_ROWS}")
    low = x.dtype in (torch.bfloat16, torch.float16)
    out_dtype = torch.float32 if split_k > 1 else x.dtype
    y = (torch.zeros if split_k > 1 else torch.empty)((m, 4 * n4), dtype=out_dtype, device=x.device)
    grid = (-(-n4 // block_n), split_k)
    floor = float(torch.tensor(SCALE_FLOOR, dtype=x.dtype))  # clamp(min=1e-5) in the input's dtype
    ternary_gemv[grid](rows, packed, weight_scale, bias if bias is not None else weight_scale, y, m, n4, k, floor,
                 rows.stride(0), packed.stride(0), y.stride(0), HAS_BIAS=bias is not None, LOW_PRECISION=low,
                 SPLIT_K=split_k, BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
                 enable_fp_fusion=False)  # x * scale must be rounded before round(), not fused into an FMA
    return y.to(x.dtype).reshape(*x.shape[:-1], 4 * n4)

