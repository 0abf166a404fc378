"""dare_linear and dare_ties: drop task-vector entries at random, rescale the rest, add (or elect signs).

Yu et al. 2023, "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
Lunch", https://arxiv.org/abs/2311.03099. `rescale` scales the kept entries so each task vector keeps its
L1 norm (mergekit's choice; the paper's 1/density is its expectation). The drop is seeded per (seed,
tensor, input), so a merge is reproducible whatever order tensors are merged in.
"""

from __future__ import annotations

from llmfast.merge.methods.base import register
from llmfast.merge.methods.task_arithmetic import DENSITY, WEIGHT, GeneralizedTaskArithmetic, merge_wide


@register("dare_linear")
class DareLinear(GeneralizedTaskArithmetic):
    paper = "Yu et al. 2023"
    sparsify = "random"
    params = (WEIGHT, DENSITY, *merge_wide(normalize=False, rescale=True))


@register("dare_ties")
class DareTies(GeneralizedTaskArithmetic):
    paper = "Yu et al. 2023 + Yadav et al. 2023"
    sparsify = "random"
    consensus = True
    params = (WEIGHT, DENSITY, *merge_wide(normalize=False, rescale=True))
