"""TEAL's attention thresholds kept under Deja Vu: one method per site, both on one model.

TEAL with `sites: [attention]` thresholds only attention's inputs (of q/k/v and of o_proj) and leaves the MLPs
alone, which is where Deja Vu's predictors work. `llmfast sparsify` with method dejavu takes such an artifact as
its source: the predictors are trained on the source with its attention thresholds in place (the activations
they will see), the thresholds file comes along with the model files, and the artifact's llmfast.json records
the source's settings as `sparsity.attention` ({"method": "teal", "config": {...}}). `models.load_model` and the
sparse runtime put both back.

Anything else over a threshold artifact stays refused: TEAL and CATS write their own thresholds file (TEAL's MLP
and attention sites are one artifact's `sites: [mlp, attention]` anyway), and relufy's training changes the
weights the thresholds were calibrated on.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmfast.errors import UserError
from llmfast.sparse.thresholds import ATTENTION_SITES, THRESHOLDS_FILE, install_thresholds, load_thresholds

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

OVER_ATTENTION = ("dejavu",)  # the methods made over a TEAL attention-only artifact


def attention_only(spec: dict[str, Any] | None) -> bool:
    """Whether a manifest's `sparsity` is TEAL on the attention sites alone."""
    config = (spec or {}).get("config") or {}
    return (spec or {}).get("method") == "teal" and (config.get("sites") or ["mlp"]) == ["attention"]


def source_attention(model_path: Path, spec: str, method: str) -> dict[str, Any] | None:
    """What an artifact made by `method` over `model_path` (as the recipe names it: `spec`) records as
    `sparsity.attention`: the source's TEAL settings, or None for a source without thresholds. A source the
    method cannot be made over is a one-line error."""
    from llmfast.artifacts import read_manifest

    source = (read_manifest(model_path) or {}).get("sparsity")
    if not source or not (model_path / THRESHOLDS_FILE).exists():
        return None
    if attention_only(source) and "attention" not in source:
        if method in OVER_ATTENTION:
            return {"method": "teal", "config": source.get("config") or {}}
        raise UserError(f"{spec} is a teal artifact of the attention sites: only {', '.join(OVER_ATTENTION)} is made "
                        f"over it (keeping its thresholds); for {method}, sparsify the model it was made from and "
                        "set TEAL's sites: [mlp, attention] if you want both")
    raise UserError(f"{spec} is already a {source.get('method')} artifact with thresholds: sparsify the model it "
                    "was made from")


def inherited_thresholds(artifact: Path, spec: dict[str, Any]) -> dict[str, "torch.Tensor"]:
    """The attention thresholds a method's artifact carries from its source (`spec`: its manifest's `sparsity`;
    empty without `attention`)."""
    under = spec.get("attention")
    if not under:
        return {}
    if not attention_only(under):
        raise UserError(f"{Path(artifact) / 'llmfast.json'}: sparsity.attention must be TEAL with sites: [attention] "
                        f"(it says {under}): rebuild the artifact with `llmfast sparsify`")
    return load_thresholds(Path(artifact), "teal", ATTENTION_SITES)


def apply_inherited(model: "PreTrainedModel", artifact: Path, spec: dict[str, Any]) -> list[Any]:
    """Hook the inherited attention thresholds (if any) into `model`; returns the handles."""
    thresholds = inherited_thresholds(artifact, spec)
    device = next(model.parameters()).device
    return install_thresholds(model, {s: t.to(device) for s, t in thresholds.items()}) if thresholds else []
