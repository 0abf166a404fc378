"""FSDP for LoRA fine-tuning: each decoder layer's weights sharded over the processes (torch's FSDP2).

Only the decoder layers are sharded, because the loss (finetune/loss.py) runs the decoder and then the
frozen head itself, outside the whole model's forward. The embedding, final norm and head stay whole on
every process; they are frozen, so nothing about them needs synchronising. The layers hold nearly all the
weights: each process keeps 1/N of them (and of the LoRA weights inside them), gathers a layer's weights just
for its forward and backward, and reduce-scatters the LoRA gradients, averaged as DDP's all-reduce is.

What is refused, before anything is written: QLoRA (4-bit weights would need bitsandbytes' quant_storage
sharding), float16 (its loss scaling would need the overflow check reduced over shards), bitsandbytes
optimizers (their kernels take plain tensors), and LoRA outside the decoder layers (say on lm_head: its
gradient would need a separate all-reduce).
"""

from __future__ import annotations

from typing import Any

import torch

from llmfast.errors import UserError

REFUSED_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")


def check_recipe(quantized: bool, dtype: str, optimizer: str) -> None:
    """Refuse what sharding does not support; `dtype` is the picked compute dtype."""
    if quantized:
        raise UserError("train.fsdp with QLoRA is not supported (sharding 4-bit weights needs bitsandbytes' "
                        "quant_storage handling; an NF4/FP4 artifact as the base is 4-bit too): train on a "
                        "full-precision model without 'quantization', or run QLoRA with DDP (train.fsdp: false)")
    if dtype == "float16":
        raise UserError("train.fsdp with float16 is not supported (loss scaling over sharded gradients): set "
                        "train.dtype to bfloat16 or float32 (auto picks float16 on GPUs without bfloat16), or "
                        "use DDP (train.fsdp: false)")
    if optimizer in REFUSED_OPTIMIZERS:
        raise UserError(f"train.optimizer {optimizer} does not work on sharded weights under train.fsdp: "
                        "use adamw_torch (or auto)")


def _base(model: Any) -> Any:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The model's decoder layers: the modules of the classes transformers says must not be split."""
    base = _base(model)
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers: list[torch.nn.Module] = []
    within: set[int] = set()  # modules inside a layer already found (modules() lists parents first)
    for m in base.modules():
        if type(m).__name__ in names and id(m) not in within:
            layers.append(m)
            within.update(id(sub) for sub in m.modules())
    if not layers:
        raise UserError(f"train.fsdp: {type(base).__name__} names no decoder layer class (_no_split_modules); "
                        "use DDP (train.fsdp: false)")
    return layers


def check_model(model: Any) -> list[torch.nn.Module]:
    """The decoder layers to shard; refuses a trainable parameter outside them."""
    layers = decoder_layers(model)
    inside = {id(p) for layer in layers for p in layer.parameters()}
    outside = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in inside]
    if outside:
        raise UserError(f"train.fsdp shards the decoder layers only, and {outside[0]} is trainable outside them: "
                        "drop that module from lora.target_modules, or use DDP (train.fsdp: false)")
    return layers


def shard_decoder_layers(model: Any, layers: list[torch.nn.Module], device_type: str, world: int) -> None:
    """Shard the decoder layers (from `check_model`) in place over the default process group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (world,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    # The decoder around them becomes the root, holding nothing itself (its embedding and norm stay whole):
    # FSDP never reshards a root after its forward, so each layer left a root of its own would keep its
    # gathered weights until the backward pass, all of them at once.
    decoder = _base(model).base_model
    inside = {id(p) for layer in layers for p in layer.parameters()}
    fully_shard(decoder, mesh=mesh, ignored_params={p for p in decoder.parameters() if id(p) not in inside})


def set_gradient_sync(layers: list[Any], sync: bool) -> None:
    """Reduce-scatter gradients after this backward (the last micro-batch of a step) or keep accumulating."""
    for layer in layers:
        layer.set_requires_gradient_sync(sync)


def local_param_bytes(model: Any) -> int:
    """Bytes of parameters this process holds: whole tensors, or its shards of sharded ones."""
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in model.parameters())


def full_lora_state(model: Any) -> dict[str, torch.Tensor]:
    """The LoRA entries of the model's state dict, gathered whole on every process (a collective)."""
    from torch.distributed.tensor import DTensor

    state = {}
    for name, value in model.state_dict().items():  # the same order on every process
        if "lora_" in name:
            state[name] = value.full_tensor() if isinstance(value, DTensor) else value
    return state


def optimizer_state(model: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole optimizer state keyed by parameter name, on process 0 (a collective; others get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                             cpu_offload=True))


def load_optimizer_state(model: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Give each process its shard of a whole optimizer state saved by `optimizer_state`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
