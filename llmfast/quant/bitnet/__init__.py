"""BitNet b1.58: ternary weights {-1, 0, 1} with one absmean scale per tensor, int8 activations per token.

Ma et al. 2024, "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits" (arXiv:2402.17764).
Post-training ternarization of a model trained in full precision loses most of its quality, so the method
fine-tunes through the rounding (quantization-aware training with a straight-through estimator) while a
full-precision copy teaches it (logit distillation), with the quantization strength warmed up from 0 to 1
as Hugging Face's 1.58-bit fine-tuning experiments found necessary. Embeddings, norms and the head stay in
high precision. The artifact is in transformers' BitNet format (`quant_method: bitnet`), which transformers
loads by itself; llmfast runs it with `TernaryLinear` (same arithmetic). vLLM has no BitNet support.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from llmfast.quant.base import QUANTIZERS, QuantConfigBase, Quantizer
from llmfast.strict import LearningRate, Seed

if TYPE_CHECKING:
    import torch


class BitNetConfig(QuantConfigBase):
    qat_steps: int = Field(0, ge=0)  # 0: post-training ternarization only (fast, and poor for small models)
    lr: LearningRate = 2e-4
    batch_size: int = Field(4, gt=0)
    lambda_warmup: float = Field(0.5, ge=0, le=1)  # fraction of qat_steps over which strength goes 0 -> 1
    teacher_samples: int = Field(0, ge=0)  # rows the teacher writes itself, added to the text (data-free QAT)
    save_every: int = Field(50, gt=0)
    eval_every: int | None = Field(None, gt=0)  # held-out KL and perplexity every N QAT steps (the curve)
    # where QAT runs: auto = a CUDA GPU when torch sees one (forward passes in bfloat16 autocast there), else the CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: Seed = 0


@QUANTIZERS.register("bitnet")
class BitNet(Quantizer):
    name = "bitnet"
    weight_bits = 2
    Config = BitNetConfig
    paper = "Ma et al. 2024, arXiv:2402.17764"
    shorthands = {"ternary": {}}

    def engines(self, cfg: QuantConfigBase) -> tuple[str, ...]:
        return ("hf",)  # vLLM does not load BitNet checkpoints

    def load_kwargs(self, cfg: QuantConfigBase, dtype: str) -> dict[str, Any]:
        return {}  # transformers reads quantization_config from the checkpoint itself

    def load(self, path: Path, cfg: QuantConfigBase, dtype: str, **kwargs: Any) -> Any:
        """llmfast's runtime: TernaryLinear layers, unpacked once at load (transformers unpacks every call)."""
        from llmfast.quant.bitnet.convert import load_ternary

        return load_ternary(path, dtype)

    def check(self, skeleton: Any, cfg: QuantConfigBase) -> None:
        from llmfast.quant.bitnet.convert import check_shapes
        from llmfast.quant.bitnet.qat import qat_device
        from llmfast.quant.base import refuse_conv1d

        refuse_conv1d(skeleton, "bitnet")
        check_shapes(skeleton)
        assert isinstance(cfg, BitNetConfig)
        if cfg.qat_steps:  # only training uses the device
            qat_device(cfg)

    def trains(self, cfg: QuantConfigBase) -> bool:
        assert isinstance(cfg, BitNetConfig)
        return cfg.qat_steps > 0

    def check_resume(self, cfg: QuantConfigBase, work: Path, source: Path) -> None:
        from llmfast.distill import check_checkpoint
        from llmfast.quant.bitnet.qat import qat_settings

        assert isinstance(cfg, BitNetConfig)
        check_checkpoint(work, qat_settings(cfg), source)

    def quantize(self, model_dir: Path, cfg: QuantConfigBase, out_dir: Path, **job: Any) -> dict[str, Any]:
        from llmfast.quant.bitnet.qat import quantize_bitnet

        assert isinstance(cfg, BitNetConfig)
        return quantize_bitnet(model_dir, cfg, out_dir, **job)
