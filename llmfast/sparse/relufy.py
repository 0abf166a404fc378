"""ReLU-fication: swap the gated MLP's SiLU for ReLU, then recover quality by distillation from the original.

Mirzadeh, Alizadeh, Mehta, Del Mundo, Tuzel, Samei, Rastegari, Farajtabar. "ReLU Strikes Back: Exploiting
Activation Sparsity in Large Language Models", 2023, arXiv:2310.04564 (stage 1: the MLP activation only).
With act = ReLU the MLP activation relu(gate(x)) * up(x) is exactly zero wherever gate(x) <= 0, so those
rows of gate/up and columns of down need not be computed. The swap costs quality; it is recovered by
training every weight of the ReLU model to match the original model's next-token distribution (KL of the
original's logits to the student's) on the text after the evaluated span. Optionally an L1 penalty on the
MLP activation, as in ProSparse (Song et al. 2024, arXiv:2402.13516), pushes more of it to zero.

The artifact is a plain Hugging Face Llama directory with `hidden_act: relu`: transformers loads it as it
is. vLLM's Llama implementation accepts SiLU only, so vLLM refuses it (the transformers engine serves it).
Training is resumable: checkpoints (safetensors weights, optimizer state read back with
torch.load(weights_only=True), state.json) and train_log.jsonl live in the job's work directory until the
artifact is complete.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, NonNegativeInt, PositiveInt

from llmfast.errors import UserError
from llmfast.sparse.base import SPARSIFIERS, Sparsifier, SparseConfigBase, SparsifyJob, gated_mlps

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


class RelufyConfig(SparseConfigBase):
    steps: NonNegativeInt = 100  # recovery steps (0: the swap alone); tokens = steps x batch_size x data.window
    batch_size: PositiveInt = 4  # windows per step
    lr: float = Field(2e-5, gt=0)
    warmup_steps: NonNegativeInt = 0  # linear warmup, then cosine decay to 10% of lr
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    l1: float = Field(0.0, ge=0)  # ProSparse-style L1 pressure on the MLP activation (0: off)
    seed: int = 0  # order of the training windows
    log_every: PositiveInt = 1
    save_every: PositiveInt | None = None  # checkpoint every N steps for --resume (null: none)
    keep_checkpoints: PositiveInt = 1


def relu_swap(model: "PreTrainedModel") -> None:
    """SiLU -> ReLU in every gated MLP, and in the config so the saved model loads with ReLU."""
    import torch

    for mlp in gated_mlps(model):
        mlp.act_fn = torch.nn.ReLU()
    model.config.hidden_act = "relu"


def kl_to_teacher(student_logits: "torch.Tensor", teacher_logits: "torch.Tensor") -> "torch.Tensor":
    """Mean over tokens of KL(teacher || student) of the next-token distributions."""
    import torch.nn.functional as F

    s = F.log_softmax(student_logits.float(), dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher_logits.float(), dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def heldout_kl(student: "PreTrainedModel", teacher: "PreTrainedModel", windows: "torch.Tensor") -> float:
    import torch

    total = 0.0
    with torch.inference_mode():
        for row in windows:
            ids = row[None].to(student.device)
            total += float(kl_to_teacher(student(ids).logits, teacher(ids).logits))
    return total / windows.shape[0]


def _lr(cfg: RelufyConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / span)))


def _batch(rows: "torch.Tensor", cfg: RelufyConfig, step: int) -> "torch.Tensor":
    """The windows of `step`: a fresh shuffle of all windows per pass, a function of (seed, step) alone."""
    picked = []
    for j in range(step * cfg.batch_size, (step + 1) * cfg.batch_size):
        epoch, pos = divmod(j, rows.shape[0])
        order = list(range(rows.shape[0]))
        random.Random(cfg.seed * 100_003 + epoch).shuffle(order)
        picked.append(order[pos])
    return rows[picked]


def _latest_checkpoint(work: Path) -> Path | None:
    found = sorted(p for p in (work / "checkpoints").glob("step-*") if (p / "state.json").is_file())
    return found[-1] if found else None


def _save_checkpoint(work: Path, student: Any, optimizer: Any, step: int, cfg: RelufyConfig) -> None:
    import torch
    from safetensors.torch import save_model

    from llmfast.artifacts import atomic_dir, atomic_write_json

    with atomic_dir(work / "checkpoints" / f"step-{step:06d}", overwrite=True) as tmp:
        save_model(student, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        atomic_write_json(tmp / "state.json", {"step": step, "config": cfg.model_dump(mode="json")})
    for old in sorted((work / "checkpoints").glob("step-*"))[: -cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)


def _resume(work: Path, student: Any, optimizer: Any, cfg: RelufyConfig) -> int:
    """Load the latest checkpoint into student and optimizer; return its step (0 without one)."""
    import torch
    from safetensors.torch import load_model

    ckpt = _latest_checkpoint(work)
    if ckpt is None:
        raise UserError(f"--resume: {work} has no complete checkpoint (set sparsify.config.save_every to make some)")
    state = json.loads((ckpt / "state.json").read_text())
    if state["config"] != cfg.model_dump(mode="json"):
        raise UserError(f"--resume: {ckpt} was written with other sparsify.config settings: resume with the same recipe")
    load_model(student, ckpt / "model.safetensors", device=str(student.device))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=student.device, weights_only=True))
    log = work / "train_log.jsonl"
    if log.is_file():  # drop lines of steps that will run again
        from llmfast.artifacts import atomic_write_text

        kept = [l for l in log.read_text().splitlines() if json.loads(l)["step"] <= state["step"]]
        atomic_write_text(log, "".join(l + "\n" for l in kept))
    return int(state["step"])


def _activation_taps(model: "PreTrainedModel") -> tuple[list, list]:
    """Hooks keeping each MLP's activation (down_proj's input) of the latest forward; (store, handles)."""
    store: list = [None] * len(gated_mlps(model))

    def keep(i: int) -> Any:
        def hook(mod: Any, args: tuple) -> None:
            store[i] = args[0]
        return hook

    return store, [m.down_proj.register_forward_pre_hook(keep(i)) for i, m in enumerate(gated_mlps(model))]


def train(job: SparsifyJob, cfg: RelufyConfig, student: "PreTrainedModel") -> dict[str, Any]:
    """Distil `job.model` (the teacher) into `student` for `cfg.steps` steps; log to job.work_dir."""
    import torch
    from tqdm.auto import tqdm

    from llmfast.sparse.measure import windows

    rows = windows(job.train_ids, job.window, "training text")
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    job.work_dir.mkdir(parents=True, exist_ok=True)
    start = _resume(job.work_dir, student, optimizer, cfg) if job.resume else 0
    store, handles = _activation_taps(student)
    student.train()
    bar = tqdm(total=cfg.steps, initial=start, desc="relufy", unit="step")
    t0, seen = time.perf_counter(), 0
    try:
        for step in range(start, cfg.steps):
            ids = _batch(rows, cfg, step).to(student.device)
            with torch.no_grad():
                target = job.model(ids).logits
            kl = kl_to_teacher(student(ids).logits, target)
            l1 = torch.stack([a.abs().float().mean() for a in store]).mean()
            loss = kl + cfg.l1 * l1 if cfg.l1 else kl
            loss.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            for g in optimizer.param_groups:
                g["lr"] = _lr(cfg, step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seen += ids.numel()
            done = step + 1
            kl_v, l1_v = kl.detach().item(), l1.detach().item()
            sparsity = [round(float((a == 0).float().mean()), 5) for a in store]
            bar.update(1)
            bar.set_postfix(kl=f"{kl_v:.4f}", sparsity=f"{sum(sparsity) / len(sparsity):.3f}")
            if done % cfg.log_every == 0 or done == cfg.steps:
                entry = {"step": done, "tokens": done * ids.numel(), "kl": round(kl_v, 6),
                         "l1": round(l1_v, 6), "lr": _lr(cfg, step),
                         "sparsity_mean": round(sum(sparsity) / len(sparsity), 5), "sparsity_per_layer": sparsity}
                with (job.work_dir / "train_log.jsonl").open("a") as f:
                    f.write(json.dumps(entry) + "\n")
            if cfg.save_every and done % cfg.save_every == 0 and done != cfg.steps:
                _save_checkpoint(job.work_dir, student, optimizer, done, cfg)
    finally:
        bar.close()
        for h in handles:
            h.remove()
    student.eval()
    elapsed = time.perf_counter() - t0
    return {"steps": cfg.steps, "resumed_from_step": start if job.resume else None,
            "train_tokens": cfg.steps * cfg.batch_size * job.window,
            "train_tokens_per_s": round(seen / elapsed, 1) if seen else None}


@SPARSIFIERS.register("relufy")
class Relufy(Sparsifier):
    name = "relufy"
    Config = RelufyConfig
    paper = "Mirzadeh et al. 2023, ReLU Strikes Back: Exploiting Activation Sparsity in Large Language Models"
    trains = True

    def sparsify(self, job: SparsifyJob, cfg: Any, out_dir: Path) -> dict[str, Any]:
        from transformers import AutoModelForCausalLM

        from llmfast.models import torch_dtype
        from llmfast.sparse.measure import measure_sparsity

        job.model.requires_grad_(False)
        student = AutoModelForCausalLM.from_pretrained(job.model_path, dtype=torch_dtype(job.dtype))
        student.to(job.model.device)
        relu_swap(student)
        kl_swap_only = heldout_kl(student, job.model, job.heldout)
        metrics = train(job, cfg, student)
        metrics["heldout_kl"] = {"relu_untrained": round(kl_swap_only, 6),
                                 "relu_trained": round(heldout_kl(student, job.model, job.heldout), 6)}
        metrics["heldout_sparsity"] = measure_sparsity(student, job.heldout)
        student.save_pretrained(out_dir, safe_serialization=True)
        job.tokenizer.save_pretrained(out_dir)
        log = job.work_dir / "train_log.jsonl"
        if log.is_file():
            shutil.copy2(log, out_dir / "train_log.jsonl")
        return metrics
