"""TEAL: training-free activation sparsity by magnitude thresholds on the hidden states.

Liu, Ponnusamy, Cai, Guo, Kim, Athiwaratkun. "Training-Free Activation Sparsity in Large Language Models"
(TEAL), 2024, arXiv:2408.14690. Hidden states entering a linear layer are zeroed where their magnitude
is below a per-tensor threshold calibrated to a target sparsity; the zeroed entries' weight columns need
not be read. `sites` chooses the linear layers:

- `mlp`        the MLP's input (shared by gate_proj and up_proj) and down_proj's input
- `attention`  attention's input (shared by q_proj, k_proj and v_proj, which the paper groups as it groups
               gate and up) and o_proj's input

Every thresholded tensor is calibrated to the same `target` (the paper's greedy per-layer allocation is
not done here). The default is `[mlp]`, what TEAL artifacts made before the option held: an artifact whose
config does not name its sites is read as MLP-only, so the default cannot change without misreading them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from llmfast.sparse.base import SPARSIFIERS, SparseConfigBase
from llmfast.sparse.thresholds import ThresholdSparsifier

SITE_GROUPS = {"mlp": ("mlp_in", "down_in"), "attention": ("attn_in", "o_in")}


class TealConfig(SparseConfigBase):
    target: float = Field(0.5, gt=0, lt=1)  # fraction of each thresholded tensor's entries zeroed
    sites: list[Literal["mlp", "attention"]] = Field(default_factory=lambda: ["mlp"], min_length=1)


@SPARSIFIERS.register("teal")
class Teal(ThresholdSparsifier):
    name = "teal"
    Config = TealConfig
    paper = "Liu et al. 2024, Training-Free Activation Sparsity in Large Language Models (TEAL)"
    sites = SITE_GROUPS["mlp"]

    def sites_for(self, cfg: Any) -> tuple[str, ...]:
        # In model order (attention before the MLP in every layer): calibration fills them as it reaches them.
        return tuple(s for group in ("attention", "mlp") if group in cfg.sites for s in SITE_GROUPS[group])
