"""Loading a transformers model the one way llmfast does: safetensors weights only, in a named dtype.

Below both `models` (which finds and prepares model directories) and `quant` (whose methods load their
formats), so neither imports the other for it. Imports torch and transformers inside functions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmfast.errors import UserError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    if name not in DTYPES:
        raise UserError(f"unknown dtype '{name}': use one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def refuse_pickle_weights(path: str | os.PathLike[str]) -> None:
    """A model whose weights are only pickle files (pytorch_model*.bin) is refused: unpickling can run code."""
    p = Path(path)
    if any(p.glob("pytorch_model*.bin")) and not any(p.glob("*.safetensors")):
        raise UserError(f"{p}: its weights are pickle files (pytorch_model.bin), which llmfast does not load (a pickle "
                        "can run code): in a trusted environment load it with transformers and save it with "
                        "save_pretrained(DIR, safe_serialization=True), then use DIR")


def from_pretrained(path: str | os.PathLike[str], dtype: str, **kwargs: Any) -> "PreTrainedModel":
    """`AutoModelForCausalLM.from_pretrained` for every loader in llmfast: safetensors weights only."""
    from transformers import AutoModelForCausalLM

    refuse_pickle_weights(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype), **kwargs)
