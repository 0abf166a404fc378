"""The fine-tuning loop: packed batches, chunked loss, AdamW with cosine warmup, checkpoints and resume.

Readable top to bottom: `run_finetune` validates everything that can be wrong with the input before it
creates the output directory (`_setup`), then trains (`train_step`, `evaluate`), checkpointing through
finetune/checkpoint.py. It runs as is on one CPU or GPU and, launched with torchrun (or `accelerate
launch` without an FSDP or mixed-precision config), over several processes: every process builds the same
deterministic stream of micro-batches and takes its share of each optimizer step, either as DDP (each
process holds the whole model) or, with `train.fsdp`, with the decoder layers sharded over the processes
(finetune/fsdp.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from llmfast.artifacts import append_line, atomic_dir, atomic_write_json, check_output, finite, write_manifest
from llmfast.data.chat import Encoded
from llmfast.data.packing import Batch, collate, epoch_order
from llmfast.errors import UserError
from llmfast.finetune import checkpoint as ckpts, fsdp as sharding
from llmfast.finetune.data_setup import RunData, note as _note, run_data, save_run_data, split_eval
from llmfast.finetune.lora import attach_lora, load_base, pick_compute_dtype, trainable_parameters
from llmfast.finetune.loss import causal_lm_loss
from llmfast.finetune.metrics import run_metrics, steady_tokens_per_s
from llmfast.finetune.optimizers import make_optimizer, optimizer_step
from llmfast.finetune.output import check_run_output, start_afresh
from llmfast.finetune.run_files import ENCODED, foreign_encoded
from llmfast.memory import peak_memory_gib
from llmfast.preflight import check_rows_fit
from llmfast.recipe import FinetuneRecipe, recipe_dict

__all__ = ["run_finetune", "train_step", "evaluate", "make_optimizer", "micro_batches", "split_eval"]


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


def micro_batches(rows: list[list[Encoded]], batch_size: int, seed: int, epoch: int, pad_id: int) -> list[Batch]:
    """One epoch's micro-batches, shuffled by (seed, epoch): the same on every process and after a resume."""
    order = epoch_order(len(rows), seed, epoch)
    return [collate([rows[i] for i in order[s : s + batch_size]], pad_id) for s in range(0, len(order), batch_size)]


@dataclasses.dataclass
class Run:
    """Everything the loop needs, built once by `_setup` (and `_prepare_training`)."""

    recipe: FinetuneRecipe
    out: Path
    acc: Any
    fsdp: bool
    model_path: Path
    tokenizer: Any
    model: Any
    layers: list[Any]
    dtype: str
    rows: list[list[Encoded]]
    eval_rows: list[list[Encoded]]
    total_steps: int
    trainable: int
    total_params: int
    ckpt: Path | None = None
    saved: Any = None  # the checkpoint's states (checkpoint.SavedTraining) until _prepare_training restores them
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    wrapped: Any = None
    start_step: int = 0
    window: tuple[float, int] = (0.0, 0)  # the log's loss sum and steps since its last line, at start_step
    epoch_cache: dict[int, list[int]] = dataclasses.field(default_factory=dict)  # an epoch's row order
    data: RunData | None = None  # the rows' digest, and their examples until saved into the run folder

    @property
    def world(self) -> int:
        return self.acc.num_processes

    @property
    def micro_per_step(self) -> int:
        return self.recipe.train.grad_accum * self.world

    @property
    def per_epoch(self) -> int:
        return math.ceil(len(self.rows) / self.recipe.train.batch_size)

    def step_batches(self, step: int) -> list[Batch]:
        """The micro-batches of optimizer step `step`, every process's share."""
        return [self.micro(step * self.micro_per_step + j) for j in range(self.micro_per_step)]

    def micro(self, index: int) -> Batch:
        """Micro-batch `index` of the run's stream (epochs reshuffled, one epoch's order kept)."""
        tc = self.recipe.train
        epoch, pos = divmod(index, self.per_epoch)
        if epoch not in self.epoch_cache:  # its order only: collating a whole epoch up front held every token again
            self.epoch_cache = {epoch: epoch_order(len(self.rows), tc.seed, epoch)}
        picked = self.epoch_cache[epoch][pos * tc.batch_size : (pos + 1) * tc.batch_size]  # micro_batches' `pos`
        return collate([self.rows[i] for i in picked], self.tokenizer.pad_token_id)


def _accelerator() -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    acc = Accelerator(cpu=not torch.cuda.is_available())
    # llmfast shards and picks the dtype itself: an accelerate config that does either would act behind its back
    # (FSDP's RAM-efficient loading zeroes the base on all but one process, expecting accelerate to broadcast).
    if acc.distributed_type == DistributedType.FSDP:
        raise UserError("launched with an accelerate FSDP config: llmfast shards by itself; launch without it "
                        "(torchrun, or a multi-GPU accelerate config) and set train.fsdp: true")
    if acc.mixed_precision != "no":
        raise UserError(f"launched with accelerate mixed precision {acc.mixed_precision}: llmfast picks the dtype "
                        "itself; launch without it and set train.dtype")
    return acc


def _setup(recipe: FinetuneRecipe, resume: bool) -> Run:
    """Launch, model, data and the resume checks: everything that can be wrong, before any output exists."""
    from llmfast.modelfiles import describe_model_dir
    from llmfast.models import load_tokenizer, resolve_model

    tc, dc = recipe.train, recipe.data
    out, resume, afresh = check_run_output(recipe, resume)
    acc = _accelerator()
    if afresh:
        start_afresh(acc, out)
    torch.manual_seed(tc.seed)
    with acc.main_process_first():
        model_path = resolve_model(recipe.model)
    check_rows_fit(model_path, dc)  # preflight checked a local folder's; the models resolved here are checked here
    tokenizer = load_tokenizer(model_path)
    data = run_data(recipe, tokenizer, acc, describe_model_dir(model_path)["vocab"], Path(model_path), out, resume)
    rows, eval_rows = data.rows, data.eval_rows
    dtype = pick_compute_dtype(tc.dtype)
    if tc.fsdp:
        from llmfast.quant import already_quantized

        # a saved NF4 artifact is 4-bit too: FSDP would shard its packed weights
        sharding.check_recipe(recipe.quantization is not None or bool(already_quantized(Path(model_path))), dtype,
                              tc.optimizer)
    micro_per_step = tc.grad_accum * acc.num_processes
    total_steps = tc.steps or max(1, math.ceil(tc.epochs * math.ceil(len(rows) / tc.batch_size) / micro_per_step))
    if tc.batch_size * micro_per_step > len(rows) * max(1, tc.epochs) and tc.steps is None:
        _note(acc, "llmfast: warning: fewer rows than one optimizer step needs; steps repeat the data")
    fsdp = acc.num_processes > 1 and tc.fsdp
    ckpt, step, saved, window = None, 0, None, (0.0, 0)
    if resume:  # the checkpoint's files before the model loads: a damaged one is then the only line printed
        ckpt = ckpts.latest_checkpoint(out)
        assert ckpt is not None
        state = ckpts.read_state(ckpt)
        ckpts.check_resumable(ckpt, state, total_steps, fsdp, acc.num_processes)
        ckpts.check_same_rows(out, data.digest)  # the rows themselves, not only their count
        step, window = state["step"], tuple(state.get("window", window))  # none in an older checkpoint
        saved = ckpts.read_training_state(ckpt, fsdp, acc.device, dtype == "float16", acc.num_processes)
        ckpts.check_fit(saved, ckpt, recipe.lora.r, _logical_shapes(Path(model_path)), Path(model_path))
        ckpts.kept_log_lines(out / "train_log.jsonl", step)  # a line llmfast did not write, refused here too
    model = attach_lora(load_base(str(model_path), recipe, dtype, acc.device.type), recipe)
    trainable, total_params = trainable_parameters(model)
    # Checked also with one process, so a recipe is refused before it is launched on several.
    layers = sharding.check_model(model) if tc.fsdp else []
    if saved is not None:
        ckpts.load_adapter(model, ckpt, saved)
    _note(acc, data.said)
    return Run(recipe, out, acc, fsdp, model_path, tokenizer, model, layers, dtype, rows, eval_rows, total_steps,
               trainable, total_params, ckpt=ckpt, saved=saved, start_step=step, window=window, data=data)


def _logical_shapes(model_path: Path) -> dict[str, list[int]] | None:
    """The base model's weight shapes as stored, where they are the layers' shapes (not a saved 4-bit artifact)."""
    from llmfast.modelfiles import stored_shapes
    from llmfast.quant import already_quantized

    if already_quantized(model_path):
        return None
    return stored_shapes(model_path, f"re-create the model in {model_path}")


def _prepare_training(run: Run) -> None:
    """Shard, build optimizer, schedule and loss scaler, restore them on resume, and wrap the loss for DDP."""
    from transformers import get_cosine_schedule_with_warmup

    tc, acc = run.recipe.train, run.acc
    if run.fsdp:
        sharding.shard_decoder_layers(run.model, run.layers, acc.device.type, run.world)
    # After sharding: the optimizer must hold the sharded parameters.
    run.optimizer = make_optimizer([p for p in run.model.parameters() if p.requires_grad],
                                   "adamw_torch" if run.fsdp and tc.optimizer == "auto" else tc.optimizer, tc.lr,
                                   tc.weight_decay, acc.device.type == "cuda" and not run.fsdp)
    run.scheduler = get_cosine_schedule_with_warmup(run.optimizer, round(tc.warmup_ratio * run.total_steps),
                                                    run.total_steps)
    # float16 (GPUs without bfloat16) cannot hold small gradients: scale the loss up and the gradients back
    # down, skipping a step whose gradients overflowed, as torch.amp does; bfloat16 and float32 need none.
    run.scaler = torch.amp.GradScaler(acc.device.type) if run.dtype == "float16" else None
    assert run.data is not None
    save_run_data(acc, run.out, run.data)  # before base.json: a run whose base.json is there has its examples saved
    if run.ckpt is not None:
        ckpts.load_training_state(run.saved, run.ckpt, run.model, run.optimizer, run.scheduler, run.scaler,
                                  run.fsdp, acc.process_index, acc.device)
        run.saved = None
        if acc.is_main_process:
            ckpts.drop_stale(run.out, run.start_step)
        _note(acc, f"llmfast: resuming {run.out} from step {run.start_step} of {run.total_steps}")
    elif acc.is_main_process:
        run.out.mkdir(parents=True, exist_ok=True)
        ckpts.record_run(run.out, recipe_dict(run.recipe), run.model_path, run.data.digest)
    acc.wait_for_everyone()
    loss_module = _LossModule(run.model, tc.loss_chunk_size)
    run.wrapped = loss_module if run.fsdp else acc.prepare(loss_module)  # sharded layers synchronise themselves


def train_step(run: Run, step: int) -> tuple[float, int]:
    """One optimizer step over this process's share of the step's micro-batches: (mean loss, real tokens)."""
    acc, tc = run.acc, run.recipe.train
    rank, world = acc.process_index, run.world
    batch_list = run.step_batches(step)
    step_targets = sum(b.target_tokens for b in batch_list)
    mine = batch_list[rank::world]
    step_loss = torch.zeros((), device=acc.device)
    for i, b in enumerate(mine):
        last = i == len(mine) - 1
        if run.fsdp:
            sharding.set_gradient_sync(run.layers, last)
        sync = contextlib.nullcontext() if last or run.fsdp else acc.no_sync(run.wrapped)
        with sync:
            loss_sum = run.wrapped(**b.tensors(acc.device))
            # DDP and FSDP average gradients over processes, hence the factor `world`.
            loss = loss_sum / step_targets * world
            acc.backward(run.scaler.scale(loss) if run.scaler is not None else loss)
        step_loss += loss_sum.detach().float()
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)  # before clipping, so the norm is of the true gradients
    if tc.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), tc.max_grad_norm)  # sharded ones too
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    elif not optimizer_step(run.optimizer):  # a rate near float32's largest value: Adam's update overflows
        raise _diverged(run, f"the update overflowed float32 at step {step + 1}")
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return acc.reduce(step_loss, reduction="sum").item() / step_targets, sum(b.real_tokens for b in batch_list)


def evaluate(run: Run, batches: Sequence[Batch] | None = None) -> float | None:
    """Mean loss per target token over the held-out rows (or `batches`), summed over processes."""
    acc = run.acc
    if batches is None and not run.eval_rows:
        return None
    # The unwrapped module: a DDP forward would sync buffers, a collective that processes with no
    # eval batch of their own would never join.
    inner = acc.unwrap_model(run.wrapped)
    inner.eval()
    total = torch.zeros(2, device=acc.device)
    with torch.no_grad():
        for batch, counted in _eval_batches(run, batches):
            loss_sum = inner(**batch.tensors(acc.device)).detach().float()
            if counted:
                total[0] += loss_sum
                total[1] += batch.target_tokens
    total = acc.reduce(total, reduction="sum")
    inner.train()
    return (total[0] / total[1]).item()


def _eval_batches(run: Run, batches: Sequence[Batch] | None) -> Iterator[tuple[Batch, bool]]:
    """This process's share of the held-out batches (or of `batches`), each collated as its turn comes (all of them
    collated up front held every held-out token again, on every process), with whether it counts. Under FSDP every
    process runs as many forwards as the others (each gathers the layers' weights with them): one without a batch
    of its own runs the first batch again and counts nothing."""
    bs, pad_id, rank, world = run.recipe.train.batch_size, run.tokenizer.pad_token_id, run.acc.process_index, run.world
    n = len(batches) if batches is not None else -(-len(run.eval_rows) // bs)
    rounds = -(-n // world) * world if run.fsdp else n
    for i in range(rank, rounds, world):
        j = i if i < n else 0
        yield (batches[j] if batches is not None else collate(run.eval_rows[j * bs : (j + 1) * bs], pad_id)), i < n


def _train(run: Run) -> dict[str, Any]:
    """The loop: steps, the log every `log_every`, evaluations and checkpoints; returns the loop's figures."""
    import json

    tc, acc, log_path = run.recipe.train, run.acc, run.out / "train_log.jsonl"
    train_seconds, tokens_seen, last_loss = 0.0, 0, float("nan")
    first = (0, 0.0)  # this invocation's first step's tokens and seconds: its warm-up, left out of the speed
    window_loss, window_steps = run.window  # a resumed run's first line averages the steps before the kill too
    # `disable` only to silence the other processes: passed at all, it overrode tqdm's TQDM_DISABLE=1
    bar = tqdm(total=run.total_steps, initial=run.start_step, desc="finetune", unit="step",
               **({} if acc.is_main_process else {"disable": True}))
    run.wrapped.train()
    for step in range(run.start_step, run.total_steps):
        t0 = time.perf_counter()
        step_loss, tokens = train_step(run, step)
        if not math.isfinite(step_loss):  # diverged (the same on every process: the loss is reduced over them)
            bar.close()
            raise _diverged(run, f"the training loss became {step_loss} at step {step + 1}")
        train_seconds += time.perf_counter() - t0
        tokens_seen += tokens
        if step == run.start_step:
            first = (tokens_seen, train_seconds)
        speed = steady_tokens_per_s(tokens_seen, train_seconds, *first) or 0.0
        window_loss, window_steps = window_loss + step_loss, window_steps + 1
        done = step + 1
        mem = peak_memory_gib(acc.device.type)
        # The figures first, painted by update's own repaint: set_postfix's refresh painted every step a second time,
        # past tqdm's mininterval (a log file's pacing)
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{speed:.0f}", mem=f"{mem:.2f}GiB", refresh=False)
        bar.update(1)
        fresh_eval = None
        if tc.eval_every and done % tc.eval_every == 0 and done != run.total_steps:
            fresh_eval = evaluate(run)
        # an evaluation's step gets a line of its own: with eval_every 2 and log_every 3 steps 2 and 4 were
        # evaluated and their losses thrown away (s47)
        if done % tc.log_every == 0 or done == run.total_steps or fresh_eval is not None:
            last_loss = window_loss / window_steps
            if acc.is_main_process:
                entry = {"step": done, "loss": round(last_loss, 6), "lr": run.scheduler.get_last_lr()[0],
                         "tokens_per_s": round(speed, 1), "peak_mem_gib": round(mem, 3)}
                if fresh_eval is not None:
                    entry["eval_loss"] = round(fresh_eval, 6)
                if run.scaler is not None:
                    entry["loss_scale"] = run.scaler.get_scale()
                append_line(log_path, json.dumps(finite(entry)))
            window_loss, window_steps = 0.0, 0
        if tc.save_every and done % tc.save_every == 0 and done != run.total_steps:
            ckpts.save_checkpoint(acc, run.model, run.optimizer, run.scheduler, run.scaler, run.out, done,
                                  run.total_steps, tc.keep_checkpoints, run.fsdp, run.world,
                                  (window_loss, window_steps))
    bar.close()
    return {"train_seconds": train_seconds, "tokens_seen": tokens_seen, "last_loss": last_loss,
            "first_step_tokens": first[0], "first_step_seconds": first[1]}


def _diverged(run: Run, what: str) -> UserError:
    """The usual cause first: float16's range where the run computes in it, then the rate, and clipping when off."""
    tc = run.recipe.train
    fixes = ["train.dtype bfloat16 or float32 (float16's range is small)"] if run.dtype == "float16" else []
    fixes.append("lower train.lr")
    if tc.max_grad_norm is None:
        fixes.append("set train.max_grad_norm (clipping is off)")
    return UserError(f"finetune: {what} (train.lr {tc.lr}): {', or '.join(fixes)}, or look for broken rows in "
                     f"the data; no adapter was saved (start again into another output, or remove {run.out})")


def _save_adapter(run: Run, metrics: dict[str, Any]) -> None:
    """The final adapter (a PEFT directory with our manifest) and metrics.json; checkpoints are then dropped."""
    from llmfast.loading import save_tokenizer

    q = run.recipe.quantization
    lora_state = sharding.full_lora_state(run.model) if run.fsdp else None  # a collective: every process
    if run.acc.is_main_process:
        for config in run.model.peft_config.values():  # PEFT writes a set as a list in the process's hash order
            if isinstance(config.target_modules, set):
                config.target_modules = sorted(config.target_modules)
        with atomic_dir(run.out / "adapter", overwrite=True) as tmp:
            run.model.save_pretrained(tmp, state_dict=lora_state)
            save_tokenizer(run.tokenizer, tmp)
            write_manifest(tmp, stage="finetune", parents=[run.recipe.model], recipe=recipe_dict(run.recipe),
                           metrics=metrics, base_model_path=str(run.model_path),
                           quantization=q.manifest() if q is not None else None)
        atomic_write_json(run.out / "metrics.json", metrics)
        shutil.rmtree(run.out / "checkpoints", ignore_errors=True)
        if foreign_encoded(run.out) is None:  # the rows --resume reads; a user's own folder of that name stays
            shutil.rmtree(run.out / ENCODED, ignore_errors=True)
    run.acc.wait_for_everyone()


def run_finetune(recipe: FinetuneRecipe, resume: bool = False) -> dict[str, Any]:
    """Train the recipe's adapter into recipe.output (the run folder); return the metrics. One run at a time per
    output (output_lock.py: two would interleave their checkpoints and logs), taken by the first process."""
    from llmfast.output_lock import output_lock

    check_output(recipe.output, overwrite=True, inputs=recipe.inputs())  # a bad path refused before its lock
    main = int(os.environ.get("RANK", "0")) == 0
    with output_lock(recipe.output) if main else contextlib.nullcontext(), _callers_rng():
        return _run_finetune(recipe, resume)


def _callers_rng() -> contextlib.AbstractContextManager[Any]:
    """The run seeds torch's global generators with train.seed (LoRA's initial weights and dropout draw from them);
    a caller in the same process (a notebook, a script that seeded torch) has its own sequence back after the run,
    or its error: it went on from train.seed's instead, the same after every run. A launch's workers (torchrun)
    end with the run, and reading every GPU's generator there would start CUDA on all of them in each worker."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return contextlib.nullcontext()
    return torch.random.fork_rng(devices=range(torch.cuda.device_count()))  # none without CUDA


def _run_finetune(recipe: FinetuneRecipe, resume: bool) -> dict[str, Any]:
    run = _setup(recipe, resume)
    _prepare_training(run)
    t_start = time.perf_counter()
    loop = _train(run)
    eval_loss = evaluate(run)
    # The last update, which no training loss checked (a rate that broke it saved a NaN-making adapter, exit 0, s46):
    # by the held-out loss, or without held-out rows by the loss of the last step's own batches.
    if eval_loss is not None and not math.isfinite(eval_loss):
        raise _diverged(run, f"the held-out loss became {eval_loss} after the last step")
    if eval_loss is None:
        again = evaluate(run, run.step_batches(run.total_steps - 1))
        if again is not None and not math.isfinite(again):
            raise _diverged(run, f"the training loss became {again} after the last step (on its own batches)")
    metrics = run_metrics(run, loop, eval_loss, time.perf_counter() - t_start, resume)
    _save_adapter(run, metrics)
    if recipe.export_merged and run.acc.is_main_process:
        from llmfast.finetune.export import export_merged

        export_merged(run.out / "adapter", run.out / "merged", overwrite=True)  # this run's own output
    run.acc.wait_for_everyone()
    return metrics
