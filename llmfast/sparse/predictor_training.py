"""Training Deja Vu's predictors from calibration activations, choosing their thresholds, and measuring them.

- Data: one batched forward pass over the calibration windows keeps, per layer, the MLP input x (the
  post-norm hidden state entering gate/up) and the label "active" for every entry of the activation
  h = act(gate(x)) * up(x): |h| above the layer's label threshold. That threshold is 0 for a ReLU source
  (active = nonzero) and the `label_sparsity` quantile of |h| otherwise (SiLU is never exactly 0).
  With look-ahead, layer i's predictor is fed layer i-1's MLP input (layer 0 its own).
- Training: per layer, logits = (x @ A) @ B + bias by binary cross-entropy (AdamW on random batches of
  calibration tokens). x is divided by its RMS while training (so one learning rate fits every layer)
  and the RMS is folded into A afterwards; the bias starts at each neuron's log-odds of being active.
- Threshold: the largest value at which the recall of active neurons on the calibration tokens still
  reaches `target_recall` (or, with `active_fraction`, the value leaving that fraction predicted active),
  computed from the stored predictor's own logits, so calibration recall >= target holds by construction.
  With `active_budget` the thresholds are set together once every layer is trained: each layer's recall
  against the fraction it keeps (`recall_curve`), then one price on fraction for all (`shared_thresholds`).
  With `threshold_share` the last share of the calibration tokens is kept out of training and sets the
  threshold alone: a predictor is more confident on tokens it was fitted to, so a threshold set there keeps
  less than `target_recall` on new text (the real model: 95% on calibration, 90.5% held out).
- Held-out metrics per layer, with the predictors applied (so each layer sees the errors of the ones
  before): recall of active neurons and of activation mass, precision, fraction predicted active, the
  true activation sparsity, the sparsity left after zeroing, and the KL of the dense model to it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

from llmfast.errors import UserError
from llmfast.sparse.base import gated_mlps
from llmfast.sparse.predictors import Predictor, install_predictors

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


@dataclasses.dataclass
class LayerData:
    x: "torch.Tensor"  # (tokens, hidden) float32: what the predictor is fed
    active: "torch.Tensor"  # (tokens, intermediate) bool: the labels
    label_threshold: float  # |h| above this is active


def collect(model: "PreTrainedModel", windows: "torch.Tensor", lookahead: bool,
            label_sparsity: float | None) -> list[LayerData]:
    """Predictor inputs and labels for every layer from one forward pass over `windows`."""
    import torch

    mlps = gated_mlps(model)
    xs: list[Any] = [None] * len(mlps)
    labels: list[Any] = [None] * len(mlps)
    cuts = [0.0] * len(mlps)

    def take_x(i: int) -> Any:
        return lambda mod, args: xs.__setitem__(i, args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu())

    def take_h(i: int) -> Any:
        def hook(mod: Any, args: tuple) -> None:
            mag = args[0].detach().reshape(-1, args[0].shape[-1]).abs().float().cpu()
            if label_sparsity is not None:
                k = max(1, min(mag.numel(), round(label_sparsity * mag.numel())))
                cuts[i] = float(mag.reshape(-1).kthvalue(k).values)
            labels[i] = mag > cuts[i]
        return hook

    handles = [m.register_forward_pre_hook(take_x(i)) for i, m in enumerate(mlps)]
    handles += [m.down_proj.register_forward_pre_hook(take_h(i)) for i, m in enumerate(mlps)]
    try:
        with torch.inference_mode():
            model(windows.to(model.device))
    finally:
        for h in handles:
            h.remove()
    fed = [xs[0], *xs[:-1]] if lookahead else xs
    return [LayerData(f, a, c) for f, a, c in zip(fed, labels, cuts)]


def train_layer(data: LayerData, cfg: Any, generator: "torch.Generator", layer: int = 0) -> Predictor:
    """A predictor fitted to one layer's labels (threshold not yet set: +inf); a training that diverges (a loss that
    is not finite, or an update beyond float32) is a UserError naming the `layer`."""
    import torch
    import torch.nn.functional as F

    from llmfast.finetune.optimizers import optimizer_step

    x, y = data.x, data.active
    n, hidden = x.shape
    scale = float(x.pow(2).mean().sqrt().clamp_min(1e-6))
    rate = y.float().mean(0).clamp(1e-4, 1 - 1e-4)
    a = (torch.randn(hidden, cfg.rank, generator=generator) / math.sqrt(hidden)).requires_grad_()
    b = (torch.randn(cfg.rank, y.shape[1], generator=generator) / math.sqrt(cfg.rank)).requires_grad_()
    bias = torch.log(rate / (1 - rate)).requires_grad_()
    opt = torch.optim.AdamW([a, b, bias], lr=cfg.lr, weight_decay=cfg.weight_decay)
    pos_weight = torch.tensor(cfg.pos_weight)

    def loss_on(rows: "torch.Tensor") -> "torch.Tensor":
        logits = (x[rows] / scale) @ a @ b + bias
        return F.binary_cross_entropy_with_logits(logits, y[rows].float(), pos_weight=pos_weight)

    def diverged(cause: str) -> UserError:  # NaN predictors predict nothing: they were written, recall 0, exit 0
        return UserError(f"dejavu: layer {layer}'s predictor diverged ({cause}): lower sparsify.config.lr (or "
                         "pos_weight); nothing was written")

    with torch.enable_grad():
        for step in range(cfg.steps):
            rows = torch.randint(n, (min(cfg.batch_tokens, n),), generator=generator)
            loss = loss_on(rows)
            if not math.isfinite(loss.item()):  # the update before it diverged
                raise diverged(f"its loss became {loss.item()} at step {step + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if not optimizer_step(opt):
                raise diverged(f"its update overflowed float32 at step {step + 1}")
        if cfg.steps and not math.isfinite(last := loss_on(rows).item()):  # the last update, checked the same way
            raise diverged(f"its loss became {last} after its last step ({cfg.steps})")
    return Predictor((a.detach() / scale).contiguous(), b.detach().contiguous(), bias.detach().contiguous(),
                     torch.tensor(float("inf")), cfg.lookahead)


def pick_threshold(logits: "torch.Tensor", active: "torch.Tensor", target_recall: float,
                   active_fraction: float | None) -> "torch.Tensor":
    """The layer's threshold on its calibration logits (a float32 scalar)."""
    import torch

    if active_fraction is not None:
        flat = logits.reshape(-1)
        keep = round(active_fraction * flat.numel())
        if keep >= flat.numel():
            return torch.tensor(float("-inf"))
        # Entries above the (n - keep)-th smallest logit: `keep` of them (fewer only where logits tie).
        return flat.kthvalue(flat.numel() - keep).values.float() if keep else flat.max().float()
    pos = logits[active]
    if pos.numel() == 0:
        return logits.max().float()  # nothing is active: predict nothing
    # positives allowed below the threshold; at least one kept (1 - a recall below 1e-16 is 1.0 in floats: all of
    # them were allowed, and kthvalue was asked for one past the last, a traceback)
    missed = min(math.floor((1 - target_recall) * pos.numel() + 1e-9), pos.numel() - 1)
    lowest_kept = pos.kthvalue(missed + 1).values.float()
    # Just below it, so `logits > threshold` keeps every positive >= lowest_kept: at least n - missed of them.
    return torch.nextafter(lowest_kept, torch.tensor(float("-inf")))


def recall_curve(logits: "torch.Tensor", active: "torch.Tensor", points: int = 2000) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(recall of active neurons: float64, threshold: float32), each of length points + 1, at predicted-active
    fractions 0, 1/points, ..., 1 of these entries: `logits > threshold[j]` keeps the j/points share of the largest
    logits (more only where logits tie)."""
    import torch

    flat = logits.reshape(-1).float()  # float32 like the runtime's comparison, so the step below is one float32 ulp
    values, order = flat.sort(descending=True)
    hits = active.reshape(-1)[order].cumsum(0)
    kept = (torch.arange(points + 1, dtype=torch.float64) * flat.numel() / points).round().long()
    last = (kept - 1).clamp_min(0)  # the smallest kept logit's position
    recall = torch.where(kept > 0, hits[last].double() / max(1, int(hits[-1])), torch.zeros((), dtype=torch.float64))
    threshold = torch.where(kept > 0, torch.nextafter(values[last], torch.tensor(float("-inf"))),
                            values[0])  # 0 kept: the largest logit, above which `>` keeps nothing
    return recall, threshold


def shared_thresholds(curves: list[tuple["torch.Tensor", "torch.Tensor"]], budget: float) -> list["torch.Tensor"]:
    """One threshold per layer such that the layers predict on average at most `budget` of their entries active
    with the highest geometric mean of their recalls the curves allow: each layer takes the point of its curve
    maximizing log(recall) - lam * fraction (it stops where one more unit of fraction would raise its log recall by
    less than lam), and lam is found by bisection so the mean fraction meets the budget. Layers whose recall still
    climbs get more of the budget than a per-layer rule would give them. The log keeps any layer from being starved:
    the arithmetic mean of recalls would rather keep nothing of a layer whose many active neurons are hard to
    predict (seen: one layer of 30 dropped whole at a 25% budget), which no model survives."""
    import torch

    points = curves[0][0].numel() - 1
    fraction = torch.linspace(0, 1, points + 1, dtype=torch.float64)
    logs = [recall.log() for recall, _ in curves]  # log(0) = -inf: a point keeping no active neuron never wins

    def mean_fraction(lam: float) -> float:
        return sum(choose(lam)) / (len(curves) * points)

    def choose(lam: float) -> list[int]:
        return [int((log - lam * fraction).argmax()) for log in logs]  # ties: the smaller fraction

    lo, hi = 0.0, 1.0
    while mean_fraction(hi) > budget and hi < 1e15:  # at a large enough price each layer keeps its first active one
        lo, hi = hi, 2 * hi
    if mean_fraction(hi) > budget:
        raise UserError(f"sparsify.config.active_budget: {budget} is less than the layers keep when each predicts "
                        f"just one active neuron ({mean_fraction(hi):.4g} on average here): give a larger budget")
    for _ in range(60):
        mid = (lo + hi) / 2
        if mean_fraction(mid) > budget:
            lo = mid
        else:
            hi = mid
    return [thr[j] for j, (_, thr) in zip(choose(hi), curves)]


def split_tokens(data: LayerData, share: float) -> tuple[LayerData, LayerData]:
    """(tokens to train on, tokens that set the threshold): the last `share` of the tokens (stored window after
    window, so these are the last windows, the first of them possibly in part) held back; both are all the tokens
    when `share` is 0 or there is a single token."""
    n = data.x.shape[0]
    if not share or n < 2:
        return data, data
    held = min(n - 1, max(1, round(share * n)))
    return (dataclasses.replace(data, x=data.x[: n - held], active=data.active[: n - held]),
            dataclasses.replace(data, x=data.x[n - held:], active=data.active[n - held:]))


def calibration_recall(p: Predictor, data: LayerData) -> tuple[float, float]:
    """(recall of active neurons, fraction predicted active) of `p` on its own calibration data."""
    pred = p.active(data.x)
    return float((pred & data.active).sum() / data.active.sum().clamp_min(1)), float(pred.float().mean())


class Tally:
    """One layer's counts on held-out text: labelled active, predicted active, both, and |h| mass."""

    def __init__(self) -> None:
        self.entries = self.active = self.predicted = self.hit = 0
        self.mass = self.mass_kept = 0.0

    def add(self, h: "torch.Tensor", predicted: "torch.Tensor", cut: float) -> None:
        mag = h.detach().abs().double()
        active = mag > cut
        self.entries += h.numel()
        self.active += int(active.sum())
        self.predicted += int(predicted.sum())
        self.hit += int((active & predicted).sum())
        self.mass += float(mag.sum())
        self.mass_kept += float(mag[predicted].sum())

    def summary(self) -> dict[str, float]:
        return {"recall": self.hit / max(1, self.active), "mass_recall": self.mass_kept / max(1e-30, self.mass),
                "precision": self.hit / max(1, self.predicted), "predicted_active": self.predicted / max(1, self.entries),
                "true_sparsity": 1 - self.active / max(1, self.entries)}


def per_layer_report(rows: list[dict[str, float]]) -> dict[str, Any]:
    """{metric: {mean, min, max, per_layer}} over layers, rounded for the manifest."""
    out = {}
    for key in rows[0]:
        vals = [r[key] for r in rows]
        out[key] = {"mean": round(sum(vals) / len(vals), 6), "min": round(min(vals), 6), "max": round(max(vals), 6),
                    "per_layer": [round(v, 6) for v in vals]}
    return out


def heldout_metrics(model: "PreTrainedModel", predictors: list[Predictor], cuts: list[float],
                    windows: "torch.Tensor", batch_size: int = 4) -> dict[str, Any]:
    """Predictor metrics, the MLP sparsity left, and KL(dense || with predictors) on held-out windows."""
    import torch

    from llmfast.distill import kl_to_teacher
    from llmfast.sparse.measure import ZeroTally, summarize  # the sparsity counts every method reports

    tallies = [Tally() for _ in predictors]
    zeros = {"down_in": [ZeroTally() for _ in predictors], "mlp_in": [ZeroTally() for _ in predictors]}

    def observe(i: int, h: "torch.Tensor", predicted: "torch.Tensor") -> None:
        tallies[i].add(h, predicted, cuts[i])
        zeros["down_in"][i].add(torch.where(predicted, h, torch.zeros((), dtype=h.dtype, device=h.device)), 0.0)

    hooked = install_predictors(model, predictors, observe=observe)
    inputs = [m.register_forward_pre_hook(lambda mod, args, i=i: zeros["mlp_in"][i].add(args[0], 0.0)
                                          if hooked.enabled else None) for i, m in enumerate(hooked.mlps)]
    kl, rows = 0.0, 0
    try:
        with torch.inference_mode():
            for s in range(0, windows.shape[0], batch_size):
                batch = windows[s: s + batch_size].to(model.device)
                hooked.enabled = False
                dense = model(batch).logits
                hooked.enabled = True
                kl += float(kl_to_teacher(model(batch).logits, dense)) * len(batch)
                rows += len(batch)
    finally:
        hooked.remove()
        for h in inputs:
            h.remove()
    return {"predictors": per_layer_report([t.summary() for t in tallies]), "heldout_sparsity": summarize(zeros),
            "heldout_kl": round(kl / max(1, rows), 6)}
