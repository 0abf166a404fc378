"""A shifted ReLU cut (FATReLU): relu(gate(x)) kept only above a per-layer threshold t >= 0.

ProSparse (Song et al. 2024, arXiv:2402.13516) raises ReLU's cut from 0 to a small positive threshold for more
zeros in the MLP activation. relufy's `target` learns with such a cut (relufy.py) and stores it in the model's
config.json as `llmfast_relu_thresholds`, one number per gated MLP. Anything built on that model keeps it:
`llmfast sparsify` puts it on the source model before a method reads activations, `models.load_model` on every
artifact whose config.json holds it (whatever its method), the sparse runtime folds it into the activation
(`fatrelu`), and our vLLM plugin runs vLLM's FATReLU at it. transformers alone ignores the key (plain ReLU).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from llmfast.errors import UserError
from llmfast.serve.vllm_plugin import RELU_THRESHOLDS_KEY
from llmfast.sparse.base import gated_mlps, mlp_activation_name, relu_mlps

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

THRESHOLDS_KEY = RELU_THRESHOLDS_KEY  # the key in config.json (defined beside the plugin, which reads it too)


def relu_thresholds(model: "PreTrainedModel", artifact: Path | str) -> list[float] | None:
    """The cut a model's config holds (None: none); the wrong length, a negative value or a non-ReLU model is a
    one-line error naming the file."""
    values = getattr(model.config, THRESHOLDS_KEY, None)
    if values is None:
        return None
    where = Path(artifact) / "config.json"
    layers = len(gated_mlps(model, where=str(artifact)))
    if not relu_mlps(model):
        raise UserError(f"{where}: {THRESHOLDS_KEY} on a model whose MLPs compute {mlp_activation_name(model)}: the "
                        "cut is of a ReLU activation; remove the key or rebuild the artifact with `llmfast sparsify`")
    if not isinstance(values, list) or len(values) != layers or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in values):
        raise UserError(f"{where}: {THRESHOLDS_KEY} must be {layers} non-negative numbers, one per layer: rebuild "
                        "the artifact with `llmfast sparsify`")
    return [float(v) for v in values]


def install_cut(model: "PreTrainedModel", thresholds: list[float]) -> list[Any]:
    """The cut as forward hooks on each MLP's activation (CATS's `gate_act` site); returns the handles."""
    import torch

    from llmfast.sparse.thresholds import install_thresholds

    return install_thresholds(model, {"gate_act": torch.tensor(thresholds, dtype=torch.float32)})


def apply_config_cut(model: "PreTrainedModel", artifact: Path | str) -> list[Any]:
    """Put the cut that `model`'s config holds (if any) on it; returns the hook handles (none without a cut)."""
    config = getattr(model, "config", None)
    if getattr(config, THRESHOLDS_KEY, None) is None:
        return []
    cut = relu_thresholds(model, artifact)
    assert cut is not None  # the key is there: relu_thresholds returns its values or raises
    return install_cut(model, cut)


def calibrated_cut(model: "PreTrainedModel", calibration: "torch.Tensor", target: float) -> list[float]:
    """Per-layer thresholds of relu(gate) that zero `target` of each layer's activation on the calibration windows
    (CATS's calibration: one pass, each layer calibrated with the earlier layers' cuts in place)."""
    from llmfast.sparse.cats import Cats

    return [float(t) for t in Cats().calibrate(model, calibration, target, ("gate_act",))["gate_act"]]


def fatrelu(t: float) -> Callable[["torch.Tensor"], "torch.Tensor"]:
    """relu(g) kept where above t (t >= 0): g where g > t, else 0."""
    import torch

    def act(g: "torch.Tensor") -> "torch.Tensor":
        return torch.where(g > t, g, torch.zeros((), dtype=g.dtype, device=g.device))
    return act
