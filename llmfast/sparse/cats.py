"""CATS: contextually-aware thresholding of the gate activation.

Lee et al. "CATS: Contextually-Aware Thresholding for Sparsity in
Large Language Models", 2024, arXiv:2404.08763. In a gated MLP `down(act(gate(x)) * up(x))`, entries of
act(gate(x)) whose magnitude is below a threshold are set to zero; the threshold is the target quantile
of |act(gate(x))| on calibration text, one per layer. A zeroed entry makes the matching row of up_proj
and column of down_proj unnecessary. (The paper's custom kernel and its fine-tuning variant are not here.)
"""

from __future__ import annotations

from pydantic import Field

from llmfast.sparse.base import SPARSIFIERS, SparseConfigBase
from llmfast.sparse.thresholds import ThresholdSparsifier


class CatsConfig(SparseConfigBase):
    target: float = Field(0.5, gt=0, lt=1)  # fraction of gate activations zeroed


@SPARSIFIERS.register("cats")
class Cats(ThresholdSparsifier):
    name = "cats"
    Config = CatsConfig
    paper = "Lee et al. 2024, CATS: Contextually-Aware Thresholding for Sparsity in Large Language Models"
    sites = ("gate_act",)
