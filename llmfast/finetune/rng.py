"""Every process's random-number state in a checkpoint, so a resumed run draws what the stopped one would have.

lora.dropout draws its masks from the generator of the device it runs on (the CPU's, or the GPU's), and each
process draws as much as its own batches' shapes ask, so the processes' states part ways. A checkpoint held process
0's CPU state only: a resumed process 1, or any GPU process, masked other activations than the run that was never
stopped. rng.pt now holds `{"cpu": uint8[processes, n], "cuda": uint8[processes, m]}` (cuda only for GPU runs);
an older rng.pt, one CPU state, is given to every process as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmfast.errors import UserError


def gather_states(acc: Any) -> dict[str, torch.Tensor]:
    """Each process's RNG states, one row per process (a collective: every process calls it)."""
    mine = {"cpu": torch.get_rng_state()}
    if acc.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(acc.device)
    # gather concatenates along the first dimension, on the device the backend takes (NCCL: the GPU)
    return {k: acc.gather(v[None].to(acc.device)).cpu() for k, v in mine.items()}


def check_states(value: Any, path: Path, processes: int, fix: str) -> dict[str, torch.Tensor]:
    """rng.pt's contents as `{"cpu": rows, ...}` with a row per process; anything else is one line naming it."""
    if isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1:
        return {"cpu": value[None].expand(processes, -1)}  # an older checkpoint: process 0's state for every one
    ok = (isinstance(value, dict) and "cpu" in value and set(value) <= {"cpu", "cuda"}
          and all(isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and v.dim() == 2 and len(v) == processes
                  for v in value.values()))
    if not ok:
        what = (f"a Tensor of {value.dtype}" if isinstance(value, torch.Tensor) else
                f"a dict of {', '.join(map(str, value))}" if isinstance(value, dict) else f"a {type(value).__name__}")
        raise UserError(f"{path}: holds {what}, not the {processes} processes' RNG states llmfast writes there; {fix}")
    return value


def restore_states(states: dict[str, torch.Tensor], rank: int, device: torch.device) -> None:
    """This process's row; a GPU state is restored only on a GPU (a CPU run resumed on one starts its GPU fresh).
    The row is copied: torch reads a state from the start of its storage, and a row of a stacked tensor (a view at
    an offset) crashed the process with SIGSEGV."""
    torch.set_rng_state(states["cpu"][rank].clone())
    if "cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"][rank].clone(), device)
