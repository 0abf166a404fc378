"""vLLM plugin: serve ReLU-fied Llama models (`llmfast sparsify` method relufy) through vLLM.

vLLM's Llama builds its MLP with SiLU only (`LlamaMLP` raises for any other `hidden_act`), so a ReLU-fied
Llama is refused. vLLM loads out-of-tree architectures through its plugin entry point: every process it
starts (the API server, the engine core it spawns, each worker, and the subprocess that inspects a lazily
registered model) calls the functions of the `vllm.general_plugins` entry-point group, and `register` below
is ours (pyproject.toml). The entry point exists once llmfast is installed (`pip install -e .`, which
`scripts/setup_venv.sh` / `make install` run); `VLLM_PLUGINS=` with a list of other names turns it off, as
vLLM loads only the plugins that variable names when it is set.

Design: a distinct architecture name, not a replacement of vLLM's own `LlamaForCausalLM`. relufy writes
`architectures: ["LlmfastReluLlamaForCausalLM"]` into a Llama artifact's config.json while `model_type` stays
`llama`: transformers picks its class from `model_type`, so it still loads the directory with no llmfast
import (as a LlamaForCausalLM with `hidden_act: relu`), and vLLM picks its class from `architectures`, so
only our artifacts reach our class. Overriding `LlamaForCausalLM` for everyone would route every Llama any
user serves in this environment through llmfast's code, and a change in vLLM's Llama would break all of
them instead of only ReLU models. The cost: a directory re-saved by transformers (a fine-tune merged into a
relufy artifact, say) gets `LlamaForCausalLM` back, and vLLM refuses its ReLU again until its config.json
names our architecture (`mark_relu_architecture`).

The model class (`llmfast.serve.vllm_relu_llama`) imports vLLM at module level because it subclasses vLLM's
Llama; it is registered by its import path so that only vLLM imports it, when it loads such a model
(vLLM inspects a lazily registered class once in a subprocess and caches what it learned under
VLLM_CACHE_ROOT/modelinfos). This module imports vLLM only inside `register`.
"""

from __future__ import annotations

import json
from pathlib import Path

ARCHITECTURE = "LlmfastReluLlamaForCausalLM"  # what a relufy artifact's config.json names
MODEL_CLASS = f"llmfast.serve.vllm_relu_llama:{ARCHITECTURE}"
RELU_THRESHOLDS_KEY = "llmfast_relu_thresholds"  # config.json: relufy's shifted cut of relu(gate), one per layer


def register() -> None:
    """The `vllm.general_plugins` entry point: tell vLLM's model registry where our ReLU Llama lives.

    vLLM calls it in each of its processes, and may call it again in one: a second call changes nothing."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)


def mark_relu_architecture(model_dir: Path) -> bool:
    """Name our architecture in a ReLU Llama's config.json (transformers' save_pretrained writes its own
    class name there), so vLLM with this plugin serves it; model_type stays llama for transformers.

    Only a Llama (model_type llama) is marked: our class is vLLM's Llama, and another gated-MLP family (Qwen2
    with its attention biases, say) would not load into it. Returns whether the config was marked."""
    from llmfast.artifacts import atomic_write_json

    path = Path(model_dir) / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if cfg.get("model_type") != "llama" or cfg.get("hidden_act") != "relu":
        return False
    cfg["architectures"] = [ARCHITECTURE]
    atomic_write_json(path, cfg)
    return True
