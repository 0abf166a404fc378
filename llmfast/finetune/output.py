"""A fine-tuning run's output folder: a new run's (empty or absent), a run to resume from its last checkpoint, or
a run killed before its first checkpoint, which `--resume` starts again. Decided before the model loads."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from llmfast.artifacts import check_output
from llmfast.errors import UserError
from llmfast.finetune import checkpoint as ckpts
from llmfast.recipe import FinetuneRecipe, recipe_dict


def check_run_output(recipe: FinetuneRecipe, resume: bool) -> tuple[Path, bool, bool]:
    """The output, whether there is a checkpoint to resume from, and whether a run killed before its first one
    is to start again (its files are removed by `start_afresh` once every process has checked them)."""
    out = Path(recipe.output)
    if resume and ckpts.latest_checkpoint(out) is None:
        if (out / "adapter").exists() or (out / "metrics.json").exists():
            raise UserError(f"--resume: {out} holds a finished run (adapter/, metrics.json): there is nothing to "
                            "resume; choose another output")
        foreign = ckpts.foreign_run_files(out)
        if foreign:
            raise UserError(f"--resume: {out} has no checkpoint and holds {foreign}, which a run of llmfast does not "
                            "write: choose another output")
        # Killed before its first checkpoint (or before its folder existed): nothing to keep, so it starts again.
        check_output(out, overwrite=out.is_dir(), inputs=recipe.inputs())
        return out, False, True
    if resume:
        ckpts.check_same_recipe(out, recipe_dict(recipe))
    if not resume and out.is_dir() and any(out.iterdir()):
        raise UserError(ckpts.taken_output(out))
    if not resume:  # a file, a parent that is a file, no permission, the data inside it: one line each
        check_output(out, overwrite=out.is_dir(), inputs=recipe.inputs())
    return out, resume, False


def start_afresh(acc: Any, out: Path) -> None:
    """Process 0 removes the files of a run killed before its first checkpoint, after every process has looked at
    them in `check_run_output` (removed before, another process could read one half gone)."""
    acc.wait_for_everyone()
    if acc.is_main_process:
        for name in ckpts.RUN_FILES:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        print(f"llmfast: {out} has no complete checkpoint yet: starting from step 0", file=sys.stderr, flush=True)
