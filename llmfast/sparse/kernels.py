"""The sparse forward of one gated MLP `down(act(gate(x)) * up(x))`, and of TEAL's thresholded attention
projections, for one token, and their dense fallback.

For a single token (batch-1 decode) only what is nonzero is computed:

- `teal`  the MLP input x is thresholded: gate and up are sums of the columns of W_gate/W_up for the kept
          entries of x, and down the sum of the columns of W_down for the kept entries of the activation.
- `cats`  gate is computed dense; where |act(gate)| is above the threshold, the rows of W_up and the columns
          of W_down of those neurons only.
- `relu`  as cats with the kept neurons where gate > 0 (relu(gate) is exactly zero elsewhere).
- `dejavu` a Deja Vu predictor (llmfast/sparse/predictors.py) names the active neurons from the MLP input (or,
          with look-ahead, the previous layer's): only their rows of W_gate and W_up and columns of W_down.

`SparseProjections` does for linear layers that read one thresholded input (TEAL's `attention` sites: q_proj,
k_proj and v_proj together, o_proj alone) what `teal` does for gate and up: the sum of the columns of the
stacked weights for the kept entries of the input.

The weights are laid out so every gather reads contiguous memory: a column of W is a row of W^T, and the
weighted sum of the rows of W^T for the kept entries is `embedding_bag(idx, W^T, per_sample_weights=v[idx],
mode="sum")` (gather and reduction in one pass, no copy of the rows). The modules' own weights become views
of these buffers, so memory does not grow. Rows of W_up (cats, relu), and of W_gate and W_up interleaved
(dejavu, so one gather reads both: a kept neuron's two rows are one contiguous block), are gathered with
`index_select` and one matrix-vector product when few are kept (ROWS_DENSE_ABOVE); above that they are
computed dense and only W_down is gathered.

In float32 or bfloat16 on a CPU the gathers run in llmfast's C kernel instead (`cpu_kernel.py`, `gather_gemv.c`:
threshold and gather in one call, the columns split over torch's threads; the kept rows of W_up or W_gate|W_up
dotted with x in place, no copy, up to the kernel's own crossover); on CUDA in llmfast's Triton kernel
(`triton_kernel.py`: no dropped row is loaded); float64 and float16 on a CPU, other devices, machines without a
C compiler and CUDA without Triton take the torch path above.

When more than one token is processed (prefill, batched decode), or a layer's kept fraction is above
`dense_above` (a dense matrix-vector product beats a gather there: scripts/bench_sparse_decode.py measures
the crossover; by default DENSE_ABOVE on the torch path, the kernel's own `dense_above` on the C and Triton kernels), the same
zeros are applied and the dense matmuls run. Either way the result is the dense-with-zeros model's
(llmfast/sparse/thresholds.py hooks) up to float summation order.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

MODES = ("teal", "cats", "relu", "dejavu")
# Kept fraction above which the dense matrix-vector product is used: on this machine's CPU (1 thread, under
# load) embedding_bag was 1.1-1.2x faster than the dense product at 60% kept and even at 70%, at the built-in
# model's and at Llama-8B's shapes (scripts/bench_sparse_decode.py, table "gather"; BENCHMARKS.md).
DENSE_ABOVE = 0.65
# Gathering whole rows (index_select copies them before the product) beats the dense product of W_up (and
# W_gate) only for few rows: above this kept fraction those are computed dense and only W_down is gathered.
ROWS_DENSE_ABOVE = 0.25


def bag_sum(idx: "torch.Tensor", w: "torch.Tensor", wt: "torch.Tensor", bags: int = 0) -> "torch.Tensor":
    """sum over j of w[j] * wt[idx[j]] (the rows of W^T, columns of W, for the kept entries) in one embedding_bag.

    embedding_bag runs its bags in parallel and each bag on one thread, so with several threads the rows are
    split into `bags` bags (default: one per thread) whose sums are added.
    """
    import torch

    k, bags = idx.numel(), bags or torch.get_num_threads()
    if k == 0:
        return wt.new_zeros(wt.shape[1])
    offsets = _one_bag() if bags == 1 or k < 2 * bags else torch.arange(0, k, -(-k // bags))
    # The aten op itself: F.embedding_bag's argument checks cost as much as a small gather (mode 0 is "sum").
    out = torch.embedding_bag(wt, idx, offsets, False, 0, False, w)[0]
    return out.view(-1) if len(offsets) == 1 else out.sum(0)


def gather_sum(keep: "torch.Tensor", v: "torch.Tensor", wt: "torch.Tensor", dense_above: float,
               calls: dict[str, int]) -> "torch.Tensor":
    """sum over kept i of v[i] * wt[i]: the rows of W^T (columns of W) where v is kept, or the dense product of
    the zeroed v when more than `dense_above` of it is kept; counts the path taken in `calls`."""
    import torch

    idx = keep.nonzero().view(-1)
    if idx.numel() > dense_above * v.numel():
        calls["dense"] += 1
        return torch.where(keep, v, 0.0) @ wt
    calls["sparse"] += 1
    return bag_sum(idx, v.index_select(0, idx), wt)


def native_for(wt: "torch.Tensor") -> Any:
    """The kernel for products with the weights `wt` where one runs them: the C kernel (float32 or bfloat16 on a
    CPU, where it is built here) or the Triton kernel (on CUDA, where Triton is installed); else None (the torch
    path).
    Decided once per layout: each call then checks only its vector (`takes`)."""
    if wt.device.type == "cuda":
        try:
            from llmfast.sparse import triton_kernel
        except ImportError:  # torch without Triton: the torch path runs
            return None
        kernel = triton_kernel.gather_kernel("cuda")
    else:
        from llmfast.sparse import cpu_kernel

        kernel = cpu_kernel.gather_kernel()
    return kernel if kernel is not None and kernel.holds(wt) else None


def limit(dense_above: float | None, native: Any) -> float:
    """The kept fraction above which the dense product runs: as given, else the default of the path taken."""
    if dense_above is not None:
        return dense_above
    return native.dense_above if native is not None else DENSE_ABOVE


def threshold_sum(v: "torch.Tensor", t: float, wt: "torch.Tensor", dense_above: float | None,
                  calls: dict[str, int], native: Any = None) -> "torch.Tensor":
    """sum over i with |v[i]| > t of v[i] * wt[i]: in the C kernel `native` (from `native_for(wt)`) where it takes
    v, in one call; else the torch path (`gather_sum`). The dense product of the zeroed v above the kept fraction
    `dense_above`."""
    import torch

    if native is None or not native.takes(v):
        return gather_sum(v.abs() > t, v, wt, limit(dense_above, None), calls)
    y = native.threshold(v, t, wt, int(limit(dense_above, native) * v.numel()))
    if y is None:
        calls["dense"] += 1
        return torch.where(v.abs() > t, v, 0.0) @ wt
    calls["sparse"] += 1
    return y


def weighted_rows(idx: "torch.Tensor", w: "torch.Tensor", wt: "torch.Tensor", native: Any = None) -> "torch.Tensor":
    """sum over j of w[j] * wt[idx[j]]: the C kernel `native` where it takes w, else `bag_sum`."""
    return native.gather(idx, w, wt) if native is not None and native.takes(w) else bag_sum(idx, w, wt)


@functools.lru_cache(maxsize=None)
def _one_bag() -> "torch.Tensor":
    """The offsets of a single bag, made once (torch is imported only when a sparse MLP runs)."""
    import torch

    return torch.zeros(1, dtype=torch.long)


class SparseMLP:
    """Callable that replaces `mlp.forward`; counts which path each gather took in `calls`."""

    def __init__(self, mlp: Any, mode: str, *, t_in: float = 0.0, t_down: float = 0.0, t_gate: float = 0.0,
                 dense_above: float | None = None, predictor: Any = None, layer: int = 0,
                 shared: dict[str, Any] | None = None, relu_cut: float | None = None) -> None:
        import torch

        if mode not in MODES:
            raise ValueError(f"unknown sparse MLP mode {mode!r} (known: {', '.join(MODES)})")
        if any(getattr(mlp, p).bias is not None for p in ("gate_proj", "up_proj", "down_proj")):
            raise ValueError("the sparse MLP supports bias-free projections only (mlp_bias: false)")
        self.mode, self.act = mode, mlp.act_fn
        self.relu_cut = relu_cut
        if relu_cut is not None:  # a shifted ReLU (relu_cut.py): relu(gate) kept above the cut, in every mode
            from llmfast.sparse.relu_cut import fatrelu

            self.act = fatrelu(relu_cut)
        self.t_in, self.t_down, self.t_gate = float(t_in), float(t_down), float(t_gate)
        self.dense_above = dense_above
        # dejavu: the predictor, this MLP's layer, and a dict all layers share for the look-ahead input
        self.predictor, self.layer, self.shared = predictor, layer, shared if shared is not None else {}
        self.calls = {"sparse": 0, "dense": 0, "prefill": 0}
        with torch.no_grad():
            wg, wu, wd = (getattr(mlp, p).weight.detach() for p in ("gate_proj", "up_proj", "down_proj"))
            self.inter = wg.shape[0]
            self.down_t = wd.t().contiguous()  # (inter, hidden): column j of W_down is row j
            if mode == "teal":
                self.gate_up_t = torch.cat([wg.t(), wu.t()], dim=1).contiguous()  # (hidden, 2 inter)
                self.gate_w = self.gate_up_t[:, : self.inter].t()
                self.up_w = self.gate_up_t[:, self.inter :].t()
            elif mode == "dejavu":
                self.gate_up_rows = torch.stack([wg, wu], dim=1).contiguous()  # (inter, 2, hidden)
                self.gate_w, self.up_w = self.gate_up_rows[:, 0], self.gate_up_rows[:, 1]
                # Dense products read it as one (2 inter, hidden) matrix: a matmul over the strided gate_w/up_w
                # views was 2.3x slower than over contiguous rows (and gate and up are wanted together).
                self.gate_up_flat = self.gate_up_rows.view(2 * self.inter, -1)
            else:
                self.gate_w, self.up_w = wg.contiguous(), wu.contiguous()  # rows of W_up are gathered as they are
            self.native = native_for(self.down_t)  # the C kernel, where it runs these CPU weights
            # The modules keep working (and memory stays one copy): their weights become views of our buffers.
            for name, w in (("gate_proj", self.gate_w), ("up_proj", self.up_w), ("down_proj", self.down_t.t())):
                getattr(mlp, name).weight = torch.nn.Parameter(w, requires_grad=False)

    def __call__(self, x: "torch.Tensor") -> "torch.Tensor":
        if x.shape[:-1].numel() != 1:
            self.calls["prefill"] += 1
            return self.dense(x)
        v = x.reshape(-1)
        if self.mode == "dejavu":
            return self.dejavu_token(x, v).view(x.shape)
        out = self.teal_token(v) if self.mode == "teal" else self.gated_token(v)
        return out.view(x.shape)

    # --- one token ---------------------------------------------------------------------------------------
    def native_taking(self, v: "torch.Tensor") -> Any:
        """The C kernel where it takes the vector `v` (its gathers and crossover apply), else None (torch path)."""
        return self.native if self.native is not None and self.native.takes(v) else None

    def teal_token(self, v: "torch.Tensor") -> "torch.Tensor":
        native = self.native_taking(v)
        silu = type(self.act).__name__ in ("SiLU", "SiLUActivation")  # torch's and transformers' modules
        if native is not None and hasattr(native, "gated_silu") and silu and (
                self.dense_above is None or self.dense_above >= 1.0):  # the Triton kernel: silu(gate) * up fused
            h = native.gated_silu(v, self.t_in, self.gate_up_t)
            self.calls["sparse"] += 1
        else:
            gu = threshold_sum(v, self.t_in, self.gate_up_t, self.dense_above, self.calls, self.native)
            h = self.act(gu[: self.inter]) * gu[self.inter :]
        return threshold_sum(h, self.t_down, self.down_t, self.dense_above, self.calls, self.native)

    def gated_token(self, v: "torch.Tensor") -> "torch.Tensor":
        import torch
        import torch.nn.functional as F

        g = F.linear(v, self.gate_w)
        a = self.act(g)
        keep = a > 0 if self.mode == "relu" else a.abs() > self.t_gate
        idx = keep.nonzero().view(-1)
        native = self.native_taking(a)
        if idx.numel() > limit(self.dense_above, native) * self.inter:
            self.calls["dense"] += 1
            return (torch.where(keep, a, 0.0) * F.linear(v, self.up_w)) @ self.down_t
        self.calls["sparse"] += 1
        u = self.kept_rows(idx, self.up_w, v, native, lambda: F.linear(v, self.up_w))
        return weighted_rows(idx, a.index_select(0, idx) * u, self.down_t, native)

    def kept_rows(self, idx: "torch.Tensor", rows: "torch.Tensor", v: "torch.Tensor", native: Any,
                  dense: Callable[[], "torch.Tensor"]) -> "torch.Tensor":
        """rows[idx] @ v for the kept neurons `idx` of `rows` ((inter, hidden): W_up; (inter, 2, hidden): Deja Vu's
        interleaved gate and up), shaped (kept,) or (kept, 2): in place by the C kernel, else gathered with
        index_select, or, when many are kept, `dense()` (the product for every neuron) indexed."""
        if hasattr(native, "rows"):  # the C kernel (the Triton one gathers only W_down's rows)
            return native.rows(idx, rows, v).view(idx.numel(), *rows.shape[1:-1])
        if idx.numel() > ROWS_DENSE_ABOVE * self.inter:
            return dense().index_select(0, idx)
        return rows.index_select(0, idx) @ v

    def predicted(self, x: "torch.Tensor") -> "torch.Tensor":
        """The predictor's active mask for MLP input `x`, fed as install_predictors feeds it (same shapes, so the
        same float32 logits)."""
        lookahead = self.predictor.lookahead and self.layer > 0
        fed = self.shared.get("last_input") if lookahead else x
        self.shared["last_input"] = x
        return self.predictor.active(fed)

    def dejavu_token(self, x: "torch.Tensor", v: "torch.Tensor") -> "torch.Tensor":
        import torch
        import torch.nn.functional as F

        keep = self.predicted(x).view(-1)
        idx = keep.nonzero().view(-1)
        native = self.native_taking(v)
        if idx.numel() > limit(self.dense_above, native) * self.inter:
            self.calls["dense"] += 1
            gu = self.gate_up_dense(v)
            return torch.where(keep, self.act(gu[:, 0]) * gu[:, 1], 0.0) @ self.down_t
        self.calls["sparse"] += 1
        gu = self.kept_rows(idx, self.gate_up_rows, v, native, lambda: self.gate_up_dense(v))  # (kept, 2): gate, up
        return weighted_rows(idx, self.act(gu[:, 0]) * gu[:, 1], self.down_t, native)

    def gate_up_dense(self, x: "torch.Tensor") -> "torch.Tensor":
        """dejavu: (..., inter, 2) gate and up of every neuron, one matmul over the contiguous interleaved rows."""
        import torch.nn.functional as F

        return F.linear(x, self.gate_up_flat).unflatten(-1, (self.inter, 2))

    # --- many tokens: dense matmuls, the same zeros ---------------------------------------------------------
    def dense(self, x: "torch.Tensor") -> "torch.Tensor":
        import torch
        import torch.nn.functional as F

        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        if self.mode == "teal":
            gu = torch.where(x.abs() > self.t_in, x, zero) @ self.gate_up_t
            h = self.act(gu[..., : self.inter]) * gu[..., self.inter :]
            return torch.where(h.abs() > self.t_down, h, zero) @ self.down_t
        if self.mode == "dejavu":
            keep = self.predicted(x)
            gu = self.gate_up_dense(x)
            return torch.where(keep, self.act(gu[..., 0]) * gu[..., 1], zero) @ self.down_t
        a = self.act(F.linear(x, self.gate_w))
        if self.mode == "cats":
            a = torch.where(a.abs() > self.t_gate, a, zero)
        return (a * F.linear(x, self.up_w)) @ self.down_t


class SparseProjections:
    """The linear layers of one input thresholded at `t` (q_proj, k_proj, v_proj; or o_proj alone) as one stacked
    W^T (in, sum of outs): each layer's forward becomes `part(j, x)`, column block j of the stacked product.

    The first of them to see a tensor computes all blocks (gathered for one token, dense for several) and keeps
    the result until each block was asked for, so q, k and v cost one threshold and one gather; a layer called
    on a tensor the others have not seen computes the product afresh (correct whatever order or inputs the
    attention code uses, only slower). Counts which path each product took in `calls`.
    """

    def __init__(self, linears: list[Any], t: float, dense_above: float | None = None) -> None:
        import torch

        self.t, self.dense_above = float(t), dense_above
        self.calls = {"sparse": 0, "dense": 0, "prefill": 0}
        widths = [lin.out_features for lin in linears]
        self.bounds = [(sum(widths[:j]), sum(widths[: j + 1])) for j in range(len(widths))]
        with torch.no_grad():
            self.wt = torch.cat([lin.weight.detach().t() for lin in linears], dim=1).contiguous()
            biases = [lin.bias for lin in linears]
            self.bias = None if all(b is None for b in biases) else torch.cat(
                [b.detach() if b is not None else self.wt.new_zeros(w) for b, w in zip(biases, widths)])
            for j, lin in enumerate(linears):
                a, b = self.bounds[j]
                lin.weight = torch.nn.Parameter(self.wt[:, a:b].t(), requires_grad=False)  # a view: one copy
                lin.forward = functools.partial(self.part, j)
        self.native = native_for(self.wt)
        self._x: Any = None
        self._out: Any = None
        self._left = 0

    def part(self, j: int, x: "torch.Tensor") -> "torch.Tensor":
        if self._x is not x or self._left == 0:
            self._x, self._out, self._left = x, self.product(x), len(self.bounds)
        a, b = self.bounds[j]
        out = self._out[..., a:b]
        self._left -= 1
        if self._left == 0:  # every block served: drop the references
            self._x = self._out = None
        return out

    def product(self, x: "torch.Tensor") -> "torch.Tensor":
        import torch

        if x.shape[:-1].numel() != 1:
            self.calls["prefill"] += 1
            out = torch.where(x.abs() > self.t, x, torch.zeros((), dtype=x.dtype, device=x.device)) @ self.wt
        else:
            v = x.reshape(-1)
            out = threshold_sum(v, self.t, self.wt, self.dense_above, self.calls, self.native)
            out = out.view(*x.shape[:-1], -1)
        return out if self.bias is None else out + self.bias
