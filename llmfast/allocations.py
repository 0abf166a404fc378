"""Tensor memory counted op by op: live and peak bytes of every storage created under a dispatch mode.

Used where a process-level number cannot answer: a test of how much one function allocates (real CPU
tensors), and scripts/estimate_finetune_memory.py, which runs training steps on the meta device (shapes,
no data) to estimate what `torch.cuda.max_memory_allocated` would report on a GPU this machine lacks.
Only the thread that enters the mode is seen: on a CPU the autograd engine runs backward on that thread.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary


class AllocationCounter(TorchDispatchMode):
    """`current` and `peak` bytes of the tensor storages created under it (views share their storage).

    `block` rounds every allocation up, as an allocator does: 512 bytes is CUDA's caching allocator.
    Storages that existed before entering are not counted (nor their views). Temporaries an operator
    makes and frees inside itself are not seen: only what operators return is.
    """

    def __init__(self, block: int = 1) -> None:
        super().__init__()
        self.block = block
        self.live: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.current = 0
        self.peak = 0

    def _count(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage in self.live:
            return
        size = math.ceil(storage.nbytes() / self.block) * self.block
        self.live[storage] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, size)

    def _release(self, size: int) -> None:
        self.current -= size

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        # a view or in-place result of a storage from before entering is not a new allocation
        older = {t.untyped_storage()._cdata for t in pytree.tree_leaves((args, kwargs))
                 if isinstance(t, torch.Tensor) and t.untyped_storage() not in self.live}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in older:
                self._count(t)
        return out
