"""BitNet b1.58 layers (Ma et al. 2024, "The Era of 1-bit LLMs", arXiv:2402.17764).

Weights: one absmean scale per tensor, values rounded to {-1, 0, 1}. Activations: per-token absmax to int8.
`BitLinear` trains through the rounding with a straight-through estimator and a quantization strength
`lam` in [0, 1] that blends full precision into ternary (x + lam * (q(x) - x), as Hugging Face's 1.58-bit
fine-tuning work warms it up from 0 to 1). `TernaryLinear` runs an exported model with exactly the
arithmetic of transformers' `BitLinear`, so llmfast and transformers give the same logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACT_MAX = 127  # int8, symmetric
SCALE_FLOOR = 1e-5  # as transformers: a zero tensor or token must not divide by zero


def ternarize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values in {-1, 0, 1}, weight_scale) with weight ~= values / weight_scale (absmean rounding)."""
    w = weight.detach().float()
    weight_scale = 1.0 / w.abs().mean().clamp(min=SCALE_FLOOR)
    return (w * weight_scale).round().clamp(-1, 1).to(torch.int8), weight_scale.reshape(1)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 codes (as floats of x's dtype) and the scale that made them: x ~= codes / scale."""
    scale = ACT_MAX / x.abs().amax(dim=-1, keepdim=True).clamp(min=SCALE_FLOOR)
    return (x * scale).round().clamp(-ACT_MAX - 1, ACT_MAX), scale


class BitLinear(nn.Linear):
    """A Linear trained ternary: forward in fake-quantized precision, gradients straight through."""

    lam: float = 1.0  # quantization strength, set by the QAT schedule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        values, w_scale = ternarize(w)
        w_q = (values.to(w.dtype) / w_scale.to(w.dtype))
        codes, a_scale = quantize_activations(x)
        x_q = codes / a_scale
        lam = self.lam
        # Straight-through: the forward sees the (blended) quantized values, the backward the identity.
        w_eff = w + lam * (w_q - w).detach()
        x_eff = x + lam * (x_q - x).detach()
        return F.linear(x_eff, w_eff, self.bias)


class TernaryLinear(nn.Module):
    """Inference with ternary weights stored as int8 and transformers' BitLinear arithmetic."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(1, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self._dense: torch.Tensor | None = None  # the ternary values in the compute dtype, made once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dense is None or self._dense.dtype != x.dtype or self._dense.device != x.device:
            self._dense = self.weight.to(x.dtype)
        codes, a_scale = quantize_activations(x)
        y = F.linear(codes, self._dense)
        y = y / (self.weight_scale * a_scale)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, ternary"


def linear_names(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """The Linear layers BitNet converts (or has converted): every one but the head (embeddings and norms are
    not Linear)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, TernaryLinear)) and not any(name == s or name.endswith("." + s) for s in skip)]
