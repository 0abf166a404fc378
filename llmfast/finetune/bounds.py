"""Recipe validators of a LoRA section: an adapter scale float32 cannot carry (below its smallest normal number it
rounds away: the run trains nothing and reports success; past its largest, NaN), and an empty module list."""

from __future__ import annotations

import math
from typing import Any

from llmfast.strict import FLOAT32_MAX, FLOAT32_TINY


def check_lora_scale(lc: Any) -> Any:
    """A recipe validator: the adapter's output is scaled by alpha/r (alpha/sqrt(r) with rslora) in float32; below
    float32's smallest normal the scale is 0, no gradient reaches B and an all-zero adapter is saved with exit 0; past
    float32's largest it is inf, and the first step's 0 * inf is NaN."""
    scale = lc.alpha / (math.sqrt(lc.r) if lc.rslora else lc.r)
    if not FLOAT32_TINY <= scale <= FLOAT32_MAX:
        r = "sqrt(lora.r)" if lc.rslora else "lora.r"
        raise ValueError(f"alpha: the adapter's scale lora.alpha / {r} = {lc.alpha!r} / {r.replace('lora.r', str(lc.r))}"
                         f" = {scale:.4g} is outside float32's normal range ({FLOAT32_TINY:.4g} to {FLOAT32_MAX:.4g}): "
                         "it would round to 0 (nothing trains) or overflow (NaN); give an alpha near r (e.g. 2 * r)")
    return lc


def some_modules(value: Any) -> Any:
    """A before-validator of `target_modules`: the union's first member would say only "Input should be
    'all-linear'" of an empty list."""
    if value == []:
        raise ValueError("an empty list targets no module: give all-linear or a list of module names, e.g. [q_proj, "
                         "v_proj]")
    return value
