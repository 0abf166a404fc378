"""Making a model ternary: post-training rounding, or quantization-aware training distilled from the original."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmfast.errors import UserError
from llmfast.quant.bitnet.convert import replace_linears, save_ternary, to_bitlinear, to_ternary
from llmfast.quant.bitnet.layers import BitLinear

if TYPE_CHECKING:
    from llmfast.distill import DistillSettings
    from llmfast.quant.bitnet import BitNetConfig


def qat_device(cfg: "BitNetConfig") -> torch.device:
    """The device QAT trains on: `cuda` needs a GPU that torch sees; `auto` takes one when there is one."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("bitnet: quantization.device is cuda but torch sees no CUDA GPU here: set it to auto or cpu")
    return torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")


def strength_at(cfg: "BitNetConfig", step: int) -> float:
    """Quantization strength lambda for a step: a linear ramp 0 -> 1 over the warm-up, then 1."""
    warm = int(cfg.lambda_warmup * cfg.qat_steps)
    return 1.0 if warm == 0 else min(1.0, step / warm)


def set_strength(model: torch.nn.Module, lam: float) -> None:
    for m in model.modules():
        if isinstance(m, BitLinear):
            m.lam = lam


def qat_settings(cfg: "BitNetConfig") -> "DistillSettings":
    from llmfast.distill import DistillSettings

    return DistillSettings(steps=cfg.qat_steps, lr=cfg.lr, batch_size=cfg.batch_size, save_every=cfg.save_every)


def prepare_student(model: Any) -> list[str]:
    """BitLinear in place of every Linear but the head; embeddings (tied to the head) stay frozen."""
    names = replace_linears(model, to_bitlinear)
    for p in model.get_input_embeddings().parameters():
        p.requires_grad_(False)
    head = model.get_output_embeddings()
    if head is not None:
        for p in head.parameters():
            p.requires_grad_(False)
    return names


def quantize_bitnet(model_dir: Path, cfg: "BitNetConfig", out_dir: Path, *, tokenizer: Any, rows: torch.Tensor | None,
                    heldout: torch.Tensor | None = None, dtype: str = "float32", work_dir: Path,
                    resume: bool = False, **_: Any) -> dict[str, Any]:
    """Write the ternary model of `model_dir` into `out_dir`; `rows` are training windows (token ids), `heldout`
    windows never trained on (the start of the evaluated text), on which the KL to the teacher is measured."""
    from llmfast.loading import from_pretrained
    from llmfast.sparse.relu_cut import apply_config_cut

    from llmfast.calibration import interleave
    from llmfast.distill import distill, gpu_autocast, heldout_scores, teacher_samples

    if cfg.qat_steps and rows is None:
        raise UserError("bitnet: qat_steps > 0 trains on text: give the recipe a `data:` section (e.g. "
                        "data: {text: eval/text/persuasion.txt})")
    if cfg.qat_steps:  # before any model loads: the text's windows and the samples the teacher will write
        from llmfast.distill import check_batch, check_samples

        check_samples(cfg.teacher_samples, rows.shape[1], "quantization.teacher_samples")
        check_batch(cfg.batch_size, len(rows) + cfg.teacher_samples, "BitNet QAT", "quantization.batch_size")
        if cfg.eval_every and heldout is None:  # the curve asked for would silently not be measured
            from llmfast.quant.base import no_heldout_window

            raise UserError(no_heldout_window("quantization.eval_every", rows.shape[1]))
    torch_dtype = getattr(torch, dtype)
    model = from_pretrained(model_dir, dtype)
    apply_config_cut(model, model_dir)  # a relufy source's cut: the model eval runs, which QAT distils from
    metrics: dict[str, Any] = {"qat_steps": cfg.qat_steps}
    if cfg.qat_steps:
        device = qat_device(cfg)
        autocast = gpu_autocast(device, torch_dtype)  # on a GPU: bfloat16 forward passes
        metrics |= {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "autocast": str(autocast).removeprefix("torch.") if autocast else None}
        model.to(device)
        teacher = from_pretrained(model_dir, dtype).to(device).eval()
        apply_config_cut(teacher, model_dir)
        samples = teacher_samples(teacher, tokenizer, cfg.teacher_samples, rows.shape[1], cfg.seed)
        # Spread among the text rows, which the steps walk in order: appended, a run of fewer steps than rows never
        # reached them (the seed then changed nothing, and the manifest counted samples never trained on).
        data = interleave(rows, samples, len(samples)) if len(samples) else rows

        def evaluate() -> dict[str, Any]:  # the fully ternary model (strength 1) of this step, on held-out text
            lam = _strength(model)
            set_strength(model, 1.0)
            try:
                return {k: round(v, 6) for k, v in heldout_scores(model, teacher, heldout).items()}
            finally:
                set_strength(model, lam)

        # Each BitLinear is made as an nn.Linear, whose initial weights (replaced at once) are drawn from torch's
        # global generator, as any dropout in training would be: a script that seeded torch went on from another
        # sequence after a QAT run
        with torch.random.fork_rng(devices=[_index(device)] if device.type == "cuda" else []):
            converted = prepare_student(model)
            metrics |= distill(model, teacher, data, qat_settings(cfg), work_dir, resume=resume,
                               before_step=lambda step: set_strength(model, strength_at(cfg, step)),
                               log_extra=lambda: {"lambda": _strength(model)}, desc="BitNet QAT",
                               evaluate=evaluate if heldout is not None else None, eval_every=cfg.eval_every,
                               autocast=autocast, lr_key="quantization.lr")
        set_strength(model, 1.0)
        # made, and of them those inside the rows the steps reached (a walk in order, wrapping round)
        is_sample = interleave(torch.zeros(len(rows)), torch.ones(len(samples)), len(samples)) if len(samples) \
            else torch.zeros(len(rows))
        metrics |= {"teacher_samples": len(samples),
                    "teacher_samples_trained": int(is_sample[:cfg.qat_steps * cfg.batch_size].sum())}
        for name in converted:  # the trained full-precision weights, rounded for the last time
            model.set_submodule(name, to_ternary(model.get_submodule(name)))
        if heldout is not None:  # the final ternary model (rounded, strength 1)
            metrics |= {k: round(v, 6) for k, v in heldout_scores(model, teacher, heldout).items()}
        if device.type == "cuda":
            metrics["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        model.to("cpu")
        del teacher
    else:
        replace_linears(model, to_ternary)
    metrics["weights_file_bytes"] = save_ternary(model, tokenizer, out_dir)
    log = work_dir / "train_log.jsonl"
    if cfg.qat_steps and log.is_file():  # the work directory goes once the artifact is complete; the log stays
        shutil.copy2(log, out_dir / "train_log.jsonl")
    metrics["ternary_linear_bytes"] = sum(
        m.weight.numel() // 4 + m.weight_scale.numel() * m.weight_scale.element_size()
        for m in model.modules() if type(m).__name__ == "TernaryLinear")
    return metrics


def _strength(model: torch.nn.Module) -> float:
    return next((m.lam for m in model.modules() if isinstance(m, BitLinear)), 1.0)


def _index(device: torch.device) -> int:
    """A CUDA device's index (`cuda` alone: the current one)."""
    return device.index if device.index is not None else torch.cuda.current_device()
