"""A Triton kernel for sparse decode on GPUs: the product of one token's sparse vector with a matrix, reading only
the rows its kept entries need.

`threshold_matvec(v, t, wt)` is `where(|v| > t, v, 0) @ wt` for a weight stored transposed, `wt` = W^T of shape
(in, out), as the CPU runtime lays it out (`kernels.py`): the rows of W^T that a kept entry needs are contiguous,
and a row whose entry is dropped is never loaded (its lanes are masked off, so the GPU issues no memory
transaction for it). No list of kept indices is built: that would need `nonzero`, whose size the host must wait
for. With TEAL's thresholds (Liu et al. 2024) at 50% a token reads half of the matrix's bytes, at 90% a tenth;
with t = 0 it skips the exact zeros of a ReLU-fied MLP's activation (the down projection's input). Products are
summed in float32. The grid is blocks of output columns times `split_k` slices of the input: the H200's first run,
with few programs each walking the whole input, was latency-bound (0.5x cuBLAS); the slices' partial sums are
added in a fixed order in the same launch (`llmfast/triton_split.py`). With `gated=True` the matrix is a gated
MLP's gate|up and the epilogue computes silu(gate) * up, so TEAL's MLP is two launches (`teal_mlp_token`).

`TritonGather` gives the sparse runtime (`kernels.py`) this kernel behind the calls of the CPU kernel
(`cpu_kernel.GatherKernel`): `SparseMLP` and `SparseProjections` on CUDA weights run their one-token products
through it.

Tested under Triton's interpreter on a CPU (`TRITON_INTERPRET=1`) against the dense product of the zeroed
vector, and inside `SparseMLP` against its dense path; speed is measured on a GPU by
`scripts/gpu_compression_checks.py`. Importing this module needs the
`triton` package (CUDA builds of torch bring it); callers import it only when they run on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmfast import triton_split
from llmfast.triton_math import round_to

# Kept fraction above which the runtime takes the dense product instead of this kernel. 1.0 (never): the kernel
# loads no dropped row, and deciding would cost a count of the kept entries, which makes the host wait for the GPU
# on every product. Measured on an H200 (BENCHMARKS.md): slower than cuBLAS at every level (0.57x at 50%, 0.68x at
# 90%), so no threshold would help; the kernel has to get faster (COMPACT below is the next try).
DENSE_ABOVE = 1.0
# Walk a list of the kept rows (`compact=True`) rather than every row with the dropped ones masked off. False until
# a GPU says otherwise: the H200's second run (masked rows, 0.57-0.68x cuBLAS at 50-90%) took time in proportion to
# all rows, not the kept ones; the list makes the arithmetic follow the kept rows, for one more (small) launch.
COMPACT = False
FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _kept_rows(v_ptr, wt_ptr, ks, rn, K, t, stride_wk, col_ok):
    """The weights of the kept entries among inputs `ks` (dropped rows masked off: never loaded) times those entries."""
    v = tl.load(v_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
    keep = (tl.abs(v) > t) & (ks < K)
    w = tl.load(wt_ptr + ks[:, None] * stride_wk + rn[None, :], mask=keep[:, None] & col_ok[None, :], other=0.0)
    return tl.sum(w.to(tl.float32) * tl.where(keep, v, 0.0)[:, None], axis=0)


@triton.jit
def _finish(acc, up, y_ptr, rn, col_ok, GATED: tl.constexpr):
    dtype = y_ptr.dtype.element_ty
    if GATED:  # silu(gate) * up as torch computes it on tensors of y's dtype: each result rounded to it
        gate = round_to(acc, dtype)
        act = round_to(gate / (1.0 + tl.exp(-gate)), dtype)
        acc = act * round_to(up, dtype)
    tl.store(y_ptr + rn, round_to(acc, dtype).to(dtype), mask=col_ok)


@triton.jit
def _listed_rows(idx_ptr, val_ptr, js, n_kept, wt_ptr, rn, stride_wk, col_ok):
    """The weights of the listed kept rows `js` < n_kept (their indices and values from `_compact`) times those values."""
    ok = js < n_kept
    rows = tl.load(idx_ptr + js, mask=ok, other=0)
    vals = tl.load(val_ptr + js, mask=ok, other=0.0)
    w = tl.load(wt_ptr + rows[:, None] * stride_wk + rn[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
    return tl.sum(w.to(tl.float32) * vals[:, None], axis=0)


@triton.jit
def _compact(v_ptr, t, idx_ptr, val_ptr, kept_ptr, K, BLOCK: tl.constexpr):
    """The kept entries of v (|v| > t) in input order: their indices, their values (float32) and how many, in one
    program (a prefix sum per block of the input, blocks in order: the same list every run)."""
    base = tl.program_id(0) * 0  # an int32 scalar carried through the loop
    for k0 in range(0, K, BLOCK):
        ks = k0 + tl.arange(0, BLOCK)
        v = tl.load(v_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
        keep = (tl.abs(v) > t) & (ks < K)
        slot = base + tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tl.store(idx_ptr + slot, ks, mask=keep)
        tl.store(val_ptr + slot, v, mask=keep)
        base += tl.sum(keep.to(tl.int32), axis=0)
    tl.store(kept_ptr, base)


@triton.jit
def _threshold_matvec(v_ptr, wt_ptr, y_ptr, part_ptr, count_ptr, idx_ptr, val_ptr, kept_ptr, K, N, t, stride_wk,
                      GATED: tl.constexpr, COMPACT: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """COMPACT: walk the list of kept rows `_compact` wrote (the work follows the kept rows) instead of every input
    with the dropped rows masked off (the loads follow the kept rows, the arithmetic every row)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = rn < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if COMPACT:
        length = tl.load(kept_ptr)
    else:
        length = K
    span = tl.cdiv(tl.cdiv(length, SPLIT_K), BLOCK_K) * BLOCK_K
    for k0 in range(pid_k * span, tl.minimum(length, (pid_k + 1) * span), BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        if COMPACT:
            acc += _listed_rows(idx_ptr, val_ptr, ks, length, wt_ptr, rn, stride_wk, col_ok)
            if GATED:
                up += _listed_rows(idx_ptr, val_ptr, ks, length, wt_ptr + N, rn, stride_wk, col_ok)
        else:
            acc += _kept_rows(v_ptr, wt_ptr, ks, rn, K, t, stride_wk, col_ok)
            if GATED:  # the up projection's columns follow the gate's N: the same kept rows, a second read each
                up += _kept_rows(v_ptr, wt_ptr + N, ks, rn, K, t, stride_wk, col_ok)
    if SPLIT_K > 1:  # store this slice's sums; the last slice of this block adds all of them and writes
        width = 2 * N if GATED else N
        mine = part_ptr + pid_k * width
        tl.store(mine + rn, acc, mask=col_ok)
        if GATED:
            tl.store(mine + N + rn, up, mask=col_ok)
        if triton_split.arrive(count_ptr, pid_n) == SPLIT_K - 1:
            acc = triton_split.total(part_ptr, rn, col_ok, width, SPLIT_K)
            if GATED:
                up = triton_split.total(part_ptr, N + rn, col_ok, width, SPLIT_K)
            _finish(acc, up, y_ptr, rn, col_ok, GATED)
            triton_split.release(count_ptr, pid_n)
    else:
        _finish(acc, up, y_ptr, rn, col_ok, GATED)


def default_launch(k: int, n: int) -> dict:
    """Launch settings for a (k, n) W^T: 256 outputs (a contiguous 512-byte read per kept row in bfloat16) by 64
    inputs per block, the input split until the grid has about 2,048 programs."""
    block_n, block_k = 256, 64
    blocks = -(-n // block_n)
    return {"block_n": block_n, "block_k": block_k, "split_k": max(1, min(-(-2048 // blocks), -(-k // block_k)))}


def threshold_matvec(v: torch.Tensor, t: float, wt: torch.Tensor, *, gated: bool = False, compact: bool | None = None,
                     block_n: int | None = None, block_k: int | None = None, split_k: int | None = None,
                     num_warps: int = 4) -> torch.Tensor:
    """`where(|v| > t, v, 0) @ wt` for one token `v` (in,) and `wt` (in, out), in v's dtype; rows of `wt` whose
    entry of v is dropped are not read. `gated`: wt is gate|up stacked, (in, 2 x inter), and the result is
    silu(gate) * up, (inter,), rounded as torch rounds it. `compact`: list the kept entries first (a second, small
    launch) and walk only them (default COMPACT). Launch settings left None come from `default_launch`."""
    if v.dim() != 1 or wt.dim() != 2 or wt.shape[0] != v.shape[0] or wt.stride(1) != 1 or (gated and wt.shape[1] % 2):
        raise ValueError(f"threshold_matvec: a vector of {tuple(v.shape)} and a row-major (in, out) matrix are needed"
                         f"{' (out even: gate|up)' if gated else ''}, got {tuple(wt.shape)} with strides {wt.stride()}")
    k, width = wt.shape
    n = width // 2 if gated else width
    auto = default_launch(k, n)
    block_n = block_n or auto["block_n"]
    block_k = block_k or auto["block_k"]
    split_k = max(1, min(split_k or auto["split_k"], -(-k // block_k)))  # no slice without inputs
    v = v.contiguous()
    y = torch.empty(n, dtype=v.dtype, device=v.device)
    blocks = -(-n // block_n)
    if split_k > 1:
        part, count = triton_split.workspace(split_k, 1, width, v.device), triton_split.counters(v.device, blocks)
    else:
        part = count = y  # not read
    compact = COMPACT if compact is None else compact
    if compact:
        idx = torch.empty(k, dtype=torch.int32, device=v.device)
        vals = torch.empty(k, dtype=torch.float32, device=v.device)
        kept = torch.empty(1, dtype=torch.int32, device=v.device)
        _compact[(1,)](v, float(t), idx, vals, kept, k, BLOCK=min(triton.next_power_of_2(k), 16384), num_warps=8)
    else:
        idx = vals = kept = y  # not read
    _threshold_matvec[(blocks, split_k)](v, wt, y, part, count, idx, vals, kept, k, n, float(t), wt.stride(0),
                                         GATED=gated, COMPACT=compact, SPLIT_K=split_k, BLOCK_N=block_n,
                                         BLOCK_K=block_k, num_warps=num_warps)
    return y


def teal_mlp_token(x: torch.Tensor, t_in: float, wt_gate_up: torch.Tensor, t_down: float, wt_down: torch.Tensor,
                   up_launch: dict | None = None, down_launch: dict | None = None) -> torch.Tensor:
    """One token through a gated SiLU MLP with TEAL's thresholds on its input and on the down projection's input:
    gate|up stacked as one (hidden, 2 x intermediate) W^T, down as (intermediate, hidden). Two launches: gate|up
    with silu(gate) * up in its epilogue, then down."""
    act = threshold_matvec(x, t_in, wt_gate_up, gated=True, **(up_launch or {}))
    return threshold_matvec(act, t_down, wt_down, **(down_launch or {}))


class TritonGather:
    """The sparse runtime's one-token products (the calls of `cpu_kernel.GatherKernel`) on `threshold_matvec`, for
    weights and vectors on `device_type`: "cuda", or "cpu" under Triton's interpreter (how the tests run it)."""

    dense_above = DENSE_ABOVE

    def __init__(self, device_type: str = "cuda") -> None:
        self.device_type = device_type

    def holds(self, wt: torch.Tensor) -> bool:
        """Whether it runs products with these weights: a row-major (in, out) float matrix on its device."""
        return (wt.device.type == self.device_type and wt.dim() == 2 and wt.is_contiguous()
                and wt.dtype in FLOATS)

    def takes(self, v: torch.Tensor) -> bool:
        """Whether it takes this vector: one float vector on its device, no gradient wanted (inference only)."""
        return (v.device.type == self.device_type and v.dim() == 1 and v.dtype in FLOATS
                and not (v.requires_grad and torch.is_grad_enabled()))

    def threshold(self, v: torch.Tensor, t: float, wt: torch.Tensor, max_kept: int) -> torch.Tensor | None:
        """sum over j with |v[j]| > t of v[j] * wt[j]; None when more than `max_kept` are kept (counted only when
        the limit can bind: the count waits for the GPU)."""
        if max_kept < v.numel() and int((v.abs() > t).sum()) > max_kept:
            return None
        return threshold_matvec(v, t, wt)

    def gated_silu(self, v: torch.Tensor, t: float, wt_gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of the thresholded `v` through gate|up stacked as one (in, 2 x inter) W^T: one launch."""
        return threshold_matvec(v, t, wt_gate_up, gated=True)

    def gather(self, idx: torch.Tensor, vals: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
        """sum over k of vals[k] * wt[idx[k]]: the values scattered into a vector whose other entries are zero,
        which the kernel skips (so are zero values: they add nothing)."""
        dense = vals.new_zeros(wt.shape[0]).index_copy_(0, idx, vals)
        return threshold_matvec(dense, 0.0, wt)


def gather_kernel(device_type: str = "cuda") -> TritonGather:
    """The kernel for the sparse runtime on `device_type`."""
    return TritonGather(device_type)
