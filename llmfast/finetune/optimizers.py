"""Optimizers a recipe names in `train.optimizer`, behind a registry (`auto` picks one for the device).

Each entry builds the optimizer from (parameters, lr, weight_decay, cuda); bitsandbytes' 8-bit and paged
AdamW keep the optimizer states in 8 bits (Dettmers et al., 2021, arXiv:2110.02861) or page them to host
memory under pressure (GPUs only for paging; the 8-bit states also run on CPUs).
"""

from __future__ import annotations

from typing import Any, Callable

from llmfast.errors import UserError
from llmfast.registry import Registry

OptimizerFactory = Callable[[list[Any], float, float, bool], Any]
OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")


@OPTIMIZERS.register("adamw_torch")
def _adamw_torch(params: list[Any], lr: float, weight_decay: float, cuda: bool) -> Any:
    import torch

    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=cuda or None)


def _bnb(cls_name: str) -> OptimizerFactory:
    def build(params: list[Any], lr: float, weight_decay: float, cuda: bool) -> Any:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError(f"train.optimizer {name} needs bitsandbytes: install it or use adamw_torch") from None
        return getattr(bnb.optim, cls_name)(params, lr=lr, weight_decay=weight_decay)

    name = {"AdamW8bit": "adamw_8bit", "PagedAdamW8bit": "paged_adamw_8bit",
            "PagedAdamW32bit": "paged_adamw_32bit"}[cls_name]
    OPTIMIZERS.add(name, build)
    return build


for _cls in ("AdamW8bit", "PagedAdamW8bit", "PagedAdamW32bit"):
    _bnb(_cls)


def resolve_optimizer(name: str, cuda: bool) -> str:
    """`auto`: paged 8-bit AdamW on a GPU, torch's AdamW elsewhere; any other name as it is."""
    if name == "auto":
        return "paged_adamw_8bit" if cuda else "adamw_torch"
    return name


def optimizer_names() -> list[str]:
    return ["auto", *OPTIMIZERS.names()]


def make_optimizer(params: list[Any], name: str, lr: float, weight_decay: float, cuda: bool) -> Any:
    return OPTIMIZERS.get(resolve_optimizer(name, cuda), where="train.optimizer")(params, lr, weight_decay, cuda)


def optimizer_step(optimizer: Any) -> bool:
    """`optimizer.step()`; False where the step itself overflowed float32: Adam moves a weight by up to ten times the
    learning rate on its first step, so a rate near float32's largest value fails there (a RuntimeError), before any
    NaN shows. The caller reports it as the divergence it is."""
    try:
        optimizer.step()
    except RuntimeError as e:
        if "without overflow" not in str(e):
            raise
        return False
    return True
