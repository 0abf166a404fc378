"""Stage types of a chain: each is an existing verb, called in-process with the arguments it takes.

A stage type knows only how to hand its `with:` section to its verb: as a recipe file (the verb's own
schema, with `output` set to the stage's directory) or as flags. The verb does all the checking and the work,
exactly as on the command line, so a chain can do nothing a verb cannot.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import yaml

from llmfast.chain.checks import CHECKS
from llmfast.errors import UserError
from llmfast.registry import Registry


@dataclasses.dataclass(frozen=True)
class StageType:
    """How to call one verb. `argv(section, out, recipe_file, resume)` -> the verb's command line."""

    argv: Callable[[dict[str, Any], Path, Path, bool], list[str]]
    resumable: Callable[[Path], bool] = lambda out: False  # whether a killed run left something to resume
    # The verb writes its output whole beside the old one and swaps it in only when complete (--overwrite): a
    # changed stage's earlier output stays until then, so a run killed meanwhile leaves the last complete one.
    replaces_whole: bool = False
    # Checks the `with:` section before any stage runs (a one-line UserError; checks.py); the verb checks the rest.
    check: Callable[[dict[str, Any]], None] = lambda section: None


STAGES: Registry[StageType] = Registry("stage type")


def write_recipe(path: Path, section: dict[str, Any], **extra: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({**section, **extra}, sort_keys=False))
    return path


def _recipe_verb(verb: list[str], output: Callable[[Path], Path], flags: list[str],
                 resume_flag: bool) -> Callable[[dict[str, Any], Path, Path, bool], list[str]]:
    def argv(section: dict[str, Any], out: Path, recipe_file: Path, resume: bool) -> list[str]:
        write_recipe(recipe_file, section, output=str(output(out)))
        return [*verb, str(recipe_file), *flags, *(["--resume"] if resume and resume_flag else [])]

    return argv


def _checkpoints_beside(out: Path) -> bool:
    """A checkpoint in the work folder beside `out`, or w4's finished AutoRound rounding (its settings file is
    written last), which a resume takes instead of rounding again before its scale tuning (in scales/)."""
    work = out.with_name(out.name + ".checkpoints")
    return (any(work.glob("checkpoints/step-*/state.json")) or any(work.glob("scales/checkpoints/step-*/state.json"))
            or (work / "autoround" / "w4-settings.json").is_file())


TASKS_KEYS = ("tasks", "train", "test", "seed")


def _check_tasks(section: dict[str, Any]) -> None:
    unknown = sorted(set(section) - set(TASKS_KEYS))
    if unknown:
        raise UserError(f"with.{unknown[0]}: not a setting of a tasks stage (they are {', '.join(TASKS_KEYS)})")
    names = section.get("tasks", ["all"])
    if not (isinstance(names, str) or (isinstance(names, list) and names and all(isinstance(n, str) for n in names))):
        raise UserError(f"with.tasks: a task name or a list of them, not {names!r}")
    # what the tasks verb refuses, refused before the first stage runs (as --dry-run): not after hours of others
    for key in ("train", "test", "seed"):
        if key in section and (isinstance(section[key], bool) or not isinstance(section[key], int)):
            raise UserError(f"with.{key}: a whole number, not {section[key]!r}")
    from llmfast.data.tasks import check_request

    names = [names] if isinstance(names, str) else names
    try:
        check_request([] if names == ["all"] else names, section.get("train", 2000), section.get("test", 200),
                      keys=("train", "test"))
    except UserError as e:
        raise UserError(f"with: {e}") from None


def _tasks_argv(section: dict[str, Any], out: Path, recipe_file: Path, resume: bool) -> list[str]:
    names = section.get("tasks", ["all"])
    argv = ["tasks", *([names] if isinstance(names, str) else names), "--out", str(out), "--overwrite"]
    for key in ("train", "test", "seed"):
        if key in section:
            argv += [f"--{key}", str(section[key])]
    return argv


def _merge_argv(section: dict[str, Any], out: Path, recipe_file: Path, resume: bool) -> list[str]:
    write_recipe(recipe_file, section)
    return ["merge", str(recipe_file), str(out), "--overwrite", "--no-progress"]


STAGES.add("tasks", StageType(_tasks_argv, check=_check_tasks))
STAGES.add("finetune", StageType(_recipe_verb(["finetune"], lambda out: out, [], True),
                                 resumable=lambda out: any(out.glob("checkpoints/step-*/state.json")),
                                 check=CHECKS["finetune"]))
STAGES.add("merge", StageType(_merge_argv, replaces_whole=True, check=CHECKS["merge"]))
STAGES.add("quantize", StageType(_recipe_verb(["quantize"], lambda out: out, ["--overwrite"], True),
                                 resumable=_checkpoints_beside, replaces_whole=True, check=CHECKS["quantize"]))
STAGES.add("sparsify", StageType(_recipe_verb(["sparsify"], lambda out: out, ["--overwrite"], True),
                                 resumable=_checkpoints_beside, replaces_whole=True, check=CHECKS["sparsify"]))
STAGES.add("eval", StageType(_recipe_verb(["eval"], lambda out: out / "results.json", [], False),
                             check=CHECKS["eval"]))
STAGES.add("bench", StageType(_recipe_verb(["bench", "run"], lambda out: out, ["--overwrite"], False),
                              replaces_whole=True, check=CHECKS["bench"]))
