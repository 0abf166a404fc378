"""What every quantization method provides, and the registry users name methods from.

A method is one module in `llmfast/quant/` that subclasses `Quantizer` and registers itself:

    @QUANTIZERS.register("bnb4")
    class Bnb4(Quantizer): ...

It owns everything about its format: the pydantic schema of its settings (`Config`), how a base is loaded
quantized for training (QLoRA today), how a model directory is quantized into an artifact, how such an
artifact is loaded, and which bench engines can serve it on this machine. The artifact's `llmfast.json`
records `{"quantization": {"method": NAME, "config": {...}}}`, so loaders and engines are chosen from the
artifact alone. Modules here import torch and the method's library inside functions only.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from llmfast.registry import Registry

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class QuantConfigBase(BaseModel):
    """A method's settings; unknown keys are errors (as in recipes)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Quantizer:
    """One quantization method. Subclasses set `name`, `Config`, `paper` and override what they support."""

    name: ClassVar[str]
    Config: ClassVar[type[QuantConfigBase]] = QuantConfigBase
    paper: ClassVar[str] = ""

    def parse(self, raw: dict[str, Any], where: str = "") -> QuantConfigBase:
        """Validate this method's settings (recipe.py turns pydantic errors into file:line messages)."""
        return self.Config.model_validate(raw)

    def training_load_kwargs(self, cfg: QuantConfigBase, dtype: str, device: str) -> dict[str, Any]:
        """`from_pretrained` keyword arguments that load a base quantized for adapter training."""
        raise NotImplementedError(f"{self.name} cannot train adapters on a quantized base")

    def load_kwargs(self, cfg: QuantConfigBase, dtype: str) -> dict[str, Any]:
        """`from_pretrained` keyword arguments that load a model in this format for inference."""
        raise NotImplementedError(f"{self.name} cannot load models")

    def quantize(self, model_dir: Path, cfg: QuantConfigBase, out_dir: Path, **kwargs: Any) -> dict[str, Any]:
        """Write the quantized model into `out_dir` (a temporary directory); return metrics."""
        raise NotImplementedError(f"{self.name} cannot quantize a model into an artifact yet")

    def engines(self, cfg: QuantConfigBase) -> tuple[str, ...]:
        """Bench engines that can run this format on this machine, preferred first."""
        return ("hf",)

    def dequantize_for_merge(self, model: "PreTrainedModel", dtype: str) -> None:
        """Turn a model loaded in this format into plain 16/32-bit layers in place (for exporting adapters)."""
        raise NotImplementedError(f"{self.name} cannot dequantize")


QUANTIZERS: Registry[Quantizer] = Registry("quantization method")
