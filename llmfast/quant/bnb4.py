"""bitsandbytes 4-bit: NF4 or FP4 weights in blocks of 64 with one scale each, optionally double-quantized.

QLoRA: Dettmers et al., 2023 (arXiv:2305.14314). The base is quantized by transformers while it loads
(`BitsAndBytesConfig`), for adapter training and for inference alike; the compute dtype is the training or
evaluation dtype. The only place in llmfast that builds that config.

On CPUs with AVX512-BF16, bitsandbytes runs a 4-bit layer in eval mode through a fused kernel that
computes in bfloat16 (`Linear4bit.support_avx512bf16_for_cpu`); elsewhere, and always while training, it
dequantizes the weight and multiplies in the compute dtype. At import, that CPU backend also tries to
fetch a kernel from the Hugging Face hub and logs a warning when it cannot: `quiet_bitsandbytes` hides
that line, and the `kernels` package's offline note on the way (the slower built-in kernel is used, with
the same results).

`llmfast quantize` with this method writes what QLoRA users deploy: a transformers 4-bit checkpoint (the
packed 4-bit weights, their block scales and `quantization_config` in config.json), made by loading the
model with the same `BitsAndBytesConfig` and saving it, so it holds exactly the weights a model quantized
while loading has. `AutoModelForCausalLM.from_pretrained(dir)` loads it with no llmfast code.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Literal

from pydantic import field_validator

from llmfast.errors import UserError
from llmfast.quant.base import QUANTIZERS, QuantConfigBase, Quantizer
from llmfast.registry import did_you_mean

TYPES = ("nf4", "fp4")

_HUB_KERNEL = "kernels-community/quantization-bitsandbytes"
# (logger, a line of that kernel's fetch it logs): bitsandbytes' own warning where the fetch failed, and, offline,
# the `kernels` package's note that it skipped the publisher check (transformers 5.25 requires `kernels`: it is
# installed wherever transformers is, and the fetch gets that far)
_HUB_KERNEL_LINES = (("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
                     ("kernels._internals.hf_hub", f"Skipping publisher trust check for '{_HUB_KERNEL}'"))


class _DropHubKernelWarning(logging.Filter):
    def __init__(self, line: str) -> None:
        super().__init__()
        self.line = line

    def filter(self, record: logging.LogRecord) -> bool:
        return self.line not in str(record.msg)


def quiet_bitsandbytes() -> None:
    """Hide the warnings of bitsandbytes' fetch of a hub kernel it could not get (logged once, when it is
    imported)."""
    # The loggers exist before bitsandbytes does; a filter set now applies when its CPU backend loads,
    # whoever imports it (transformers and peft do too).
    for name, line in _HUB_KERNEL_LINES:
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropHubKernelWarning) for f in log.filters):
            log.addFilter(_DropHubKernelWarning(line))


quiet_bitsandbytes()


class Bnb4Config(QuantConfigBase):
    bits: Literal[4] = 4
    type: Literal["nf4", "fp4"] = "nf4"  # NF4: levels at normal quantiles (QLoRA); FP4: a 4-bit float
    double_quant: bool = True  # quantize the per-block scales too (~0.4 bit per weight saved)

    @field_validator("type", mode="before")
    @classmethod
    def _known_type(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in TYPES:
            raise ValueError(f"Input should be 'nf4' or 'fp4'{did_you_mean(v, list(TYPES))}")
        return v


def bnb_config(cfg: Bnb4Config, dtype: str, purpose: str, for_saving: bool = False) -> Any:
    """The `BitsAndBytesConfig` for these settings, computing in `dtype`. The packed 4-bit values are held in
    `dtype` tensors (FSDP needs that to shard a QLoRA base), or for a saved checkpoint in uint8 (the layout
    transformers writes by default, which every bitsandbytes loader reads)."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise UserError(f"{purpose} needs bitsandbytes: `pip install bitsandbytes`, or remove 'quantization' "
                        "from the recipe") from None
    import torch

    td = _torch_dtype(dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=cfg.type, bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=td, bnb_4bit_quant_storage=torch.uint8 if for_saving else td,
    )


def _torch_dtype(dtype: str) -> Any:
    import torch

    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"unknown dtype '{dtype}': use float32, bfloat16 or float16")
    return getattr(torch, dtype)


@QUANTIZERS.register("bnb4")
class Bnb4(Quantizer):
    name = "bnb4"
    quantizes_on_load = True  # bitsandbytes quantizes a full-precision model as transformers loads it
    dequantizes = True  # dequantize_for_merge: QLoRA bases and saved NF4/FP4 artifacts, for export
    config_names = ("bitsandbytes",)
    weight_bits = 4
    Config = Bnb4Config
    paper = "QLoRA: Efficient Finetuning of Quantized LLMs (arXiv:2305.14314)"
    shorthands = {"nf4": {"type": "nf4"}, "fp4": {"type": "fp4"}}

    def training_load_kwargs(self, cfg: QuantConfigBase, dtype: str, device: str) -> dict[str, Any]:
        import torch

        assert isinstance(cfg, Bnb4Config)
        return {"quantization_config": bnb_config(cfg, dtype, "QLoRA"),
                "device_map": {"": device if device != "cuda" else torch.cuda.current_device()}}

    def load_for_training(self, path: Path, cfg: QuantConfigBase, dtype: str, device: str) -> Any:
        with large_blocks_given_back():  # QLoRA's load quantizes as it goes, as save_4bit's does
            return super().load_for_training(path, cfg, dtype, device)

    def load_kwargs(self, cfg: QuantConfigBase, dtype: str) -> dict[str, Any]:
        assert isinstance(cfg, Bnb4Config)
        return {"quantization_config": bnb_config(cfg, dtype, "loading a bitsandbytes 4-bit model")}

    def load(self, path: Path, cfg: QuantConfigBase, dtype: str, **kwargs: Any) -> Any:
        """A checkpoint saved in 4-bit (`llmfast quantize`) loads as saved; a full-precision model is quantized
        while it loads."""
        from llmfast.loading import from_pretrained

        assert isinstance(cfg, Bnb4Config)
        saved = saved_4bit(path)
        if saved is None:
            with large_blocks_given_back():
                return super().load(path, cfg, dtype, **kwargs)
        if saved != (cfg.type, cfg.double_quant):
            raise UserError(f"{path} is saved in {_describe(*saved)}, not {_describe(cfg.type, cfg.double_quant)}: "
                            "drop the quantization setting (the checkpoint says how it is quantized)")
        return from_pretrained(path, dtype, **kwargs)

    def check(self, skeleton: Any, cfg: QuantConfigBase) -> None:
        check_has_linear(skeleton)

    def quantize(self, model_dir: Path, cfg: QuantConfigBase, out_dir: Path, **job: Any) -> dict[str, Any]:
        assert isinstance(cfg, Bnb4Config)
        return save_4bit(model_dir, cfg, out_dir, **job)

    def engines(self, cfg: QuantConfigBase) -> tuple[str, ...]:
        import torch

        # vLLM's CPU backend has no bitsandbytes kernels; on CUDA vLLM loads pre-quantized bitsandbytes checkpoints,
        # reading `quantization_config` from config.json (its docs, "BitsAndBytes"; not run on this project's
        # machines: none has both a GPU and vLLM). transformers runs them on CPUs and GPUs.
        return ("vllm", "hf") if torch.cuda.is_available() else ("hf",)

    def dequantize_for_merge(self, model: Any, dtype: str, store: Callable[[str], Any] | None = None,
                             defer: Collection[str] = ()) -> None:
        """Replace every Linear4bit with a plain Linear holding its weight decoded in `dtype`, kept in `store(name)`
        (a torch dtype, for each parameter's name; `dtype` without it), one layer at a time: export rounds each
        decoded float32 layer to its output dtype before the next, so the model is never whole in float32. A layer
        named in `defer` keeps its 4-bit codes behind a weight that takes no memory, until `decode_deferred`."""
        import bitsandbytes as bnb
        import torch

        td = _torch_dtype(dtype)
        keep = store or (lambda name: td)
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, bnb.nn.Linear4bit):
                    state = child.weight.quant_state
                    if getattr(state, "packing_format_for_cpu", False):  # repacked by an eval forward on AVX512-BF16
                        raise UserError("dequantize: the 4-bit model has run in eval mode on this CPU; load it afresh")
                    full = f"{name}.{child_name}" if name else child_name
                    lin = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                          device="meta")
                    if full in defer:  # a stride-0 float32 view: its shape and dtype for PEFT, no memory
                        lin.weight = torch.nn.Parameter(torch.zeros((), dtype=td, device=child.weight.device).expand(
                            child.out_features, child.in_features), requires_grad=False)
                        lin.llmfast_4bit = (child.weight.data, state, td)  # what decode_deferred decodes
                    else:
                        w = bnb.functional.dequantize_4bit(child.weight.data, state).to(td)
                        lin.weight = torch.nn.Parameter(w.to(keep(f"{full}.weight")), requires_grad=False)
                    if child.bias is not None:
                        lin.bias = torch.nn.Parameter(child.bias.data.to(td).to(
                            td if full in defer else keep(f"{full}.bias")), requires_grad=False)
                    setattr(module, child_name, lin)
        model.is_quantized = False
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        # Loaded from a saved 4-bit checkpoint, the model remembers how its codes were read; save_pretrained would
        # try to reverse that for the plain weights, and transformers cannot (NotImplementedError).
        conversions = getattr(model, "_weight_conversions", None)
        if conversions:
            model._weight_conversions = [c for c in conversions if not any(
                type(op).__name__.startswith("Bnb") for op in getattr(c, "operations", []))]


def decode_deferred(layer: Any) -> None:
    """The weight of a Linear that `dequantize_for_merge` deferred (`defer`), decoded from its 4-bit codes in the
    dtype asked for then (a no-op for any other layer)."""
    import bitsandbytes as bnb
    import torch

    found = getattr(layer, "llmfast_4bit", None)
    if found is not None:
        codes, state, td = found
        layer.weight = torch.nn.Parameter(bnb.functional.dequantize_4bit(codes, state).to(td), requires_grad=False)
        del layer.llmfast_4bit


def _describe(kind: str, double_quant: bool) -> str:
    return f"{kind}{' with' if double_quant else ' without'} double quant"


def saved_4bit(path: Path) -> tuple[str, bool] | None:
    """(type, double_quant) of a transformers bitsandbytes 4-bit checkpoint at `path`, or None for any other."""
    try:
        qc = json.loads((Path(path) / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(qc, dict) or qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit"):
        return None
    return str(qc.get("bnb_4bit_quant_type", "fp4")), bool(qc.get("bnb_4bit_use_double_quant", False))


def check_has_linear(skeleton: Any) -> None:
    """bitsandbytes replaces `nn.Linear` (and GPT-2's `Conv1D`) layers, never the head: a model without any
    has nothing to quantize (a one-line refusal rather than a "quantized" copy of the same weights)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    found = [n for n, m in skeleton.named_modules()
             if (type(m) is torch.nn.Linear or isinstance(m, Conv1D)) and not n.endswith("lm_head")]
    if not found:
        arch = type(skeleton).__name__
        raise UserError(f"bnb4: {arch} has no Linear layers besides the head, so bitsandbytes has nothing to "
                        "quantize: use a model built from nn.Linear layers (Llama, Qwen, Mistral, GPT-2, ...)")


def save_4bit(model_dir: Path, cfg: Bnb4Config, out_dir: Path, *, tokenizer: Any, dtype: str = "float32",
              **_: Any) -> dict[str, Any]:
    """Quantize while loading (on the CPU, as for eval) and save the 4-bit checkpoint into `out_dir`."""
    from llmfast.bench.lineage import model_size
    from llmfast.loading import from_pretrained, save_tokenizer
    from llmfast.serve.vllm_plugin import mark_relu_architecture

    qc = bnb_config(cfg, dtype, "saving a bitsandbytes 4-bit model", for_saving=True)
    with large_blocks_given_back():
        model = from_pretrained(model_dir, dtype, quantization_config=qc, device_map={"": "cpu"})
    # No forward pass before saving: on AVX512-BF16 CPUs an eval forward repacks the weights for its kernel.
    model.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(tokenizer, out_dir)
    mark_relu_architecture(out_dir)  # a ReLU-fied Llama stays one (save_pretrained writes LlamaForCausalLM)
    size = model_size(out_dir)
    return {"type": cfg.type, "double_quant": cfg.double_quant, "weights_file_bytes": size["file_bytes"],
            "linear_weight_bytes": size["linear_weight_bytes"]}


_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc's malloc.h)
_GLIBC_MMAP_THRESHOLD_MAX = 32 << 20  # the most glibc's own raising of the threshold reaches on 64-bit
_inside = 0  # large_blocks_given_back's depth


@contextlib.contextmanager
def large_blocks_given_back(threshold: int = 1 << 20) -> Any:
    """While inside, glibc's malloc serves blocks of `threshold` bytes and more by mmap: each is given back to the
    system when freed.

    Quantizing while loading, bitsandbytes' CPU `quantize_4bit` (backends/default/ops.py, 0.50) makes float32
    temporaries of each weight and keeps its small 4-bit codes and scales. glibc raises its mmap threshold to the
    size of any mmapped block freed (up to 32 MiB); past that the temporaries came from the heap, the kept codes
    landed between them and the heap only grew: 1.0 to 2.2 bfloat16 copies of the model (varying run to run) where
    the 4-bit model needs 0.25. glibc cannot say what the threshold was: it is left at those 32 MiB. Elsewhere
    than glibc, nothing is changed."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
    except (OSError, AttributeError):
        yield
        return
    global _inside
    if _inside == 0:  # nested: the outermost sets and resets it
        libc.mallopt(_M_MMAP_THRESHOLD, threshold)
    _inside += 1
    try:
        yield
    finally:
        _inside -= 1
        if _inside == 0:
            libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD_MAX)
