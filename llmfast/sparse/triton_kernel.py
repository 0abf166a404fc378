"""A Triton kernel for sparse decode on GPUs: the product of one token's sparse vector with a matrix, reading only
the rows its kept entries need.

`threshold_matvec(v, t, wt)` is `where(|v| > t, v, 0) @ wt` for a weight stored transposed, `wt` = W^T of shape
(in, out), as the CPU runtime lays it out (`kernels.py`): the rows of W^T that a kept entry needs are contiguous,
and a row whose entry is dropped is never loaded (its lanes are masked off, so the GPU issues no memory
transaction for it). No list of kept indices is built: that would need `nonzero`, whose size the host must wait
for. With TEAL's thresholds (Liu et al. 2024) at 50% a token reads half of the matrix's bytes, at 90% a tenth;
with t = 0 it skips the exact zeros of a ReLU-fied MLP's activation (the down projection's input). Products are
summed in float32 per program; `split_k` > 1 splits the input dimension across programs as well (for matrices
with few columns), which add their partial sums atomically into a float32 buffer (their order varies).

`TritonGather` gives the sparse runtime (`kernels.py`) this kernel behind the calls of the CPU kernel
(`cpu_kernel.GatherKernel`): `SparseMLP` and `SparseProjections` on CUDA weights run their one-token products
through it.

Tested under Triton's interpreter on a CPU (`TRITON_INTERPRET=1`) against the dense product of the zeroed
vector, and inside `SparseMLP` against its dense path; speed is measured on a GPU by
`scripts/gpu_compression_checks.py`. Importing this module needs the
`triton` package (CUDA builds of torch bring it); callers import it only when they run on a GPU.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from llmfast.triton_math import round_to

# Kept fraction above which the runtime takes the dense product instead of this kernel. 1.0 (never): the kernel
# loads no dropped row, so at any density it reads at most the dense product's bytes, and deciding would cost a
# count of the kept entries, which makes the host wait for the GPU on every product. Not yet measured against
# cuBLAS at low sparsity (scripts/gpu_compression_checks.py times 50/70/90%): lower it if that says so.
DENSE_ABOVE = 1.0
FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _threshold_matvec(v_ptr, wt_ptr, y_ptr, K, N, t, stride_wk, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = rn < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    for k0 in range(pid_k * span, tl.minimum(K, (pid_k + 1) * span), BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(v_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
        keep = (tl.abs(v) > t) & (ks < K)
        w = tl.load(wt_ptr + ks[:, None] * stride_wk + rn[None, :], mask=keep[:, None] & col_ok[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * tl.where(keep, v, 0.0)[:, None], axis=0)
    if SPLIT_K == 1:
        tl.store(y_ptr + rn, round_to(acc, y_ptr.dtype.element_ty).to(y_ptr.dtype.element_ty), mask=col_ok)
    else:
        tl.atomic_add(y_ptr + rn, acc, mask=col_ok)


def threshold_matvec(v: torch.Tensor, t: float, wt: torch.Tensor, *, block_n: int = 64, block_k: int = 64,
                     split_k: int = 1, num_warps: int = 4) -> torch.Tensor:
    """`where(|v| > t, v, 0) @ wt` for one token `v` (in,) and `wt` (in, out), in v's dtype; rows of `wt` whose
    entry of v is dropped are not read."""
    if v.dim() != 1 or wt.dim() != 2 or wt.shape[0] != v.shape[0] or wt.stride(1) != 1:
        raise ValueError(f"threshold_matvec: a vector of {tuple(v.shape)} and a row-major (in, out) matrix are needed, "
                         f"got {tuple(wt.shape)} with strides {wt.stride()}")
    k, n = wt.shape
    v = v.contiguous()
    y = (torch.zeros if split_k > 1 else torch.empty)(n, dtype=torch.float32 if split_k > 1 else v.dtype,
                                                       device=v.device)
    grid = (-(-n // block_n), split_k)
    _threshold_matvec[grid](v, wt, y, k, n, float(t), wt.stride(0), SPLIT_K=split_k, BLOCK_N=block_n,
                            BLOCK_K=block_k, num_warps=num_warps)
    return y.to(v.dtype)


def teal_mlp_token(x: torch.Tensor, t_in: float, wt_gate_up: torch.Tensor, t_down: float, wt_down: torch.Tensor,
                   **launch: Any) -> torch.Tensor:
    """One token through a gated SiLU MLP with TEAL's thresholds on its input and on the down projection's input:
    gate|up stacked as one (hidden, 2 x intermediate) W^T, down as (intermediate, hidden)."""
    gate_up = threshold_matvec(x, t_in, wt_gate_up, **launch)
    inter = wt_down.shape[0]
    act = torch.nn.functional.silu(gate_up[:inter]) * gate_up[inter:]
    return threshold_matvec(act, t_down, wt_down, **launch)


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

    def gather(self, idx: torch.Tensor, vals: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
        """sum over k of vals[k] * wt[idx[k]]: the values scattered into a vector whose other entries are zero,
        which the kernel skips (so are zero values: they add nothing)."""
        dense = vals.new_zeros(wt.shape[0]).index_copy_(0, idx, vals)
        return threshold_matvec(dense, 0.0, wt)


def gather_kernel(device_type: str = "cuda") -> TritonGather:
    """The kernel for the sparse runtime on `device_type`."""
    return TritonGather(device_type)
