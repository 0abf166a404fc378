"""linear: a model soup, sum(w_i * W_i) / sum(w_i) over whole weights.

Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models improves accuracy
without increasing inference time", https://arxiv.org/abs/2203.05482. As in mergekit, a base_model that
is not among the models is averaged in as one more input (with its own `weight`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmfast.merge.methods.base import MergeMethod, Param, TensorContext, register

if TYPE_CHECKING:
    import numpy as np


@register("linear")
class Linear(MergeMethod):
    paper = "Wortsman et al. 2022 (model soups)"
    domain = "raw"
    needs_base = False
    elementwise = True
    params = (
        Param("weight", per_input=True, help="this model's share of the average"),
        Param("normalize", bool, True, help="divide by the sum of the weights"),
    )

    def merge(self, base: "np.ndarray | None", inputs: list[Any], params: list[dict[str, Any]],
              shared: dict[str, Any], ctx: TensorContext) -> "np.ndarray":
        import numpy as np

        dtype = np.float64 if inputs[0].dtype == np.float64 else np.float32
        weights = [float(p["weight"]) for p in params]
        # mergekit: (weights * stacked).sum(0): each product rounded, then summed in input order.
        out = np.multiply(inputs[0], weights[0], dtype=dtype)
        scaled = np.empty_like(out) if len(inputs) > 1 else out
        for t, w in zip(inputs[1:], weights[1:]):
            np.multiply(t, w, out=scaled, dtype=dtype)
            np.add(out, scaled, out=out)
        if shared["normalize"]:
            np.divide(out, _total(weights), out=out)
        return out

    def coefficients(self, params: list[dict[str, Any]], shared: dict[str, Any],
                     is_base: list[bool]) -> list[float] | None:
        # base + sum(c_i * delta_i) with the base's own weight contributing no task vector.
        weights = [float(p["weight"]) for p in params]
        if shared["normalize"]:
            total = _total(weights)
        elif abs(sum(weights) - 1) > 1e-6:
            raise ValueError("linear with normalize: false and weights not summing to 1 scales the base too, "
                             "which a LoRA adapter cannot express")
        else:
            total = 1.0
        return [0.0 if b else w / total for w, b in zip(weights, is_base)]


def _total(weights: list[float]) -> float:
    total = sum(weights)
    if total == 0:
        raise ValueError("the weights sum to 0, so they cannot be normalized: set normalize: false")
    return total
