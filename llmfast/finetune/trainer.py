"""The fine-tuning loop: packed batches, chunked loss, AdamW with cosine warmup, checkpoints and resume.

Readable top to bottom: `run_finetune` validates everything that can be wrong with the input before it
creates the output directory, then trains. It runs as is on one CPU or GPU and, launched with
`accelerate launch` (or torchrun), over several processes: every process builds the same deterministic
stream of micro-batches and takes its share of each optimizer step, either as DDP (each process holds the
whole model) or, with `train.fsdp`, with the decoder layers sharded over the processes (finetune/fsdp.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from llmfast.artifacts import atomic_dir, atomic_write_json, atomic_write_text, check_output, write_manifest
from llmfast.data.chat import Encoded, load_examples
from llmfast.data.packing import Batch, collate, pack
from llmfast.errors import UserError
from llmfast.finetune import fsdp as sharding
from llmfast.finetune.lora import attach_lora, load_base, pick_compute_dtype, trainable_parameters
from llmfast.finetune.loss import causal_lm_loss
from llmfast.recipe import FinetuneRecipe, recipe_dict


class _LossModule(torch.nn.Module):
    """Wraps the PEFT model so the loss runs inside forward(), which DDP needs to sync gradients."""

    def __init__(self, model: Any, chunk_size: int) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor,
                label_positions: torch.Tensor | None = None) -> torch.Tensor:
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                 "label_positions": label_positions}
        total, _ = causal_lm_loss(self.model, batch, self.chunk_size)
        return total


def make_optimizer(params: list[torch.nn.Parameter], name: str, lr: float, weight_decay: float, cuda: bool) -> Any:
    if name == "auto":
        name = "paged_adamw_8bit" if cuda else "adamw_torch"
    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=cuda or None)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError(f"train.optimizer {name} needs bitsandbytes: install it or use adamw_torch") from None
    table = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
             "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}
    return table[name](params, lr=lr, weight_decay=weight_decay)


def split_eval(examples: list[Encoded], fraction: float, seed: int) -> tuple[list[Encoded], list[Encoded]]:
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(examples) * fraction))
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def micro_batches(rows: list[list[Encoded]], batch_size: int, seed: int, epoch: int, pad_id: int) -> list[Batch]:
    """One epoch's micro-batches, shuffled by (seed, epoch): the same on every process and after a resume."""
    order = list(range(len(rows)))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return [collate([rows[i] for i in order[s : s + batch_size]], pad_id) for s in range(0, len(order), batch_size)]


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _latest_checkpoint(out: Path) -> Path | None:
    found = sorted(p for p in (out / "checkpoints").glob("step-*") if (p / "state.json").is_file())
    return found[-1] if found else None


def _note(acc: Any, line: str) -> None:
    # Warnings and progress notices go to stderr, once per run; stdout carries only the summary.
    if acc.is_main_process:
        print(line, file=sys.stderr, flush=True)


def run_finetune(recipe: FinetuneRecipe, resume: bool = False) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    from peft import set_peft_model_state_dict
    from transformers import get_cosine_schedule_with_warmup

    from llmfast.models import load_tokenizer, resolve_model

    tc, dc = recipe.train, recipe.data
    out = Path(recipe.output)
    if resume and _latest_checkpoint(out) is None:
        raise UserError(f"--resume: {out} has no complete checkpoint (set train.save_every to make some)")
    if not resume and out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out} already exists: pass --resume to continue that run, or choose another output")
    if not resume:  # a file, a parent that is a file, no permission, the data inside it: one line each
        check_output(out, overwrite=out.is_dir(), inputs=[dc.train, dc.eval])

    acc = Accelerator(cpu=not torch.cuda.is_available())
    rank, world = acc.process_index, acc.num_processes
    # llmfast shards and picks the dtype itself: an accelerate config that does either would act behind its back
    # (FSDP's RAM-efficient loading zeroes the base on all but one process, expecting accelerate to broadcast).
    if acc.distributed_type == DistributedType.FSDP:
        raise UserError("launched with an accelerate FSDP config: llmfast shards by itself; launch without it "
                        "(torchrun, or a multi-GPU accelerate config) and set train.fsdp: true")
    if acc.mixed_precision != "no":
        raise UserError(f"launched with accelerate mixed precision {acc.mixed_precision}: llmfast picks the dtype "
                        "itself; launch without it and set train.dtype")
    fsdp = world > 1 and tc.fsdp
    torch.manual_seed(tc.seed)
    with acc.main_process_first():
        model_path = resolve_model(recipe.model)
    tokenizer = load_tokenizer(model_path)

    # ---- everything that can be wrong with the input is found before the output directory exists
    train_ex, warnings = load_examples(dc.train, tokenizer, dc.max_length, dc.too_long)
    if dc.eval is not None:
        eval_ex, more = load_examples(dc.eval, tokenizer, dc.max_length, dc.too_long)
        warnings += more
    else:
        train_ex, eval_ex = split_eval(train_ex, dc.eval_fraction, tc.seed)
    for w in warnings:
        _note(acc, f"llmfast: warning: {w}")
    dtype = pick_compute_dtype(tc.dtype)
    if tc.fsdp:
        sharding.check_recipe(recipe.quantization is not None, dtype, tc.optimizer)
    model = attach_lora(load_base(str(model_path), recipe, dtype, acc.device.type), recipe)
    trainable, total_params = trainable_parameters(model)
    # Checked also with one process, so a recipe is refused before it is launched on several.
    layers = sharding.check_model(model) if tc.fsdp else []

    pack_length = dc.pack_length or dc.max_length
    rows = pack(train_ex, pack_length) if dc.packing else [[e] for e in train_ex]
    eval_rows = pack(eval_ex, pack_length) if dc.packing else [[e] for e in eval_ex]
    pad_id = tokenizer.pad_token_id
    per_epoch = math.ceil(len(rows) / tc.batch_size)
    micro_per_step = tc.grad_accum * world
    total_steps = tc.steps or max(1, math.ceil(tc.epochs * per_epoch / micro_per_step))
    if tc.batch_size * micro_per_step > len(rows) * max(1, tc.epochs) and tc.steps is None:
        _note(acc, "llmfast: warning: fewer rows than one optimizer step needs; steps repeat the data")

    ckpt = _latest_checkpoint(out) if resume else None
    state = json.loads((ckpt / "state.json").read_text()) if ckpt is not None else {}
    if ckpt is not None:
        if state["total_steps"] != total_steps:
            raise UserError(f"--resume: the recipe now gives {total_steps} steps, the run had {state['total_steps']}: "
                            "resume with the same recipe")
        if state.get("fsdp", False) != fsdp:
            raise UserError(f"--resume: {ckpt} was written {'with' if state.get('fsdp') else 'without'} FSDP over "
                            "several processes: resume it the same way")
        if state.get("processes", world) != world:  # each step's share of micro-batches depends on it
            raise UserError(f"--resume: {ckpt} was written by {state['processes']} processes, this run has {world}: "
                            "resume with as many")
        from safetensors.torch import load_file

        # Into the whole model, before sharding splits the weights (copied onto the model's device).
        set_peft_model_state_dict(model, load_file(ckpt / "adapter.safetensors", device="cpu"))
    if fsdp:
        sharding.shard_decoder_layers(model, layers, acc.device.type, world)

    # After sharding: the optimizer must hold the sharded parameters.
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad],
                               "adamw_torch" if fsdp and tc.optimizer == "auto" else tc.optimizer, tc.lr,
                               tc.weight_decay, acc.device.type == "cuda" and not fsdp)
    warmup = round(tc.warmup_ratio * total_steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    # float16 (GPUs without bfloat16) cannot hold small gradients: scale the loss up and the gradients back
    # down, skipping a step whose gradients overflowed, as torch.amp does; bfloat16 and float32 need none.
    scaler = torch.amp.GradScaler(acc.device.type) if dtype == "float16" else None

    start_step = 0
    log_path = out / "train_log.jsonl"
    if ckpt is not None:
        if acc.is_main_process:  # checkpoints whose write a kill cut short
            for stale in (out / "checkpoints").glob(".step-*"):
                shutil.rmtree(stale, ignore_errors=True)
        if fsdp:
            sharding.load_optimizer_state(model, optimizer, torch.load(ckpt / "optimizer.pt", weights_only=False))
        else:
            optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=acc.device, weights_only=False))
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
        torch.set_rng_state(torch.load(ckpt / "rng.pt", weights_only=False))
        if scaler is not None and (ckpt / "scaler.pt").is_file():  # absent in checkpoints of older versions
            scaler.load_state_dict(torch.load(ckpt / "scaler.pt", weights_only=False))
        start_step = state["step"]
        if acc.is_main_process and log_path.is_file():  # drop log lines of steps that will run again
            kept = [l for l in log_path.read_text().splitlines() if json.loads(l).get("step", 0) <= start_step]
            atomic_write_text(log_path, "".join(l + "\n" for l in kept))
        _note(acc, f"llmfast: resuming {out} from step {start_step} of {total_steps}")
    elif acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "recipe.json", recipe_dict(recipe))
    acc.wait_for_everyone()

    loss_module = _LossModule(model, tc.loss_chunk_size)
    wrapped = loss_module if fsdp else acc.prepare(loss_module)  # the sharded layers synchronise themselves
    epoch_cache: dict[int, list[Batch]] = {}

    def micro(index: int) -> Batch:
        epoch, pos = divmod(index, per_epoch)
        if epoch not in epoch_cache:
            epoch_cache.clear()
            epoch_cache[epoch] = micro_batches(rows, tc.batch_size, tc.seed, epoch, pad_id)
        return epoch_cache[epoch][pos]

    def evaluate() -> float | None:
        if not eval_rows:
            return None
        # The unwrapped module: a DDP forward would sync buffers, a collective that processes with no
        # eval batch of their own would never join.
        inner = acc.unwrap_model(wrapped)
        inner.eval()
        batches = [collate(eval_rows[s : s + tc.batch_size], pad_id) for s in range(0, len(eval_rows), tc.batch_size)]
        total = torch.zeros(2, device=acc.device)
        # Under FSDP every process runs as many forwards as the others (each gathers the layers' weights with
        # them): one without a batch of its own runs the first batch again and counts nothing.
        n = len(batches)
        rounds = -(-n // world) * world if fsdp else n
        with torch.no_grad():
            for i in range(rank, rounds, world):
                loss_sum = inner(**batches[i if i < n else 0].tensors(acc.device)).detach().float()
                if i < n:
                    total[0] += loss_sum
                    total[1] += batches[i].target_tokens
        total = acc.reduce(total, reduction="sum")
        inner.train()
        return (total[0] / total[1]).item()

    t_start = time.perf_counter()
    train_seconds, tokens_seen, last_loss, eval_loss = 0.0, 0, float("nan"), None
    window_loss, window_steps = 0.0, 0
    bar = tqdm(total=total_steps, initial=start_step, desc="finetune", unit="step", disable=not acc.is_main_process)
    wrapped.train()
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        batch_list = [micro(step * micro_per_step + j) for j in range(micro_per_step)]
        step_targets = sum(b.target_tokens for b in batch_list)
        mine = batch_list[rank::world]
        step_loss = torch.zeros((), device=acc.device)
        for i, b in enumerate(mine):
            last = i == len(mine) - 1
            if fsdp:
                sharding.set_gradient_sync(layers, last)
            sync = contextlib.nullcontext() if last or fsdp else acc.no_sync(wrapped)
            with sync:
                loss_sum = wrapped(**b.tensors(acc.device))
                # DDP and FSDP average gradients over processes, hence the factor `world`.
                loss = loss_sum / step_targets * world
                acc.backward(scaler.scale(loss) if scaler is not None else loss)
            step_loss += loss_sum.detach().float()
        if scaler is not None:
            scaler.unscale_(optimizer)  # before clipping, so the norm is of the true gradients
        if tc.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.max_grad_norm)  # sharded ones too
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_loss = acc.reduce(step_loss, reduction="sum").item() / step_targets
        train_seconds += time.perf_counter() - t0
        tokens_seen += sum(b.real_tokens for b in batch_list)
        window_loss += step_loss
        window_steps += 1
        done = step + 1
        mem = peak_memory_gib(acc.device)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens_seen / train_seconds:.0f}", mem=f"{mem:.2f}GiB")
        fresh_eval = None
        if tc.eval_every and done % tc.eval_every == 0 and done != total_steps:
            fresh_eval = eval_loss = evaluate()
        if done % tc.log_every == 0 or done == total_steps:
            last_loss = window_loss / window_steps
            if acc.is_main_process:
                entry = {"step": done, "loss": round(last_loss, 6), "lr": scheduler.get_last_lr()[0],
                         "tokens_per_s": round(tokens_seen / train_seconds, 1), "peak_mem_gib": round(mem, 3)}
                if fresh_eval is not None:
                    entry["eval_loss"] = round(fresh_eval, 6)
                if scaler is not None:
                    entry["loss_scale"] = scaler.get_scale()
                with log_path.open("a") as f:
                    f.write(json.dumps(entry) + "\n")
            window_loss, window_steps = 0.0, 0
        if tc.save_every and done % tc.save_every == 0 and done != total_steps:
            _save_checkpoint(acc, model, optimizer, scheduler, scaler, out, done, total_steps, tc.keep_checkpoints,
                             fsdp, world)
    bar.close()
    eval_loss = evaluate()
    wall = time.perf_counter() - t_start
    metrics = {
        "train_tokens_per_s": round(tokens_seen / train_seconds, 1) if train_seconds else None,
        "train_tokens": tokens_seen,
        "peak_memory_gib": round(peak_memory_gib(acc.device), 3),
        "memory_kind": "cuda max allocated" if acc.device.type == "cuda" else "process peak RSS",
        "final_train_loss": round(last_loss, 6),
        "final_eval_loss": round(eval_loss, 6) if eval_loss is not None else None,
        "wall_seconds": round(wall, 1),
        "steps": total_steps,
        "resumed_from_step": start_step if resume else None,
        "trainable_params": trainable,
        "total_params": total_params,
        "processes": world,
        "fsdp": fsdp,
        "param_bytes_per_process": sharding.local_param_bytes(model),
        "device": acc.device.type,
        "dtype": dtype,
    }
    lora_state = sharding.full_lora_state(model) if fsdp else None  # a collective: every process
    if acc.is_main_process:
        with atomic_dir(out / "adapter", overwrite=True) as tmp:
            model.save_pretrained(tmp, state_dict=lora_state)
            tokenizer.save_pretrained(tmp)
            write_manifest(tmp, stage="finetune", parents=[recipe.model], recipe=recipe_dict(recipe), metrics=metrics,
                           base_model_path=str(model_path), quantization=recipe.quantization is not None)
        atomic_write_json(out / "metrics.json", metrics)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    acc.wait_for_everyone()
    if recipe.export_merged and acc.is_main_process:
        from llmfast.finetune.export import export_merged

        export_merged(out / "adapter", out / "merged")
    acc.wait_for_everyone()
    return metrics


def _save_checkpoint(acc: Any, model: Any, optimizer: Any, scheduler: Any, scaler: Any, out: Path, step: int,
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
