"""TEAL: training-free activation sparsity by magnitude thresholds on the hidden states.

Liu, Ponnusamy, Cai, Guo, Kim, Athiwaratkun. "Training-Free Activation Sparsity in Large Language Models"
(TEAL), 2024, arXiv:2408.14690. Hidden states entering a linear layer are zeroed where their magnitude
is below a per-tensor threshold calibrated to a target sparsity; the zeroed entries' weight columns need
not be read. Here: the MLP's input (shared by gate_proj and up_proj) and down_proj's input, each
calibrated to `target` (the paper also sparsifies the attention projections and allocates sparsity
greedily per layer: not done here, every tensor gets the same target).
"""

from __future__ import annotations

from pydantic import Field

from llmfast.sparse.base import SPARSIFIERS, SparseConfigBase
from llmfast.sparse.thresholds import ThresholdSparsifier


class TealConfig(SparseConfigBase):
    target: float = Field(0.5, gt=0, lt=1)  # fraction of each thresholded tensor's entries zeroed


@SPARSIFIERS.register("teal")
class Teal(ThresholdSparsifier):
    name = "teal"
    Config = TealConfig
    paper = "Liu et al. 2024, Training-Free Activation Sparsity in Large Language Models (TEAL)"
    sites = ("mlp_in", "down_in")
