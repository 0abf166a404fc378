"""Export: a full model with a LoRA adapter merged into its weights.

For a QLoRA adapter the base is loaded in 4-bit exactly as it was trained against, dequantized to 16/32-bit,
and the adapter merged into that: the merged model reproduces the trained model, not the adapter applied
to the original weights. Merging into 4-bit weights is refused: the LoRA delta is far smaller than one
4-bit quantization step, so rounding would throw most of it away.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmfast.artifacts import atomic_dir, read_manifest, write_manifest
from llmfast.errors import UserError

MERGE_DTYPES = ("float32", "bfloat16", "float16")


def _dequantize_4bit(model: Any, dtype: Any) -> None:
    """Replace every bitsandbytes Linear4bit with a plain Linear holding its dequantized weight."""
    import bitsandbytes as bnb
    import torch

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                w = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state).to(dtype)
                lin = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                      device=w.device, dtype=dtype)
                lin.weight.data.copy_(w)
                if child.bias is not None:
                    lin.bias.data.copy_(child.bias.data.to(dtype))
                setattr(module, child_name, lin)


def export_merged(adapter_dir: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmfast.models import torch_dtype

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if dtype.lower() in ("nf4", "fp4", "int4", "4bit", "4-bit"):
        raise UserError(f"merging into {dtype} weights is refused: a LoRA delta is much smaller than one 4-bit "
                        "quantization step and would be rounded away; export in float32/bfloat16/float16 and "
                        "quantize the merged model afterwards")
    if dtype not in MERGE_DTYPES:
        raise UserError(f"export dtype '{dtype}' unknown: use one of {', '.join(MERGE_DTYPES)}")
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise UserError(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json)")
    manifest = read_manifest(adapter_dir) or {}
    base = manifest.get("base_model_path") or json.loads(cfg_path.read_text()).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise UserError(f"{adapter_dir}: its base model {base!r} is not a local directory")
    quantized = bool(manifest.get("quantization"))
    td = torch_dtype(dtype)
    if quantized:
        from llmfast.finetune.lora import bnb_4bit_config

        q = manifest.get("recipe", {}).get("quantization") or {}
        bnb_cfg = bnb_4bit_config(q.get("type", "nf4"), q.get("double_quant", True), dtype)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(base, quantization_config=bnb_cfg, dtype=td,
                                                     device_map={"": device})
        _dequantize_4bit(model, td)
        model.is_quantized = False
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=td)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged = merged.to("cpu")
    with atomic_dir(out_dir, overwrite=True) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(tmp)
        write_manifest(tmp, stage="export", parents=[str(adapter_dir)], recipe={"dtype": dtype},
                       metrics=manifest.get("metrics", {}), dequantized_4bit_base=quantized)
    return out_dir
