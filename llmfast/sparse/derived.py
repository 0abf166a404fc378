"""The `sparsity` of an artifact that a verb writing new weights (export, merge, quantize) makes from a sparse model.

A relufy model keeps its sparsity in config.json: the ReLU activation and, with relufy's `target`, the shifted cut
(relu_cut.py). These verbs write that config.json with the new weights (merge refuses models that differ in it),
and every loader puts the cut on, so the derived model's MLP activation is zero exactly where relu(gate) is at or
below the cut, whatever its weights: it is a relufy artifact as much as its source, and its llmfast.json says so
(the source's relufy settings and its own weights' fingerprint), so that what reads the manifest (the hf-sparse
bench engine, serve's check, reports) takes it for one. TEAL, CATS and Deja Vu keep theirs in files fitted to the
source's weights, which new weights would not fit: the verbs refuse those sources (sources.py; `refuse_sparse_files`
for export's base).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from llmfast.errors import UserError


def carried_sparsity(sources: Iterable[Path], out: Path) -> dict[str, Any]:
    """`{"sparsity": ...}` for write_manifest of the model written at `out` from `sources` (the base an adapter is
    merged into, a merge's models, a quantized model): relufy's, from the first source that is a relufy artifact
    (made by sparsify or carried so), with the fingerprint of `out`'s own weights and config.json, which
    `sparsity_section` checks; empty when no source is one. The sources' fingerprints are not checked here, after
    the work: what decides is `out`'s config.json, which holds the ReLU and the cut it runs with."""
    from llmfast.artifacts import read_manifest
    from llmfast.modelfiles import weights_fingerprint

    for source in sources:
        spec = (read_manifest(source) or {}).get("sparsity") or {}
        if spec.get("method") == "relufy":
            return {"sparsity": {"method": "relufy", "config": spec.get("config") or {},
                                 "weights": weights_fingerprint(out)}}
    return {}


def refuse_sparse_files(path: Path, verb: str, instead: str) -> None:
    """One line when `path` is a TEAL, CATS or Deja Vu artifact, whose thresholds or predictors `verb` would drop."""
    from llmfast.sources import sparse_files_method

    method = sparse_files_method(path)
    if method:
        raise UserError(f"{path} is a {method} artifact: its sparsity lives in files beside the weights, fitted to "
                        f"them, which {verb} does not carry over; {instead}")
