"""ties: trim each task vector to its largest entries, elect a sign per entry, average what agrees.

Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models", https://arxiv.org/abs/2306.01708.
"""

from __future__ import annotations

from llmfast.merge.methods.base import register
from llmfast.merge.methods.task_arithmetic import DENSITY, WEIGHT, GeneralizedTaskArithmetic, merge_wide


@register("ties")
class Ties(GeneralizedTaskArithmetic):
    paper = "Yadav et al. 2023"
    sparsify = "magnitude"
    consensus = True
    params = (WEIGHT, DENSITY, *merge_wide(normalize=True, rescale=False))
