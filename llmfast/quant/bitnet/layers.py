"""BitNet b1.58 layers (Ma et al. 2024, "The Era of 1-bit LLMs", arXiv:2402.17764).

Weights: one absmean scale per tensor, values rounded to {-1, 0, 1}. Activations: per-token absmax to int8.
`BitLinear` trains through the rounding with a straight-through estimator and a quantization strength
`lam` in [0, 1] that blends full precision into ternary (x + lam * (q(x) - x), as Hugging Face's 1.58-bit
fine-tuning work warms it up from 0 to 1). `TernaryLinear` runs an exported model with exactly the
arithmetic of transformers' `BitLinear`, so llmfast and transformers give the same logits.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmfast.quant.bitnet import cpu_kernel

ACT_MAX = 127  # int8, symmetric
SCALE_FLOOR = 1e-5  # as transformers: a zero tensor or token must not divide by zero


@functools.lru_cache(maxsize=1)
def _triton_kernel() -> Any:
    """llmfast.quant.bitnet.triton_kernel, or None where Triton is not installed (CPU-only torch builds)."""
    try:
        from llmfast.quant.bitnet import triton_kernel
    except ImportError:
        return None
    return triton_kernel


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
    """Inference with ternary weights stored as int8 and transformers' BitLinear arithmetic.

    On a CPU, float32 and bfloat16 inputs of at most `cpu_kernel.MAX_ROWS` rows (decode steps) run through one
    fused C call (`ternary_gemv.c`: quantize, byte dot products, scale); more rows run the integer product in
    oneDNN's int8 GEMM (`onednn::qlinear_pointwise`: uint8 codes (zero point 128) times int8 weights, summed in
    int32, returned as float32 with unit scales). Those sums are exact, and so is the float32 matmul of the same
    small integers (below 2^24), and the kernel repeats torch's float operations in order, so every path gives
    bit-identical outputs. oneDNN reads a quarter of float32's weight bytes, the kernel (2 bits a weight) a
    sixteenth. In bfloat16 (and float16) the codes are torch's, the integer sums are kept exact on every fast CPU
    path (the C kernel, oneDNN) where transformers' bfloat16 matmul rounds them, and the output is rounded once:
    the same bits on each, and those of the Triton kernel; `fast = False` keeps transformers' rounded arithmetic.
    On a GPU with Triton, inputs of at most 16 tokens (of the weight scale's dtype) run one Triton launch over
    the 2-bit packed weights (`triton_kernel.py`; float32 meant to give the same bits, as it does under Triton's
    interpreter; bfloat16 keeps the integer sums exact where a bfloat16 matmul rounds them).
    `TernaryLinear.fast = False` switches all of these off, `TernaryLinear.kernel = False` the C kernel only.
    """

    fast: bool = True
    kernel: bool = True

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(1, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self._dense: torch.Tensor | None = None  # the ternary values in the compute dtype, made once
        self._packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # oneDNN's int8 layout
        self._kernel_weights: cpu_kernel.PackedTernary | None = None  # the C kernel's layout of the weights
        self._gpu_packed: torch.Tensor | None = None  # transformers' 2-bit packing, for the Triton kernel
        self._made_from: tuple[int, ...] | None = None  # the buffers' versions the caches were made of

    def _fresh(self) -> None:
        """Drop the caches when the weights changed since they were made (load_state_dict, copy_, a new buffer)."""
        weight, scale = self._buffers["weight"], self._buffers["weight_scale"]
        made_from = (id(weight), weight.data_ptr(), _version(weight), id(scale), _version(scale))
        if made_from != self._made_from:
            self._dense = self._packed = self._kernel_weights = self._gpu_packed = None
            self._made_from = made_from

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The fused C kernel's output, or None where it does not apply or cannot be built here."""
        k, weight, scale = self.in_features, self._buffers["weight"], self._buffers["weight_scale"]
        # The torch path's output is float32 exactly when x is and the (single) weight scale is not float64, and
        # bfloat16 when both are.
        scales = (torch.float32, torch.bfloat16, torch.float16) if x.dtype == torch.float32 else (torch.bfloat16,)
        if not (self.kernel and x.dtype in (torch.float32, torch.bfloat16) and x.device.type == "cpu"
                and weight.device.type == "cpu" and x.shape[-1:] == (k,) and 0 < k <= cpu_kernel.MAX_INPUTS
                and x.numel() <= cpu_kernel.MAX_ROWS * k and scale.numel() == 1 and scale.dtype in scales
                and not (x.requires_grad and torch.is_grad_enabled())):
            return None
        kernel = cpu_kernel.ternary_kernel()
        if kernel is None:
            return None
        packed = self._kernel_weights
        if packed is None:
            packed = self._kernel_weights = kernel.pack(weight, float(scale.float()))
        return kernel(x if x.is_contiguous() else x.contiguous(), packed)

    def _triton_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The Triton decode kernel's output on a GPU (at most 16 tokens, no autograd), or None."""
        weight, scale = self._buffers["weight"], self._buffers["weight_scale"]
        if not (x.is_cuda and weight.is_cuda and x.shape[-1] == self.in_features and self.out_features % 4 == 0
                and x.numel() <= 16 * self.in_features and scale.numel() == 1 and scale.dtype == x.dtype
                and not (x.requires_grad and torch.is_grad_enabled())):
            return None
        kernel = _triton_kernel()
        if kernel is None:
            return None
        if self._gpu_packed is None:
            from llmfast.quant.bitnet.pack import pack_ternary

            self._gpu_packed = pack_ternary(weight)
        return kernel.ternary_matmul(x, self._gpu_packed, scale)

    def _integer_product(self, codes: torch.Tensor) -> torch.Tensor:
        """codes @ W^T for integer-valued codes, exactly."""
        if self.fast and codes.device.type == "cpu" and codes.dtype == torch.float32 and _onednn_int8():
            if self._packed is None:
                self._packed = (torch.ops.onednn.qlinear_prepack(self.weight, None),
                                torch.ones(self.out_features), torch.zeros(self.out_features, dtype=torch.int32))
            packed, ones, zeros = self._packed
            # Unsigned codes with zero point 128: oneDNN's fast int8 kernels take u8 x s8 (s8 x s8 was 100x slower).
            flat = (codes.reshape(-1, self.in_features) + 128).to(torch.uint8)
            y = torch.ops.onednn.qlinear_pointwise(flat, 1.0, 128, packed, ones, zeros, None, 1.0, 0, torch.float32,
                                                   "none", [], "")
            return y.reshape(*codes.shape[:-1], self.out_features)
        if self._dense is None or self._dense.dtype != codes.dtype or self._dense.device != codes.device:
            self._dense = self.weight.to(codes.dtype)
        return F.linear(codes, self._dense)

    def _exact_sums(self, x: torch.Tensor) -> bool:
        """16-bit x on a CPU: the product of the codes is taken exactly (oneDNN's int8 GEMM, or a float32 matmul of
        the small integers where torch has no oneDNN), as the C and Triton kernels take it, instead of in a 16-bit
        matmul, which rounds the sums to 8 or 11 bits."""
        return (self.fast and x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu"
                and self._buffers["weight_scale"].dtype == x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._fresh()
        y = (self._triton_forward(x) if x.is_cuda else self._kernel_forward(x)) if self.fast else None
        if y is None:
            codes, a_scale = quantize_activations(x)
            if self._exact_sums(x):  # the kernels' arithmetic: the integer sums exact, the result rounded once
                y = (self._integer_product(codes.float()) / (self.weight_scale * a_scale).float()).to(x.dtype)
            else:
                y = self._integer_product(codes)
                y = y / (self.weight_scale * a_scale)
            if self.fast:  # a row with an infinity has scale 0 and NaN codes, which oneDNN's uint8 cast turns into
                y = y.masked_fill(a_scale == 0, float("nan"))  # numbers: NaN, as the kernels and transformers give
        bias = self._buffers["bias"]  # not self.bias: Module.__getattr__ costs a microsecond per decode call
        if bias is not None:
            y = y + bias
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, ternary"


def _version(t: torch.Tensor) -> int:
    """The tensor's in-place version counter; -1 for inference-mode tensors, which keep none (and cannot be
    changed in place outside inference mode)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def _onednn_int8() -> bool:
    return hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qlinear_pointwise")


def linear_names(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """The Linear layers BitNet converts (or has converted): every one but the head (embeddings and norms are
    not Linear)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, TernaryLinear)) and not any(name == s or name.endswith("." + s) for s in skip)]
