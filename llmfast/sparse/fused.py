"""Fused gate|up MLPs (Phi-3, Phi-3.5, Phi-4-mini, GLM, GLM-4) for the sparse runtime.

Those MLPs hold one `gate_up_proj` (2 x intermediate rows: gate's, then up's) and compute
`down_proj(up * activation_fn(gate))`. Every sparsity method works on them as they are (base.gated_mlps: hooks on
the MLP's input, its activation and down_proj's input), and relufy's model is saved in the architecture's own
layout. Only the sparse runtime reads gate's and up's rows apart: `split_fused_mlps` gives each such MLP
`gate_proj` and `up_proj` (the two halves of the fused weight, moved into Linear modules of their own, no copy
kept), `act_fn` (its activation) and Llama's forward, `down_proj(act_fn(gate_proj(x)) * up_proj(x))`: the same
function, the halves multiplied apart (equal up to float summation order). A model split so is for inference: it is
never saved. Only the classes known to compute exactly that are taken (`FUSED_CLASSES`), with a plain
`torch.nn.Linear` for `gate_up_proj`: another module with a `gate_up_proj` could order its halves otherwise (or be
quantized), and is refused by `base.gated_mlps` as a model without a gated MLP.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

# transformers' MLP classes that compute down_proj(up * activation_fn(gate)) with gate, up = gate_up_proj(x).chunk(2)
FUSED_CLASSES = ("Phi3MLP", "GlmMLP", "Glm4MLP")


def is_fused_mlp(module: Any) -> bool:
    """A fused gate|up MLP of a known class, not split, whose gate_up_proj is a plain Linear."""
    import torch

    return (type(module).__name__ in FUSED_CLASSES and type(getattr(module, "gate_up_proj", None)) is torch.nn.Linear
            and hasattr(module, "down_proj") and hasattr(module, "activation_fn"))


def _gated_forward(self: Any, x: "torch.Tensor") -> "torch.Tensor":
    return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _half(fused: Any, rows: slice) -> Any:
    import torch

    weight = fused.weight.detach()[rows]
    bias = None if fused.bias is None else fused.bias.detach()[rows]
    lin = torch.nn.Linear(fused.in_features, weight.shape[0], bias=bias is not None, device="meta")
    # clones: each half its own storage (the fused one is dropped)
    lin.weight = torch.nn.Parameter(weight.clone(), requires_grad=fused.weight.requires_grad)
    if bias is not None:
        lin.bias = torch.nn.Parameter(bias.clone(), requires_grad=fused.bias.requires_grad)
    return lin


def split_fused_mlps(model: "PreTrainedModel") -> int:
    """Split every fused gate|up MLP of `model` into gate_proj / up_proj in place; returns how many were split."""
    split = 0
    for mlp in list(model.modules()):
        if not is_fused_mlp(mlp):
            continue
        fused = mlp.gate_up_proj
        inter = fused.out_features // 2
        mlp.gate_proj, mlp.up_proj = _half(fused, slice(0, inter)), _half(fused, slice(inter, 2 * inter))
        del mlp.gate_up_proj
        mlp.act_fn = mlp.activation_fn
        mlp.forward = types.MethodType(_gated_forward, mlp)  # an instance attribute: __call__ runs it
        split += 1
    return split
