"""Checkpoints of a fine-tuning run: what `--resume` needs to continue bit-identically, safe to open.

A checkpoint is `OUTPUT/checkpoints/step-NNNNNN/`: the adapter (safetensors), the optimizer, scheduler,
RNG and (float16) loss-scaler states, and `state.json`, written last through a temporary sibling so a
checkpoint exists only once complete. The `.pt` files hold only tensors and plain containers, and are read
with `torch.load(weights_only=True)`: a checkpoint folder from elsewhere that carries pickled objects is
refused instead of running their code.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from llmfast.artifacts import atomic_dir, atomic_write_json, atomic_write_text
from llmfast.errors import UserError
from llmfast.finetune import fsdp as sharding


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted(p for p in (out / "checkpoints").glob("step-*") if (p / "state.json").is_file())
    return found[-1] if found else None


def read_state(ckpt: Path) -> dict[str, Any]:
    from llmfast.modelfiles import read_json_file

    state = read_json_file(ckpt / "state.json", "checkpoint state", "delete that checkpoint folder")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "total_steps" not in state:
        raise UserError(f"{ckpt / 'state.json'}: not a checkpoint state llmfast wrote: delete that checkpoint folder")
    return state


def check_resumable(ckpt: Path, state: dict[str, Any], total_steps: int, fsdp: bool, world: int) -> None:
    """The run being resumed must split its steps as the checkpointed one did."""
    if state["total_steps"] != total_steps:
        raise UserError(f"--resume: the recipe now gives {total_steps} steps, the run had {state['total_steps']}: "
                        "resume with the same recipe")
    if state.get("fsdp", False) != fsdp:
        raise UserError(f"--resume: {ckpt} was written {'with' if state.get('fsdp') else 'without'} FSDP over "
                        "several processes: resume it the same way")
    if state.get("processes", world) != world:  # each step's share of micro-batches depends on it
        raise UserError(f"--resume: {ckpt} was written by {state['processes']} processes, this run has {world}: "
                        "resume with as many")


def safe_load(path: Path, map_location: Any = None) -> Any:
    """torch.load that unpickles only tensors and plain containers: nothing in the file can run code."""
    fix = "delete that checkpoint folder, or start the run again without --resume"
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests loading unsafely; for a file from elsewhere that is the wrong advice.
        raise UserError(f"{path}: refused: it holds pickled objects other than tensors and plain containers, "
                        f"which could run code when loaded, so it is not a checkpoint llmfast wrote; {fix}") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UserError(f"{path}: cannot be read as a checkpoint file ({type(e).__name__}; truncated or "
                        f"corrupt?); {fix}") from None


def load_adapter(model: Any, ckpt: Path) -> None:
    """Into the whole model, before sharding splits the weights (copied onto the model's device)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(ckpt / "adapter.safetensors", device="cpu"))


def load_training_state(ckpt: Path, model: Any, optimizer: Any, scheduler: Any, scaler: Any, fsdp: bool,
                        device: torch.device) -> None:
    """Optimizer, scheduler, RNG and loss-scaler states, all read safely (`safe_load`)."""
    optim = safe_load(ckpt / "optimizer.pt", map_location=None if fsdp else device)
    sched = safe_load(ckpt / "scheduler.pt")
    rng = safe_load(ckpt / "rng.pt")
    scale = safe_load(ckpt / "scaler.pt") if scaler is not None and (ckpt / "scaler.pt").is_file() else None
    if fsdp:
        sharding.load_optimizer_state(model, optimizer, optim)
    else:
        optimizer.load_state_dict(optim)
    scheduler.load_state_dict(sched)
    torch.set_rng_state(rng)
    if scale is not None:  # absent in checkpoints of older versions: the default loss scale
        scaler.load_state_dict(scale)


def drop_stale(out: Path, start_step: int) -> None:
    """Process 0 on resume: remove checkpoints whose write a kill cut short, and log lines of steps to rerun."""
    for stale in (out / "checkpoints").glob(".step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    log_path = out / "train_log.jsonl"
    if log_path.is_file():
        kept = [l for l in log_path.read_text().splitlines() if json.loads(l).get("step", 0) <= start_step]
        atomic_write_text(log_path, "".join(l + "\n" for l in kept))


def save_checkpoint(acc: Any, model: Any, optimizer: Any, scheduler: Any, scaler: Any, out: Path, step: int,
                    total: int, keep: int, fsdp: bool, world: int) -> None:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    acc.wait_for_everyone()
    adapter: dict[str, torch.Tensor] = {}
    optim: dict[str, Any] = {}
    if fsdp:  # collectives: every process gathers, process 0 writes
        adapter = get_peft_model_state_dict(model, state_dict=sharding.full_lora_state(model))
        optim = sharding.optimizer_state(model, optimizer)
    elif acc.is_main_process:
        adapter, optim = get_peft_model_state_dict(model), optimizer.state_dict()
    if acc.is_main_process:
        with atomic_dir(out / "checkpoints" / f"step-{step:06d}", overwrite=True) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in adapter.items()}, tmp / "adapter.safetensors")
            torch.save(optim, tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(torch.get_rng_state(), tmp / "rng.pt")
            if scaler is not None:
                torch.save(scaler.state_dict(), tmp / "scaler.pt")
            # state.json last: a checkpoint counts only once it is there (and the rename made it visible).
            atomic_write_json(tmp / "state.json", {"step": step, "total_steps": total, "fsdp": fsdp,
                                                   "processes": world})
        for old in sorted((out / "checkpoints").glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
