"""The `sparsity` of an artifact that a verb writing new weights (export, merge, quantize) makes from a sparse model.

A relufy model keeps its sparsity in config.json: the ReLU activation and, with relufy's `target`, the shifted cut
(relu_cut.py). These verbs write that config.json with the new weights (merge refuses models that differ in it),
and every loader puts the cut on, so the derived model's MLP activation is zero exactly where relu(gate) is at or
below the cut, whatever its weights: it is a relufy artifact as much as its source, and its llmfast.json says so
(the source's relufy settings and its own weights' fingerprint), so that what reads the manifest (the hf-sparse
bench engine, serve's check, reports) takes it for one. TEAL, CATS and Deja Vu keep theirs in files fitted to the
source's weights, which new weights would not fit: the verbs refuse those sources (sources.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable


def carried_sparsity(sources: Iterable[Path], out: Path) -> dict[str, Any]:
    """`{"sparsity": ...}` for write_manifest of the model written at `out` from `sources` (the base an adapter is
    merged into, a merge's models, a quantized model): relufy's, from the first source that is a relufy artifact
    (made by sparsify or carried so), with the fingerprint of `out`'s own weights and config.json, which
    `sparsity_section` checks; empty when no source is one."""
    from llmfast.modelfiles import weights_fingerprint
    from llmfast.sparse.base import sparsity_section

    for source in sources:
        spec = sparsity_section(source)
        if spec.get("method") == "relufy":
            return {"sparsity": {"method": "relufy", "config": spec.get("config") or {},
                                 "weights": weights_fingerprint(out)}}
    return {}

