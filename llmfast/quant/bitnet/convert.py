"""Ternary models on disk: post-training ternarization, export in transformers' BitNet format, and loading.

The saved directory is an ordinary transformers checkpoint with `quantization_config.quant_method: bitnet`
(`linear_class: bitlinear`, offline): `AutoModelForCausalLM.from_pretrained(dir)` loads it without llmfast.
`load_ternary` loads the same files into llmfast's `TernaryLinear` layers (same arithmetic, no packing at run
time).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmfast.errors import UserError
from llmfast.quant.bitnet.layers import BitLinear, TernaryLinear, linear_names, ternarize
from llmfast.quant.bitnet.pack import VALUES_PER_BYTE, pack_ternary, unpack_ternary

SKIP = ("lm_head",)  # embeddings, norms and the head stay in high precision


def quantization_config(skip: tuple[str, ...] = SKIP) -> dict[str, Any]:
    return {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline",
            "modules_to_not_convert": list(skip), "use_rms_norm": False, "rms_norm_eps": 1e-6}


def check_shapes(model: nn.Module, skip: tuple[str, ...] = SKIP) -> list[str]:
    """The Linear layers to convert; a layer whose output size does not divide by 4 is a one-line error."""
    names = linear_names(model, skip)
    if not names:
        raise UserError("bitnet: the model has no Linear layers to make ternary")
    for name in names:
        out = model.get_submodule(name).out_features
        if out % VALUES_PER_BYTE:
            raise UserError(f"bitnet: layer {name} has {out} outputs; transformers' BitNet format packs four "
                            "values per byte along the outputs, so every converted layer needs a multiple of 4")
    return names


def ternary_state_dict(model: nn.Module, skip: tuple[str, ...] = SKIP) -> dict[str, torch.Tensor]:
    """The model's weights with every converted Linear ternarized and packed, plus its `weight_scale`."""
    names = set(check_shapes(model, skip))
    state: dict[str, torch.Tensor] = {}
    dtype = next(model.parameters()).dtype
    for name, module in model.named_modules():
        if name in names:
            if isinstance(module, TernaryLinear):
                values, scale = module.weight, module.weight_scale
            else:
                values, scale = ternarize(module.weight)
            state[f"{name}.weight"] = pack_ternary(values)
            state[f"{name}.weight_scale"] = scale.to(dtype).contiguous()
            if getattr(module, "bias", None) is not None:
                state[f"{name}.bias"] = module.bias.detach().contiguous()
    for key, tensor in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner not in names and key not in state:
            state[key] = tensor.detach().contiguous()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the embedding, as transformers saves it
    return state


def save_ternary(model: Any, tokenizer: Any, out_dir: Path, skip: tuple[str, ...] = SKIP) -> int:
    """Write a transformers BitNet checkpoint of `model` into `out_dir`; return the bytes of its weights file."""
    from safetensors.torch import save_file

    state = ternary_state_dict(model, skip)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(skip)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        from llmfast.loading import save_tokenizer

        save_tokenizer(tokenizer, out_dir)
    return (out_dir / "model.safetensors").stat().st_size


def replace_linears(model: nn.Module, factory: Any, skip: tuple[str, ...] = SKIP) -> list[str]:
    """Swap each converted Linear for `factory(linear)`; return the names swapped."""
    names = check_shapes(model, skip)
    for name in names:
        model.set_submodule(name, factory(model.get_submodule(name)))
    return names


def to_bitlinear(linear: nn.Linear) -> BitLinear:
    """A trainable BitLinear holding `linear`'s full-precision weight (for quantization-aware training)."""
    layer = BitLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                      device=linear.weight.device, dtype=linear.weight.dtype)
    layer.weight = linear.weight
    layer.bias = linear.bias
    return layer


def to_ternary(linear: nn.Linear) -> TernaryLinear:
    """A TernaryLinear with `linear`'s weight ternarized now (post-training quantization)."""
    dtype = linear.weight.dtype
    layer = TernaryLinear(linear.in_features, linear.out_features, bias=linear.bias is not None, dtype=dtype,
                          device=linear.weight.device)
    values, scale = ternarize(linear.weight)
    layer.weight.copy_(values)
    layer.weight_scale.copy_(scale.to(dtype))
    if linear.bias is not None:
        layer.bias.copy_(linear.bias.detach())
    return layer


def load_ternary(path: str | Path, dtype: str = "float32") -> Any:
    """Load a BitNet checkpoint written by `save_ternary` into llmfast's `TernaryLinear` runtime, eval mode."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from llmfast.loading import auto_config

    path = Path(path)
    config = auto_config(path)  # never the folder's own code (an auto_map): one line, not a prompt on the terminal
    qc = getattr(config, "quantization_config", None) or {}
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") != "bitnet":
        raise UserError(f"{path}: not a BitNet checkpoint (config.json has no quantization_config.quant_method "
                        "'bitnet')")
    del config.quantization_config
    torch_dtype = getattr(torch, dtype)
    from accelerate import init_empty_weights

    # Parameters on the meta device, filled by the files below: a model built on the CPU held every Linear in full
    # precision (randomly initialized) before they were swapped for int8 ones. Buffers stay real: non-persistent
    # ones (rotary frequencies) are not in the files.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    skip = tuple(qc.get("modules_to_not_convert") or SKIP)
    replace_linears(model, lambda lin: TernaryLinear(lin.in_features, lin.out_features, lin.bias is not None,
                                                     dtype=torch_dtype, device="meta"), skip)
    state = {}
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            state[key] = f.get_tensor(key)
    for name, module in model.named_modules():
        if isinstance(module, TernaryLinear):
            state[f"{name}.weight"] = unpack_ternary(state[f"{name}.weight"])
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}): re-export the model")
    model.tie_weights()
    return model.to(torch_dtype).eval()
