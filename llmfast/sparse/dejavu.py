"""Deja Vu: low-rank predictors of which MLP neurons a token needs, trained on calibration activations.

Liu, Wang, Dao, Zhou, Yuan, Song, Shrivastava, Zhang, Tian, Re, Chen. "Deja Vu: Contextual Sparsity for
Efficient LLMs at Inference Time", ICML 2023, arXiv:2310.17157. In a gated MLP `down(act(gate(x)) * up(x))`
only some entries of the activation (down_proj's input) matter for a given token. Per layer a small
low-rank net reads the MLP's input (or, with `lookahead`, the previous layer's MLP input, as the paper
does to run the prediction ahead of the layer) and predicts the set of active neurons; a neuron it calls
inactive need not be computed (a row of gate/up, a column of down).

The artifact is the source model's files (hard-linked: the weights are unchanged) plus
`predictors.safetensors` (format: llmfast/sparse/predictors.py, read with `load_predictors`); made over a TEAL
artifact of the attention sites, also that artifact's thresholds, kept on (stacked.py). Loading it
(`apply`) sets `mlp.llmfast_predictor` on every gated MLP and zeroes the activation entries predicted
inactive, so outputs and perplexity include every misprediction; the matmuls stay dense here (the
sparse runtime skips the work). How predictors are trained and measured: predictor_training.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, PositiveInt, model_validator

from llmfast.errors import UserError
from llmfast.sparse.base import SPARSIFIERS, Sparsifier, SparseConfigBase, SparsifyJob, gated_mlps, relu_mlps
from llmfast.sparse.predictors import PREDICTORS_FILE, Predictor, install_predictors, load_predictors
from llmfast.strict import LearningRate, Seed

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["Dejavu", "DejavuConfig", "PREDICTORS_FILE", "Predictor", "load_predictors"]


class DejavuConfig(SparseConfigBase):
    # Width of the low-rank bottleneck: A is hidden x rank, B rank x intermediate. 128 on the relufied built-in
    # model (1536 neurons): held-out recall at 30% predicted active 97.1% against 94.4% at 64 (5 layers probed).
    rank: PositiveInt = 128
    lookahead: bool = False  # feed layer i's predictor the MLP input of layer i-1 (layer 0: its own)
    # Only for sources whose activations are never exactly 0 (SiLU): the fraction of each layer's |activation|
    # entries labelled inactive (null: 0.5). A ReLU source's active neurons are its nonzero ones; refused there.
    label_sparsity: float | None = Field(None, gt=0, lt=1)
    # Calibration recall of active neurons each layer's threshold keeps (null: 0.95, unless another rule is set).
    target_recall: float | None = Field(None, gt=0, le=1)
    active_fraction: float | None = Field(None, gt=0, lt=1)  # instead: this fraction predicted active per layer
    # Instead: at most this fraction predicted active on average over the layers (less where every layer's recall
    # saturates first), shared out for the highest geometric mean of their recalls.
    active_budget: float | None = Field(None, gt=0, lt=1)
    # Share of the calibration tokens (the last windows) kept out of training and used only to set each layer's
    # threshold, so `target_recall` is met on tokens the predictor has not fitted (0: the training tokens set it,
    # where a fitted predictor looks better than it is: 95% there was 91% on held-out text, 94% with 0.25).
    threshold_share: float = Field(0.25, ge=0, lt=1)
    steps: PositiveInt = 300  # AdamW steps per layer
    batch_tokens: PositiveInt = 1024  # calibration tokens per step
    lr: LearningRate = 3e-3
    weight_decay: float = Field(0.0, ge=0)
    pos_weight: float = Field(1.0, gt=0)  # weight of the active class in the cross-entropy
    seed: Seed = 0

    @model_validator(mode="after")
    def _one_threshold_rule(self) -> "DejavuConfig":
        rules = [k for k in ("target_recall", "active_fraction", "active_budget") if getattr(self, k) is not None]
        if len(rules) > 1:
            raise ValueError(f"set one of target_recall, active_fraction and active_budget, not {' and '.join(rules)}")
        if not rules:
            self.target_recall = 0.95  # filled in here so the manifest records the value used
        return self


def _check_source(job: SparsifyJob, cfg: DejavuConfig) -> float | None:
    """The label sparsity to use (None: nonzero = active), after refusing sources that cannot be used."""
    if (job.model_path / PREDICTORS_FILE).exists():  # predictors on predictors would drop the first ones
        raise UserError(f"{job.model_spec} is already a dejavu artifact: sparsify the model it was made from")
    mlp = gated_mlps(job.model)[0]
    full = min(mlp.down_proj.in_features, mlp.down_proj.out_features)  # (x @ A) @ B has no higher rank than this
    if cfg.rank > full:  # a huge one was a traceback from torch's size arithmetic, or minutes of wasted training
        raise UserError(f"sparsify.config.rank: {cfg.rank} is more than the {full} a predictor of this model's MLPs "
                        f"(hidden {mlp.down_proj.out_features}, intermediate {mlp.down_proj.in_features}) can use: "
                        f"set it to at most {full}")
    if relu_mlps(job.model):
        if cfg.label_sparsity is not None:
            raise UserError(f"sparsify.config.label_sparsity: {job.model_spec} has ReLU MLPs, whose active neurons are "
                            "the nonzero activations: remove the key")
        return None
    return 0.5 if cfg.label_sparsity is None else cfg.label_sparsity


@SPARSIFIERS.register("dejavu")
class Dejavu(Sparsifier):
    name = "dejavu"
    Config = DejavuConfig
    paper = "Liu et al. 2023, Deja Vu: Contextual Sparsity for Efficient LLMs at Inference Time"

    def sparsify(self, job: SparsifyJob, cfg: Any, out_dir: Path) -> dict[str, Any]:
        import torch
        from tqdm.auto import tqdm

        from llmfast.sparse import predictor_training as pt
        from llmfast.sparse.predictors import save_predictors
        from llmfast.sparse.stacked import heldout_attention_sparsity
        from llmfast.sparse.thresholds import THRESHOLDS_FILE, link_or_copy_model

        label_sparsity = _check_source(job, cfg)
        layers = pt.collect(job.model, job.calibration, cfg.lookahead, label_sparsity)
        generator = torch.Generator().manual_seed(cfg.seed)
        predictors, helds, curves = [], [], []
        for i, data in enumerate(tqdm(layers, desc="dejavu predictors", unit="layer", leave=False)):
            fit, held = pt.split_tokens(data, cfg.threshold_share)
            p = pt.train_layer(fit, cfg, generator, layer=i)
            logits = p.logits(held.x)
            if cfg.active_budget is None:
                p.threshold = pt.pick_threshold(logits, held.active, cfg.target_recall, cfg.active_fraction)
            else:  # thresholds once every layer's curve is known
                curves.append(pt.recall_curve(logits, held.active))
            del logits  # (held tokens x intermediate): not kept while the next layer trains
            predictors.append(p)
            helds.append(held)
        if curves:
            for p, threshold in zip(predictors, pt.shared_thresholds(curves, cfg.active_budget)):
                p.threshold = threshold
        calibration = []
        for p, held, data in zip(predictors, helds, layers):
            recall, frac = pt.calibration_recall(p, held)
            calibration.append({"recall": recall, "predicted_active": frac,
                                "true_sparsity": 1 - float(data.active.float().mean())})
        threshold_tokens = helds[0].x.shape[0] if helds else job.calibration.numel()
        cuts = [d.label_threshold for d in layers]
        del layers, helds
        link_or_copy_model(job.model_path, out_dir)
        save_predictors(predictors, out_dir / PREDICTORS_FILE)
        metrics = pt.heldout_metrics(job.model, predictors, cuts, job.heldout)
        if (job.model_path / THRESHOLDS_FILE).exists():  # over TEAL's attention sites (stacked.py): their zeros too
            metrics["heldout_sparsity"].update(heldout_attention_sparsity(job.model, predictors, job.heldout))
        metrics.update({"calibration": pt.per_layer_report(calibration), "calibration_tokens": job.calibration.numel(),
                        "threshold_tokens": threshold_tokens,
                        "labels": "nonzero" if label_sparsity is None else f"|h| above the {label_sparsity} quantile",
                        "label_thresholds": cuts})
        return metrics

    def apply(self, model: "PreTrainedModel", cfg: Any, artifact: Path) -> None:
        from llmfast.artifacts import read_manifest
        from llmfast.sparse.stacked import apply_inherited

        install_predictors(model, load_predictors(artifact), where=artifact / PREDICTORS_FILE)
        apply_inherited(model, artifact, (read_manifest(artifact) or {}).get("sparsity") or {})  # a TEAL source's
