"""`llmfast sparsify RECIPE`: check everything, load the model and the text, let the method write its artifact.

The recipe's `sparsify.config` is validated in two steps: the method is looked up by name (did-you-mean
on a typo), then its own schema checks the settings, with errors pointing at the file and line. Every
check that needs no model runs before the model loads; nothing is written before all checks passed, and
the artifact appears only complete (atomic_dir). A training method keeps its checkpoints and log in
OUTPUT.checkpoints beside the output until the artifact is complete.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import create_model

from llmfast.errors import UserError
from llmfast.memory import peak_memory_gib
from llmfast.overrides import apply_overrides, parse_overrides
from llmfast.recipe import SparsifyRecipe, StrictModel, read_yaml, validate
from llmfast.sparse import base


def load_sparsify_recipe(path: str | os.PathLike[str], overrides: list[str] | None = None
                         ) -> tuple[Any, base.Sparsifier]:
    """The validated recipe (its sparsify.config parsed by the method's own schema) and the method."""
    import llmfast.sparse  # noqa: F401  (registers the methods)

    path = Path(path)
    data, lines = read_yaml(path)
    overridden = apply_overrides(data, parse_overrides(overrides))
    generic = validate(data, SparsifyRecipe, str(path), lines, overridden)
    key = ("sparsify", "method")
    where = f"{path} (--set sparsify.method)" if key in overridden else f"{path}:{lines.get(key, 1)}"
    method = base.SPARSIFIERS.get(generic.sparsify.method, where=f"{where}: sparsify.method")()
    return validate(data, method_schema(method), str(path), lines, overridden), method


def method_schema(method: base.Sparsifier) -> type[SparsifyRecipe]:
    """The recipe schema with `sparsify.config` checked by the method's own settings."""
    spec = create_model(f"Sparsify_{method.name}", __base__=StrictModel, method=(str, ...),
                        config=(method.Config, method.Config()))
    return create_model(f"SparsifyRecipe_{method.name}", __base__=SparsifyRecipe, sparsify=(spec, ...))


def work_dir_of(output: Path) -> Path:
    return output.with_name(output.name + ".checkpoints")


def _check_outputs(recipe: Any, method: base.Sparsifier, resume: bool, overwrite: bool) -> Path:
    from llmfast.artifacts import check_output
    from llmfast.work_dir import check_work_dir

    out = Path(recipe.output).expanduser()
    local = Path(recipe.model).expanduser()
    check_output(out, overwrite, inputs=[local if local.exists() else None])
    work = work_dir_of(out)
    check_work_dir(work)  # removed below when starting afresh: never a user's folder of that name
    if resume and not method.trains:
        raise UserError(f"--resume: {method.name} does not train, there is nothing to resume: run it without --resume")
    checkpoints = list(work.glob("checkpoints/step-*/state.json"))
    if checkpoints and not resume and not overwrite:
        raise UserError(f"{work} holds checkpoints of an interrupted run: pass --resume to continue it, or "
                        "--overwrite to start again")
    if resume and not checkpoints:
        raise UserError(f"--resume: {work} has no complete checkpoint (set sparsify.config.save_every to make some)")
    return work


def run_sparsify(recipe: Any, method: base.Sparsifier, resume: bool = False, overwrite: bool = False
                 ) -> dict[str, Any]:
    """Write the sparsified artifact at recipe.output; return its metrics. One run at a time per output
    (output_lock.py: a second would share, or delete, the first's work folder)."""
    from llmfast.artifacts import check_output
    from llmfast.output_lock import output_lock

    out = check_output(Path(recipe.output).expanduser(), overwrite)  # refused as such before a lock is taken
    with output_lock(out):
        return _run_sparsify(recipe, method, resume, overwrite)


def _run_sparsify(recipe: Any, method: base.Sparsifier, resume: bool, overwrite: bool) -> dict[str, Any]:
    import torch

    from llmfast.artifacts import atomic_dir, write_manifest
    from llmfast.work_dir import check_resumed_run, marked_work_dir
    from llmfast.loading import check_positions
    from llmfast.modelfiles import weights_fingerprint
    from llmfast.models import load_tokenizer, resolve_model
    from llmfast.recipe import recipe_dict
    from llmfast.sparse.relu_cut import apply_config_cut
    from llmfast.modelfiles import widened_note
    from llmfast.sources import check_source
    from llmfast.sparse.stacked import apply_inherited, source_attention
    from llmfast.calibration import conversation_windows, split_text, text_ids, windows, with_conversations

    t0 = time.perf_counter()
    work = _check_outputs(recipe, method, resume, overwrite)
    model_path = resolve_model(recipe.model)
    # its integer layers would be trained or measured as something else, and the artifact would drop the format
    check_source(Path(model_path), recipe.model, "sparsify")
    run = {"verb": "sparsify", "model": str(Path(model_path).resolve()), "method": method.name,
           "settings": recipe.sparsify.config.model_dump(mode="json"), "data": recipe.data.model_dump(mode="json"),
           "dtype": recipe.dtype, "weights": weights_fingerprint(model_path)}
    if resume:  # checkpoints of another model or settings are not continued; a damaged one refused before loading
        check_resumed_run(work, run)
        method.check_resume(recipe.sparsify.config, work, Path(model_path))
    attention = source_attention(model_path, recipe.model, method.name)  # a TEAL attention-only source's settings
    _check_space(method, model_path, Path(recipe.output).expanduser(), recipe.dtype,
                 _check_architecture(model_path, recipe.model))
    check_positions(model_path, recipe.data.window, "data.window")
    tokenizer = load_tokenizer(model_path)
    d = recipe.data
    ids = text_ids(tokenizer, d.text)
    train_ids, calibration, heldout = split_text(ids, d.skip_tokens, d.calibration_tokens, d.heldout_tokens,
                                                 d.window, str(d.text))
    chats = conversation_windows(tokenizer, d.conversations, d.window) if d.conversations else None
    calibration, mixed_calibration = with_conversations(calibration, d, chats, add=False)
    mixed = mixed_calibration and {"calibration": mixed_calibration}
    train_rows = None
    if method.trains:  # all the text after the evaluated span, and conversations on top when given
        train_rows, mixed_train = with_conversations(windows(train_ids, d.window, "training text"), d, chats,
                                                     add=True)
        if mixed:
            mixed["training"] = mixed_train
    from llmfast.loading import from_pretrained

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = from_pretrained(model_path, recipe.dtype).to(device).eval()
    apply_config_cut(model, model_path)  # a shifted ReLU source is what the method reads, cut included
    if attention:  # and so are a TEAL source's attention thresholds (stacked.py)
        apply_inherited(model, model_path, {"method": method.name, "attention": attention})
    if not resume and work.exists():  # checked above: --overwrite, or only a log without checkpoints
        shutil.rmtree(work)
    job = base.SparsifyJob(model_spec=recipe.model, model_path=model_path, model=model, tokenizer=tokenizer,
                           dtype=recipe.dtype, train_rows=train_rows, calibration=calibration, heldout=heldout,
                           window=d.window, work_dir=work, resume=resume)
    cfg = recipe.sparsify.config
    # the work folder marked before the method writes into it: what a kill leaves there is known to be llmfast's
    with marked_work_dir(work, run, resume), atomic_dir(recipe.output, overwrite=overwrite, inputs=[model_path],
                                                        guard=True) as tmp:
        metrics = method.sparsify(job, cfg, tmp)
        metrics.update({
            "method": method.name, "wall_seconds": round(time.perf_counter() - t0, 1),
            "peak_memory_gib": round(peak_memory_gib(device), 3),
            "memory_kind": "cuda max allocated" if device == "cuda" else "process peak RSS",
            "device": device, "dtype": recipe.dtype,
            "text": {"path": str(d.text), "tokens": int(ids.numel()), "heldout": [0, int(heldout.numel())],
                     "calibration_from": d.skip_tokens},
        })
        if mixed:
            metrics["conversations"] = mixed
        write_manifest(tmp, stage="sparsify", parents=[recipe.model], recipe=recipe_dict(recipe), metrics=metrics,
                       base_model_path=str(model_path),
                       sparsity={"method": method.name, "config": cfg.model_dump(mode="json"),
                                 **({"attention": attention} if attention else {}),
                                 # thresholds and predictors fit these weights, often hard links to the source's
                                 "weights": weights_fingerprint(tmp)})
    shutil.rmtree(work, ignore_errors=True)
    if (note := widened_note(Path(model_path), Path(recipe.output).expanduser(), "dtype")) is not None:
        print(note, file=sys.stderr)  # relufy writes the model in `dtype`: a bfloat16 one doubles in float32
    return metrics


def _check_architecture(model_path: Path, spec: str) -> Any:
    """No gated MLP is refused from the config alone: the model is built on the meta device, no weights read;
    returns that skeleton."""
    from llmfast.loading import meta_skeleton

    skeleton = meta_skeleton(model_path)
    base.gated_mlps(skeleton, where=spec)
    return skeleton


def _check_space(method: base.Sparsifier, model_path: Path, out: Path, dtype: str, skeleton: Any) -> None:
    """The fewest bytes the artifact takes, against its disk's free space, before the model loads (relufy's
    training takes hours on a large model): its weights in `dtype` for a method that rewrites them; the source's
    files where they must be copied (another file system: no hard links); nothing to check otherwise."""
    from llmfast.artifacts import check_space, nearest_existing
    from llmfast.loading import torch_dtype
    from llmfast.sparse.thresholds import source_files

    if method.rewrites_weights:
        need = sum(p.numel() for p in skeleton.parameters()) * torch_dtype(dtype).itemsize
    else:
        if nearest_existing(out.parent).stat().st_dev == Path(model_path).stat().st_dev:
            return
        need = sum(f.stat().st_size for f in source_files(Path(model_path)))
    check_space(out, need, at_least=True)


