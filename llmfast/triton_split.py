"""Split-K for decode kernels in Triton: the input dimension shared by many programs, summed in one launch.

A one-token product reads a whole matrix once; a GPU streams it at full speed only when hundreds of programs each
read a small piece at once (the H200's first run of llmfast's kernels, with a few programs each walking the whole
input, moved 84-300 GB/s of its ~4.8 TB/s). So the kernels split the input dimension across SPLIT_K programs per
block of outputs. Each stores its partial sums (float32) in a workspace, then counts itself in on its output
block's counter; the program that arrives last adds the SPLIT_K partials in a fixed order (the same bits on every
run, unlike atomic float adds) and writes the output, then resets the counter for the next launch. No memset, no
second launch: the counters are allocated once per device and stream, zero, and left zero by every launch.

Memory order: every thread's partial stores happen before the block's barrier, the count is an acquire-release
atomic at GPU scope, and the last program reads the partials from L2 (`.cg`), never from a stale L1 line of an
earlier launch. Importing this module needs the `triton` package; only GPU code paths (and tests under
`TRITON_INTERPRET=1`) do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_COUNTERS: dict[tuple[str, int], torch.Tensor] = {}


def counters(device: torch.device, blocks: int) -> torch.Tensor:
    """At least `blocks` int32 counters on `device`, all zero between launches. One set per device and CUDA stream:
    launches on one stream run in order, so no two of them share a counter at once."""
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (str(device), stream)
    have = _COUNTERS.get(key)
    if have is None or have.numel() < blocks:
        have = _COUNTERS[key] = torch.zeros(max(blocks, 1024), dtype=torch.int32, device=device)
    return have


def workspace(split_k: int, rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """The partial sums' buffer: (split_k, rows, cols) float32, uninitialized (every entry is written before it is read)."""
    return torch.empty((split_k, rows, cols), dtype=torch.float32, device=device)


@triton.jit
def arrive(count_ptr, block):
    """Counts this program in on `block` once its partial sums are stored; the count before it (SPLIT_K - 1: last)."""
    tl.debug_barrier()  # every thread's stores are issued before the count
    return tl.atomic_add(count_ptr + block, 1, sem="acq_rel", scope="gpu")


@triton.jit
def total(part_ptr, offs, mask, split_stride, SPLIT_K: tl.constexpr):
    """The SPLIT_K partial sums at `offs`, added in split order, read from L2 (`.cg`): another SM wrote them."""
    acc = tl.load(part_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(part_ptr + s * split_stride + offs, mask=mask, other=0.0, cache_modifier=".cg")
    return acc


@triton.jit
def release(count_ptr, block):
    """The last program leaves its block's counter at zero for the next launch."""
    tl.atomic_xchg(count_ptr + block, 0, sem="relaxed", scope="gpu")
