"""Padding-free packing: short examples share a row, each with its own positions and no cross-attention.

Examples are placed into bins of at most `pack_length` tokens (first-fit decreasing). Inside a bin the
position ids restart at 0 for every example; transformers turns restarting position ids (with no
attention mask) into a block-diagonal causal mask, so an example never attends to its neighbours and its
logits are exactly what they would be on its own. Rows in a batch are right-padded to the longest; the
padding is one more "example" whose labels are ignored.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from llmfast.data.chat import IGNORE, Encoded
from llmfast.errors import UserError


@dataclass
class Batch:
    input_ids: list[list[int]]
    labels: list[list[int]]
    position_ids: list[list[int]]
    real_tokens: int  # tokens that are not padding: what tokens/s counts
    target_tokens: int  # tokens with a label

    def tensors(self, device: str = "cpu") -> dict:
        import torch

        out = {k: torch.tensor(getattr(self, k), device=device) for k in ("input_ids", "labels", "position_ids")}
        out["label_positions"] = torch.tensor(label_positions(self.labels), dtype=torch.long, device=device)
        return out


def label_positions(labels: Sequence[Sequence[int]]) -> list[int]:
    """Where the next token has a label, as flat indices into (rows, width - 1): what the loss predicts from."""
    width = len(labels[0]) - 1
    if any(len(row) != width + 1 for row in labels):
        raise ValueError("label_positions needs rows of one width (as collate pads them)")
    return [r * width + t for r, row in enumerate(labels) for t in range(width) if row[t + 1] != IGNORE]


def pack(examples: Sequence[Encoded], pack_length: int) -> list[list[Encoded]]:
    """First-fit-decreasing bins of at most `pack_length` tokens; deterministic for the same input. An example longer
    than that (a `pack_length` below `max_length`) is refused, naming its row: alone in a bin, it would train past
    the positions and the memory `pack_length` was checked and chosen for."""
    for e in examples:
        if len(e) > pack_length:
            raise UserError(f"{e.where or f'row {e.row}'}: {len(e)} tokens, more than data.pack_length {pack_length} "
                            "(a packed row's length): raise data.pack_length to data.max_length, or leave it out (it "
                            "defaults to max_length)")
    lengths = [len(e) for e in examples]
    order = sorted(range(len(examples)), key=lambda i: (-lengths[i], i))
    # First fit through a max-tree of the bins' free room (O(n log n); scanning the bins was O(n * bins): hours for
    # a million rows). Leaves not yet opened hold a whole empty bin, so the leftmost leaf with room is the first bin
    # that fits, or the next new one: the bins a scan finds, bit for bit.
    size = 1 << max(0, len(examples) - 1).bit_length()
    tree = [pack_length] * (2 * size)
    bins: list[list[Encoded]] = []
    for i in order:
        n, node = lengths[i], 1
        while node < size:
            node = 2 * node if tree[2 * node] >= n else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(examples[i])
        tree[node] -= n
        while node > 1:
            node //= 2
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
    return bins


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of `n` rows in epoch `epoch`, shuffled by (seed, epoch): the same on every process and after a
    resume."""
    order = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def collate(rows: Sequence[Sequence[Encoded]], pad_id: int) -> Batch:
    """Each row is a bin of examples (or a single example, for plain padded batches)."""
    width = max(sum(len(e) for e in row) for row in rows)
    ids, labels, pos = [], [], []
    real = target = 0
    for row in rows:
        r_ids, r_lab, r_pos = [], [], []
        for e in row:
            r_ids += e.input_ids
            r_lab += e.labels
            r_pos += list(range(len(e)))
            target += e.target_tokens
        real += len(r_ids)
        pad = width - len(r_ids)
        ids.append(r_ids + [pad_id] * pad)
        labels.append(r_lab + [IGNORE] * pad)
        pos.append(r_pos + list(range(pad)))
    return Batch(ids, labels, pos, real, target)
