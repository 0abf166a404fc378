"""Deja Vu's per-layer predictors of active MLP neurons: the saved format, loading, and hooking them into a model.

A predictor maps the MLP input x of its layer (or, with look-ahead, the previous layer's MLP input; layer
0 reads its own) to one logit per intermediate neuron, and calls a neuron active where the logit is
above the layer's threshold:

    logits = (x @ A) @ B + bias        A: hidden x rank, B: rank x intermediate
    active = logits > threshold

`predictors.safetensors` (beside the model's files in a dejavu artifact) holds, for each layer i,
float32 tensors `{i}.A`, `{i}.B`, `{i}.bias` and `{i}.threshold` (a scalar); its metadata holds
`format` and `lookahead` ("true"/"false"). This format is read by the sparse runtime too: change it
only together with it. Training is in predictor_training.py, the method in dejavu.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from llmfast.errors import UserError

if TYPE_CHECKING:
    import torch

PREDICTORS_FILE = "predictors.safetensors"
FORMAT = "llmfast-dejavu-1"
PARTS = ("A", "B", "bias", "threshold")


@dataclasses.dataclass
class Predictor:
    """One layer's predictor of its active MLP neurons (all tensors float32 as stored)."""

    A: "torch.Tensor"  # (hidden, rank)
    B: "torch.Tensor"  # (rank, intermediate)
    bias: "torch.Tensor"  # (intermediate,)
    threshold: "torch.Tensor"  # () : a neuron is predicted active where its logit is above this
    lookahead: bool = False  # True: fed the previous layer's MLP input (layer 0: its own)

    def logits(self, x: "torch.Tensor") -> "torch.Tensor":
        """(..., hidden) -> (..., intermediate) float32 logits; x may be any float dtype on A's device."""
        return (x.to(self.A.dtype) @ self.A) @ self.B + self.bias

    def active(self, x: "torch.Tensor") -> "torch.Tensor":
        """(..., hidden) -> (..., intermediate) bool: the neurons predicted active."""
        return self.logits(x) > self.threshold

    @property
    def rank(self) -> int:
        return int(self.A.shape[1])

    def to(self, device: Any) -> "Predictor":
        return dataclasses.replace(self, **{p: getattr(self, p).to(device) for p in PARTS})


def save_predictors(predictors: list[Predictor], path: Path) -> None:
    """Write `predictors` (one per layer, in order) as float32 safetensors with the format in the metadata."""
    from safetensors.torch import save_file

    tensors = {f"{i}.{p}": getattr(pr, p).detach().float().cpu().contiguous()
               for i, pr in enumerate(predictors) for p in PARTS}
    lookahead = bool(predictors and predictors[0].lookahead)
    save_file(tensors, path, metadata={"format": FORMAT, "lookahead": str(lookahead).lower()})


def load_predictors(artifact: Path) -> list[Predictor]:
    """The predictors of a dejavu artifact (on the CPU), layer by layer; a malformed file is a one-line error."""
    from safetensors import safe_open

    path = Path(artifact) / PREDICTORS_FILE
    if not path.is_file():
        raise UserError(f"{artifact}: a dejavu artifact without {PREDICTORS_FILE}: rebuild it with `llmfast sparsify`")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: not a {FORMAT} file (metadata format {meta.get('format')!r}): rebuild it with "
                        "`llmfast sparsify`")
    layers = {k.split(".")[0] for k in tensors}
    n = 1 + max((int(i) for i in layers if i.isdigit()), default=-1)
    expected = {f"{i}.{p}" for i in range(n) for p in PARTS}
    if set(tensors) != expected or n == 0:
        odd = [f"missing {k}" for k in sorted(expected - set(tensors))] + [
            f"unexpected {k}" for k in sorted(set(tensors) - expected)]
        raise UserError(f"{path}: expected {{i}}.A, {{i}}.B, {{i}}.bias, {{i}}.threshold for every layer i: "
                        f"{', '.join(odd[:3]) or 'no layers'}: rebuild it with `llmfast sparsify`")
    lookahead = meta.get("lookahead") == "true"
    out = []
    for i in range(n):
        a, b, bias, t = (tensors[f"{i}.{p}"].float() for p in PARTS)
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0] or bias.shape != (b.shape[1],) or t.dim() != 0:
            raise UserError(f"{path}: layer {i} has shapes A {tuple(a.shape)}, B {tuple(b.shape)}, bias "
                            f"{tuple(bias.shape)}, threshold {tuple(t.shape)}: expected (hidden, rank), (rank, "
                            "intermediate), (intermediate,), ()")
        out.append(Predictor(a, b, bias, t, lookahead))
    return out


def check_predictors(predictors: list[Predictor], model: Any, where: Path | str) -> list[Any]:
    """The model's gated MLPs, after checking the predictors fit them (layer count, widths); one line if not."""
    from llmfast.sparse.base import gated_mlps

    mlps = gated_mlps(model, where=str(where))
    if len(predictors) != len(mlps):
        raise UserError(f"{where}: {len(predictors)} predictors for a model with {len(mlps)} gated MLPs: the "
                        "predictors belong to another model")
    for i, (p, mlp) in enumerate(zip(predictors, mlps)):
        hidden, inter = mlp.down_proj.out_features, mlp.down_proj.in_features  # either MLP form has down_proj
        if p.A.shape[0] != hidden or p.B.shape[1] != inter:
            raise UserError(f"{where}: layer {i}'s predictor maps {p.A.shape[0]} -> {p.B.shape[1]}, the model's MLP "
                            f"is {hidden} -> {inter}: the predictors belong to another model")
    return mlps


@dataclasses.dataclass
class HookedPredictors:
    """Predictors hooked into a model's gated MLPs (install_predictors); `enabled = False` runs it dense."""

    predictors: list[Predictor]
    handles: list[Any]
    mlps: list[Any]
    enabled: bool = True
    masks: list[Any] = dataclasses.field(default_factory=list)
    last_input: Any = None  # the latest MLP input, for the next layer's look-ahead predictor

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for mlp in self.mlps:
            if hasattr(mlp, "llmfast_predictor"):
                del mlp.llmfast_predictor


def install_predictors(model: Any, predictors: list[Predictor], where: Path | str = "predictors",
                       observe: Callable[[int, "torch.Tensor", "torch.Tensor"], None] | None = None
                       ) -> HookedPredictors:
    """Set `mlp.llmfast_predictor` on each gated MLP and zero the activation entries predicted inactive.

    The prediction is made when the MLP is entered (from its input, or the previous MLP's with look-ahead)
    and applied to down_proj's input, act(gate(x)) * up(x). `observe(layer, activation, active)` sees each
    activation before it is zeroed (for metrics). Kept entries are untouched bit for bit, so predictors
    calling every neuron active give exactly the dense model's outputs.
    """
    import torch

    mlps = check_predictors(predictors, model, where)
    device = next(model.parameters()).device
    predictors = [p.to(device) for p in predictors]
    state = HookedPredictors(predictors, [], mlps, masks=[None] * len(mlps))

    def predict(i: int) -> Any:
        def hook(mod: Any, args: tuple) -> None:
            if state.enabled:
                x = args[0]
                fed = state.last_input if predictors[i].lookahead and i > 0 else x
                state.masks[i] = predictors[i].active(fed)
                state.last_input = x
        return hook

    def zero(i: int) -> Any:
        def hook(mod: Any, args: tuple) -> tuple | None:
            if not state.enabled:
                return None
            h, active = args[0], state.masks[i]
            if observe is not None:
                observe(i, h, active)
            # where() rather than a multiply: kept entries stay bit for bit.
            return (torch.where(active, h, torch.zeros((), dtype=h.dtype, device=h.device)), *args[1:])
        return hook

    for i, (mlp, p) in enumerate(zip(mlps, predictors)):
        mlp.llmfast_predictor = p
        state.handles.append(mlp.register_forward_pre_hook(predict(i)))
        state.handles.append(mlp.down_proj.register_forward_pre_hook(zero(i)))
    return state
