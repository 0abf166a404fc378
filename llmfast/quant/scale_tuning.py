"""End-to-end tuning of a W4 artifact's group scales by distillation: EfficientQAT's second phase (E2E-QP).

Chen et al. 2024, "EfficientQAT: Efficient Quantization-Aware Training for Large Language Models"
(arXiv:2407.11062). AutoRound fits each decoder block alone to that block's full-precision output; what is left
of every block's error adds up through the model, and a block's mean squared error is dominated by the few huge
residual channels that the next norm rescales anyway (BENCHMARKS.md, "W4 with AWQ"). Here the integer levels stay
as AutoRound rounded them and only the scales (one per output row and group of `group_size` inputs) train,
through the whole model at once, towards the full-precision model's next-token distribution (logit KL,
llmfast.distill) on the training windows w4 gives it (all the text after the evaluated span and the
conversations). The artifact keeps its format and size: the same qweight and qzeros, new scales, so vLLM and
transformers load it as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from llmfast.distill import DistillSettings


class GroupScaledLinear(nn.Module):
    """A Linear whose weight is integer levels times one scale per (output row, input group).

    What trains is a factor on each scale, starting at 1: Adam's steps are of the order of its lr in the
    parameter's own units, so a factor makes the step relative to each scale, the same in every layer.
    """

    def __init__(self, levels: torch.Tensor, scales: torch.Tensor, group_size: int, bias: torch.Tensor | None = None
                 ) -> None:
        super().__init__()
        out_features, in_features = levels.shape
        if in_features % group_size or scales.shape != (in_features // group_size, out_features):
            raise ValueError(f"levels {tuple(levels.shape)} and scales {tuple(scales.shape)} do not fit groups of "
                             f"{group_size}")
        self.group_size = group_size
        self.register_buffer("levels", levels.to(torch.int8))  # (out, in): level minus zero point, -15..15
        self.register_buffer("scales", scales.float())  # (groups, out), as the artifact stores them
        self.factor = nn.Parameter(torch.ones_like(self.scales))
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    def tuned_scales(self) -> torch.Tensor:
        return self.scales * self.factor

    def weight_from_scales(self, dtype: torch.dtype) -> torch.Tensor:
        out_features, in_features = self.levels.shape
        grouped = self.levels.view(out_features, -1, self.group_size).to(dtype)
        return (grouped * self.tuned_scales().t().unsqueeze(-1).to(dtype)).view(out_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight_from_scales(x.dtype), bias)


def quantized_layers(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every quantized Linear of the w4 artifact at `path`: {name: {"levels": (out, in) int8, "scales"}}."""
    from safetensors import safe_open

    from llmfast.quant.w4_format import artifact_packing, artifact_weight_files, awq_levels, gptq_levels

    unpack = awq_levels if artifact_packing(path) == "awq" else gptq_levels
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for file in artifact_weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key.endswith(".qweight"):
                    name = key[: -len(".qweight")]
                    layers[name] = {"levels": unpack(f.get_tensor(key), f.get_tensor(f"{name}.qzeros")),
                                    "scales": f.get_tensor(f"{name}.scales")}
    return layers


def student_from_artifact(path: Path, group_size: int, dtype: str = "float32") -> tuple[Any, list[str]]:
    """The artifact as a model whose quantized Linears are GroupScaledLinear (only their factors train); the
    names of those layers."""
    from llmfast.quant.w4_format import load_dequantized

    model = load_dequantized(path, group_size, dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for name, layer in quantized_layers(path).items():
        old = model.get_submodule(name)
        model.set_submodule(name, GroupScaledLinear(layer["levels"], layer["scales"], group_size, old.bias))
        names.append(name)
    return model, names


def write_scales(path: Path, model: Any, names: list[str]) -> int:
    """Replace the artifact's `.scales` tensors with the tuned ones, in their stored dtype, and set the model's
    layers to exactly those values; return how many changed. Each file is written beside itself and renamed over
    it, so a kill leaves the old file or the new one."""
    import os

    from safetensors import safe_open
    from safetensors.torch import save_file

    from llmfast.quant.w4_format import artifact_weight_files

    changed = 0
    for file in artifact_weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        before = changed
        for name in names:
            key = f"{name}.scales"
            if key in tensors:
                layer = model.get_submodule(name)
                stored = layer.tuned_scales().detach().to(tensors[key].dtype).contiguous()
                tensors[key] = stored
                with torch.no_grad():  # the model now holds what the file holds (rounded to the stored dtype)
                    layer.scales.copy_(stored.float())
                    layer.factor.fill_(1.0)
                changed += 1
        if changed == before:  # a shard without quantized layers (the embeddings, the head) stays as it is
            continue
        tmp = file.with_name(file.name + ".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, file)
    return changed


def scale_settings(steps: int, lr: float, batch_size: int) -> "DistillSettings":
    from llmfast.distill import DistillSettings

    return DistillSettings(steps=steps, lr=lr, batch_size=batch_size, max_grad_norm=None)


def tune_scales(path: Path, teacher_dir: Path, rows: torch.Tensor, *, group_size: int, steps: int, lr: float,
                batch_size: int, work_dir: Path, resume: bool = False, heldout: torch.Tensor | None = None,
                eval_every: int | None = None, dtype: str = "float32") -> dict[str, Any]:
    """Train the scales of the w4 artifact at `path` towards the model at `teacher_dir` on `rows` (windows of
    token ids) for `steps` steps, and write them into the artifact. Returns metrics (held-out KL before/after)."""
    from llmfast.loading import from_pretrained
    from llmfast.sparse.relu_cut import apply_config_cut

    from llmfast.distill import distill, heldout_scores

    teacher = from_pretrained(teacher_dir, dtype).eval()
    apply_config_cut(teacher, teacher_dir)  # a relufy source's cut: the model eval runs
    student, names = student_from_artifact(path, group_size, dtype)
    apply_config_cut(student, path)  # the artifact keeps the source's cut in its config.json
    settings = scale_settings(steps, lr, batch_size)

    def evaluate() -> dict[str, Any]:
        return {k: float(f"{v:.6g}") for k, v in heldout_scores(student, teacher, heldout).items()}

    metrics: dict[str, Any] = {}
    if heldout is not None:
        metrics["before_scale_tuning"] = evaluate()
    trained = distill(student, teacher, rows, settings, work_dir, resume=resume, desc="W4 scale tuning",
                      lr_key="quantization.scale_lr",
                      evaluate=evaluate if heldout is not None else None, eval_every=eval_every)
    metrics |= {"scale_" + k: v for k, v in trained.items()}
    factors = torch.cat([student.get_submodule(n).factor.detach().flatten() for n in names])
    metrics["scale_factor_range"] = [round(factors.min().item(), 4), round(factors.max().item(), 4)]
    metrics["scales_tuned"] = write_scales(path, student, names)
    if heldout is not None:
        metrics["after_scale_tuning"] = evaluate()
    return metrics
