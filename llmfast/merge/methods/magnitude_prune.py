"""magnitude_prune: task arithmetic on magnitude-trimmed task vectors, without TIES's sign election.

The trim step of Yadav et al. 2023 (https://arxiv.org/abs/2306.01708) on its own; an llmfast name.
"""

from __future__ import annotations

from llmfast.merge.methods.base import register
from llmfast.merge.methods.task_arithmetic import DENSITY, WEIGHT, GeneralizedTaskArithmetic, merge_wide


@register("magnitude_prune")
class MagnitudePrune(GeneralizedTaskArithmetic):
    paper = "Yadav et al. 2023 (trim step only)"
    sparsify = "magnitude"
    params = (WEIGHT, DENSITY, *merge_wide(normalize=False, rescale=False))
