"""Checks a verb runs before importing torch: what a user can get wrong answers in a fraction of a second.

Importing torch, transformers and accelerate takes seconds; a typo in a data path, a broken model directory
or an output that already exists should not wait for them (and certainly not for a model to load).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from llmfast.artifacts import check_output
from llmfast.data.chat import check_rows
from llmfast.errors import UserError
from llmfast.recipe_paths import paths_of

if TYPE_CHECKING:
    from llmfast.recipe import DataConfig, FinetuneRecipe


def check_rows_fit(model_path: Path, data: "DataConfig") -> None:
    """A learned position table fails on a longer row mid-run (IndexError); rotary ones would train past the
    positions they were trained on: refused as every verb's windows are. Here for a local model folder, by the
    trainer for the models it resolves itself (built-in, GGUF, hub)."""
    from llmfast.loading import check_positions

    packed = data.packing and data.pack_length is not None
    check_positions(model_path, data.pack_length if packed else data.max_length,
                    "data.pack_length" if packed else "data.max_length")


def check_finetune_inputs(recipe: "FinetuneRecipe", resume: bool) -> None:
    """The output, a local model directory (one LoRA can train on) and every JSONL row's shape, as the trainer will
    find them."""
    from llmfast.models import resolve_model
    from llmfast.sources import check_source

    out = Path(recipe.output)
    dc = recipe.data
    if not resume:
        if out.is_dir() and any(out.iterdir()):
            from llmfast.finetune.run_files import taken_output

            raise UserError(taken_output(out))
        check_output(out, overwrite=out.is_dir(), inputs=recipe.inputs())
    if Path(recipe.model).expanduser().is_dir():  # builtin/GGUF/hub models may need a conversion: the trainer's job
        model_path = resolve_model(recipe.model)
        # LoRA on a full-precision or bitsandbytes 4-bit model; not through a TEAL/CATS/Deja Vu artifact's files
        check_source(model_path, recipe.model, "finetune")
        check_rows_fit(model_path, dc)
    for path in (*paths_of(dc.train), *paths_of(dc.eval)):
        if Path(path).is_file():
            check_rows(path)
