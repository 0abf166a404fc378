"""Checkpoints of a fine-tuning run: what `--resume` needs to continue bit-identically, safe to open.

A checkpoint is `OUTPUT/checkpoints/step-NNNNNN/`: the adapter (safetensors), the optimizer, scheduler,
RNG and (float16) loss-scaler states, and `state.json`, written last through a temporary sibling so a
checkpoint exists only once complete. The `.pt` files hold only tensors and plain containers, and are read
with `torch.load(weights_only=True)`: a checkpoint folder from elsewhere that carries pickled objects is
refused instead of running their code.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from llmfast.artifacts import atomic_dir, atomic_write_json, atomic_write_text, latest_step, step_folders
from llmfast.errors import UserError
from llmfast.finetune import fsdp as sharding
from llmfast.finetune.rng import check_states, gather_states, restore_states
# torch-free, so that preflight.py reads them too; re-exported: the trainer names them ckpts.*
from llmfast.finetune.run_files import RUN_FILES, foreign_run_files, taken_output  # noqa: F401
from llmfast.recipe_paths import paths_of


def record_run(out: Path, recipe: dict[str, Any], model_path: Path, rows: str) -> None:
    """What `--resume` compares a run against: its recipe (recipe.json), its base model's weights and the rows it
    trains on (base.json: the recipe names the model and the data by their paths, and other files may be saved
    there since; `rows` is data.chat.rows_digest)."""
    from llmfast.modelfiles import weights_fingerprint

    atomic_write_json(out / "recipe.json", recipe)
    atomic_write_json(out / "base.json", {"weights": weights_fingerprint(model_path), "rows": rows})


def check_same_rows(out: Path, rows: str) -> None:
    """--resume trains on the rows the run started on: a data file edited (or encoded otherwise) since would finish
    the run on other rows, silently. A run of an earlier version recorded none."""
    recorded = recorded_rows(out)
    if recorded is not None and recorded != rows:
        raise UserError(f"--resume: the data encodes to other rows than the run in {out} started on (a data file "
                        "edited or replaced since, or another tokenizer): resume with the data it started on, or train "
                        "into another output")


def recorded_rows(out: Path) -> str | None:
    """The rows digest base.json records (`record_run`), or None (a run of an earlier version recorded none)."""
    try:
        recorded = json.loads((out / "base.json").read_text(encoding="utf-8")).get("rows")
    except (OSError, ValueError, AttributeError):
        return None
    return recorded if isinstance(recorded, str) else None


def latest_checkpoint(out: Path) -> Path | None:
    return latest_step(out / "checkpoints")


def read_state(ckpt: Path) -> dict[str, Any]:
    from llmfast.modelfiles import read_json_file

    state = read_json_file(ckpt / "state.json", "checkpoint state", "delete that checkpoint folder")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "total_steps" not in state or not (
            _is_window(state.get("window", [0.0, 0]))):  # an older checkpoint has none: its log line restarted
        raise UserError(f"{ckpt / 'state.json'}: not a checkpoint state llmfast wrote: delete that checkpoint folder")
    return state


def _is_window(value: Any) -> bool:
    """state.json's `window`: [loss sum, steps] of the steps since the log's last line, which its next one averages."""
    return (isinstance(value, list) and len(value) == 2 and type(value[1]) is int and value[1] >= 0
            and type(value[0]) in (int, float) and math.isfinite(value[0]))


def check_resumable(ckpt: Path, state: dict[str, Any], total_steps: int, fsdp: bool, world: int) -> None:
    """The run being resumed must split its steps as the checkpointed one did."""
    if not 0 <= state["step"] <= state["total_steps"]:
        raise UserError(f"{ckpt / 'state.json'}: step {state['step']} of {state['total_steps']} is not a step of the "
                        "run: not a checkpoint state llmfast wrote; delete that checkpoint folder")
    if state["total_steps"] != total_steps:
        raise UserError(f"--resume: the recipe now gives {total_steps} steps, the run had {state['total_steps']}: "
                        "resume with the same recipe")
    if state.get("fsdp", False) != fsdp:
        raise UserError(f"--resume: {ckpt} was written {'with' if state.get('fsdp') else 'without'} FSDP over "
                        "several processes: resume it the same way")
    if state.get("processes", world) != world:  # each step's share of micro-batches depends on it
        raise UserError(f"--resume: {ckpt} was written by {state['processes']} processes, this run has {world}: "
                        "resume with as many")


FIX = "delete that checkpoint folder, or start the run again without --resume"


def safe_load(path: Path, map_location: Any = None, fix: str = FIX, mmap: bool = False) -> Any:
    """torch.load that unpickles only tensors and plain containers: nothing in the file can run code. `mmap`: map
    the tensors' bytes instead of reading them (for a check of the file's form: a full model's AdamW state is twice
    its weights); only torch.save's zip format can be mapped, so another file is read as usual."""
    import zipfile

    try:
        with warnings.catch_warnings():  # a raw pickle (not torch.save's) drew torch's two-line protocol warning
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True,
                              mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError:
        # torch's own message suggests loading unsafely; for a file from elsewhere that is the wrong advice.
        raise UserError(f"{path}: refused: it holds pickled objects other than tensors and plain containers, "
                        f"which could run code when loaded, so it is not a checkpoint llmfast wrote; {fix}") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UserError(f"{path}: cannot be read as a checkpoint file ({type(e).__name__}; truncated or "
                        f"corrupt?); {fix}") from None


@dataclass
class SavedTraining:
    """A checkpoint's files, read and checked before the model loads (its progress bar would come before the error
    line of a damaged file); `load_adapter` and `load_training_state` then check them against the model."""

    adapter: dict[str, torch.Tensor]
    optimizer: Any
    scheduler: dict[str, Any]
    rng: dict[str, torch.Tensor]  # finetune/rng.py: a row per process
    scaler: Any = None


def read_training_state(ckpt: Path, fsdp: bool, device: torch.device, with_scaler: bool,
                        processes: int = 1) -> SavedTraining:
    """The adapter, optimizer, scheduler, RNG and loss-scaler states of `ckpt`, all read safely (`safe_load`)."""
    from safetensors.torch import load_file

    path = ckpt / "adapter.safetensors"
    try:
        adapter = load_file(path, device="cpu")
    except Exception as e:  # noqa: BLE001 - missing, truncated or not safetensors: safetensors' own error types
        from llmfast.loading import first_line

        raise UserError(f"{path}: cannot be read ({type(e).__name__}: {first_line(e)}); {FIX}") from None
    # torchrun on a CPU gives the device as cpu:0, which torch.load cannot map to (every DDP resume on a CPU failed
    # with "truncated or corrupt?", s47)
    optim = safe_load(ckpt / "optimizer.pt", map_location=None if fsdp else "cpu" if device.type == "cpu" else device)
    check_optimizer_form(optim, ckpt / "optimizer.pt", FIX)  # its fit to the parameters once the model is loaded
    sched = safe_load(ckpt / "scheduler.pt")
    rng = check_states(safe_load(ckpt / "rng.pt"), ckpt / "rng.pt", processes, FIX)
    scale = safe_load(ckpt / "scaler.pt") if with_scaler and (ckpt / "scaler.pt").is_file() else None
    if not isinstance(sched, dict):
        raise UserError(f"{ckpt / 'scheduler.pt'}: holds a {type(sched).__name__}"
                        f"{' of ' + str(sched.dtype) if isinstance(sched, torch.Tensor) else ''}, not the state "
                        f"llmfast writes there; {FIX}")
    return SavedTraining(adapter, optim, sched, rng, scale)


def check_fit(saved: SavedTraining, ckpt: Path, rank: int, base: dict[str, list[int]] | None,
              model_path: Path | None = None) -> None:
    """What the model is not needed for, checked before it loads: the base's weights those the run started on
    (`record_run`; a run of an earlier version recorded none), each LoRA pair whole and of the recipe's rank,
    each pair's shape that of its layer in `base` (the base model's stored weight shapes, where they are its
    logical shapes: not a packed 4-bit artifact), and the optimizer's state for as many tensors as the adapter has,
    its AdamW moments of the adapter's shapes. `load_adapter` and `load_training_state` then check the rest."""
    from llmfast.modelfiles import same_weights

    try:
        recorded = json.loads((ckpt.parent.parent / "base.json").read_text(encoding="utf-8")).get("weights")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if model_path is not None and isinstance(recorded, str) and not same_weights(model_path, recorded):
        raise UserError(f"--resume: {model_path} holds other weights than the run in {ckpt.parent.parent} started "
                        "on (re-made or re-saved since?): resume with the model it started from, or train into "
                        "another output")
    path = ckpt / "adapter.safetensors"
    shapes = {k: list(v.shape) for k, v in saved.adapter.items()}
    for key, shape in sorted(shapes.items()):
        half = "lora_A" if ".lora_A." in key else "lora_B" if ".lora_B." in key else None
        if half is None or len(shape) != 2:  # DoRA's magnitude vectors, embedding adapters: after the model loads
            continue
        twin = key.replace(f".{half}.", ".lora_B." if half == "lora_A" else ".lora_A.")
        if twin not in shapes:
            raise UserError(f"{path}: does not fit this run's adapter (missing {twin}): resume with the recipe that "
                            f"wrote it, or {FIX}")
        has = shape[0] if half == "lora_A" else shape[1]
        if has != rank:
            raise UserError(f"{path}: its LoRA rank is {has} ({key}), the recipe's lora.r is {rank}: resume with the "
                            f"recipe that wrote it, or {FIX}")
        if half == "lora_B":  # each pair once, from its A
            continue
        layer = (base or {}).get(key.removeprefix("base_model.model.").replace(".lora_A.", "."))
        size = [shapes[twin][0], shape[1]]  # B's output by A's input; GPT-2's Conv1D stores its weight (in, out)
        if layer is not None and len(layer) == 2 and layer not in (size, size[::-1]):
            raise UserError(f"{path}: {key} and its lora_B map {size[1]} inputs to {size[0]} outputs, which does not "
                            f"fit the model's layer of shape {layer}: it belongs to another model; {FIX}")
    optim = ckpt / "optimizer.pt"
    params = sum(len(g["params"]) for g in saved.optimizer["param_groups"])
    if params != len(shapes):
        raise UserError(f"{optim}: holds the state of {params} parameters, the checkpoint's adapter has {len(shapes)} "
                        f"tensors: it belongs to another run; {FIX}")
    known = {tuple(v) for v in shapes.values()}
    for state in saved.optimizer["state"].values():
        for key in ("exp_avg", "exp_avg_sq"):  # torch's AdamW; bitsandbytes' 8-bit states are blockwise
            value = state.get(key) if isinstance(state, dict) else None
            if isinstance(value, torch.Tensor) and tuple(value.shape) not in known:
                raise UserError(f"{optim}: its {key} state has shape {list(value.shape)}, which no tensor of the "
                                f"checkpoint's adapter has: it belongs to another run; {FIX}")


def load_adapter(model: Any, ckpt: Path, saved: SavedTraining) -> None:
    """Into the whole model, before sharding splits the weights (copied onto the model's device). Every LoRA
    tensor the model has must be in the file with its shape: one left out would keep its fresh initial values."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    path = ckpt / "adapter.safetensors"
    wanted = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    got = {k: tuple(v.shape) for k, v in saved.adapter.items()}
    if got != wanted:
        odd = [f"missing {k}" for k in sorted(set(wanted) - set(got))] + [
            f"unexpected {k}" for k in sorted(set(got) - set(wanted))] + [
            f"{k} is {list(got[k])}, the run's is {list(wanted[k])}" for k in sorted(set(got) & set(wanted))
            if got[k] != wanted[k]]
        raise UserError(f"{path}: does not fit this run's adapter ({'; '.join(odd[:2])}): resume with the recipe "
                        f"that wrote it, or {FIX}")
    set_peft_model_state_dict(model, saved.adapter)


def load_training_state(saved: SavedTraining, ckpt: Path, model: Any, optimizer: Any, scheduler: Any, scaler: Any,
                        fsdp: bool, rank: int = 0, device: torch.device = torch.device("cpu")) -> None:
    """The optimizer (checked against the run's parameters), scheduler, this process's RNG and loss-scaler states."""
    restore_optimizer(optimizer, saved.optimizer, ckpt / "optimizer.pt", FIX,
                      load=(lambda o, s: sharding.load_optimizer_state(model, o, s)) if fsdp else None)
    scheduler.load_state_dict(saved.scheduler)
    restore_states(saved.rng, rank, device)
    if saved.scaler is not None:  # read for float16 runs (which have a scaler); absent in older checkpoints
        scaler.load_state_dict(saved.scaler)


def check_optimizer_form(state: Any, path: Path, fix: str) -> None:
    """`state` (read from `path`) has the form of a torch optimizer's state (a `state` dict, a list of
    `param_groups` each listing its `params`): checked without the optimizer, so before a resume loads the model."""
    if not isinstance(state, dict):
        raise UserError(f"{path}: holds a {type(state).__name__}, not the optimizer state llmfast writes there; {fix}")
    groups = state.get("param_groups")
    if not (isinstance(state.get("state"), dict) and isinstance(groups, list) and groups
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)):
        raise UserError(f"{path}: does not fit this run's optimizer (not a torch optimizer state: a state dict and "
                        f"a list of param_groups); {fix}")


def restore_optimizer(optimizer: Any, state: Any, path: Path, fix: str,
                      load: Callable[[Any, Any], None] | None = None) -> None:
    """`state` (read from `path` with `safe_load`) into `optimizer`, checked: a dict torch accepts, and per-parameter
    state (Adam's moments) of each parameter's shape, which torch would only find out at the first step, after the
    log was already cut back to the checkpoint. `load(optimizer, state)` replaces `optimizer.load_state_dict`."""
    from llmfast.loading import first_line

    check_optimizer_form(state, path, fix)
    try:
        load(optimizer, state) if load is not None else optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{path}: does not fit this run's optimizer ({type(e).__name__}: {first_line(e)}); "
                        f"{fix}") from None
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != p.shape:
                    raise UserError(f"{path}: its {key} state has shape {list(value.shape)} for a parameter of shape "
                                    f"{list(p.shape)}: it belongs to another run; {fix}")


def drop_stale(out: Path, start_step: int) -> None:
    """Process 0 on resume: remove checkpoints whose write a kill cut short, and log lines of steps to rerun."""
    log_path = out / "train_log.jsonl"
    kept = kept_log_lines(log_path, start_step)  # read (a bad line refused) before anything is removed
    for stale in (out / "checkpoints").glob(".step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if log_path.is_file():
        atomic_write_text(log_path, "".join(l + "\n" for l in kept))


def kept_log_lines(path: Path, start: int) -> list[str]:
    """The lines of a training log (`finetune`'s, or a distilling method's) that a run resumed at step `start`
    keeps: those of steps up to it. A line that is not JSON, or not an object with a numeric step, is one line
    naming it."""
    if not path.is_file():
        return []
    kept = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            row = json.loads(line)
        except ValueError:
            raise UserError(f"{path}: line {n} is not JSON: delete that line (or the file) and resume again") from None
        step = row.get("step") if isinstance(row, dict) else None
        if isinstance(step, bool) or not isinstance(step, (int, float)):
            raise UserError(f"{path}: line {n} is not a log line llmfast wrote (a JSON object with a step): delete "
                            "that line and resume again")
        if step <= start:
            kept.append(line)
    return kept


def save_checkpoint(acc: Any, model: Any, optimizer: Any, scheduler: Any, scaler: Any, out: Path, step: int,
                    total: int, keep: int, fsdp: bool, world: int, window: tuple[float, int] = (0.0, 0)) -> None:
    """`window`: the loss sum and number of the steps since the log's last line, which a resumed run's next line
    averages with its own steps (it would otherwise average only those)."""
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
    rng = gather_states(acc)  # a collective too
    if acc.is_main_process:
        with atomic_dir(out / "checkpoints" / f"step-{step:06d}", overwrite=True) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in adapter.items()}, tmp / "adapter.safetensors")
            torch.save(optim, tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rng, tmp / "rng.pt")
            if scaler is not None:
                torch.save(scaler.state_dict(), tmp / "scaler.pt")
            # state.json last: a checkpoint counts only once it is there (and the rename made it visible).
            atomic_write_json(tmp / "state.json", {"step": step, "total_steps": total, "fsdp": fsdp,
                                                   "processes": world, "window": [window[0], window[1]]})
        for old in step_folders(out / "checkpoints")[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


# Settings a resumed run may change: how often it saves, logs and evaluates, how many checkpoints it keeps, and how
# the output folder (the same folder: it holds the run) is spelled.
RESUME_MAY_CHANGE = {("train", "save_every"), ("train", "keep_checkpoints"), ("train", "log_every"),
                     ("train", "eval_every"), ("output",)}


def _flat(value: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, (*prefix, str(key))).items()}
    return {prefix: value}


def check_same_recipe(out: Path, recipe: dict[str, Any]) -> None:
    """--resume continues the run its folder holds: a recipe that differs from its `recipe.json` (another model, other
    data, another learning rate) would make a mixed adapter whose records disagree; one line naming the key."""
    path = out / "recipe.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # a run of a version that kept none, or a damaged one: the checkpoint's own checks follow
    was, now = _flat(saved), _flat(recipe)
    for flat in (was, now):  # one data file or a list of that one file: the same data
        for key in (("data", "train"), ("data", "eval")):
            if key in flat:
                flat[key] = [str(p) for p in paths_of(flat[key])]
    for key in sorted(set(was) | set(now)):
        if key not in RESUME_MAY_CHANGE and was.get(key) != now.get(key):
            raise UserError(f"--resume: {'.'.join(key)} is {now.get(key)!r}, the run in {out} was started with "
                            f"{was.get(key)!r} ({path}): resume with the same recipe, or train into another output")
