"""`llmfast quantize RECIPE`: check everything, then let the method write a quantized artifact.

Every check that needs no model runs first (the method and its settings, the output, an input that is
already quantized, the calibration text); the artifact appears only complete (atomic_dir) with
`llmfast.json` recording `quantization: {method, config}`, so `load_model`, eval and bench pick the loader
and the engines from the artifact alone. A method that trains keeps its checkpoints in OUTPUT.checkpoints
until the artifact is complete; `--resume` continues from them.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

from llmfast.errors import UserError


def skeleton(model_dir: Path) -> Any:
    """The model's modules on the meta device: every shape, no weights, nothing read but config.json."""
    from llmfast.loading import meta_skeleton

    return meta_skeleton(model_dir)


def _rows(recipe: Any, tokenizer: Any) -> dict[str, Any]:
    """The windows a method may use: `rows`, calibration windows from after the evaluated span with
    data.conversations mixed in; `train_rows`, all the text after that span with the conversations on top (for a
    method that trains through the whole model); `heldout`, windows from the span's start, or None when
    data.heldout_tokens makes no full window (only a method that trains measures on them); and what
    conversations went into each (`mixed`, `mixed_train`: None without conversations)."""
    from llmfast.calibration import after_eval_span, conversation_windows, text_ids, windows, with_conversations

    d = recipe.data
    ids = text_ids(tokenizer, d.text)
    span = after_eval_span(ids, d.skip_tokens, d.calibration_tokens, str(d.text),
                           "data.skip_tokens + data.calibration_tokens")
    heldout = windows(ids[: d.heldout_tokens], d.window, "data.heldout_tokens") if d.heldout_tokens >= d.window else None
    chats = conversation_windows(tokenizer, d.conversations, d.window) if d.conversations else None
    rows, mixed = with_conversations(windows(span, d.window, "data.calibration_tokens"), d, chats, add=False)
    train_rows, mixed_train = with_conversations(windows(ids[d.skip_tokens:], d.window, "training text"), d, chats,
                                                 add=True)
    return {"rows": rows, "train_rows": train_rows, "heldout": heldout, "mixed": mixed, "mixed_train": mixed_train}


def run_quantize(recipe: Any, resume: bool = False, overwrite: bool = False) -> tuple[Path, dict[str, Any]]:
    """Quantize `recipe.model` into `recipe.output`; return the artifact's path and metrics. One run at a time per
    output (output_lock.py: a second would share the work folder)."""
    from llmfast.artifacts import check_output
    from llmfast.output_lock import output_lock

    out = check_output(recipe.output, overwrite)  # a bad path refused as such before a lock is taken for it
    with output_lock(out):
        return _run_quantize(recipe, resume, overwrite)


def _run_quantize(recipe: Any, resume: bool, overwrite: bool) -> tuple[Path, dict[str, Any]]:
    from llmfast.artifacts import atomic_dir, check_output, write_manifest
    from llmfast.work_dir import check_resumed_run, check_work_dir, holds_work, marked_work_dir
    from llmfast.sources import check_source
    from llmfast.calibration import used_data
    from llmfast.memory import peak_memory_gib
    from llmfast.modelfiles import weights_fingerprint, widened_note
    from llmfast.models import load_tokenizer, resolve_model
    from llmfast.sparse.derived import carried_sparsity

    spec = recipe.quantization
    out = check_output(recipe.output, overwrite, inputs=[recipe.model if Path(recipe.model).exists() else None])
    work = out.with_name(out.name + ".checkpoints")
    check_work_dir(work)  # removed below when starting afresh or done: never a user's folder of that name
    if holds_work(work) and not (resume or overwrite):
        raise UserError(f"{work} holds checkpoints of an earlier run: pass --resume to continue it, or --overwrite "
                        "to start again")
    source = resolve_model(recipe.model)
    check_output(out, overwrite, inputs=[source])
    run = {"verb": "quantize", "model": str(Path(source).resolve()), "method": spec.method,
           "settings": spec.config.model_dump(mode="json"),
           "data": recipe.data.model_dump(mode="json") if recipe.data is not None else None, "dtype": recipe.dtype,
           "weights": weights_fingerprint(source)}
    if resume and not spec.quantizer.trains(spec.config):
        raise UserError(f"--resume: this {spec.method} run does not train, so it keeps no checkpoints to continue: "
                        "run it without --resume")
    if resume and not holds_work(work):
        raise UserError(f"--resume: {work} holds nothing of an earlier run to continue: run it without --resume")
    if resume:  # checkpoints of another model or settings are not continued; a damaged one refused before loading
        check_resumed_run(work, run)
        spec.quantizer.check_resume(spec.config, work, Path(source))
    from llmfast.loading import check_positions, check_weights_fit, refuse_pickle_weights

    refuse_pickle_weights(source)  # what the methods' loaders refuse, before anything is written
    check_weights_fit(source)
    if recipe.data is not None:
        check_positions(source, recipe.data.window, "data.window")
    check_source(source, recipe.model, "quantize")
    skel = skeleton(source)
    spec.quantizer.check(skel, spec.config)
    if spec.quantizer.weight_bits:  # before calibration and tuning (an hour on an 8B model), not after
        from llmfast.artifacts import check_space
        from llmfast.quant.base import least_bytes

        check_space(out, least_bytes(skel, spec.quantizer.weight_bits), at_least=True)
    tokenizer = load_tokenizer(source)
    data = _rows(recipe, tokenizer) if recipe.data is not None else dict.fromkeys(
        ("rows", "train_rows", "heldout", "mixed", "mixed_train"))
    if work.exists() and overwrite and not resume:
        shutil.rmtree(work)
    start = time.perf_counter()  # a duration: the wall clock jumps when NTP or a user sets it
    # the work folder marked before a method writes into it: what a kill leaves there is known to be llmfast's
    with marked_work_dir(work, run, resume), atomic_dir(out, overwrite=overwrite, inputs=[source], guard=True) as tmp:
        metrics = spec.quantizer.quantize(source, spec.config, tmp, tokenizer=tokenizer, rows=data["rows"],
                                          train_rows=data["train_rows"], heldout=data["heldout"], dtype=recipe.dtype,
                                          work_dir=work, resume=resume)
        if data["mixed"] and used_data("quantize", metrics):  # not for a method that ignored the rows (RTN)
            metrics["conversations"] = {"calibration": data["mixed"]}  # as sparsify's
            if metrics.get("scale_train_tokens"):  # w4's scale tuning trained on the training rows
                metrics["conversations"]["training"] = data["mixed_train"]
        metrics["wall_seconds"] = round(time.perf_counter() - start, 2)
        metrics["peak_rss_gib"] = round(peak_memory_gib("cpu"), 3)
        write_manifest(tmp, stage="quantize", parents=[str(source)], recipe=recipe.model_dump(mode="json"),
                       metrics=metrics, quantization=spec.manifest(),
                       **carried_sparsity([Path(source)], tmp))  # a relufy model's ReLU and cut are kept
    if work.exists():
        shutil.rmtree(work, ignore_errors=True)
    print(f"quantized {recipe.model} with {spec.method} in {metrics['wall_seconds']} s", file=sys.stderr)
    if (note := widened_note(Path(source), out, "dtype")) is not None:  # what stays unquantized, in `dtype`
        print(note, file=sys.stderr)
    return out, metrics
