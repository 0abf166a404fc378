"""Where an adapter's tensors sit: the module each key of an adapter_model.safetensors names, below PEFT's own parts
(LoRA matrices, DoRA magnitude, the wrapped layer, trainable token rows, a saved module's copies)."""

from __future__ import annotations

import re
from typing import Collection, Iterable

ADAPTER_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "base_layer",
                 "token_adapter", "modules_to_save", "original_module")

SAVED_COPY = re.compile(r"\.(?:original_module|modules_to_save\.[^.]+)(?=\.|$)")  # modules_to_save's wrapper


def adapter_module(key: str) -> tuple[str, list[str]]:
    """The module an adapter key is on (`model.layers.0.self_attn.q_proj` for
    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`) and the key's parts from PEFT's part on (the
    last part where it names none: a saved module's own `weight`)."""
    parts = key.removeprefix("base_model.model.").split(".")
    cut = next((i for i, part in enumerate(parts) if part in ADAPTER_PARTS), len(parts) - 1)
    return ".".join(parts[:cut]), parts[cut:]


def unknown_adapter_tensors(keys: Iterable[str], modules: Collection[str],
                            lora_layers: Collection[str] | None = None) -> list[str]:
    """The tensors of an adapter's file (`keys`) on none of a model's `modules` (their names), which PEFT (and vLLM)
    skip, PEFT 0.22+ with a warning among many: an adapter of a deeper model of the family (its extra layers), or
    with renamed modules.
    With `lora_layers` (the modules PEFT put LoRA on), a LoRA matrix must be on one of them: one on a module the
    config does not target is skipped as well."""
    unknown = []
    for key in keys:
        module, rest = adapter_module(key)
        if module not in modules or (lora_layers is not None and rest[0].startswith("lora_")
                                     and module not in lora_layers):
            unknown.append(key)
    return sorted(unknown)
