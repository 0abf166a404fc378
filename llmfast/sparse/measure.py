"""Measuring MLP activation sparsity, and cutting the shipped text into calibration and held-out windows.

The MLP activation of a layer is the input of its down projection, `act(gate(x)) * up(x)` (after any
threshold a method puts there): a zero in it is a column of `down_proj` (and, for ReLU, a row of
gate/up) that a sparse kernel can skip. The sparsity is the fraction of its entries that are exactly
zero (or at most `eps` in magnitude), per layer; the per-token fractions' spread is kept too, so a
caller can say how precise a measured fraction is.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any, Iterator

from llmfast.sparse.base import gated_mlps

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


class ZeroTally:
    """Per-token zero fractions of one tensor site, summed over everything seen."""

    def __init__(self) -> None:
        self.zeros = 0
        self.entries = 0
        self.tokens = 0
        self.frac_sum = 0.0
        self.frac_sq = 0.0

    def add(self, x: "torch.Tensor", eps: float) -> None:
        zero = (x.detach().abs() <= eps).reshape(-1, x.shape[-1])
        per_token = zero.float().mean(dim=-1)
        self.zeros += int(zero.sum())
        self.entries += zero.numel()
        self.tokens += per_token.numel()
        self.frac_sum += float(per_token.sum())
        self.frac_sq += float((per_token.double() ** 2).sum())

    def summary(self) -> dict[str, float]:
        mean = self.zeros / max(1, self.entries)
        var = max(0.0, self.frac_sq / max(1, self.tokens) - (self.frac_sum / max(1, self.tokens)) ** 2)
        return {"sparsity": mean, "token_std": math.sqrt(var), "tokens": self.tokens}


@contextlib.contextmanager
def record_sparsity(model: "PreTrainedModel", eps: float = 0.0, inputs: bool = True) -> Iterator[dict[str, list]]:
    """Count zeros entering each MLP's down projection (`down_in`) and, with `inputs`, entering the MLP
    (`mlp_in`, what TEAL thresholds) while the block runs; yields {site: [ZeroTally per layer]}.

    Register after any sparsity hooks so the thresholded tensors are the ones counted.
    """
    mlps = gated_mlps(model)
    tallies: dict[str, list[ZeroTally]] = {"down_in": [ZeroTally() for _ in mlps]}
    if inputs:
        tallies["mlp_in"] = [ZeroTally() for _ in mlps]
    handles = []
    for i, mlp in enumerate(mlps):
        handles.append(mlp.down_proj.register_forward_pre_hook(
            lambda mod, args, t=tallies["down_in"][i]: t.add(args[0], eps)))
        if inputs:
            handles.append(mlp.register_forward_pre_hook(lambda mod, args, t=tallies["mlp_in"][i]: t.add(args[0], eps)))
    try:
        yield tallies
    finally:
        for h in handles:
            h.remove()


def summarize(tallies: dict[str, list[ZeroTally]]) -> dict[str, Any]:
    """Per-layer fractions and their mean over layers, per site (JSON-ready)."""
    out: dict[str, Any] = {}
    for site, per_layer in tallies.items():
        layers = [t.summary() for t in per_layer]
        out[site] = {
            "mean": round(sum(l["sparsity"] for l in layers) / len(layers), 6),
            "per_layer": [round(l["sparsity"], 6) for l in layers],
            "token_std": [round(l["token_std"], 6) for l in layers],
            "tokens": layers[0]["tokens"] if layers else 0,
        }
    return out


def measure_sparsity(model: "PreTrainedModel", windows: "torch.Tensor", eps: float = 0.0,
                     batch_size: int = 4) -> dict[str, Any]:
    """MLP activation sparsity of `model` on `windows` (rows of token ids), per layer and site."""
    import torch

    with record_sparsity(model, eps) as tallies, torch.inference_mode():
        for s in range(0, windows.shape[0], batch_size):
            model(windows[s : s + batch_size].to(model.device))
    return summarize(tallies)
