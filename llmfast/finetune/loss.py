"""Cross-entropy without full-vocabulary logits for the whole batch.

A plain causal-LM forward computes `batch x length x vocab` logits and upcasts them to float32 for the
loss: at a 152k vocabulary and 8 x 1024 tokens that is 5 GB before the backward pass keeps its copies.
Here the head runs only on positions that have a label (prompt tokens are masked anyway), in chunks,
each chunk under activation checkpointing, so at most one chunk of logits exists at a time and the
backward recomputes it. The same idea as Liger Kernel's fused linear cross-entropy and Unsloth's
chunked loss, in plain PyTorch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llmfast.data.chat import IGNORE


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_lm_loss(
    hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, chunk_size: int = 2048
) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over labelled positions, and their count.

    `hidden` is the decoder's last hidden state (B, L, H); `labels` (B, L) uses -100 for ignored tokens;
    `head` is the output projection (a Linear, possibly wrapped by LoRA, whose forward is used as is when
    it has trainable parameters).
    """
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    keep = y != IGNORE
    h, y = h[keep], y[keep]
    count = int(y.numel())
    if count == 0:
        return hidden.sum() * 0.0, 0
    plain_linear = isinstance(head, torch.nn.Linear) and not any(p.requires_grad for p in head.parameters())
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, count, chunk_size):
        hc, yc = h[start : start + chunk_size], y[start : start + chunk_size]
        if plain_linear and torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, hc, head.weight, head.bias, yc, use_reentrant=False)
        elif plain_linear:
            total = total + _chunk_loss(hc, head.weight, head.bias, yc)
        else:
            total = total + checkpoint(lambda a, b: F.cross_entropy(head(a).float(), b, reduction="sum"), hc, yc,
                                       use_reentrant=False)
    return total, count


def causal_lm_loss(model: Any, batch: dict[str, torch.Tensor], chunk_size: int = 2048) -> tuple[torch.Tensor, int]:
    """Run the decoder of a (PEFT-wrapped) causal LM and return (summed loss, labelled tokens)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # No attention mask and no KV cache: that is when transformers reads restarting position ids as packed
    # examples and builds a block-diagonal causal mask (see data/packing.py).
    out = base.base_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=None,
                          use_cache=False)
    return chunked_lm_loss(out.last_hidden_state, batch["labels"], base.get_output_embeddings(), chunk_size)
