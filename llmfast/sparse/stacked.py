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
from llmfast.sparse.base import OVER_ATTENTION
from llmfast.sparse.thresholds import ATTENTION_SITES, THRESHOLDS_FILE, install_thresholds, load_thresholds

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


# How to get `method` and TEAL's attention thresholds on one model, for the refusal of `method` over them
ORDER = {"relufy": "relufy first, then TEAL with sites: [attention] over it",
         "teal": "one TEAL artifact with sites: [mlp, attention]",
         "cats": "not available (CATS and TEAL share one thresholds file)"}


def attention_only(spec: dict[str, Any] | None) -> bool:
    """Whether a manifest's `sparsity` is TEAL on the attention sites alone."""
    config = (spec or {}).get("config") or {}
    return (spec or {}).get("method") == "teal" and set(config.get("sites") or ["mlp"]) == {"attention"}


def source_attention(model_path: Path, spec: str, method: str) -> dict[str, Any] | None:
    """What an artifact made by `method` over `model_path` (as the recipe names it: `spec`) records as
    `sparsity.attention`: the source's TEAL settings, or None for a source without thresholds. A source the
    method cannot be made over is a one-line error."""
    from llmfast.sparse.base import sparsity_section
    from llmfast.sparse.predictors import PREDICTORS_FILE

    source = sparsity_section(model_path)
    if (model_path / PREDICTORS_FILE).exists() and method != "dejavu":  # (dejavu refuses it in its own words)
        raise UserError(f"{spec} is a dejavu artifact: {method} over it would drop its predictors; sparsify the model "
                        f"it was made from (Deja Vu goes last: over TEAL's attention sites, make the TEAL artifact "
                        "first and Deja Vu over it)")
    if not source or not (model_path / THRESHOLDS_FILE).exists():
        return None
    if attention_only(source) and "attention" not in source:
        if method in OVER_ATTENTION:
            return {"method": "teal", "config": source.get("config") or {}}
        raise UserError(f"{spec} is a teal artifact of the attention sites: only {', '.join(OVER_ATTENTION)} is made "
                        f"over it (keeping its thresholds); for {method} with them: {ORDER.get(method, 'not available')}")
    raise UserError(f"{spec} is already a {source.get('method')} artifact with thresholds: sparsify the model it "
                    "was made from")


def inherited_thresholds(artifact: Path, spec: dict[str, Any]) -> dict[str, "torch.Tensor"]:
    """The attention thresholds a method's artifact carries from its source (`spec`: its manifest's `sparsity`;
    empty without `attention`); on an artifact of a method not made over them, or with other settings, a
    one-line error."""
    under = spec.get("attention")
    if not under:
        return {}
    where = Path(artifact) / "llmfast.json"
    if spec.get("method") not in OVER_ATTENTION or not attention_only(under):
        raise UserError(f"{where}: sparsity.attention is for {', '.join(OVER_ATTENTION)} artifacts over TEAL with "
                        f"sites: [attention] (this one: {spec.get('method')} over {under}): rebuild it with "
                        "`llmfast sparsify`")
    return load_thresholds(Path(artifact), f"{spec['method']} (over TEAL's attention sites)", ATTENTION_SITES)


def heldout_attention_sparsity(model: "PreTrainedModel", predictors: list[Any], windows: "torch.Tensor",
                               batch_size: int = 4) -> dict[str, Any]:
    """The zeros entering q/k/v and o_proj on held-out windows, with the inherited thresholds (already hooked into
    `model`) and the predictors on: what the artifact's manifest reports beside the MLP's."""
    import torch

    from llmfast.sparse.measure import summarize
    from llmfast.sparse.predictors import install_predictors
    from llmfast.sparse.thresholds import record_attention_sparsity

    hooked = install_predictors(model, predictors)
    try:
        with record_attention_sparsity(model, ATTENTION_SITES) as tallies, torch.inference_mode():
            for s in range(0, windows.shape[0], batch_size):
                model(windows[s: s + batch_size].to(model.device))
    finally:
        hooked.remove()
    return summarize(tallies)


def apply_inherited(model: "PreTrainedModel", artifact: Path, spec: dict[str, Any]) -> list[Any]:
    """Hook the inherited attention thresholds (if any) into `model`; returns the handles."""
    thresholds = inherited_thresholds(artifact, spec)
    device = next(model.parameters()).device
    return install_thresholds(model, {s: t.to(device) for s, t in thresholds.items()},
                              where=str(Path(artifact) / THRESHOLDS_FILE)) if thresholds else []
