"""What a fine-tuning run writes into its output before its first checkpoint is complete, and whether a folder holds
only that: read without torch, by preflight.py before anything heavy is imported and by the trainer's `--resume`."""

from __future__ import annotations

import json
from pathlib import Path


# What a run writes into its output before the first checkpoint is complete (`encoded`: finetune/encoded_cache.py).
ENCODED = "encoded"
ENCODED_FILES = {"meta.json", "ids.npy", "labels.npy", "examples.npy"}
RUN_FILES = {"recipe.json", "base.json", "train_log.jsonl", "checkpoints", ENCODED}


def foreign_encoded(out: Path) -> Path | None:
    """OUTPUT/encoded where it is not what finetune writes there (a link, a file, a folder with other files: a user's
    own, the name being a plain word), which is then neither read nor replaced nor dropped; None where it is absent
    or llmfast's."""
    d = out / ENCODED
    if not d.exists() and not d.is_symlink():
        return None
    if d.is_dir() and not d.is_symlink() and {p.name for p in d.iterdir()} <= ENCODED_FILES:
        return None
    return d


def foreign_run_files(out: Path) -> str | None:
    """What in `out` a run killed before its first checkpoint would not have left (named for the error), or None:
    only then may `--resume` remove what is there and start again. Checked inside, not by name alone: a user's
    `checkpoints/` folder or `recipe.json` of the same name is not llmfast's."""
    if not out.is_dir():
        return None
    for p in sorted(out.iterdir()):
        if p.is_symlink() or p.name not in RUN_FILES and not _left_by_a_write(p.name):
            return str(p)
    if (encoded := foreign_encoded(out)) is not None:
        return str(encoded)
    ckpt_dir = out / "checkpoints"
    if ckpt_dir.exists():
        if not ckpt_dir.is_dir():
            return str(ckpt_dir)
        for p in ckpt_dir.iterdir():  # only checkpoints being written (.step-N.tmp-*) or without their state.json
            if not p.name.startswith(("step-", ".step-")) or p.is_symlink():
                return str(p)
    recipe = out / "recipe.json"
    if recipe.exists():
        try:
            data = json.loads(recipe.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return str(recipe)
        if not isinstance(data, dict) or not {"model", "data", "lora", "train", "output"} <= set(data):
            return str(recipe)
    base = out / "base.json"
    if base.exists():
        try:
            if not isinstance(json.loads(base.read_text(encoding="utf-8")).get("weights"), str):
                return str(base)
        except (OSError, ValueError, AttributeError):
            return str(base)
    log = out / "train_log.jsonl"
    if log.exists():
        try:
            rows = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, ValueError):
            return str(log)
        if not all(isinstance(r, dict) and "step" in r for r in rows):
            return str(log)
    return None


def _left_by_a_write(name: str) -> bool:
    """A temporary sibling of one of RUN_FILES (artifacts.atomic_dir's, atomic_write_text's `.NAME.tmp-PID-...`) that
    a kill mid-write left: removed by the next write of that file, once its process is gone."""
    return any(name.startswith((f".{f}.tmp-", f".{f}.old-")) for f in RUN_FILES)


def taken_output(out: Path) -> str:
    """Why a non-empty `out` is refused without `--resume`, and what to do: a finished run is not resumed, a run with
    a checkpoint is, one stopped before its first starts again, and a folder of the user's files is not llmfast's."""
    from llmfast.artifacts import latest_step

    if (out / "adapter").exists() or (out / "metrics.json").exists():
        return (f"{out} holds a finished run (adapter/, metrics.json): choose another output, or remove it to train "
                "again")
    if latest_step(out / "checkpoints") is not None:
        return f"{out} already exists: pass --resume to continue that run, or choose another output"
    foreign = foreign_run_files(out)
    if foreign is None:
        return (f"{out} holds a run stopped before its first checkpoint: pass --resume to start it again there, or "
                "choose another output")
    return f"{out} already exists and holds {foreign}, which a run of llmfast does not write: choose another output"
