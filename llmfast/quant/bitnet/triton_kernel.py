"""A Triton kernel for BitNet b1.58 decode on GPUs: packed 2-bit ternary weights times int8 activations.

One launch does what `TernaryLinear` does in several: per-token absmax int8 quantization of the input, the
integer product with the weights as transformers stores them (four 2-bit values per byte along the output
dimension, `pack.py`), and the scaling back, `y = (codes @ W^T) / (input_scale * weight_scale)`. A decode step
is bound by the bytes it reads, and these weights are an eighth of bfloat16's: that is the whole point of
1.58 bits, and it pays only when the GPU streams them at full speed, which takes hundreds of programs reading at
once. So the grid is blocks of packed weight rows times SPLIT_K slices of the input (`llmfast/triton_split.py`
adds the slices' partial sums in one launch). Each program reads the input rows' absmax (the whole row: every
slice needs the same scale; from L2 after the first program), then streams its tile of packed bytes once,
unpacking the four output rows a byte holds in registers.

The sums are integers: codes in [-127, 127] times weights in {-1, 0, 1}, at most 127 x 16,384 < 2^24 in size,
so float32 holds every partial and total exactly and the order of additions does not matter (split or not, the
same bits). The 2-bit fields are w + 1 in {0, 1, 2}: sum(codes * w) = sum(codes * field) - sum(codes), one
subtraction per tile instead of one per weight. One token uses a plain multiply-and-sum over the tile (a GEMV);
more tokens can use `tl.dot` on int8 (`dot=True`), exact in int32 too.

The arithmetic follows `quantize_activations` in the input's dtype (each product rounded to it, as torch does
for bfloat16 tensors), so the int8 codes are the ones `TernaryLinear` computes; the integer sums are exact,
where a bfloat16 matmul rounds them. The divisions are IEEE (`div_rn`; Triton's `/` is approximate on GPUs) and
the product x * scale is rounded before round() (the launch turns FMA fusion off), so float32 inputs give the
same bits as `TernaryLinear`: tested under Triton's interpreter on a CPU (`TRITON_INTERPRET=1`), and checked on
a GPU by `scripts/gpu_compression_checks.py`, which also measures the speed. Importing this module needs the
`triton` package (CUDA builds of torch bring it); callers import it only when they run on a GPU.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from llmfast import triton_split
from llmfast.triton_math import round_half_even, round_to

MAX_ROWS = 16  # up to 16 tokens share one pass over the weights
# layers.py's ACT_MAX (127, in the kernel) and SCALE_FLOOR (not imported: layers.py imports this module); the
# tests compare with TernaryLinear bit for bit, so a change there shows here
SCALE_FLOOR = 1e-5


@triton.jit
def _write(acc, denom, b_ptr, y_ptr, rn, col_ok, out_ok, base,  # untyped: Triton resolves annotations
           HAS_BIAS: tl.constexpr, LOW_PRECISION: tl.constexpr, dtype: tl.constexpr):
    y = tl.math.div_rn(acc, denom[:, None])  # IEEE division, as torch's (`/` is approximate)
    if LOW_PRECISION:
        y = round_to(y, dtype)
    if HAS_BIAS:
        bias = tl.load(b_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)
        y = y + bias[None, :]
    tl.store(base, round_to(y, dtype).to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _codes(x_ptr, rm, ks, row_ok, K, stride_xm, scale, LOW_PRECISION: tl.constexpr, dtype: tl.constexpr):
    """int8 codes (as integer-valued float32) of the tokens' inputs `ks`, as `quantize_activations` gives them."""
    x = tl.load(x_ptr + rm[:, None] * stride_xm + ks[None, :], mask=row_ok[:, None] & (ks[None, :] < K),
                other=0.0).to(tl.float32)
    prod = x * scale[:, None]
    if LOW_PRECISION:  # torch rounds x * scale to the tensor's dtype before round()
        prod = round_to(prod, dtype)
    return tl.minimum(tl.maximum(round_half_even(prod), -128.0), 127.0)


@triton.jit
def _dp4a(a, b, c, ASM: tl.constexpr):
    """c + the dot product of the four unsigned bytes of `a` with the four signed bytes of `b` (int32 lanes): one
    `dp4a` instruction on a GPU; the same sum spelled out in shifts under the interpreter (which runs no asm)."""
    if ASM:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        for i in tl.static_range(4):
            c += ((a >> (8 * i)) & 0xFF) * ((b << (24 - 8 * i)) >> 24)
        return c


@triton.jit
def _code_words(x_ptr, codes_ptr, rm, rw, k0, row_ok, K, stride_xm, stride_cm, scale, PREQUANT: tl.constexpr,
                ASM: tl.constexpr, LOW_PRECISION: tl.constexpr, dtype: tl.constexpr, BLOCK_M: tl.constexpr,
                WORDS: tl.constexpr):
    """The tokens' codes of inputs k0 + 4w + b as int32 words (code b in byte b) and their sum (float32)."""
    if PREQUANT:  # the words as quantize_rows stored them; their sum by dp4a with four ones
        cw = tl.load(codes_ptr + rm[:, None] * stride_cm + (k0 // 4 + rw)[None, :],
                     mask=row_ok[:, None] & ((k0 + 4 * rw) < K)[None, :], other=0)
        total = tl.sum(_dp4a(tl.full((BLOCK_M, WORDS), 0x01010101, tl.int32), cw,
                             tl.zeros((BLOCK_M, WORDS), tl.int32), ASM), axis=1).to(tl.float32)
    else:
        cw = tl.zeros((BLOCK_M, WORDS), dtype=tl.int32)
        total = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for b in tl.static_range(4):
            c = _codes(x_ptr, rm, k0 + 4 * rw + b, row_ok, K, stride_xm, scale, LOW_PRECISION, dtype)
            total += tl.sum(c, axis=1)
            cw = cw | ((c.to(tl.int32) & 0xFF) << (8 * b))
    return cw, total


@triton.jit
def _field_sum(codes, packed, shift: tl.constexpr, PRODUCT: tl.constexpr):
    """sum over k of codes[m, k] * field[n, k] for the 2-bit field at `shift` of each byte (w + 1, in {0, 1, 2})."""
    field = (packed >> shift) & 3
    if PRODUCT == 1:
        return tl.dot(codes.to(tl.int8), tl.trans(field.to(tl.int8))).to(tl.float32)
    else:
        return tl.sum(codes[:, None, :] * field.to(tl.float32)[None, :, :], axis=2)


@triton.jit
def _scale(x_ptr, rm, row_ok, K, floor, stride_xm, dtype: tl.constexpr, BLOCK_M: tl.constexpr, AMAX_K: tl.constexpr):
    """Each token's activation scale, ACT_MAX / amax.clamp(min=SCALE_FLOOR), as torch computes it: the reciprocal,
    then times 127 (int / tensor is reciprocal() * int in torch), each rounded to the input's dtype."""
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, AMAX_K):
        ks = k0 + tl.arange(0, AMAX_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + ks[None, :], mask=row_ok[:, None] & (ks[None, :] < K),
                    other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
    inv = round_to(tl.math.div_rn(tl.full((BLOCK_M,), 1.0, tl.float32), tl.maximum(amax, floor)), dtype)
    return round_to(inv * 127.0, dtype)


@triton.jit
def quantize_rows(x_ptr, codes_ptr, scales_ptr, M, K, floor, stride_xm, stride_cm, LOW_PRECISION: tl.constexpr,
                  BLOCK: tl.constexpr):
    """One token per program: its int8 codes and its scale (float32), for `ternary_gemv`'s PREQUANT mode."""
    rm = tl.program_id(0) + tl.arange(0, 1)
    row_ok = rm < M
    dtype = x_ptr.dtype.element_ty
    scale = _scale(x_ptr, rm, row_ok, K, floor, stride_xm, dtype, 1, BLOCK)
    for k0 in range(0, K, BLOCK):
        ks = k0 + tl.arange(0, BLOCK)
        c = _codes(x_ptr, rm, ks, row_ok, K, stride_xm, scale, LOW_PRECISION, dtype)
        tl.store(codes_ptr + rm[:, None] * stride_cm + ks[None, :], c.to(tl.int8),
                 mask=row_ok[:, None] & (ks[None, :] < K))
    tl.store(scales_ptr + rm, scale, mask=row_ok)


@triton.jit(do_not_specialize=["M"])  # one compile for every token count up to BLOCK_M
def ternary_gemv(x_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, part_ptr, count_ptr, codes_ptr, scales_ptr, M, N4, K, floor,
                 stride_xm, stride_wn, stride_ym, stride_cm, HAS_BIAS: tl.constexpr, LOW_PRECISION: tl.constexpr,
                 SPLIT_K: tl.constexpr, PRODUCT: tl.constexpr, ASM: tl.constexpr, PREQUANT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, AMAX_K: tl.constexpr):
    """PRODUCT 0: multiply-and-sum in float32 over byte tiles (any token count); 1: `tl.dot` on int8 (16 tokens
    or more in a tile); 2: `dp4a` over int32 words of four packed bytes (one token; w_ptr is the int32 view, its
    row stride in words). All three sums are exact integers. PREQUANT: the codes and scales come from `quantize_rows`
    (codes_ptr int8, or its int32 view for dp4a; stride_cm in its elements) instead of each program's own absmax
    pass over the whole input."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # packed byte rows: outputs rn + j * N4, j = 0..3
    row_ok = rm < M
    col_ok = rn < N4
    dtype = x_ptr.dtype.element_ty
    span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    start = pid_k * span
    end = tl.minimum(K, start + span)
    WORDS: tl.constexpr = BLOCK_K // 4
    rw = tl.arange(0, WORDS)
    rk = tl.arange(0, BLOCK_K)
    # The first weight tile is requested before the absmax pass, and each next one before the current one is
    # used: the weights' latency overlaps the input's.
    if PRODUCT == 2:
        tile = tl.load(w_ptr + rn[:, None] * stride_wn + (start // 4 + rw)[None, :],
                       mask=col_ok[:, None] & ((start + 4 * rw) < end)[None, :], other=0x55555555)
    else:
        tile = tl.load(w_ptr + rn[:, None] * stride_wn + (start + rk)[None, :],
                       mask=col_ok[:, None] & ((start + rk) < end)[None, :], other=0x55)  # 0x55: fields of 1
    if PREQUANT:
        scale = tl.load(scales_ptr + rm, mask=row_ok, other=1.0)
    else:  # each token's absmax over the whole input (every slice needs the same scale)
        scale = _scale(x_ptr, rm, row_ok, K, floor, stride_xm, dtype, BLOCK_M, AMAX_K)
    code_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if PRODUCT == 2:
        w0 = tl.zeros((BLOCK_N, WORDS), dtype=tl.int32)
        w1 = tl.zeros((BLOCK_N, WORDS), dtype=tl.int32)
        w2 = tl.zeros((BLOCK_N, WORDS), dtype=tl.int32)
        w3 = tl.zeros((BLOCK_N, WORDS), dtype=tl.int32)
        for k0 in range(start, end, BLOCK_K):
            words = tile
            nk = k0 + BLOCK_K + 4 * rw
            tile = tl.load(w_ptr + rn[:, None] * stride_wn + (nk // 4)[None, :], mask=col_ok[:, None] & (nk < end)[None, :],
                           other=0x55555555)
            cw, cs = _code_words(x_ptr, codes_ptr, rm, rw, k0, row_ok, K, stride_xm, stride_cm, scale, PREQUANT, ASM,
                                 LOW_PRECISION, dtype, BLOCK_M, WORDS)
            code_sum += cs
            cw = tl.broadcast_to(cw, (BLOCK_N, WORDS))  # one token
            w0 = _dp4a(words & 0x03030303, cw, w0, ASM)
            w1 = _dp4a((words >> 2) & 0x03030303, cw, w1, ASM)
            w2 = _dp4a((words >> 4) & 0x03030303, cw, w2, ASM)
            w3 = _dp4a((words >> 6) & 0x03030303, cw, w3, ASM)
        acc0 = tl.sum(w0, axis=1).to(tl.float32)[None, :]  # exact: below 2^24
        acc1 = tl.sum(w1, axis=1).to(tl.float32)[None, :]
        acc2 = tl.sum(w2, axis=1).to(tl.float32)[None, :]
        acc3 = tl.sum(w3, axis=1).to(tl.float32)[None, :]
    else:
        acc0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(start, end, BLOCK_K):
            packed = tile
            nk = k0 + BLOCK_K + rk
            tile = tl.load(w_ptr + rn[:, None] * stride_wn + nk[None, :], mask=col_ok[:, None] & (nk < end)[None, :],
                           other=0x55)
            if PREQUANT:
                codes = tl.load(codes_ptr + rm[:, None] * stride_cm + (k0 + rk)[None, :],
                                mask=row_ok[:, None] & ((k0 + rk) < K)[None, :], other=0).to(tl.float32)
            else:
                codes = _codes(x_ptr, rm, k0 + rk, row_ok, K, stride_xm, scale, LOW_PRECISION, dtype)
            code_sum += tl.sum(codes, axis=1)
            acc0 += _field_sum(codes, packed, 0, PRODUCT)
            acc1 += _field_sum(codes, packed, 2, PRODUCT)
            acc2 += _field_sum(codes, packed, 4, PRODUCT)
            acc3 += _field_sum(codes, packed, 6, PRODUCT)
    # fields are w + 1: subtract the codes' sum once (exact: integers below 2^24)
    acc0 -= code_sum[:, None]
    acc1 -= code_sum[:, None]
    acc2 -= code_sum[:, None]
    acc3 -= code_sum[:, None]
    _epilogue(acc0, acc1, acc2, acc3, scale, ws_ptr, b_ptr, y_ptr, part_ptr, count_ptr, rm, rn, row_ok, col_ok, pid_n,
              pid_k, M, N4, stride_ym, HAS_BIAS, LOW_PRECISION, SPLIT_K, dtype)


@triton.jit
def _epilogue(acc0, acc1, acc2, acc3, scale, ws_ptr, b_ptr, y_ptr, part_ptr, count_ptr, rm, rn, row_ok, col_ok, pid_n,
              pid_k, M, N4, stride_ym, HAS_BIAS: tl.constexpr, LOW_PRECISION: tl.constexpr, SPLIT_K: tl.constexpr,
              dtype: tl.constexpr):
    """The four output blocks written, or with SPLIT_K > 1 this slice's sums stored and the block's last slice adding
    all of them and writing."""
    out_ok = row_ok[:, None] & col_ok[None, :]
    if SPLIT_K > 1:
        n_all = 4 * N4
        part = rm[:, None] * n_all + rn[None, :]
        split_stride = M * n_all
        mine = part_ptr + pid_k * split_stride
        tl.store(mine + part, acc0, mask=out_ok)
        tl.store(mine + part + N4, acc1, mask=out_ok)
        tl.store(mine + part + 2 * N4, acc2, mask=out_ok)
        tl.store(mine + part + 3 * N4, acc3, mask=out_ok)
        if triton_split.arrive(count_ptr, pid_n) == SPLIT_K - 1:
            acc0 = triton_split.total(part_ptr, part, out_ok, split_stride, SPLIT_K)
            acc1 = triton_split.total(part_ptr, part + N4, out_ok, split_stride, SPLIT_K)
            acc2 = triton_split.total(part_ptr, part + 2 * N4, out_ok, split_stride, SPLIT_K)
            acc3 = triton_split.total(part_ptr, part + 3 * N4, out_ok, split_stride, SPLIT_K)
            _finish(acc0, acc1, acc2, acc3, scale, ws_ptr, b_ptr, y_ptr, rm, rn, col_ok, out_ok, N4, stride_ym,
                    HAS_BIAS, LOW_PRECISION, dtype)
            triton_split.release(count_ptr, pid_n)
    else:
        _finish(acc0, acc1, acc2, acc3, scale, ws_ptr, b_ptr, y_ptr, rm, rn, col_ok, out_ok, N4, stride_ym,
                HAS_BIAS, LOW_PRECISION, dtype)


@triton.jit
def _finish(acc0, acc1, acc2, acc3, scale, ws_ptr, b_ptr, y_ptr, rm, rn, col_ok, out_ok, N4, stride_ym,
            HAS_BIAS: tl.constexpr, LOW_PRECISION: tl.constexpr, dtype: tl.constexpr):
    # y = sums / (weight_scale * input_scale): the product in the input's dtype, as TernaryLinear computes it
    denom = tl.load(ws_ptr).to(tl.float32) * scale
    if LOW_PRECISION:
        denom = round_to(denom, dtype)
    base = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    _write(acc0, denom, b_ptr, y_ptr, rn, col_ok, out_ok, base, HAS_BIAS, LOW_PRECISION, dtype)
    _write(acc1, denom, b_ptr + N4, y_ptr, rn, col_ok, out_ok, base + N4, HAS_BIAS, LOW_PRECISION, dtype)
    _write(acc2, denom, b_ptr + 2 * N4, y_ptr, rn, col_ok, out_ok, base + 2 * N4, HAS_BIAS, LOW_PRECISION, dtype)
    _write(acc3, denom, b_ptr + 3 * N4, y_ptr, rn, col_ok, out_ok, base + 3 * N4, HAS_BIAS, LOW_PRECISION, dtype)


PRODUCTS = {"fma": 0, "dot": 1, "dp4a": 2}
# Quantize the tokens in a first small launch rather than in every program. False until a GPU says otherwise: on the
# H200's second run every program read the whole input for its absmax (8 KiB a program at 4096 inputs: as many bytes
# from L2 as the weights' own at a 2,048-program grid), which this removes for one more launch.
PREQUANT = False


def default_launch(m: int, n4: int, k: int) -> dict:
    """Launch settings for `m` tokens on (4 * n4) x k weights, from the H200's second run (BENCHMARKS.md): one token
    by `dp4a` in blocks of 8 packed rows (32 outputs) by 512 inputs, the input split until the grid has about 2,048
    programs (the best of 26 settings at 4096 x 4096: 9.9 us, 1.33x cuBLAS); more tokens by `tl.dot` (float
    multiply-adds materialize tokens x tile products: 16x slower at 4 tokens) in blocks of 16 by 512."""
    block_n, block_k, programs = (8, 512, 2048) if m == 1 else (16, 512, 1024)
    blocks = -(-n4 // block_n)
    split = max(1, min(-(-programs // blocks), -(-k // block_k)))
    return {"block_n": block_n, "block_k": block_k, "split_k": split,
            "product": ("dp4a" if k % 4 == 0 else "fma") if m == 1 else "dot"}


def ternary_matmul(x: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
                   *, block_n: int | None = None, block_k: int | None = None, split_k: int | None = None,
                   product: str | None = None, prequant: bool | None = None, num_warps: int = 4) -> torch.Tensor:
    """`TernaryLinear`'s output for `x` (..., in) of at most MAX_ROWS tokens, from transformers-packed weights
    (out/4, in) uint8 and the per-tensor `weight_scale`, in one Triton launch. Launch settings left None come
    from `default_launch`; `product` is "fma", "dot" or "dp4a" (one token, inputs a multiple of 4); `prequant`
    quantizes the tokens once in a first launch (`quantize_rows`) instead of in every program (default PREQUANT)."""
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
    auto = default_launch(m, n4, k)
    block_n = block_n or auto["block_n"]
    block_k = block_k or auto["block_k"]
    split_k = max(1, min(split_k or auto["split_k"], -(-k // block_k)))  # no slice without inputs
    product = PRODUCTS[product or auto["product"]]
    weights, stride_w = packed, packed.stride(0)
    if product == 2:
        if m == 1 and k % 4 == 0 and packed.stride(1) == 1 and packed.stride(0) % 4 == 0 and packed.data_ptr() % 4 == 0:
            weights, stride_w = packed.view(torch.int32), packed.stride(0) // 4
        else:  # words of four inputs need one token, whole aligned words
            product = 0
    block_m = max(16 if product == 1 else 1, triton.next_power_of_2(m))
    if product == 1:  # tl.dot's smallest tile is 16 x 16 x 16 (in x: 32 for int8)
        block_n, block_k = max(block_n, 16), max(block_k, 32)
    low = x.dtype in (torch.bfloat16, torch.float16)
    y = torch.empty((m, 4 * n4), dtype=x.dtype, device=x.device)
    blocks = -(-n4 // block_n)
    if split_k > 1:
        part, count = triton_split.workspace(split_k, m, 4 * n4, x.device), triton_split.counters(x.device, blocks)
    else:
        part = count = y  # not read
    floor = float(torch.tensor(SCALE_FLOOR, dtype=x.dtype))  # clamp(min=1e-5) in the input's dtype
    prequant = PREQUANT if prequant is None else prequant
    if prequant:
        codes = torch.empty((m, k), dtype=torch.int8, device=x.device)
        scales = torch.empty(m, dtype=torch.float32, device=x.device)
        quantize_rows[(m,)](rows, codes, scales, m, k, floor, rows.stride(0), codes.stride(0), LOW_PRECISION=low,
                            BLOCK=min(triton.next_power_of_2(k), 4096), num_warps=8, enable_fp_fusion=False)
        if product == 2:
            codes = codes.view(torch.int32)  # k % 4 == 0 on this path
        stride_c = codes.stride(0)
    else:
        codes = scales = y  # not read
        stride_c = 0
    ternary_gemv[(blocks, split_k)](
        rows, weights, weight_scale, bias if bias is not None else weight_scale, y, part, count, codes, scales, m, n4,
        k, floor, rows.stride(0), stride_w, y.stride(0), stride_c, HAS_BIAS=bias is not None, LOW_PRECISION=low,
        SPLIT_K=split_k, PRODUCT=product, ASM=x.is_cuda, PREQUANT=prequant, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k,
        AMAX_K=min(triton.next_power_of_2(k), max(64, 8192 // block_m)), num_warps=num_warps,
        enable_fp_fusion=False)  # x * scale must be rounded before round(), not fused into an FMA
    return y.reshape(*x.shape[:-1], 4 * n4)
