"""What a variant is made of and where it came from: weight bytes from the safetensors headers, the chain of
manifests back to the base, and the fine-tuning logs found on the way (for the report's loss curves)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Tensors of a decoder layer's linear maps, in full precision or in a quantized format's parts (GPTQ packing,
# BitNet's scale, bitsandbytes 4-bit: block scales, nested scales, code book and its serialized state).
_LINEAR_PARTS = (".weight", ".qweight", ".qzeros", ".scales", ".weight_scale", ".g_idx", "absmax", "quant_map",
                 "bitsandbytes__nf4", "bitsandbytes__fp4")
_NOT_LINEAR = ("norm", "embed", "lm_head")


def _header(path: Path) -> dict[str, Any]:
    from llmfast.modelfiles import safetensors_header

    return safetensors_header(path, "re-create the model")


def model_size(model_dir: Path) -> dict[str, int]:
    """Bytes of the weight files, and of the tensors that belong to decoder-layer linear maps. The weight files are
    those transformers loads (model.safetensors or its index's shards, `model_weight_files`) and a sparse artifact's
    thresholds or predictors; not a stray copy beside them (a hub's consolidated file, a backup), which counted the
    weights twice, and an index's missing shard is named, where the size came out smaller."""
    from llmfast.modelfiles import model_weight_files
    from llmfast.sparse.predictors import PREDICTORS_FILE
    from llmfast.sparse.thresholds import THRESHOLDS_FILE

    files = model_weight_files(model_dir, "re-create the model")
    files += [model_dir / n for n in (THRESHOLDS_FILE, PREDICTORS_FILE) if (model_dir / n).is_file()]
    linear = 0
    for f in files:
        for name, info in _header(f).items():
            if name == "__metadata__" or any(w in name for w in _NOT_LINEAR) or ".layers." not in name:
                continue
            if name.endswith(_LINEAR_PARTS) and len(info.get("shape", [])) >= 1:
                start, end = info["data_offsets"]
                linear += end - start
    return {"file_bytes": sum(f.stat().st_size for f in files), "linear_weight_bytes": linear}


def lineage(model_dir: Path, depth: int = 4) -> list[dict[str, Any]]:
    """The stages that made this model, newest first: [{stage, path, parents}], following llmfast.json."""
    from llmfast.artifacts import read_manifest

    chain, todo, seen = [], [model_dir], set()
    while todo and len(chain) < depth:
        path = Path(todo.pop(0))
        if str(path) in seen:
            continue
        seen.add(str(path))
        manifest = read_manifest(path) if path.is_dir() else None
        if not manifest:
            continue
        parents = [str(p) for p in manifest.get("parents", [])]
        chain.append({"stage": manifest.get("stage"), "path": str(path), "parents": parents})
        todo += [Path(p) for p in parents]
    return chain


def training_logs(chain: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """train_log.jsonl of every fine-tuning run (an adapter's run folder) in a lineage, by run name."""
    logs: dict[str, list[dict[str, Any]]] = {}
    for step in chain:
        for p in [step["path"], *step["parents"]]:
            run = Path(p).parent if Path(p).name == "adapter" else Path(p)
            log = run / "train_log.jsonl"
            if log.is_file() and run.name not in logs:
                logs[run.name] = [r for r in _jsonl(log) if "loss" in r]
    return logs


def compression(model_dir: Path) -> dict[str, Any] | None:
    """What the stage that made this variant measured, for a quantize or sparsify artifact (else None):
    method, wall time and peak memory, held-out MLP sparsity, predictor quality, the held-out curve of a
    training method (train_log.jsonl points with held-out scores)."""
    from llmfast.artifacts import read_manifest
    from llmfast.calibration import used_data

    manifest = read_manifest(model_dir) if model_dir.is_dir() else None
    if not manifest or manifest.get("stage") not in ("quantize", "sparsify"):
        return None
    m = manifest.get("metrics") or {}
    # by the stage: a quantized relufy model records the relufy sparsity it keeps as well (sparse/derived.py)
    spec = manifest.get("quantization" if manifest["stage"] == "quantize" else "sparsity") or {}
    method = spec.get("method")
    under = spec.get("attention")  # TEAL's attention thresholds kept under Deja Vu (sparse/stacked.py)
    if method and under:
        from llmfast.sparse.teal import TealConfig  # its settings, defaults filled in

        method += f" + teal attention {TealConfig.model_validate(under.get('config') or {}).target:.0%}"
    out: dict[str, Any] = {"stage": manifest["stage"], "method": method,
                           "wall_seconds": m.get("wall_seconds"),
                           "peak_memory_gib": m.get("peak_memory_gib", m.get("peak_rss_gib")),
                           "train_tokens": m.get("train_tokens"), "data": used_data(manifest["stage"], m)}
    if m.get("conversations"):
        out["conversations_share"] = m["conversations"]["calibration"]["share"]
    held = m.get("heldout_sparsity") or {}
    if "down_in" in held:
        out["mlp_sparsity"] = held["down_in"]["mean"]
        out["heldout_tokens"] = held["down_in"].get("tokens")
    if "predictors" in m:
        out["predictors"] = {k: m["predictors"][k]["mean"] for k in ("recall", "precision", "predicted_active")
                             if k in m["predictors"]}
    log = model_dir / "train_log.jsonl"
    if log.is_file() and m.get("train_tokens"):  # its own training (a Deja Vu artifact links its source's files)
        out["curve"] = [{k: r[k] for k in ("step", "tokens", "heldout_kl", "heldout_ppl", "teacher_heldout_ppl",
                                           "heldout_sparsity") if k in r} for r in _jsonl(log) if "heldout_kl" in r]
    return out


def _jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a train_log.jsonl that llmfast wrote (blank lines skipped)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
