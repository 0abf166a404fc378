"""bitsandbytes 4-bit: NF4 or FP4 weights in blocks of 64 with one scale each, optionally double-quantized.

QLoRA: Dettmers et al., 2023 (arXiv:2305.14314). The base is quantized by transformers while it loads
(`BitsAndBytesConfig`), for adapter training and for inference alike; the compute dtype is the training or
evaluation dtype. The only place in llmfast that builds that config.

On CPUs with AVX512-BF16, bitsandbytes runs a 4-bit layer in eval mode through a fused kernel that
computes in bfloat16 (`Linear4bit.support_avx512bf16_for_cpu`); elsewhere, and always while training, it
dequantizes the weight and multiplies in the compute dtype. At import, that CPU backend also tries to
fetch a kernel from the Hugging Face hub and logs a warning when it cannot: `quiet_bitsandbytes` hides
that line (the slower built-in kernel is used, with the same results).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from llmfast.errors import UserError
from llmfast.quant.base import QUANTIZERS, QuantConfigBase, Quantizer

_HUB_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropHubKernelWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _HUB_KERNEL_WARNING not in str(record.msg)


def quiet_bitsandbytes() -> None:
    """Hide bitsandbytes' warning about a hub kernel it could not fetch (logged once, when it is imported)."""
    # The logger exists before bitsandbytes does; a filter set now applies when its CPU backend loads,
    # whoever imports it (transformers and peft do too).
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropHubKernelWarning) for f in log.filters):
        log.addFilter(_DropHubKernelWarning())


quiet_bitsandbytes()


class Bnb4Config(QuantConfigBase):
    bits: Literal[4] = 4
    type: Literal["nf4", "fp4"] = "nf4"  # NF4: levels at normal quantiles (QLoRA); FP4: a 4-bit float
    double_quant: bool = True  # quantize the per-block scales too (~0.4 bit per weight saved)


def bnb_config(cfg: Bnb4Config, dtype: str, purpose: str) -> Any:
    """The `BitsAndBytesConfig` for these settings, computing in `dtype`."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise UserError(f"{purpose} needs bitsandbytes: `pip install bitsandbytes`, or remove 'quantization' "
                        "from the recipe") from None
    td = _torch_dtype(dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=cfg.type, bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=td, bnb_4bit_quant_storage=td,
    )


def _torch_dtype(dtype: str) -> Any:
    import torch

    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"unknown dtype '{dtype}': use float32, bfloat16 or float16")
    return getattr(torch, dtype)


@QUANTIZERS.register("bnb4")
class Bnb4(Quantizer):
    name = "bnb4"
    Config = Bnb4Config
    paper = "QLoRA: Efficient Finetuning of Quantized LLMs (arXiv:2305.14314)"
    shorthands = {"nf4": {"type": "nf4"}, "fp4": {"type": "fp4"}}

    def training_load_kwargs(self, cfg: QuantConfigBase, dtype: str, device: str) -> dict[str, Any]:
        import torch

        assert isinstance(cfg, Bnb4Config)
        return {"quantization_config": bnb_config(cfg, dtype, "QLoRA"),
                "device_map": {"": device if device != "cuda" else torch.cuda.current_device()}}

    def load_kwargs(self, cfg: QuantConfigBase, dtype: str) -> dict[str, Any]:
        assert isinstance(cfg, Bnb4Config)
        return {"quantization_config": bnb_config(cfg, dtype, "loading a bitsandbytes 4-bit model")}

    def engines(self, cfg: QuantConfigBase) -> tuple[str, ...]:
        # vLLM's CPU backend has no bitsandbytes kernels; transformers runs them on CPUs and GPUs.
        return ("hf",)

    def dequantize_for_merge(self, model: Any, dtype: str) -> None:
        """Replace every Linear4bit with a plain Linear holding its dequantized weight, in `dtype`."""
        import bitsandbytes as bnb
        import torch

        td = _torch_dtype(dtype)
        for module in list(model.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, bnb.nn.Linear4bit):
                    state = child.weight.quant_state
                    if getattr(state, "packing_format_for_cpu", False):  # repacked by an eval forward on AVX512-BF16
                        raise UserError("dequantize: the 4-bit model has run in eval mode on this CPU; load it afresh")
                    w = bnb.functional.dequantize_4bit(child.weight.data, state).to(td)
                    lin = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                          device=w.device, dtype=td)
                    lin.weight.data.copy_(w)
                    if child.bias is not None:
                        lin.bias.data.copy_(child.bias.data.to(td))
                    setattr(module, child_name, lin)
        model.is_quantized = False
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
