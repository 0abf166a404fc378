"""Knowledge distillation from a full-precision teacher: the recovery loop of compressed models.

Used where a model is changed in a way that costs quality and then trained back towards the original:
1.58-bit quantization-aware training (quant/bitnet) and ReLU-fication (sparse/relufy). The loss is the
token-level KL divergence KL(teacher || student) of the next-token distributions (Hinton et al. 2015), on
windows of text. Data can include samples the teacher generates itself, as in data-free QAT (LLM-QAT, Liu et
al. 2023, arXiv:2305.17888), so no outside data set is needed.

Batches go to the student's device (a GPU when the model is there); `distill(autocast=torch.bfloat16)` runs the
forward passes in bfloat16 mixed precision (float32 weights and optimizer state), as GPU training usually does.

Resumable: every `save_every` steps the trainable weights (safetensors), the optimizer state (tensors only,
read back with `weights_only=True`) and `state.json` go to `WORK/checkpoints/step-NNNNNN/`; batches are a
function of the step, so a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from llmfast.artifacts import append_line, atomic_dir, atomic_write_json, finite, latest_step, step_folders
from llmfast.work_dir import mark_work_dir
from llmfast.errors import UserError
from llmfast.finetune.optimizers import optimizer_step


@dataclasses.dataclass(frozen=True)
class DistillSettings:
    steps: int
    lr: float = 2e-4
    batch_size: int = 4
    warmup_ratio: float = 0.05
    temperature: float = 1.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    save_every: int = 50
    log_every: int = 10


class _ChunkedKL(torch.autograd.Function):
    """t^2 * mean over positions of KL(teacher || student) with its gradient computed in the forward pass, chunk by
    chunk: autograd kept the float32 log-softmaxes of every position for the backward pass, three copies of the
    logits at the peak; here the gradient (d/dz = t * (softmax(z_s / t) - softmax(z_t / t)) / N), in the logits'
    dtype, is the one copy."""

    @staticmethod
    def forward(ctx: Any, student: torch.Tensor, teacher: torch.Tensor, t: float, step: int) -> torch.Tensor:
        n = len(student)
        grad = torch.empty_like(student) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float64, device=student.device)
        for i in range(0, n, step):
            log_q = F.log_softmax(student[i: i + step].float() / t, dim=-1)
            log_p = F.log_softmax(teacher[i: i + step].float() / t, dim=-1)
            total += F.kl_div(log_q, log_p, log_target=True, reduction="sum").double()
            if grad is not None:
                grad[i: i + step] = (log_q.exp_() - log_p.exp_()).mul_(t / n)
        ctx.save_for_backward(grad)
        return (total / max(n, 1) * t * t).float()

    @staticmethod
    def backward(ctx: Any, out: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        (grad,) = ctx.saved_tensors
        return (grad.mul_(out.to(grad.dtype)) if grad is not None else None), None, None, None  # backward runs once


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                  chunk: int | None = None) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student), scaled by T^2 so gradients keep their size across T, computed
    `chunk` positions at a time (default: about 2**24 logits a chunk; the whole batch's float32 log-softmaxes were
    three copies of its logits: at a 128K vocabulary and 4 windows of 512 tokens, 1 GiB each)."""
    s, p = student_logits.flatten(0, -2), teacher_logits.detach().flatten(0, -2)
    step = chunk or max(1, 2**24 // max(s.shape[-1], 1))
    return _ChunkedKL.apply(s, p, temperature, step)


def heldout_kl(student: Any, teacher: Any, rows: torch.Tensor, batch_size: int = 4) -> float:
    """KL(teacher || student) on held-out windows, for logs and reports."""
    return heldout_scores(student, teacher, rows, batch_size)["heldout_kl"]


@torch.no_grad()
def heldout_scores(student: Any, teacher: Any, rows: torch.Tensor, batch_size: int = 4) -> dict[str, float]:
    """The student's KL to the teacher and both models' perplexity on held-out windows, from one pass of each.

    Perplexity here is exp(mean next-token loss) inside each window: every window starts without context, so it
    is higher than `llmfast eval`'s strided perplexity of the same text; it is for comparing points of one run.
    Windows of one token hold no next token: the perplexities are then left out (they read 1.0, a perfect score of
    nothing), the KL, measured at every position, stays.
    """
    kl = nll_s = nll_t = 0.0
    rows_seen = tokens = 0
    device = _device(student)
    for i in range(0, len(rows), batch_size):
        batch = rows[i: i + batch_size].to(device)
        s_logits, t_logits = student(batch).logits, teacher(batch).logits
        kl += kl_to_teacher(s_logits, t_logits).item() * len(batch)
        target = batch[:, 1:].reshape(-1)
        nll_s += F.cross_entropy(s_logits[:, :-1].flatten(0, 1).float(), target, reduction="sum").item()
        nll_t += F.cross_entropy(t_logits[:, :-1].flatten(0, 1).float(), target, reduction="sum").item()
        rows_seen, tokens = rows_seen + len(batch), tokens + target.numel()
    if not tokens:
        return {"heldout_kl": kl / max(rows_seen, 1)}
    return {"heldout_kl": kl / max(rows_seen, 1), "heldout_ppl": math.exp(nll_s / tokens),
            "teacher_heldout_ppl": math.exp(nll_t / tokens)}


@torch.no_grad()
def teacher_samples(teacher: Any, tokenizer: Any, count: int, length: int, seed: int, chunk: int = 1024
                    ) -> torch.Tensor:
    """`count` rows of `length` tokens the teacher writes itself, sampled from its beginning-of-text token, on the
    teacher's device, `chunk` rows per generate call (its KV cache grows with the rows); returned on the CPU.
    Callers refuse windows of fewer than 2 tokens first (`check_samples`), before any model loads."""
    if count == 0:
        return torch.empty(0, length, dtype=torch.long)
    from tqdm.auto import tqdm

    # a tokenizer with neither BOS nor EOS (a bare tokenizer.json): the pad load_tokenizer chose (id 0) starts them
    start = next(i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, 0) if i is not None)
    device = _device(teacher)
    out = []
    # manual_seed seeds every CUDA device: fork them all (none where CUDA was never started)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):  # generate() samples with the global generator: seed it quietly
        torch.manual_seed(seed)
        # `disable` only to switch it off (one batch): passed False, it overrode tqdm's TQDM_DISABLE=1
        for first in tqdm(range(0, count, chunk), desc="teacher samples", unit="batch", file=sys.stderr,
                          **({"disable": True} if count <= chunk else {})):
            prompt = torch.full((min(chunk, count - first), 1), start, dtype=torch.long, device=device)
            rows = teacher.generate(prompt, do_sample=True, top_k=50, max_new_tokens=length - 1,
                                    min_new_tokens=length - 1,
                                    pad_token_id=start if tokenizer.pad_token_id is None else tokenizer.pad_token_id)
            out.append(rows[:, :length].cpu())
    return torch.cat(out)


def check_samples(count: int, length: int, key: str = "samples") -> None:
    """Refuse samples of `length` < 2 tokens: the start token and nothing written (generate refused max_new_tokens 0
    with a traceback). Callers check before loading models."""
    from llmfast.strict import COUNT_MAX

    if count > COUNT_MAX:  # 1e30 overflowed a C size in the sampling loop: a traceback (OverflowError)
        raise UserError(f"{key}: {count} samples: give at most {COUNT_MAX} (each is a window the model writes)")
    if count and length < 2:
        raise UserError(f"{key}: a sample is a window the model writes after its start token, and data.window is "
                        f"{length}: set data.window to at least 2, or {key} to 0")


def lr_at(settings: DistillSettings, step: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    warm = max(1, int(settings.warmup_ratio * settings.steps))
    if step < warm:
        return settings.lr * (step + 1) / warm
    progress = (step - warm) / max(1, settings.steps - warm)
    return settings.lr * 0.5 * (1 + math.cos(math.pi * progress))


def batch_at(rows: torch.Tensor, settings: DistillSettings, step: int) -> torch.Tensor:
    """The rows of step `step`: a deterministic walk through the data, so resuming repeats nothing."""
    idx = (torch.arange(settings.batch_size) + step * settings.batch_size) % len(rows)
    return rows[idx]


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _trainable(model: Any) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def latest_checkpoint(work: Path) -> Path | None:
    return latest_step(work / "checkpoints")


def rows_digest(rows: torch.Tensor) -> str:
    """sha256 of the training windows: a resumed run must train on the same rows (text, chats, their mix)."""
    import hashlib

    data = rows.detach().to("cpu", torch.int64).contiguous()
    return hashlib.sha256(str(tuple(data.shape)).encode() + data.numpy().tobytes()).hexdigest()


def save_checkpoint(work: Path, student: Any, optimizer: Any, step: int, settings: DistillSettings,
                    keep: int = 2, rows: str | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_dir(work / "checkpoints" / f"step-{step:06d}", overwrite=True) as tmp:
        save_file({n: p.detach().contiguous().cpu() for n, p in _trainable(student).items()},
                  str(tmp / "student.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        atomic_write_json(tmp / "state.json", {"step": step, "settings": dataclasses.asdict(settings), "rows": rows})
    for old in step_folders(work / "checkpoints")[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


_FIX = "delete that checkpoint folder (an earlier one is used), or start again with --overwrite"


def _checked_step(ckpt: Path, settings: DistillSettings, rows: str | None) -> int:
    """The step of `ckpt`'s state.json, checked against this run's settings and (when given) its windows' digest."""
    from llmfast.modelfiles import read_json_file

    state = read_json_file(ckpt / "state.json", "checkpoint state", _FIX)
    step = state.get("step") if isinstance(state, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= settings.steps:
        raise UserError(f"{ckpt / 'state.json'}: step {step!r} is not a step of this run (0 to {settings.steps}): "
                        f"not a checkpoint state llmfast wrote; {_FIX}")
    if state.get("settings") != json.loads(json.dumps(dataclasses.asdict(settings))):
        raise UserError(f"--resume: {ckpt} was written with other training settings: resume with the same "
                        "recipe, or start again with --overwrite")
    if rows and state.get("rows") and state["rows"] != rows:
        raise UserError(f"--resume: {ckpt} was trained on other windows (data.text, data.conversations or their "
                        "token settings changed): resume with the same recipe, or start again with --overwrite")
    return step


def _check_step(stepped: bool, loss: float, where: str, student: Any, bar: Any, desc: str, lower: str) -> None:
    """A UserError where a step diverged: its loss went NaN or inf, or its update overflowed (`stepped` False); every
    later step, and the artifact, would be NaN. The progress bar is closed first, so the line is the last. `lower`:
    the recipe key of the learning rate, and its value, the usual fix."""
    if stepped and math.isfinite(loss):
        return
    bar.close()
    fix = ("float16 weights lack the range this training needs: use dtype bfloat16 or float32"
           if next(student.parameters()).dtype == torch.float16 else f"lower {lower}")
    cause = f"the distillation loss became {loss}" if stepped else "the update overflowed float32"
    raise UserError(f"{desc}: {cause} {where}: {fix}; nothing was written")


def _check_last_update(student: Any, batch: torch.Tensor, target: torch.Tensor, settings: DistillSettings,
                       mixed: Callable[[], Any], bar: Any, desc: str, lower: str) -> None:
    """The last step's update checked as each other step's is, by the loss it gives on its batch: a rate that sent
    the weights to inf or NaN on that step wrote them (an all-NaN relufy model, and exit 0)."""
    with torch.no_grad(), mixed():
        after = kl_to_teacher(student(batch).logits, target, settings.temperature).item()
    _check_step(True, after, f"after the last step ({settings.steps})", student, bar, desc, lower)


def check_checkpoint(work: Path, settings: DistillSettings, source: Path | None = None) -> None:
    """What a resume can check without the models, run before they load (transformers' progress bar would
    otherwise print before the one error line): the latest checkpoint's state and settings, its weights file whole
    (and, given the `source` model's folder, the shape of each tensor the source also has), its optimizer state's
    form, and the log lines it keeps. `resume_from` checks their fit to the model."""
    from safetensors import safe_open

    from llmfast.finetune.checkpoint import check_optimizer_form, kept_log_lines, safe_load
    from llmfast.loading import first_line
    from llmfast.modelfiles import stored_shapes

    ckpt = latest_checkpoint(work)
    if ckpt is None:
        return
    step = _checked_step(ckpt, settings, None)
    student = ckpt / "student.safetensors"
    try:  # the header and the file's length: a truncated file is found here without reading the tensors
        with safe_open(str(student), "pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - missing, truncated or not safetensors: safetensors' own error types
        raise UserError(f"{student}: cannot be read ({type(e).__name__}: {first_line(e)}); {_FIX}") from None
    if source is not None:  # the student's weights are the source's (a tensor of another shape would broadcast)
        model = stored_shapes(source, f"re-create the model in {source}")
        odd = [n for n, shape in shapes.items() if n in model and shape != model[n]]
        if odd:
            raise UserError(f"{student}: {odd[0]} has shape {shapes[odd[0]]}, the model's is {model[odd[0]]}: it "
                            f"belongs to another model; {_FIX}")
    optimizer = ckpt / "optimizer.pt"
    check_optimizer_form(safe_load(optimizer, map_location="cpu", fix=_FIX, mmap=True), optimizer, _FIX)
    kept_log_lines(work / "train_log.jsonl", step)


def resume_from(work: Path, student: Any, optimizer: Any, settings: DistillSettings, rows: str | None = None) -> int:
    """Load the latest checkpoint into student and optimizer; return its step (0 when there is none). `rows`: the
    digest of this run's training windows, refused when the checkpoint's differs (one written before digests were
    kept is accepted)."""
    from safetensors.torch import load_file

    from llmfast.finetune.checkpoint import restore_optimizer, safe_load
    from llmfast.loading import first_line

    ckpt = latest_checkpoint(work)
    if ckpt is None:
        return 0
    step = _checked_step(ckpt, settings, rows)
    try:
        weights = load_file(str(ckpt / "student.safetensors"))
    except Exception as e:  # noqa: BLE001 - missing, truncated or not safetensors: safetensors' own error types
        raise UserError(f"{ckpt / 'student.safetensors'}: cannot be read ({type(e).__name__}: {first_line(e)}); "
                        f"{_FIX}") from None
    params = _trainable(student)
    if set(weights) != set(params):
        raise UserError(f"--resume: {ckpt} holds other weights than this model trains: start again with --overwrite")
    odd = [n for n, p in params.items() if tuple(weights[n].shape) != tuple(p.shape)]  # copy_ would broadcast
    if odd:
        raise UserError(f"{ckpt / 'student.safetensors'}: {odd[0]} has shape {list(weights[odd[0]].shape)}, the "
                        f"model's is {list(params[odd[0]].shape)}: it belongs to another model; {_FIX}")
    # on the CPU first (a GPU run may be resumed where there is none); load_state_dict moves it to each parameter
    restore_optimizer(optimizer, safe_load(ckpt / "optimizer.pt", map_location="cpu", fix=_FIX),
                      ckpt / "optimizer.pt", _FIX)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    return step


def check_batch(batch_size: int, windows: int, desc: str, key: str = "batch_size") -> None:
    """Refuse a batch of more windows than there are (`key`: the recipe's name for it): each step would hold some
    twice, and a huge one overflowed torch's index arithmetic (a traceback) or ran out of memory after the models
    loaded."""
    if batch_size > windows:
        raise UserError(f"{desc}: {key} is {batch_size}, more than the {windows} training windows there are (a step "
                        f"would repeat windows): set {key} to at most {windows}, or give more text")


def gpu_autocast(device: torch.device, dtype: torch.dtype) -> torch.dtype | None:
    """`distill`'s `autocast` for a `dtype` model on `device`: bfloat16 for a float32 model on a GPU (weights,
    gradients, AdamW state and the KL stay float32), none elsewhere."""
    return torch.bfloat16 if device.type == "cuda" and dtype == torch.float32 else None


def distill(student: Any, teacher: Any, rows: torch.Tensor, settings: DistillSettings, work: Path,
            resume: bool = False, before_step: Callable[[int], None] | None = None,
            extra_loss: Callable[[], torch.Tensor] | None = None,
            log_extra: Callable[[], dict[str, Any]] | None = None, desc: str = "distilling",
            evaluate: Callable[[], dict[str, Any]] | None = None, eval_every: int | None = None,
            autocast: torch.dtype | None = None, lr_key: str = "the learning rate") -> dict[str, Any]:
    """Train `student` towards `teacher` on `rows` (windows of token ids) for `settings.steps` steps.

    `before_step(step)` adjusts the student (a quantization-strength schedule); `extra_loss()` adds a term (an L1
    pressure on activations); `log_extra()` adds fields to each log line. `evaluate()` (held-out measurements, run
    with the student in eval mode) is logged at step 0, every `eval_every` steps and at the end: the curve of quality
    against training tokens. `autocast` (torch.bfloat16 on a GPU) runs both forward passes in that precision; weights,
    gradients, optimizer state and the loss stay float32. Callers refuse a batch of more windows than `rows`
    (`check_batch`) before any model loads. `lr_key`: the key a divergence's message says to lower. Returns metrics."""
    import contextlib

    from tqdm.auto import tqdm

    from llmfast.finetune.checkpoint import kept_log_lines  # the log lines a resumed run keeps, shared with finetune

    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.train()
    params = list(_trainable(student).values())
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    digest = rows_digest(rows)
    start = resume_from(work, student, optimizer, settings, digest) if resume else 0
    log_path = work / "train_log.jsonl"
    kept = kept_log_lines(log_path, start) if start else []  # the checkpoint's steps, read before any write
    if start:
        print(f"resuming from step {start} of {settings.steps}", file=sys.stderr)
    mark_work_dir(work)  # llmfast's: the verb removes it when the artifact is complete
    if log_path.is_file():
        log_path.write_text("".join(k + "\n" for k in kept))
    loss_value = float("nan")
    lower = f"{lr_key} ({settings.lr:g})"

    def measured() -> dict[str, Any]:
        student.eval()
        try:
            return evaluate() if evaluate is not None else {}
        finally:
            student.train()

    device = _device(student)
    mixed = (lambda: torch.autocast(device.type, dtype=autocast)) if autocast is not None else contextlib.nullcontext
    tokens_per_step = settings.batch_size * rows.shape[1]
    if evaluate is not None and eval_every and start == 0:
        append_line(log_path, json.dumps(finite({"step": 0, "tokens": 0, "lr": 0.0, **measured()})))
    bar = tqdm(total=settings.steps, initial=start, desc=desc, unit="step", file=sys.stderr)
    for step in range(start, settings.steps):
        if before_step is not None:
            before_step(step)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(settings, step)
        batch = batch_at(rows, settings, step).to(device)
        with torch.no_grad(), mixed():
            target = teacher(batch).logits
        with mixed():
            logits = student(batch).logits
        loss = kl_to_teacher(logits, target, settings.temperature)
        total = loss + extra_loss() if extra_loss is not None else loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if settings.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        loss_value = loss.item()
        done = step + 1
        _check_step(optimizer_step(optimizer), loss_value, f"at step {done}", student, bar, desc, lower)
        bar.set_postfix(kl=f"{loss_value:.4f}", refresh=False)  # painted by update, within tqdm's mininterval
        bar.update(1)
        evaluating = evaluate is not None and eval_every and (done % eval_every == 0 or done == settings.steps)
        if done % settings.log_every == 0 or done == settings.steps or evaluating:
            line = {"step": done, "tokens": done * tokens_per_step, "kl": loss_value, "lr": lr_at(settings, step),
                    **(log_extra() if log_extra else {}), **(measured() if evaluating else {})}
            append_line(log_path, json.dumps(finite(line)))
        if done % settings.save_every == 0 and done < settings.steps:
            save_checkpoint(work, student, optimizer, done, settings, rows=digest)
    if start < settings.steps:
        _check_last_update(student, batch, target, settings, mixed, bar, desc, lower)
    bar.close()
    student.eval()
    return {"steps": settings.steps, "final_kl": loss_value, "train_tokens": settings.steps * settings.batch_size
            * rows.shape[1], "train_windows": len(rows), "resumed_from": start}
