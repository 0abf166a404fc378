"""vLLM's Llama with ReLU MLPs: the model class our vLLM plugin registers (see llmfast/serve/vllm_plugin.py).

Only vLLM imports this module (it is registered by its import path), which is why vLLM is imported at module
level here: the classes subclass vLLM's. Everything but the MLP activation is vLLM's own Llama (attention,
weight loading, LoRA, tensor and pipeline parallelism); the MLP computes `down(relu(gate(x)) * up(x))` with
vLLM's FATReLU-and-mul at threshold 0 (x kept where x > 0, else 0: ReLU exactly), which has a CUDA kernel and
a plain torch path on CPUs. Its gate and up stay one merged matmul, as in vLLM's SiLU Llama. A relufy
artifact made with `target` holds a shifted cut per layer in config.json (`llmfast_relu_thresholds`): layer i's
FATReLU then runs at that threshold (gate kept where gate > t_i, as llmfast's own loader cuts it).
"""

from __future__ import annotations

import copy
from typing import Any

from vllm.config import VllmConfig
from vllm.model_executor.layers.activation import FatreluAndMul
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index

from llmfast.serve.vllm_plugin import ARCHITECTURE, RELU_THRESHOLDS_KEY


class ReluLlamaDecoderLayer(LlamaDecoderLayer):
    """vLLM's Llama decoder layer whose MLP activation is ReLU."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config: Any = None, **kwargs: Any) -> None:
        config = config or vllm_config.model_config.hf_config
        if config.hidden_act != "relu":
            raise ValueError(f"{ARCHITECTURE} needs hidden_act 'relu' in config.json, not {config.hidden_act!r}: "
                             "a SiLU Llama's architecture is LlamaForCausalLM")
        # vLLM's LlamaMLP refuses any activation but SiLU while it is built, and the layer builds it itself: it is
        # built from a copy of the config that says silu (nothing else in the layer reads hidden_act), then given
        # ReLU. The copy leaves the config vLLM shares between layers untouched.
        as_silu = copy.copy(config)
        as_silu.hidden_act = "silu"
        super().__init__(vllm_config, prefix, config=as_silu, **kwargs)
        cut = getattr(config, RELU_THRESHOLDS_KEY, None)  # relufy's shifted cut, one per layer (None: plain ReLU)
        self.mlp.act_fn = FatreluAndMul(threshold=float(cut[extract_layer_index(prefix)]) if cut else 0.0)


class LlmfastReluLlamaForCausalLM(LlamaForCausalLM):
    """A ReLU-fied Llama (`llmfast sparsify` method relufy): vLLM's Llama with ReluLlamaDecoderLayer layers."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **kwargs: Any) -> None:
        kwargs.setdefault("layer_type", ReluLlamaDecoderLayer)
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)


assert LlmfastReluLlamaForCausalLM.__name__ == ARCHITECTURE  # the name vLLM's registry looks up
