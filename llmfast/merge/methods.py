"""Merge methods: one function per method, behind the `METHODS` registry.

Papers:
- linear (model soups): Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models
  improves accuracy without increasing inference time", https://arxiv.org/abs/2203.05482
- task arithmetic: Ilharco et al. 2023, "Editing Models with Task Arithmetic", https://arxiv.org/abs/2212.04089
- TIES: Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models",
  https://arxiv.org/abs/2306.01708
- DARE: Yu et al. 2023, "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
  Free Lunch", https://arxiv.org/abs/2311.03099

Semantics follow mergekit 0.1.5 so configs give the same model: linear averages whole weights (the base
too, when given) and normalizes by the weight sum; the task-vector methods work on delta = model - base,
trim or drop each delta, multiply it by its weight, optionally keep only the entries whose sign agrees
with the sign of the weighted sum ("sum" election), add, optionally divide by the weight mass that
agreed (`normalize`), multiply by `lambda` and add the result to the base. DARE's `rescale` scales the
kept entries so the delta keeps its L1 norm (mergekit's choice; the paper's 1/density is its expectation).
Every computation runs in float32 (float64 stays float64); the caller casts to the output dtype.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import TYPE_CHECKING, Any, Callable, Literal

from llmfast.merge.config import REQUIRED

if TYPE_CHECKING:
    import torch


@dataclasses.dataclass(frozen=True)
class MergeMethod:
    name: str
    paper: str
    # "raw": the function gets whole weights; "delta": it gets task vectors (model - base).
    domain: Literal["raw", "delta"]
    needs_base: bool
    shared: dict[str, tuple[type, Any]]  # merge-wide parameter -> (type, default)
    per_input: dict[str, tuple[type, Any]]  # per-model parameter -> (type, default or REQUIRED)
    fn: Callable[..., "torch.Tensor"]
    # Methods whose result is base + sum(c_i * delta_i) (so LoRA ranks can be concatenated exactly).
    linear_in_deltas: bool = False


def _work(t: "torch.Tensor") -> "torch.Tensor":
    import torch

    return t if t.dtype in (torch.float32, torch.float64) else t.float()


# ---------------------------------------------------------------- sparsification
def magnitude_mask(delta: "torch.Tensor", density: float) -> "torch.Tensor | None":
    """Boolean mask of the `density` fraction of entries largest in magnitude (None: keep all).

    k = max(1, int(density * n)) like mergekit. A selection by threshold (linear time) instead of a full
    sort; only when entries tie at a nonzero threshold does it sort, as mergekit always does.
    """
    import numpy as np
    import torch

    n = delta.numel()
    if density >= 1:
        return None
    if density <= 0 or n == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    k = max(1, int(density * n))
    mag = delta.abs().reshape(-1)
    if mag.dtype != torch.float32 and mag.dtype != torch.float64:
        mag = mag.float()
    # numpy's introselect finds the k-th largest magnitude in linear time, several times faster than a sort.
    threshold = float(np.partition(mag.numpy(), n - k)[n - k])
    mask = mag >= threshold
    if threshold > 0 and int(mask.sum()) != k:
        # Entries tied at the threshold (common: fine-tuned fp32 deltas sit on the base weights' ulp grid).
        # Which of them to keep is decided exactly as mergekit's magnitude() does, so outputs match.
        mask = torch.zeros_like(mask)
        mask[torch.argsort(mag, descending=True)[:k]] = True
    # (Ties at a zero threshold only add zeros, which change nothing.)
    return mask.reshape(delta.shape)


def random_mask(delta: "torch.Tensor", density: float, generator: "torch.Generator") -> "torch.Tensor | None":
    """DARE's drop: keep each entry with probability `density` (None: keep all)."""
    import torch

    if density >= 1:
        return None
    return torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density


def apply_mask(delta: "torch.Tensor", mask: "torch.Tensor | None", rescale: bool, eps: float = 1e-7) -> "torch.Tensor":
    """Zero the dropped entries; with `rescale`, scale the rest so the L1 norm is unchanged (as mergekit)."""
    if mask is None:
        return delta
    kept = delta * mask
    if not rescale:
        return kept
    before = delta.abs().sum()
    after = kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def tensor_generator(seed: int, tensor_name: str, index: int) -> "torch.Generator":
    """A generator per (seed, tensor, input): the same drop whatever order tensors are merged in."""
    import torch

    digest = hashlib.sha256(f"{seed}\0{tensor_name}\0{index}".encode()).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


# ---------------------------------------------------------------- methods
def linear(base: "torch.Tensor | None", tensors: list["torch.Tensor"], params: list[dict[str, Any]],
           shared: dict[str, Any], **_: Any) -> "torch.Tensor":
    """Model soup: sum(w_i * W_i) / sum(w_i) over whole weights (normalize: true, the default)."""
    import torch

    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    weights = [float(p["weight"]) for p in params]
    out = torch.zeros(tensors[0].shape, dtype=dtype)
    for t, w in zip(tensors, weights):
        out.add_(t.to(dtype), alpha=w)
    if shared["normalize"]:
        total = sum(weights)
        if total == 0:
            raise ValueError("the weights sum to 0, so they cannot be normalized: set normalize: false")
        out.div_(total)
    return out


def generalized_task_arithmetic(
    base: "torch.Tensor", deltas: list["torch.Tensor | None"], params: list[dict[str, Any]], shared: dict[str, Any],
    *, sparsify: Literal["magnitude", "random"] | None, consensus: bool, tensor_name: str = "", seed: int = 0,
    stats: dict[str, Any] | None = None,
) -> "torch.Tensor":
    """Task arithmetic, TIES, DARE and magnitude pruning: trim/drop, weight, elect signs, add, normalize.

    `deltas[i]` None means a zero task vector (an adapter that does not touch this tensor). The delta
    tensors are consumed (changed in place): each is a fresh tensor the caller made for this call.
    The operations and their order are mergekit's, so float32 results agree bit for bit.
    """
    import torch

    work = _work(base)
    weighted: list[torch.Tensor] = []
    weights: list[float] = []
    rescale = bool(shared.get("rescale", False))
    for i, (delta, p) in enumerate(zip(deltas, params)):
        if delta is None:
            continue
        if delta.dtype not in (torch.float32, torch.float64):
            delta = delta.float()
        if sparsify == "magnitude":
            mask = magnitude_mask(delta, p["density"])
        elif sparsify == "random":
            mask = random_mask(delta, p["density"], tensor_generator(seed, tensor_name, i))
        else:
            mask = None
        if mask is not None:
            if stats is not None:
                nz = delta != 0
                stats["kept"] = stats.get("kept", 0) + int((mask & nz).sum())
                stats["nonzero"] = stats.get("nonzero", 0) + int(nz.sum())
                del nz
            before = delta.abs().sum() if rescale else None
            delta.mul_(mask)
            if rescale:
                after = delta.abs().sum()
                if before >= 1e-7 and after >= 1e-7:  # mergekit leaves near-empty deltas unscaled
                    delta.mul_(before / after)
            del mask
        delta.mul_(p["weight"])
        weighted.append(delta)
        weights.append(p["weight"])
    if not weighted:
        return work
    mixed = weighted[0].clone()
    for d in weighted[1:]:
        mixed.add_(d)
    divisor: Any = None
    if consensus:
        # TIES sign election by total mass: the sign of the weighted, trimmed sum per entry (0 counts as +).
        sign = torch.where(mixed >= 0, 1.0, -1.0).to(mixed.dtype)
        mixed.zero_()
        divisor = torch.zeros_like(work)
        for d, w in zip(weighted, weights):
            agree = (d * sign) > 0  # a zero never agrees (mergekit compares sign(0) = 0 with +-1)
            mixed.add_(d.mul_(agree))
            divisor.add_(agree.to(divisor.dtype), alpha=w)
        del sign
        divisor[divisor == 0] = 1
    if shared["normalize"]:
        if divisor is None:
            total = sum(weights)
            divisor = total if abs(total) >= 1e-8 else 1.0
        mixed.div_(divisor)
    if shared["lambda"] != 1:
        mixed.mul_(shared["lambda"])
    return work + mixed


def _gta(sparsify: Literal["magnitude", "random"] | None, consensus: bool) -> Callable[..., "torch.Tensor"]:
    def fn(base: "torch.Tensor", deltas: list["torch.Tensor | None"], params: list[dict[str, Any]],
           shared: dict[str, Any], **kw: Any) -> "torch.Tensor":
        return generalized_task_arithmetic(base, deltas, params, shared, sparsify=sparsify, consensus=consensus, **kw)

    return fn


def _gta_method(name: str, paper: str, sparsify: Literal["magnitude", "random"] | None, consensus: bool,
                normalize: bool, rescale: bool) -> MergeMethod:
    per_input: dict[str, tuple[type, Any]] = {"weight": (float, REQUIRED)}
    if sparsify:
        per_input["density"] = (float, 1.0)
    return MergeMethod(
        name=name, paper=paper, domain="delta", needs_base=True,
        shared={"normalize": (bool, normalize), "rescale": (bool, rescale), "lambda": (float, 1.0),
                "int8_mask": (bool, False)},
        per_input=per_input, fn=_gta(sparsify, consensus),
        linear_in_deltas=sparsify is None and not consensus,
    )


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in [
        MergeMethod(name="linear", paper="Wortsman et al. 2022 (model soups)", domain="raw", needs_base=False,
                    shared={"normalize": (bool, True)}, per_input={"weight": (float, REQUIRED)}, fn=linear,
                    linear_in_deltas=True),
        _gta_method("task_arithmetic", "Ilharco et al. 2023", None, False, normalize=False, rescale=False),
        _gta_method("ties", "Yadav et al. 2023", "magnitude", True, normalize=True, rescale=False),
        _gta_method("dare_linear", "Yu et al. 2023", "random", False, normalize=False, rescale=True),
        _gta_method("dare_ties", "Yu et al. 2023 + Yadav et al. 2023", "random", True, normalize=False, rescale=True),
        # Task arithmetic on magnitude-trimmed task vectors, without TIES's sign election (an llmfast name).
        _gta_method("magnitude_prune", "Yadav et al. 2023 (trim step only)", "magnitude", False, normalize=False,
                    rescale=False),
    ]
}


def linear_coefficients(method: MergeMethod, params: list[dict[str, Any]], shared: dict[str, Any],
                        is_base: list[bool]) -> list[float]:
    """c_i with merged = base + sum(c_i * delta_i), for methods linear in the task vectors."""
    weights = [float(p["weight"]) for p in params]
    if method.name == "linear":
        total = sum(weights)
        if not shared["normalize"]:
            if abs(total - 1) > 1e-6:
                raise ValueError("linear with normalize: false and weights not summing to 1 scales the base too, "
                                 "which a LoRA adapter cannot express")
            total = 1.0
        return [0.0 if b else w / total for w, b in zip(weights, is_base)]
    total = sum(weights)
    norm = total if shared["normalize"] and abs(total) >= 1e-8 else 1.0
    return [w / norm * shared["lambda"] for w in weights]
