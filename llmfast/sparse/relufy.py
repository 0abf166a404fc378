"""ReLU-fication: swap the gated MLP's SiLU for ReLU, then recover quality by distillation from the original.

Mirzadeh, Alizadeh, Mehta, Del Mundo, Tuzel, Samei, Rastegari, Farajtabar. "ReLU Strikes Back: Exploiting
Activation Sparsity in Large Language Models", 2023, arXiv:2310.04564 (stage 1: the MLP activation only).
With act = ReLU the MLP activation relu(gate(x)) * up(x) is exactly zero wherever gate(x) <= 0, so those
rows of gate/up and columns of down need not be computed. The swap costs quality; it is recovered by
training every weight of the ReLU model to match the original model's next-token distribution (KL of the
original's logits to the student's) on the text after the evaluated span. Optionally an L1 penalty on the
MLP activation, as in ProSparse (Song et al. 2024, arXiv:2402.13516), pushes more of it to zero.

The artifact is a plain Hugging Face Llama directory with `hidden_act: relu` (Gemma's `hidden_activation` too):
transformers loads it as it is (model_type llama). Its config.json names the architecture
LlmfastReluLlamaForCausalLM, which our vLLM plugin registers (llmfast/serve/vllm_plugin.py; vLLM's own Llama accepts
SiLU only), so vLLM serves it too. The training loop is llmfast/distill.py's (shared with quantization-aware
training): resumable from checkpoints (safetensors weights, optimizer state read back with
torch.load(weights_only=True)) kept with train_log.jsonl in the job's work directory until the artifact is complete.
On a GPU (where `llmfast sparsify` puts the model when torch sees one) the forward passes run in bfloat16 autocast,
weights and AdamW state in float32, as bitnet QAT does; on a CPU training is as it always was
(scripts/gpu_relufy.py: relufy at a lent GPU's budget). Training windows are the text after the evaluated span, plus
the fine-tune's conversations when `data.conversations` names them (a fine-tuned model distilled on book text alone
keeps the language model and loses the skill), optionally plus samples the original model writes itself, in an order
fixed by the seed; a resume on other windows is refused.

With `target`, ReLU's cut is shifted up during training (FATReLU, ProSparse's last stage, here learned with
rather than applied afterwards): each layer keeps relu(gate(x)) only above a threshold set, at every step, to
the quantile of that step's activations that zeroes the fraction asked for, which ramps linearly from 0 to
`target` over the first `shift_warmup` of the steps (below the layer's own ReLU sparsity the threshold is 0).
The model trains through the cut, so it learns to live without the entries it removes. At the end the
thresholds are calibrated once on the calibration windows, as CATS calibrates its own (one pass, each layer on
what it sees with the earlier layers' cuts in place), and saved in config.json as `llmfast_relu_thresholds`
(one per layer): llmfast's loader and sparse runtime apply them, and so does our vLLM plugin (vLLM's FATReLU);
plain transformers ignores the key and runs the unshifted ReLU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, NonNegativeInt, PositiveInt

from llmfast.errors import UserError
from llmfast.sparse.base import (SPARSIFIERS, Sparsifier, SparseConfigBase, SparsifyJob, activation, gated_mlps,
                                 set_activation)
from llmfast.sparse.relu_cut import THRESHOLDS_KEY, calibrated_cut, install_cut
from llmfast.strict import ClipNorm, LearningRate, Seed  # float32 floors; numpy's seeds

if TYPE_CHECKING:
    import torch
    from llmfast.distill import DistillSettings
    from transformers import PreTrainedModel


class RelufyConfig(SparseConfigBase):
    steps: NonNegativeInt = 100  # recovery steps (0: the swap alone); tokens = steps x batch_size x data.window
    batch_size: PositiveInt = 4  # windows per step
    lr: LearningRate = 1e-3  # 1e-4 -> 1.2e-3 took the 85%-cut merge from x2.63 to x1.76 perplexity (BENCHMARKS)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)  # linear warmup over this fraction of steps, then cosine to 0
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: ClipNorm | None = 1.0
    l1: float = Field(0.0, ge=0)  # ProSparse-style L1 pressure on the MLP activation (0: off)
    samples: NonNegativeInt = 0  # extra training windows the original model generates itself
    seed: Seed = 0  # order of the training windows, and the samples
    log_every: PositiveInt = 1
    eval_every: PositiveInt | None = None  # held-out KL, perplexity and sparsity every N steps (and at 0 and the end)
    save_every: PositiveInt | None = None  # checkpoint every N steps for --resume (null: none)
    target: float | None = Field(None, gt=0, lt=1)  # shifted ReLU cut for this MLP sparsity per layer (null: plain ReLU)
    shift_warmup: float = Field(0.5, ge=0, le=1)  # fraction of the steps over which the cut's sparsity ramps to target


def relu_swap(model: "PreTrainedModel") -> None:
    """SiLU -> ReLU in every gated MLP, and in the config so the saved model loads with ReLU."""
    import torch

    for mlp in gated_mlps(model):
        set_activation(mlp, torch.nn.ReLU())
    # The key a reloaded model builds its MLPs from: hidden_act (Llama and most), hidden_activation (Gemma2/3), on
    # the text model's config for a multimodal one (Gemma3's text_config).
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.hidden_act = "relu"
        if getattr(config, "hidden_activation", None):
            config.hidden_activation = "relu"


def _activation_taps(model: "PreTrainedModel") -> tuple[list, list]:
    """Hooks keeping each MLP's activation (down_proj's input) of the latest forward; (store, handles)."""
    store: list = [None] * len(gated_mlps(model))

    def keep(i: int) -> Any:
        def hook(mod: Any, args: tuple) -> None:
            store[i] = args[0]
        return hook

    return store, [m.down_proj.register_forward_pre_hook(keep(i)) for i, m in enumerate(gated_mlps(model))]


class ShiftedCut:
    """During training: each layer's relu(gate(x)) kept only above a threshold that zeroes `fraction` of this
    forward's entries (a quantile, never below 0); in eval mode the last thresholds stay fixed."""

    def __init__(self, model: "PreTrainedModel") -> None:
        import torch

        mlps = gated_mlps(model)
        self.fraction = 0.0
        # on the model's device: each step writes them there and reads them back with no copy or sync (a GPU run)
        self.thresholds = torch.zeros(len(mlps), device=next(model.parameters()).device)
        self.handles = [activation(m).register_forward_hook(self._hook(i, m)) for i, m in enumerate(mlps)]

    def _hook(self, i: int, mlp: Any) -> Any:
        from llmfast.sparse.thresholds import magnitude_quantile, zero_small

        def hook(mod: Any, args: tuple, out: "torch.Tensor") -> "torch.Tensor":
            if mlp.training and self.fraction > 0:  # out = relu(gate) >= 0, so its |value| quantile is >= 0
                self.thresholds[i] = magnitude_quantile(out, self.fraction)
            # kept entries (and their gradient) pass as they are
            return zero_small(out, self.thresholds[i])
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def shift_schedule(cfg: RelufyConfig, step: int) -> float:
    """The sparsity the cut asks for at `step`: linear from 0 to `target` over `shift_warmup` of the steps."""
    ramp = round(cfg.shift_warmup * cfg.steps)
    return float(cfg.target or 0.0) * (min(1.0, (step + 1) / ramp) if ramp else 1.0)


def _training_rows(job: SparsifyJob, cfg: RelufyConfig) -> "torch.Tensor":
    import torch

    from llmfast.distill import teacher_samples

    rows = job.train_rows
    if cfg.samples:
        rows = torch.cat([rows, teacher_samples(job.model, job.tokenizer, cfg.samples, job.window, cfg.seed)])
    # Consecutive windows of one book are alike: a fixed shuffle mixes the text (and the samples) over the steps.
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed))
    return rows[order].to(job.model.device)


def _check_same_config(work: Path, cfg: RelufyConfig, resume: bool) -> None:
    """distill.py checks its own settings on resume; the keys it does not see (l1, samples, seed) are checked here."""
    from llmfast.artifacts import atomic_write_json

    path, mine = work / "relufy.json", cfg.model_dump(mode="json")
    if resume and path.is_file() and json.loads(path.read_text()) != mine:
        raise UserError(f"--resume: {work} was written with other sparsify.config settings: resume with the same "
                        "recipe, or start again with --overwrite")
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, mine)


def distill_settings(cfg: RelufyConfig) -> "DistillSettings":
    from llmfast.distill import DistillSettings

    return DistillSettings(steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, warmup_ratio=cfg.warmup_ratio,
                           weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
                           save_every=cfg.save_every or cfg.steps + 1, log_every=cfg.log_every)


def train(job: SparsifyJob, cfg: RelufyConfig, student: "PreTrainedModel") -> dict[str, Any]:
    """Distil `job.model` (the teacher) into `student` for `cfg.steps` steps; log to job.work_dir."""
    import torch

    from llmfast.distill import distill, gpu_autocast, heldout_scores
    from llmfast.sparse.measure import record_sparsity, summarize

    _check_same_config(job.work_dir, cfg, job.resume)
    settings = distill_settings(cfg)
    store, handles = _activation_taps(student)
    cut = ShiftedCut(student) if cfg.target else None

    def l1() -> "torch.Tensor":
        return torch.stack([a.abs().float().mean() for a in store]).mean()

    def log_extra() -> dict[str, Any]:
        sparsity = [round(float((a == 0).float().mean()), 5) for a in store]
        extra = {"l1": round(l1().item(), 6), "sparsity_mean": round(sum(sparsity) / len(sparsity), 5),
                 "sparsity_per_layer": sparsity}
        if cut is not None:
            extra.update(shift_target=round(cut.fraction, 5), shift_mean=round(float(cut.thresholds.mean()), 6))
        return extra

    def before_step(step: int) -> None:
        if cut is not None:
            cut.fraction = shift_schedule(cfg, step)

    def evaluate() -> dict[str, Any]:  # one point of the curve: quality and sparsity on the held-out windows
        with record_sparsity(student, inputs=False) as tallies:
            scores = heldout_scores(student, job.model, job.heldout.to(job.model.device))
        return {**{k: round(v, 6) for k, v in scores.items()},
                "heldout_sparsity": summarize(tallies)["down_in"]["mean"]}

    first = next(student.parameters())
    autocast = gpu_autocast(first.device, first.dtype)
    try:
        metrics = distill(student, job.model, _training_rows(job, cfg), settings, job.work_dir, resume=job.resume,
                          before_step=before_step, extra_loss=(lambda: cfg.l1 * l1()) if cfg.l1 else None,
                          log_extra=log_extra, desc="relufy", evaluate=evaluate, eval_every=cfg.eval_every,
                          autocast=autocast, lr_key="sparsify.config.lr")
        if autocast is not None:  # a CPU run's metrics stay as they were
            metrics |= {"gpu": torch.cuda.get_device_name(first.device), "autocast": "bfloat16"}
        return metrics
    finally:
        for h in handles:
            h.remove()
        if cut is not None:
            cut.remove()


@SPARSIFIERS.register("relufy")
class Relufy(Sparsifier):
    name = "relufy"
    Config = RelufyConfig
    paper = "Mirzadeh et al. 2023, ReLU Strikes Back: Exploiting Activation Sparsity in Large Language Models"
    trains = True
    rewrites_weights = True

    def check_resume(self, cfg: Any, work: Path, source: Path) -> None:
        from llmfast.distill import check_checkpoint

        check_checkpoint(work, distill_settings(cfg), source)

    def sparsify(self, job: SparsifyJob, cfg: Any, out_dir: Path) -> dict[str, Any]:
        from llmfast.distill import check_batch, check_samples, heldout_kl
        from llmfast.loading import from_pretrained
        from llmfast.serve.vllm_plugin import mark_relu_architecture
        from llmfast.sparse.measure import measure_sparsity

        if cfg.steps:  # before the student loads or the work folder holds anything (a refused run leaves nothing)
            check_samples(cfg.samples, job.window, "sparsify.config.samples")
            check_batch(cfg.batch_size, len(job.train_rows) + cfg.samples, "relufy", "sparsify.config.batch_size")
        student = from_pretrained(job.model_path, job.dtype)
        student.to(job.model.device).eval()
        relu_swap(student)
        if hasattr(student.config, THRESHOLDS_KEY):  # a relufy source's cut: this run makes its own, or none
            delattr(student.config, THRESHOLDS_KEY)
        heldout = job.heldout.to(job.model.device)
        kl_swap_only = heldout_kl(student, job.model, heldout)
        metrics: dict[str, Any] = {"steps": 0, "train_tokens": 0}
        if cfg.steps:
            metrics = train(job, cfg, student)
        if cfg.target:
            thresholds = calibrated_cut(student, job.calibration, cfg.target)
            setattr(student.config, THRESHOLDS_KEY, thresholds)  # saved in config.json with the model
            install_cut(student, thresholds)
            metrics["thresholds"] = {"gate_act": [round(t, 8) for t in thresholds]}
        metrics["heldout_kl"] = {"relu_untrained": round(kl_swap_only, 6),
                                 "relu_trained": round(heldout_kl(student, job.model, heldout), 6)}
        metrics["heldout_sparsity"] = measure_sparsity(student, job.heldout)
        from llmfast.loading import save_tokenizer

        student.save_pretrained(out_dir, safe_serialization=True)
        mark_relu_architecture(out_dir)  # vLLM serves it through our plugin; transformers reads model_type
        save_tokenizer(job.tokenizer, out_dir)
        log = job.work_dir / "train_log.jsonl"
        if log.is_file():
            shutil.copy2(log, out_dir / "train_log.jsonl")
        return metrics

    # apply: nothing beyond the weights; a cut in config.json is put on by models.load_model (relu_cut.py)
