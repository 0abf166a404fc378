"""The sparse runtime: a `llmfast sparsify` artifact loaded so that batch-1 decode skips the zeros it makes.

`llmfast.models.load_model` applies an artifact's sparsity with hooks on dense matmuls (the zeros are
measured, not skipped). `load_sparse_model` loads the same weights without the hooks and replaces every
gated MLP's forward with `kernels.SparseMLP`, which for one token computes only the nonzero rows/columns and
for several tokens applies the same zeros to dense matmuls. The outputs are the hook model's up to float
summation order (tests/test_sparse_runtime.py checks logits on prefill and on cached decode).

Which mode a layer runs follows the artifact's `sparsity.method`:

    teal    thresholds of the MLP input and of down_proj's input (sparsity.safetensors)
    cats    a threshold of the gate activation (sparsity.safetensors)
    relufy  the exact zeros of relu(gate) (the model's config says hidden_act: relu)
    dejavu  the neurons the artifact's predictors call active (predictors.safetensors)
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
    from llmfast.artifacts import read_manifest

    return (((read_manifest(artifact) or {}).get("sparsity")) or {}).get("method")


def _has_hooks(mlp: Any) -> bool:
    return bool(mlp._forward_pre_hooks or mlp._forward_hooks or mlp.down_proj._forward_pre_hooks
                or mlp.act_fn._forward_hooks)


def install_sparse_runtime(model: "PreTrainedModel", artifact: str | os.PathLike[str],
                           dense_above: float | None = None) -> list[Any]:
    """Replace each gated MLP's forward of `model` (loaded without the artifact's hooks, e.g. by
    `llmfast.loading.from_pretrained`) by the sparse one the artifact's method calls for; return them.

    `dense_above`: the kept fraction above which a layer uses the dense product (default: kernels.DENSE_ABOVE).
    """
    from llmfast.sparse.base import gated_mlps
    from llmfast.sparse.kernels import DENSE_ABOVE, SparseMLP

    artifact = Path(artifact)
    method = artifact_method(artifact)
    if method not in RUNTIME_METHODS:
        raise UserError(f"{artifact}: the sparse runtime runs {', '.join(RUNTIME_METHODS)} artifacts (this one: "
                        f"{method or 'not a llmfast sparsify artifact'})")
    mlps = gated_mlps(model, where=str(artifact))
    if any(_has_hooks(m) for m in mlps):
        raise ValueError("the model's MLPs carry hooks (thresholds put on by load_model?): load it with "
                         "llmfast.loading.from_pretrained, or use load_sparse_model")
    limit = DENSE_ABOVE if dense_above is None else dense_above
    kw: list[dict[str, Any]] = [{} for _ in mlps]
    if method in ("teal", "cats"):
        import llmfast.sparse  # noqa: F401  (registers the methods)
        from llmfast.sparse.base import SPARSIFIERS
        from llmfast.sparse.thresholds import load_thresholds

        sites = SPARSIFIERS.get(method).sites  # type: ignore[attr-defined]  (threshold methods name theirs)
        for site, vector in load_thresholds(artifact, method, sites).items():
            values = [float(t) for t in vector]
            if len(values) != len(mlps):
                raise UserError(f"{artifact}: {site} thresholds for {len(values)} layers, the model has {len(mlps)} "
                                "gated MLPs: the thresholds belong to another model")
            key = {"mlp_in": "t_in", "down_in": "t_down", "gate_act": "t_gate"}[site]
            for i, t in enumerate(values):
                kw[i][key] = t
    elif method == "dejavu":
        from llmfast.sparse.predictors import check_predictors, load_predictors

        predictors = load_predictors(artifact)
        check_predictors(predictors, model, artifact)
        device = next(model.parameters()).device
        shared: dict[str, Any] = {}  # the previous layer's MLP input, for look-ahead predictors
        for i, (mlp, p) in enumerate(zip(mlps, predictors)):
            mlp.llmfast_predictor = kw[i]["predictor"] = p.to(device)  # where install_predictors puts it too
            kw[i].update(layer=i, shared=shared)
    elif getattr(model.config, "hidden_act", None) != "relu":
        raise UserError(f"{artifact}: a relufy artifact whose config.json says hidden_act "
                        f"{getattr(model.config, 'hidden_act', None)!r}, not relu: rebuild it with `llmfast sparsify`")
    mode = {"teal": "teal", "cats": "cats", "relufy": "relu", "dejavu": "dejavu"}[method]
    runtimes = []
    for mlp, k in zip(mlps, kw):
        rt = SparseMLP(mlp, mode, dense_above=limit, **k)
        mlp.forward = rt  # an instance attribute: nn.Module.__call__ runs it in place of the class's forward
        runtimes.append(rt)
    return runtimes


def load_sparse_model(path: str | os.PathLike[str], dtype: str = "float32",
                      dense_above: float | None = None) -> "PreTrainedModel":
    """A sparse artifact in eval mode with the sparse runtime installed (see `install_sparse_runtime`)."""
    from llmfast.loading import from_pretrained

    model = from_pretrained(path, dtype)
    install_sparse_runtime(model, path, dense_above)
    model.eval()
    return model


def runtime_calls(model: "PreTrainedModel") -> dict[str, int]:
    """How often the installed sparse MLPs took each path (sparse gather, dense product, several tokens)."""
    from llmfast.sparse.kernels import SparseMLP

    total: dict[str, int] = {}
    for m in model.modules():
        rt = m.__dict__.get("forward")
        if isinstance(rt, SparseMLP):
            for k, n in rt.calls.items():
                total[k] = total.get(k, 0) + n
    return total
