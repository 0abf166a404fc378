"""The sparse runtime: a `llmfast sparsify` artifact loaded so that batch-1 decode skips the zeros it makes.

`llmfast.models.load_model` applies an artifact's sparsity with hooks on dense matmuls (the zeros are
measured, not skipped). `load_sparse_model` loads the same weights without the hooks and replaces every
gated MLP's forward with `kernels.SparseMLP`, which for one token computes only the nonzero rows/columns and
for several tokens applies the same zeros to dense matmuls. The outputs are the hook model's up to float
summation order (tests/test_sparse_runtime.py checks logits on prefill and on cached decode).

Which mode a layer runs follows the artifact's `sparsity.method`:

    teal    thresholds of the MLP input and of down_proj's input (sparsity.safetensors); with the
            `attention` sites also of the input of q/k/v and of o_proj (kernels.SparseProjections); with the
            attention sites alone over a ReLU model, its MLPs as relufy's
    cats    a threshold of the gate activation (sparsity.safetensors)
    relufy  the exact zeros of relu(gate) (the model's config says hidden_act: relu)
    dejavu  the neurons the artifact's predictors call active (predictors.safetensors), and the attention
            thresholds of the TEAL artifact it was made over, if it was (`sparsity.attention`, stacked.py)

A ReLU model whose config.json holds a shifted cut (relufy's `target`, relu_cut.py), and any artifact made over
it, runs every method with the activation relu(gate) kept above that cut (`relu_cut`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmfast.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

RUNTIME_METHODS = ("teal", "cats", "relufy", "dejavu")  # sparsity methods the runtime turns into skipped work


def artifact_method(artifact: str | os.PathLike[str]) -> str | None:
    """The sparsity method an artifact's llmfast.json records (None for a plain model directory)."""
    return _sparsity(Path(artifact)).get("method")


def _has_hooks(mlp: Any) -> bool:
    from llmfast.sparse.base import activation

    return bool(mlp._forward_pre_hooks or mlp._forward_hooks or mlp.down_proj._forward_pre_hooks
                or activation(mlp)._forward_hooks)


def _attention_has_hooks(attn: Any) -> bool:
    from llmfast.sparse.thresholds import input_projections

    return any(getattr(attn, p)._forward_pre_hooks for p in (*input_projections(attn), "o_proj"))


def _sparsity(artifact: Path) -> dict[str, Any]:
    """The `sparsity` section of an artifact's llmfast.json (empty for a plain model directory)."""
    from llmfast.sparse.base import sparsity_section

    return sparsity_section(artifact)


def _threshold_sites(artifact: Path, sparsity: dict[str, Any], method: str) -> tuple[str, ...]:
    """The sites a teal/cats artifact thresholds, from the settings its manifest's `sparsity` records."""
    import llmfast.sparse  # noqa: F401  (registers the methods)
    from llmfast.sparse.base import SPARSIFIERS, manifest_config

    sparsifier = SPARSIFIERS.get(method)()
    return sparsifier.sites_for(manifest_config(sparsifier, sparsity, artifact))  # type: ignore[attr-defined]


def _per_layer(artifact: Path, site: str, vector: Any, layers: int) -> list[float]:
    values = [float(t) for t in vector]
    if len(values) != layers:
        raise UserError(f"{artifact}: {site} thresholds for {len(values)} layers, the model has {layers} gated MLPs: "
                        "the thresholds belong to another model")
    return values


def _attention_thresholds(artifact: Path, sparsity: dict[str, Any], layers: int) -> dict[str, list[float]]:
    """{attn_in / o_in: per-layer thresholds} the artifact applies to attention: TEAL's own attention sites, or
    those a Deja Vu artifact keeps from its TEAL source (stacked.py); empty for none."""
    from llmfast.sparse.stacked import inherited_thresholds
    from llmfast.sparse.thresholds import ATTENTION_SITES, load_thresholds

    method = sparsity.get("method")
    if method == "teal":
        sites = tuple(s for s in _threshold_sites(artifact, sparsity, method) if s in ATTENTION_SITES)
        tensors = load_thresholds(artifact, method, sites) if sites else {}
    else:
        tensors = inherited_thresholds(artifact, sparsity)
    return {site: _per_layer(artifact, site, v, layers) for site, v in tensors.items()}


def install_sparse_runtime(model: "PreTrainedModel", artifact: str | os.PathLike[str],
                           dense_above: float | None = None) -> list[Any]:
    """Replace each gated MLP's forward of `model` (loaded without the artifact's hooks, e.g. by
    `llmfast.loading.from_pretrained`) by the sparse one the artifact's method calls for, and for TEAL's
    attention sites the forwards of q/k/v and o_proj; return the replacements (SparseMLP, SparseProjections).

    `dense_above`: the kept fraction above which a layer uses the dense product (default: the crossover of the
    path that runs: kernels.DENSE_ABOVE for torch's gathers, cpu_kernel.DENSE_ABOVE for the C kernel,
    triton_kernel.DENSE_ABOVE for the Triton kernel on CUDA).
    """
    from llmfast.sparse.base import gated_mlps, mlp_activation_name, relu_mlps
    from llmfast.sparse.kernels import SparseMLP, SparseProjections

    artifact = Path(artifact)
    sparsity = _sparsity(artifact)  # read once: the method, its settings, a Deja Vu artifact's attention source
    method = sparsity.get("method")
    if method not in RUNTIME_METHODS:
        raise UserError(f"{artifact}: the sparse runtime runs {', '.join(RUNTIME_METHODS)} artifacts (this one: "
                        f"{method or 'not a llmfast sparsify artifact'})")
    from llmfast.sparse.fused import split_fused_mlps

    split_fused_mlps(model)  # SparseMLP reads gate's and up's rows apart (a model split so is never saved)
    mlps = gated_mlps(model, where=str(artifact))
    if any(_has_hooks(m) for m in mlps):
        raise ValueError("the model's MLPs carry hooks (thresholds put on by load_model?): load it with "
                         "llmfast.loading.from_pretrained, or use load_sparse_model")
    kw: list[dict[str, Any]] = [{} for _ in mlps]
    # attn_in / o_in thresholds per layer: TEAL's attention sites, or a TEAL source's under Deja Vu (stacked.py)
    attention = _attention_thresholds(artifact, sparsity, len(mlps))
    attns: list[Any] = []
    if attention:  # checked before anything on the model changes
        from llmfast.sparse.thresholds import attention_blocks, input_projections

        attns = attention_blocks(model, where=str(artifact))
        if any(_attention_has_hooks(a) for a in attns):
            raise ValueError("the model's attention projections carry hooks (thresholds put on by load_model?): load "
                             "it with llmfast.loading.from_pretrained, or use load_sparse_model")
    sparse_mlps = True
    mode = {"teal": "teal", "cats": "cats", "relufy": "relu", "dejavu": "dejavu"}[method]
    if method in ("teal", "cats"):
        from llmfast.sparse.thresholds import ATTENTION_SITES, load_thresholds

        sites = _threshold_sites(artifact, sparsity, method)
        mlp_sites = [s for s in sites if s not in ATTENTION_SITES]
        for site, vector in load_thresholds(artifact, method, tuple(mlp_sites)).items():
            values = _per_layer(artifact, site, vector, len(mlps))
            key = {"mlp_in": "t_in", "down_in": "t_down", "gate_act": "t_gate"}[site]
            for i, t in enumerate(values):
                kw[i][key] = t
        if not mlp_sites:  # teal with sites: [attention]: a ReLU model's MLPs skip their exact zeros, others are dense
            sparse_mlps = relu_mlps(model)
            mode = "relu"
    elif method == "dejavu":
        from llmfast.sparse.predictors import check_predictors, load_predictors

        predictors = load_predictors(artifact)
        check_predictors(predictors, model, artifact)
        device = next(model.parameters()).device
        shared: dict[str, Any] = {}  # the previous layer's MLP input, for look-ahead predictors
        for i, (mlp, p) in enumerate(zip(mlps, predictors)):
            mlp.llmfast_predictor = kw[i]["predictor"] = p.to(device)  # where install_predictors puts it too
            kw[i].update(layer=i, shared=shared)
    elif not relu_mlps(model):
        raise UserError(f"{artifact}: a relufy artifact whose MLPs load with {mlp_activation_name(model)}, not ReLU "
                        "(its config.json names another activation): rebuild it with `llmfast sparsify`")
    from llmfast.sparse.relu_cut import relu_thresholds

    cut = relu_thresholds(model, artifact)  # a shifted ReLU (relufy's target), any method over it
    for i, t in enumerate(cut or []):
        kw[i]["relu_cut"] = t
    runtimes: list[Any] = []
    for i, (mlp, k) in enumerate(zip(mlps, kw)):
        if attention:
            for site, projections in (("attn_in", input_projections(attns[i])), ("o_in", ("o_proj",))):
                if site in attention:
                    runtimes.append(SparseProjections([getattr(attns[i], p) for p in projections],
                                                      attention[site][i], dense_above=dense_above))
        if sparse_mlps:
            rt = SparseMLP(mlp, mode, dense_above=dense_above, **k)
            mlp.forward = rt  # an instance attribute: nn.Module.__call__ runs it in place of the class's forward
            runtimes.append(rt)
    return runtimes


def load_sparse_model(path: str | os.PathLike[str], dtype: str = "float32",
                      dense_above: float | None = None, device: str = "cpu") -> "PreTrainedModel":
    """A sparse artifact in eval mode with the sparse runtime installed (see `install_sparse_runtime`) on `device`:
    on a CPU float32 and bfloat16 run the C kernel, on CUDA the Triton kernel (kernels.native_for)."""
    from llmfast.loading import from_pretrained

    model = from_pretrained(path, dtype).to(device)  # before the runtime lays out its buffers: they stay there
    install_sparse_runtime(model, path, dense_above)
    model.eval()
    return model


def sparse_forwards(model: "PreTrainedModel", part: str = "all") -> list[Any]:
    """The installed replacements, once each: `part` "mlp" (SparseMLP), "attention" (SparseProjections) or "all"."""
    from llmfast.sparse.kernels import SparseMLP, SparseProjections

    kinds = {"mlp": (SparseMLP,), "attention": (SparseProjections,), "all": (SparseMLP, SparseProjections)}[part]
    found: dict[int, Any] = {}
    for m in model.modules():
        fwd = m.__dict__.get("forward")
        owner = getattr(getattr(fwd, "func", None), "__self__", fwd)  # a projection's forward is partial(rt.part, j)
        if isinstance(owner, kinds):
            found.setdefault(id(owner), owner)
    return list(found.values())


def runtime_calls(model: "PreTrainedModel", part: str = "all") -> dict[str, int]:
    """How often the installed sparse forwards (`part`: "mlp", "attention" or "all") took each path: sparse
    gather, dense product, several tokens. A SparseProjections counts once per product (q, k and v share one)."""
    total: dict[str, int] = {}
    for rt in sparse_forwards(model, part):
        for k, n in rt.calls.items():
            total[k] = total.get(k, 0) + n
    return total
