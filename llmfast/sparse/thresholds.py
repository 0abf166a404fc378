"""Training-free sparsity by magnitude thresholds (TEAL, CATS): where they sit, how they are calibrated, how
they are saved and put back on a loaded model.

A threshold site is a tensor inside each layer whose entries with |value| <= t are set to zero:

- `mlp_in`   the hidden state entering the MLP (the input of gate_proj and up_proj)    TEAL
- `down_in`  the intermediate activation act(gate) * up (the input of down_proj)        TEAL
- `gate_act` the gate activation act(gate_proj(x)), before it multiplies up_proj(x)    CATS
- `attn_in`  the hidden state entering attention (the input of q_proj, k_proj, v_proj) TEAL, `sites: [attention]`
- `o_in`     the attention heads' output (the input of o_proj)                          TEAL, `sites: [attention]`

Calibration runs the calibration windows through the model as one batch: when a site is reached its
threshold is set to the target quantile of |values| over all calibration tokens and applied at once, so
every later site is calibrated on the activations it will really see (earlier thresholds in place), in
one forward pass. The thresholds are saved as `sparsity.safetensors` (one float32 vector per site, one
entry per layer) beside the unchanged weights.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

from llmfast.errors import UserError
from llmfast.sparse.base import Sparsifier, SparsifyJob, activation, gated_mlps, modules_with

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

THRESHOLDS_FILE = "sparsity.safetensors"
SITES = ("mlp_in", "down_in", "gate_act", "attn_in", "o_in")
ATTENTION_SITES = ("attn_in", "o_in")
QKV = ("q_proj", "k_proj", "v_proj")
FUSED_QKV = ("qkv_proj",)  # Phi-3's one projection of attention's input: q, k and v stacked


def input_projections(attn: Any) -> tuple[str, ...]:
    """The projections of an attention block that read its input (the `attn_in` site): q/k/v, or a fused qkv_proj."""
    return QKV if all(hasattr(attn, p) for p in QKV) else FUSED_QKV


def attention_blocks(model: "PreTrainedModel", where: str = "") -> list[Any]:
    """The attention modules with q/k/v projections (separate, Llama style, or one fused qkv_proj, Phi-3 style) and
    o_proj, in layer order; none is a one-line error."""
    found = [m for m in model.modules() if hasattr(m, "o_proj") and any(
        all(hasattr(m, p) for p in names) for names in (QKV, FUSED_QKV))]
    # none found: modules_with finds none either and raises the one line naming the architecture
    return found or modules_with(model, (*QKV, "o_proj"), where, "attention with q_proj/k_proj/v_proj (or a fused "
                                 "qkv_proj) and o_proj: TEAL's attention sites support Llama- and Phi-3-style "
                                 "attention only (use sites: [mlp])")


def zero_small(x: "torch.Tensor", t: "torch.Tensor") -> "torch.Tensor":
    import torch

    # where() rather than a multiply by a mask: kept entries stay bit-for-bit, so threshold 0 changes nothing.
    return torch.where(x.abs() > t.to(device=x.device, dtype=x.dtype), x, torch.zeros((), dtype=x.dtype, device=x.device))


def magnitude_quantile(x: "torch.Tensor", target: float) -> "torch.Tensor":
    """The threshold that zeroes `target` of `x`'s entries: the k-th smallest |value| (k = target x n, at least
    one), so zeroing entries <= it zeroes k of n (fewer only where values tie). A float32 scalar on x's device."""
    flat = x.detach().abs().reshape(-1).float()
    k = max(1, min(flat.numel(), round(target * flat.numel())))
    # the same value either way: CUDA's kthvalue selects with one thread block per row, slow on the one long row of
    # a training batch's activations (10^7 entries, relufy's shifted cut at every step); topk spreads it over the GPU
    return kth_smallest_by_topk(flat, k) if flat.is_cuda else flat.kthvalue(k).values


def kth_smallest_by_topk(flat: "torch.Tensor", k: int) -> "torch.Tensor":
    """kthvalue(k).values of a 1-D tensor through topk: the k-th smallest is the (n - k + 1)-th largest, so the
    shorter of the two selections is taken."""
    m = min(k, flat.numel() - k + 1)
    top = flat.topk(m, largest=m != k, sorted=False).values
    return top.max() if m == k else top.min()


def _calibrated(x: "torch.Tensor", thresholds: "torch.Tensor", i: int, target: float | None) -> "torch.Tensor":
    """The threshold of layer i: set now from `x` (all calibration tokens) if calibrating and not yet set."""
    import torch

    if target is not None and torch.isnan(thresholds[i]):
        thresholds[i] = magnitude_quantile(x, target).to(thresholds.device)
    return thresholds[i]


def install_thresholds(model: "PreTrainedModel", thresholds: dict[str, "torch.Tensor"],
                       calibrate: float | None = None, where: str = "") -> list[Any]:
    """Hook `thresholds` ({site: vector over layers}) into the model's gated MLPs and attention projections;
    return the hook handles. `where`, the thresholds' file, is named in errors.

    With `calibrate` (a target fraction), NaN entries are filled from the first batch that reaches them.
    `attn_in` is one threshold per layer hooked on each of q_proj, k_proj and v_proj (or a fused qkv_proj): they
    read the same tensor, so q_proj's hook (the first to run) calibrates it and all three zero the same entries.
    """
    mlps = gated_mlps(model)
    attns = attention_blocks(model) if any(s in ATTENTION_SITES for s in thresholds) else []
    if attns and len(attns) != len(mlps):
        raise UserError(f"{len(attns)} attention blocks and {len(mlps)} gated MLPs: TEAL's attention sites need one "
                        "of each per layer")
    handles = []
    for site, vec in thresholds.items():
        if site not in SITES:
            raise UserError(f"unknown threshold site '{site}' (known: {', '.join(SITES)})")
        if vec.shape != (len(mlps),):
            raise UserError(f"{where + ': ' if where else ''}{site} thresholds have shape {tuple(vec.shape)}, the "
                            f"model has {len(mlps)} gated MLPs: the thresholds belong to another model; rebuild them "
                            "with `llmfast sparsify`")
        if site in ATTENTION_SITES:
            handles += _attention_hooks(attns, site, vec, calibrate)
            continue
        for i, mlp in enumerate(mlps):
            if site == "mlp_in":
                hook = (lambda mod, args, v=vec, i=i: (zero_small(args[0], _calibrated(args[0], v, i, calibrate)),
                                                       *args[1:]))
                handles.append(mlp.register_forward_pre_hook(hook))
            elif site == "down_in":
                hook = (lambda mod, args, v=vec, i=i: (zero_small(args[0], _calibrated(args[0], v, i, calibrate)),))
                handles.append(mlp.down_proj.register_forward_pre_hook(hook))
            else:
                hook = lambda mod, args, out, v=vec, i=i: zero_small(out, _calibrated(out, v, i, calibrate))  # noqa: E731
                handles.append(activation(mlp).register_forward_hook(hook))
    return handles


def _attention_hooks(attns: list[Any], site: str, vec: "torch.Tensor", calibrate: float | None) -> list[Any]:
    handles = []
    for i, attn in enumerate(attns):
        hook = (lambda mod, args, v=vec, i=i: (zero_small(args[0], _calibrated(args[0], v, i, calibrate)),
                                               *args[1:]))
        for proj in (input_projections(attn) if site == "attn_in" else ("o_proj",)):
            handles.append(getattr(attn, proj).register_forward_pre_hook(hook))
    return handles


@contextlib.contextmanager
def record_attention_sparsity(model: "PreTrainedModel", sites: tuple[str, ...],
                              eps: float = 0.0) -> Iterator[dict[str, list[Any]]]:
    """Zeros entering q_proj or qkv_proj (`attn_in`: k_proj and v_proj read the same tensor) and o_proj (`o_in`) while
    the block runs, for the attention sites among `sites`; yields {site: [ZeroTally per layer]}, as
    measure.record_sparsity does for the MLP. Register after the threshold hooks."""
    from llmfast.sparse.measure import ZeroTally

    wanted = [s for s in sites if s in ATTENTION_SITES]
    attns = attention_blocks(model) if wanted else []
    tallies = {s: [ZeroTally() for _ in attns] for s in wanted}
    handles = [getattr(attn, input_projections(attn)[0] if s == "attn_in" else "o_proj").register_forward_pre_hook(
                   lambda mod, args, t=tallies[s][i]: t.add(args[0], eps))
               for s in wanted for i, attn in enumerate(attns)]
    try:
        yield tallies
    finally:
        for h in handles:
            h.remove()


# Not taken from a source: its manifest and training log (the artifact writes its own), other formats' weights
# (pickles llmfast never loads, GGUF, TensorFlow/Flax: gigabytes on another file system) and hidden files.
_NOT_TAKEN = {"llmfast.json", "train_log.jsonl"}
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".gguf", ".h5", ".msgpack", ".onnx")


def source_files(src: Path) -> list[Path]:
    """The files of the model directory `src` that a threshold or Deja Vu artifact takes: its config, weights,
    tokenizer and the rest of the model's own files, not those named above. Of its *.safetensors, the weights
    transformers loads (model.safetensors, the index's shards) and an artifact's thresholds/predictors the new one
    builds on: a stray copy beside them (a hub's consolidated.safetensors, a user's backup) is no part of the model."""
    from llmfast.modelfiles import INDEX, model_weight_files, weight_files
    from llmfast.sparse.predictors import PREDICTORS_FILE

    fix = f"re-create the model in {src}"
    weights = {f.name for f in model_weight_files(src, fix)}
    if (src / INDEX).is_file():  # its shards too where model.safetensors is beside it: vLLM reads those
        weights |= {f.name for f in weight_files(src, fix)}
    taken = weights | {THRESHOLDS_FILE, PREDICTORS_FILE} if weights else None  # neither: every *.safetensors
    return [f for f in sorted(src.iterdir()) if f.is_file() and f.name not in _NOT_TAKEN
            and not f.name.startswith(".") and not f.name.lower().endswith(_OTHER_WEIGHTS)
            and (taken is None or not f.name.endswith(".safetensors") or f.name in taken)]


def link_or_copy_model(src: Path, dst: Path) -> None:
    """The model directory's files (`source_files`) into `dst`, hard-linked where the filesystem allows (weights
    are unchanged)."""
    for f in source_files(src):
        real = f.resolve()  # a hub snapshot's files are links into its blobs: link(2) would copy the link, dangling
        try:
            os.link(real, dst / f.name)
        except OSError:
            shutil.copy2(real, dst / f.name)


class ThresholdSparsifier(Sparsifier):
    """A method that thresholds `sites` to `cfg.target` sparsity each; subclasses set `sites` and `Config`
    (and override `sites_for` when the settings choose among them)."""

    sites: ClassVar[tuple[str, ...]]

    def sites_for(self, cfg: Any) -> tuple[str, ...]:
        """The sites an artifact made with settings `cfg` thresholds (what its sparsity.safetensors holds)."""
        return self.sites

    def calibrate(self, model: "PreTrainedModel", calibration: "torch.Tensor", target: float,
                  sites: tuple[str, ...] | None = None) -> dict[str, Any]:
        """Thresholds for every site (default: the class's `sites`) and layer from one batched pass over the
        calibration windows."""
        import torch

        n = len(gated_mlps(model))
        thresholds = {s: torch.full((n,), float("nan")) for s in (sites or self.sites)}
        handles = install_thresholds(model, thresholds, calibrate=target)
        try:
            with torch.inference_mode():
                model(calibration.to(model.device))
        finally:
            for h in handles:
                h.remove()
        return thresholds

    def sparsify(self, job: SparsifyJob, cfg: Any, out_dir: Path) -> dict[str, Any]:
        from safetensors.torch import save_file

        from llmfast.sparse.measure import measure_sparsity, summarize

        sites = self.sites_for(cfg)
        thresholds = self.calibrate(job.model, job.calibration, cfg.target, sites)
        idle = [s for s, v in thresholds.items() if bool((v <= 0).all())]
        # a ReLU-fied source's exact zeros already reach the target where a threshold of 0 adds none: refused when
        # that is every site (TEAL's mlp_in still thresholds a ReLU model's MLP input while its down_in is idle)
        if idle and len(idle) == len(thresholds):
            raise UserError(f"{job.model_spec}: its {', '.join(idle)} is already at least {cfg.target:.0%} zeros in "
                            f"every layer (a ReLU-fied model?), so {self.name}'s thresholds would be 0 and zero nothing "
                            "more: choose a higher target, or sparsify the model it was made from")
        link_or_copy_model(job.model_path, out_dir)
        save_file({s: v.contiguous() for s, v in thresholds.items()}, out_dir / THRESHOLDS_FILE)
        handles = install_thresholds(job.model, thresholds)
        try:
            with record_attention_sparsity(job.model, sites) as attention:
                heldout = measure_sparsity(job.model, job.heldout)
        finally:
            for h in handles:
                h.remove()
        heldout.update(summarize(attention))
        return {"heldout_sparsity": heldout, "calibration_tokens": job.calibration.numel(),
                "thresholds": {s: [round(float(x), 8) for x in v] for s, v in thresholds.items()}}

    def apply(self, model: "PreTrainedModel", cfg: Any, artifact: Path) -> None:
        tensors = load_thresholds(artifact, self.name, self.sites_for(cfg))
        install_thresholds(model, {s: t.to(model.device) for s, t in tensors.items()},
                           where=str(Path(artifact) / THRESHOLDS_FILE))


def load_thresholds(artifact: Path, method: str, sites: tuple[str, ...]) -> dict[str, "torch.Tensor"]:
    """{site: vector over layers} of a threshold artifact (the hooks' and the sparse runtime's source);
    a missing file or site is a one-line error."""
    from safetensors.torch import load_file

    path = Path(artifact) / THRESHOLDS_FILE
    if not path.is_file():
        raise UserError(f"{artifact}: a {method} artifact without {THRESHOLDS_FILE}: rebuild it with "
                        "`llmfast sparsify`")
    try:
        tensors = load_file(path)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        from llmfast.loading import first_line

        raise UserError(f"{path}: not a readable safetensors file ({first_line(e)}): rebuild it with "
                        "`llmfast sparsify`") from None
    missing = [s for s in sites if s not in tensors]
    if missing:
        raise UserError(f"{path}: no thresholds for {', '.join(missing)}: rebuild it with `llmfast sparsify`")
    for s in sites:
        if tensors[s].dim() != 1 or not tensors[s].is_floating_point():
            raise UserError(f"{path}: {s} thresholds are a {tensors[s].dtype} tensor of shape "
                            f"{tuple(tensors[s].shape)}, not one float per layer: rebuild it with `llmfast sparsify`")
    return {s: tensors[s] for s in sites}
