"""Cross-entropy without full-vocabulary logits for the whole batch.

A plain causal-LM forward computes `batch x length x vocab` logits and upcasts them to float32 for the
loss: at a 152k vocabulary and 8 x 1024 tokens that is 5 GB before the backward pass keeps its copies.
Here the head runs only on positions that have a label (prompt tokens are masked anyway), a chunk of
positions at a time. For the usual frozen head the gradient with respect to the hidden states is computed
in the same pass (softmax minus one-hot, in place in the chunk's float32 logits, times the head weight),
so one chunk of float32 logits exists at a time and the backward pass does not compute them again:
Liger Kernel's fused linear cross-entropy, in plain PyTorch. A head with trainable (LoRA) weights goes
through autograd per chunk under activation checkpointing instead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llmfast.data.chat import IGNORE


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T (+ bias)` against `targets`; d/d hidden found in forward."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk_size):
            logits = F.linear(hidden[start : start + chunk_size], weight, bias).float()
            y = targets[start : start + chunk_size, None]
            picked = logits.gather(1, y)
            top = logits.amax(dim=-1, keepdim=True)
            logits.sub_(top).exp_()  # log-sum-exp in place: torch.logsumexp would make a chunk-sized temporary
            sums = logits.sum(dim=-1, keepdim=True)
            total += (sums.log() + top - picked).sum()
            if grad is not None:  # softmax minus one-hot, still in the logits' own memory
                logits.div_(sums).scatter_add_(1, y, logits.new_full(y.shape, -1.0))
                rows = grad[start : start + chunk_size]
                if rows.dtype == weight.dtype:
                    torch.mm(logits.to(weight.dtype), weight, out=rows)
                else:
                    rows.copy_(logits.to(weight.dtype) @ weight)
            del logits  # before the next chunk's logits exist
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple:
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None


def chunked_lm_loss(
    hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, chunk_size: int = 1024,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over labelled positions, and their count.

    `hidden` is the decoder's last hidden state (B, L, H); `labels` (B, L) uses -100 for ignored tokens;
    `head` is the output projection (a Linear, possibly wrapped by LoRA, whose forward is used as is when
    it has trainable parameters). `positions` are the labelled positions as flat indices into (B, L - 1)
    (`label_positions`); the trainer computes them on the host with the batch, which saves a GPU sync
    (finding them here is a `nonzero`) and lets the loss run on tensors without data (memory estimates).
    """
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    if positions is None:
        positions = (y != IGNORE).nonzero().squeeze(1)
    h, y = h.index_select(0, positions), y.index_select(0, positions)
    count = int(positions.numel())
    if count == 0:
        return hidden.sum() * 0.0, 0
    if isinstance(head, torch.nn.Linear) and not any(p.requires_grad for p in head.parameters()):
        return _FrozenHeadCrossEntropy.apply(h, head.weight, head.bias, y, chunk_size), count
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, count, chunk_size):
        hc, yc = h[start : start + chunk_size], y[start : start + chunk_size]
        total = total + checkpoint(lambda a, b: F.cross_entropy(head(a).float(), b, reduction="sum"), hc, yc,
                                   use_reentrant=False)
    return total, count


def causal_lm_loss(model: Any, batch: dict[str, torch.Tensor], chunk_size: int = 1024) -> tuple[torch.Tensor, int]:
    """Run the decoder of a (PEFT-wrapped) causal LM and return (summed loss, labelled tokens)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # No attention mask and no KV cache: that is when transformers reads restarting position ids as packed
    # examples and builds a block-diagonal causal mask (see data/packing.py).
    out = base.base_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=None,
                          use_cache=False)
    return chunked_lm_loss(out.last_hidden_state, batch["labels"], base.get_output_embeddings(), chunk_size,
                           batch.get("label_positions"))
