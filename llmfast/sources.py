"""What a verb takes as its source model, checked from the folder's files before anything loads.

Two kinds of artifact are not a plain full-precision model: a quantized one (its layers hold packed integer codes,
which merging would average as numbers and training would not reach), and a TEAL, CATS or Deja Vu artifact (its
sparsity lives in files beside the weights, which a verb that rewrites the weights would drop without a word).
Each verb refuses what it cannot carry, in one line that names the way round. The same table tells `llmfast run`,
when it plans a chain, that a stage will refuse what its parent stage makes.
"""

from __future__ import annotations

from pathlib import Path

from llmfast.errors import UserError


def keeps_sparse_files(method: object) -> bool:
    """Whether a sparsification method's artifact keeps its sparsity in files beside the weights: every registered
    method that writes no new weights (TEAL, CATS, Deja Vu, and a new one the same moment it registers; a relufy
    model keeps its ReLU, and its cut, in config.json, so every verb carries it)."""
    import llmfast.sparse  # noqa: F401  (registers the methods; light: torch is imported inside their functions)
    from llmfast.sparse.base import SPARSIFIERS

    return isinstance(method, str) and method in SPARSIFIERS and not SPARSIFIERS.get(method).rewrites_weights


# verb: what to do instead of giving it a quantized model
QUANTIZED = {
    "quantize": "quantize the full-precision model it came from",
    "sparsify": "sparsify the full-precision model it came from, then quantize the result (a relufy model can be "
                "quantized)",
    "merge": "merge the full-precision models, then quantize the merge",
    "finetune": "LoRA trains on a full-precision model or a bitsandbytes 4-bit one: fine-tune the full-precision "
                "model it came from (with quantization: nf4 for QLoRA)",
}
# verb: the quantization methods it does take (a checkpoint made elsewhere names them as their `config_names`)
QUANTIZED_TAKEN = {"finetune": ("bnb4",)}
# verb: what to do instead of giving it a TEAL, CATS or Deja Vu artifact (sparsify has its own rules: stacked.py)
SPARSE_FILES = {
    "quantize": "quantize the model it was made from (a relufy model, whose ReLU is in its config, can be quantized)",
    "merge": "merge the models they were made from, then sparsify the merge",
    "finetune": "fine-tune the model it was made from, export the adapter, then sparsify the export",
}


def sparse_files_method(path: Path) -> str | None:
    """The method of a TEAL, CATS or Deja Vu artifact at `path`, or None."""
    from llmfast.artifacts import read_manifest

    method = ((read_manifest(path) or {}).get("sparsity") or {}).get("method")
    return method if keeps_sparse_files(method) else None


def _quantized_refusal(verb: str, spec: str, method: str) -> str | None:
    from llmfast.quant import QUANTIZERS

    taken = {n for m in QUANTIZED_TAKEN.get(verb, ()) for n in (m, *QUANTIZERS.get(m).config_names)}
    if verb not in QUANTIZED or method in taken:
        return None
    return f"{spec} is already quantized ({method}): {QUANTIZED[verb]}"


def _sparse_refusal(verb: str, spec: str, method: str) -> str | None:
    if verb not in SPARSE_FILES:
        return None
    return (f"{spec} is a {method} artifact: its sparsity lives in files beside the weights that {verb} does not "
            f"carry over; {SPARSE_FILES[verb]}")


def check_source(path: Path, spec: str, verb: str) -> None:
    """One line when `verb` cannot take the model at `path` (`spec`: as the user wrote it): quantized (its
    llmfast.json or config.json), or a TEAL/CATS/Deja Vu artifact."""
    from llmfast.quant import already_quantized

    method = already_quantized(path)
    refusal = _quantized_refusal(verb, spec, method) if method else None
    sparse = sparse_files_method(path)
    refusal = refusal or (_sparse_refusal(verb, spec, sparse) if sparse else None)
    if refusal:
        raise UserError(refusal)


def planned_refusal(verb: str, spec: str, made_by: str, method: str | None) -> str | None:
    """Why `verb` will refuse the artifact of a stage of type `made_by` (quantize or sparsify) with `method`, or
    None: `llmfast run` says so before any stage runs, not after the stages before it."""
    if made_by == "quantize" and method:
        return _quantized_refusal(verb, spec, method)
    if made_by == "sparsify" and keeps_sparse_files(method):
        return _sparse_refusal(verb, spec, method)
    return None
