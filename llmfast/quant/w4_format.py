"""The files of a w4 artifact: AutoRound's GPTQ and AWQ packings of int4 levels, decoded without auto-round.

vLLM serves the packed weights as they are; llmfast's transformers engine, eval and the scale tuning
(quant/scale_tuning.py) read them back here: the levels minus their zero points, and the dequantized weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmfast.errors import UserError


def gptq_levels(qweight: Any, qzeros: Any) -> Any:
    """(out, in) int8 levels minus zero points from AutoRound's GPTQ packing: eight 4-bit values per int32 along
    the inputs (qweight: in/8 x out), zero points stored minus one (qzeros: groups x out/8)."""
    import torch

    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    levels = ((qweight.unsqueeze(1) >> shifts.view(1, -1, 1)) & 0xF).reshape(-1, qweight.shape[1])
    zeros = ((qzeros.unsqueeze(2) >> shifts.view(1, 1, -1)) & 0xF).reshape(qzeros.shape[0], -1) + 1
    group = torch.arange(levels.shape[0]) // (levels.shape[0] // zeros.shape[0])
    return (levels - zeros[group]).t().to(torch.int8).contiguous()


def _scaled(levels: Any, scales: Any, group_size: int) -> Any:
    """(out, in) float32 weights: each level times its group's scale (scales: groups x out)."""
    import torch

    group = torch.arange(levels.shape[1]) // group_size
    return (levels.float() * scales.float()[group].t()).contiguous()


def dequantize_gptq(qweight: Any, qzeros: Any, scales: Any, group_size: int) -> Any:
    """(out, in) float32 weights from AutoRound's GPTQ packing (`gptq_levels`) and its scales (groups x out)."""
    return _scaled(gptq_levels(qweight, qzeros), scales, group_size)


# AWQ packs the eight 4-bit values of an int32 in the order 0, 2, 4, 6, 1, 3, 5, 7 of their output columns:
# nibble j of a word holds column _AWQ_NIBBLE_COLUMN[j] of its block of eight.
_AWQ_NIBBLE_COLUMN = (0, 2, 4, 6, 1, 3, 5, 7)


def awq_levels(qweight: Any, qzeros: Any) -> Any:
    """(out, in) int8 levels minus zero points from AutoRound's AWQ packing (what it writes for `sym: false`):
    eight 4-bit values per int32 along the outputs (qweight: in x out/8, qzeros: groups x out/8, nibbles in AWQ's
    column order, zero points as stored)."""
    import torch

    def unpack(packed: Any) -> Any:
        shifts = torch.arange(0, 32, 4, dtype=torch.int32)
        nibbles = (packed.unsqueeze(2) >> shifts.view(1, 1, -1)) & 0xF  # rows x out/8 x 8, by nibble
        columns = torch.empty_like(nibbles)
        columns[:, :, list(_AWQ_NIBBLE_COLUMN)] = nibbles
        return columns.reshape(packed.shape[0], -1)

    levels, zeros = unpack(qweight), unpack(qzeros)
    group = torch.arange(levels.shape[0]) // (levels.shape[0] // zeros.shape[0])
    return (levels - zeros[group]).t().to(torch.int8).contiguous()


def dequantize_awq(qweight: Any, qzeros: Any, scales: Any, group_size: int) -> Any:
    """(out, in) float32 weights from AutoRound's AWQ packing (`awq_levels`) and its scales (groups x out)."""
    return _scaled(awq_levels(qweight, qzeros), scales, group_size)


def artifact_packing(path: Path) -> str:
    """"awq" or "gptq": how AutoRound packed this artifact (its quantization_config says)."""
    from llmfast.modelfiles import describe_model_dir

    cfg = describe_model_dir(path)["config"].get("quantization_config") or {}
    return "awq" if "awq" in str(cfg.get("packing_format", "")) else "gptq"


def artifact_weight_files(path: Path) -> list[Path]:
    """The files of the artifact at `path` that its weights are read from (here, and by the scale tuning, which
    writes its scales back into them): those transformers loads, model.safetensors or its index's shards. Not a
    stray *.safetensors beside them (a hub's consolidated copy, a backup), whose tensors were read over the model's
    and rewritten; an index's missing shard is named, where it read as tensors missing from the model."""
    from llmfast.modelfiles import model_weight_files

    return model_weight_files(path, "quantize the model again")


def load_dequantized(path: Path, group_size: int, dtype: str) -> Any:
    """The w4 artifact at `path` as a plain transformers model whose linear weights are the int4 values.

    One copy of the weights: the modules are built with their parameters on the meta device (no random
    initialization of a model that is overwritten, which held a second copy), and each weight is dequantized and
    cast to `dtype` as it is read (float32 ones for a bfloat16 model were a third)."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from llmfast.loading import auto_config, torch_dtype

    config = auto_config(path)  # never the folder's own code (an auto_map): one line, not a prompt on the terminal
    del config.quantization_config
    with init_empty_weights(include_buffers=False):  # buffers real: the rotary frequencies are not in the files
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
    state: dict[str, Any] = {}
    unpack = dequantize_awq if artifact_packing(path) == "awq" else dequantize_gptq
    for file in artifact_weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            for key in keys:
                if key.endswith(".qweight"):
                    name = key[: -len(".qweight")]
                    state[f"{name}.weight"] = unpack(f.get_tensor(key), f.get_tensor(f"{name}.qzeros"),
                                                     f.get_tensor(f"{name}.scales"), group_size
                                                     ).to(torch_dtype(dtype))
                elif not key.endswith((".qzeros", ".scales", ".g_idx")):
                    t = f.get_tensor(key)
                    state[key] = t.to(torch_dtype(dtype)) if t.is_floating_point() else t
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise UserError(f"{path}: its weights do not match its config (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}): quantize the model again")
    del state
    model.tie_weights()
    return model.to(torch_dtype(dtype)).eval()
