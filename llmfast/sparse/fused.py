"""Fused gate|up MLPs (Phi-3, Phi-3.5, Phi-4-mini, GLM, GLM-4) seen as Llama-style gated MLPs, so that every
sparsity method and the sparse runtime take them.

Those MLPs hold one `gate_up_proj` (2 x intermediate rows: gate's, then up's) and compute
`down_proj(up * activation_fn(gate))`. `split_fused_mlps` gives each one `gate_proj` and `up_proj` (the two halves
of the fused weight, moved into Linear modules of their own, no copy kept), `act_fn` (its activation) and Llama's
forward, `down_proj(act_fn(gate_proj(x)) * up_proj(x))`: the same function, the two halves multiplied apart
instead of as one product (equal up to float summation order). Only the classes known to compute exactly that are
split (`FUSED_CLASSES`): another module with a `gate_up_proj` could order its halves otherwise, and is refused by
`base.gated_mlps` as a model without a gated MLP. `fused_state_dict` puts the halves back as `gate_up_proj`, so a
saved model is the architecture's own checkpoint, which transformers and vLLM load as they would the original.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

# transformers' MLP classes that compute down_proj(up * activation_fn(gate)) with gate, up = gate_up_proj(x).chunk(2)
FUSED_CLASSES = ("Phi3MLP", "GlmMLP", "Glm4MLP")
SPLIT_MARK = "llmfast_split_fused"  # set on a split MLP: its state_dict keys are gate_proj/up_proj, not gate_up_proj


def _gated_forward(self: Any, x: "torch.Tensor") -> "torch.Tensor":
    return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _half(fused: Any, rows: slice) -> Any:
    import torch

    weight = fused.weight.detach()[rows]
    bias = None if fused.bias is None else fused.bias.detach()[rows]
    lin = torch.nn.Linear(fused.in_features, weight.shape[0], bias=bias is not None, device="meta")
    # clones: each half its own storage (safetensors refuses tensors that share one, and the fused one is dropped)
    lin.weight = torch.nn.Parameter(weight.clone(), requires_grad=fused.weight.requires_grad)
    if bias is not None:
        lin.bias = torch.nn.Parameter(bias.clone(), requires_grad=fused.bias.requires_grad)
    return lin


def split_fused_mlps(model: "PreTrainedModel") -> int:
    """Split every fused gate|up MLP of `model` (of `FUSED_CLASSES`) into gate_proj / up_proj in place; returns how
    many were split now (0 when there are none, or they were split before)."""
    split = 0
    for mlp in model.modules():
        if type(mlp).__name__ not in FUSED_CLASSES or getattr(mlp, SPLIT_MARK, False):
            continue
        fused = mlp.gate_up_proj
        inter = fused.out_features // 2
        mlp.gate_proj, mlp.up_proj = _half(fused, slice(0, inter)), _half(fused, slice(inter, 2 * inter))
        del mlp.gate_up_proj
        mlp.act_fn = mlp.activation_fn
        mlp.forward = types.MethodType(_gated_forward, mlp)  # an instance attribute: __call__ runs it
        setattr(mlp, SPLIT_MARK, True)
        split += 1
    return split


def fused_state_dict(model: "PreTrainedModel") -> dict[str, "torch.Tensor"]:
    """`model.state_dict()` with each split MLP's gate_proj and up_proj put back as the one `gate_up_proj` its
    architecture loads (gate's rows first); the model's own state dict where nothing was split."""
    import torch

    state = model.state_dict()
    for name, mlp in model.named_modules():
        if not getattr(mlp, SPLIT_MARK, False):
            continue
        prefix = f"{name}." if name else ""
        for kind in ("weight", "bias"):
            gate, up = state.pop(f"{prefix}gate_proj.{kind}", None), state.pop(f"{prefix}up_proj.{kind}", None)
            if gate is not None:
                state[f"{prefix}gate_up_proj.{kind}"] = torch.cat([gate, up])
    return state
