"""Recipe validators for finetune values that float32 cannot carry: below its smallest normal number a learning
rate, clip norm or adapter scale rounds away (the run trains nothing and reports success); past its largest, NaN."""

from __future__ import annotations

import math
from typing import Any

FLOAT32_TINY = 1.1754943508222875e-38  # float32's smallest normal number
FLOAT32_MAX = 3.4028234663852886e38


def float32_normal(value: float) -> float:
    """A recipe validator: a learning rate or clip norm below float32's smallest normal rounds to 0 (or to a few bits)
    in float32 training: the run would change nothing and report success (fuzz pass 10)."""
    if 0 < value < FLOAT32_TINY:
        raise ValueError(f"{value!r} is below float32's smallest normal number ({FLOAT32_TINY:.4g}): it rounds away in "
                         "float32 training, so nothing would train; give a larger value")
    return value


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
