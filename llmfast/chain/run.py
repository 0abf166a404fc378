"""`llmfast run RECIPE`: run a chain's stages in dependency order, reusing every result whose key is unchanged.

State lives in the run directory: `llmfast-run.json` names the recipe that owns the directory (another
recipe's directory is refused), `.state/NAME.json` records a finished stage's key and `.state/NAME.started`
the key of a stage that began. A stage whose recorded key matches is reused; one that was killed resumes
where its verb can (a fine-tune or a training quantize/sparsify from its checkpoint) and otherwise runs again;
one whose key changed, or that `--from` names or follows, runs again: its old checkpoints are removed first, and
its old output too unless the verb replaces that whole once the new one is complete (merge, quantize, sparsify, bench).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from llmfast.artifacts import atomic_write_json
from llmfast.chain.checks import with_flags
from llmfast.chain.launchers import check_launch
from llmfast.chain.plan import ChainRecipe, Stage, downstream, plan, substitute
from llmfast.chain.stages import STAGES
from llmfast.errors import UserError
from llmfast.output_lock import output_lock

OWNER = "llmfast-run.json"


def _state(out: Path, stage: Stage, suffix: str) -> Path:
    return out / ".state" / f"{stage.name}.{suffix}"


def _recorded_key(path: Path, field: str = "key") -> str | None:
    try:
        return json.loads(path.read_text()).get(field)
    except (OSError, ValueError, AttributeError):
        return None


def decide(out: Path, stages: list[Stage], forced: set[str]) -> dict[str, tuple[str, str]]:
    """For each stage: (action, why), action one of reuse / resume / run."""
    decisions: dict[str, tuple[str, str]] = {}
    rerun: set[str] = set()
    for stage in stages:
        stage_dir = out / stage.name
        done_key = _recorded_key(_state(out, stage, "json"))
        started_key = _recorded_key(_state(out, stage, "started"))
        if stage.name in forced:
            decisions[stage.name] = ("run", "--from")
        elif done_key is None and started_key is None:
            decisions[stage.name] = ("run", "new")
        elif started_key == stage.key and done_key != stage.key and STAGES.get(stage.type).resumable(stage_dir):
            decisions[stage.name] = ("resume", "interrupted; its checkpoint is kept")
        elif set(stage.parents) & rerun:
            decisions[stage.name] = ("run", "a parent runs again")
        elif done_key == stage.key and stage_dir.exists():
            decisions[stage.name] = ("reuse", f"done, key {stage.key}")
            continue
        elif done_key is not None and done_key != stage.key:
            settings = _recorded_key(_state(out, stage, "json"), "settings")
            decisions[stage.name] = ("run", "an input file changed" if settings == stage.settings else
                                     "settings changed" if settings else "keyed anew: its input files count now")
        else:
            decisions[stage.name] = ("run", "did not finish, no checkpoint to resume" if done_key is None
                                     else "output missing")
        rerun.add(stage.name)
    return decisions


def _claim(out: Path, recipe_path: Path) -> None:
    """The run directory belongs to one recipe; another recipe's directory is refused before anything runs."""
    owner_file = out / OWNER
    me = str(recipe_path.resolve())
    if owner_file.is_file():
        owner = _recorded_owner(owner_file)
        if owner != me:
            raise UserError(f"{out} belongs to the chain recipe {owner}: give this recipe another output")
    elif out.exists() and not out.is_dir():  # listing it was a traceback (NotADirectoryError)
        raise UserError(f"output {out} is a file: give a folder for the run (one folder per stage in it)")
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"output {out} exists and was not made by `llmfast run`: choose another output")


def _recorded_owner(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("recipe")
    except (OSError, ValueError, AttributeError):
        return None


def _clear(out: Path, stage: Stage) -> None:
    """Remove what a stage's earlier settings left (the run directory owns it) before it runs from scratch: its
    checkpoints, and its output unless the verb replaces that only once the new one is complete."""
    target = out / stage.name
    stale = [target.with_name(target.name + ".checkpoints")]
    if not STAGES.get(stage.type).replaces_whole:
        stale.append(target)
    for path in stale:
        if path.is_symlink():  # the user's (a stage's output kept on another disk): its target is not the run's
            raise UserError(f"{path} is a symbolic link, and stage '{stage.name}' must clear what its earlier settings "
                            "left there: remove the link (and what it points to, if no longer needed), then run "
                            "again")
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    _state(out, stage, "json").unlink(missing_ok=True)


def _launch(stage: Stage, argv: list[str], env: dict[str, str] | None, keep: tuple[int, ...]) -> None:
    """Run the stage's verb under its launcher (`argv`: the verb's command line), in `env`, passing on `keep`."""
    import subprocess

    try:
        proc = subprocess.Popen([*stage.launch, "-m", "llmfast.cli", *argv], env=env, pass_fds=keep)
    except FileNotFoundError:
        raise UserError(f"stage {stage.name}: launcher '{stage.launch[0]}' not found: install it or give its "
                        "full path in `launch:`") from None
    try:
        code = proc.wait()
    except KeyboardInterrupt as e:  # passed on (subprocess.run would SIGKILL the launcher after 0.25 s, and
        # torchrun's workers would train on, orphaned); a launcher that has not stopped in 30 s is killed
        import signal

        proc.send_signal(getattr(e, "signum", signal.SIGINT))
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    if code:
        raise UserError(f"stage {stage.name} ({stage.type}) under {' '.join(stage.launch)} failed with exit "
                        f"code {code}: see its output above")


def run_stage(out: Path, stage: Stage, resume: bool, run_verb: Callable[[list[str]], int],
              recipe_path: Path | None = None) -> None:
    """Run one stage through `run_verb` (the CLI's own dispatch, handed in so the chain does not import it)."""
    paths = {name: out / name for name in stage.parents}
    section = substitute(stage.section, paths)
    flags = substitute(list(stage.flags), paths)
    generated = out / ".recipes" / f"{stage.name}.yaml"
    argv = STAGES.get(stage.type).argv(section, out / stage.name, generated, resume)
    if stage.launch:  # a launcher (torchrun) starts the verb's processes itself
        from llmfast.scratch import scratch_env

        # torchrun leaves a torchelastic_* folder in $TMPDIR each run: the stage's own goes
        with scratch_env() as (env, keep):
            _launch(stage, [*argv, *flags], {**os.environ, **env} if env else None, keep)
        return
    from llmfast.memory import give_back_freed_memory, reset_peak_memory

    reset_peak_memory()  # the stage runs in this process: the peak memory its metrics report is its own
    try:
        code = run_verb([*argv, *flags])
    except UserError as e:  # the user wrote the chain recipe, not the stage's generated one
        # (a line number in the generated file would point nowhere in it)
        where = f"{recipe_path} (stages.{stage.name})" if recipe_path else str(generated)
        said = re.sub(re.escape(str(generated)) + r"(:\d+)?", lambda _: where, str(e))
        raise UserError(f"stage {stage.name} ({stage.type}): {said}") from None
    finally:  # a merge stage's malloc keeps its peak heap for reuse: not for the stages after it
        give_back_freed_memory()
    if code:
        raise UserError(f"stage {stage.name} ({stage.type}) failed with exit code {code}: see its output above")


def format_plan(stages: list[Stage], decisions: dict[str, tuple[str, str]]) -> str:
    width = max(len(s.name) for s in stages)
    lines = []
    for i, s in enumerate(stages, 1):
        action, why = decisions[s.name]
        parents = f" <- {', '.join(s.parents)}" if s.parents else ""
        lines.append(f"{i:>2}. {action:<7} {s.name:<{width}}  {s.type:<9} {why}{parents}")
    return "\n".join(lines)


def run_chain(recipe: ChainRecipe, recipe_path: Path, run_verb: Callable[[list[str]], int], dry_run: bool = False,
              start: str | None = None, parse_verb: Callable[[list[str]], Any] | None = None) -> Path:
    """Run (or, with dry_run, only show) the chain; return the run directory. `parse_verb` (the CLI's parser, handed
    in as `run_verb` is) checks each stage's command line, its `flags:` included, before any stage runs."""
    stages = plan(recipe, str(recipe_path), STAGES.names())
    out = Path(recipe.output).expanduser()
    if start is not None and start not in recipe.stages:
        from llmfast.registry import did_you_mean

        raise UserError(f"--from {start}: no such stage{did_you_mean(start, list(recipe.stages))}; the stages are "
                        f"{', '.join(s.name for s in stages)}")
    _claim(out, recipe_path)
    for stage in stages:  # what a stage type can check of its section, before anything runs (checks.py)
        try:
            check_launch(stage.launch)  # a command line the recipe gives: only a launcher that starts llmfast
            STAGES.get(stage.type).check(with_flags(stage.section, list(stage.flags)))
            if parse_verb is not None and stage.flags:  # a misspelled flag failed only when its stage's turn came
                with tempfile.TemporaryDirectory() as tmp:  # the verb's recipe file, written only to be named
                    parse_verb([*STAGES.get(stage.type).argv(stage.section, out / stage.name, Path(tmp) / "r.yaml",
                                                             False), *stage.flags])
        except UserError as e:
            raise UserError(f"stage {stage.name} ({stage.type}) of {recipe_path}: {e}") from None
    decisions = decide(out, stages, downstream(stages, start) if start else set())
    if dry_run:
        print(format_plan(stages, decisions))
        return out
    # one run of a chain at a time: a second would clear a running stage's folder before its verb refused it
    with output_lock(out):
        return _run_locked(out, stages, decisions, run_verb, recipe_path)


def _run_locked(out: Path, stages: list[Stage], decisions: dict[str, tuple[str, str]],
                run_verb: Callable[[list[str]], int], recipe_path: Path) -> Path:
    existed = out.exists()
    fresh = not existed or not any(out.iterdir())
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / OWNER, {"recipe": str(recipe_path.resolve())})
    try:
        _run_stages(out, stages, decisions, run_verb, recipe_path)
    except BaseException:
        if fresh:
            _drop_if_only_bookkeeping(out, keep_folder=existed)
        raise
    return out


def _drop_if_only_bookkeeping(out: Path, keep_folder: bool) -> None:
    """A new run folder whose first stage failed before writing anything holds only the chain's own files: remove
    them (and the folder unless it was there, empty, before), so a failed run leaves nothing on disk and the
    output stays free for another recipe."""
    own = {OWNER, ".state", ".recipes"}
    if not {p.name for p in out.iterdir()} <= own or any((out / ".state").glob("*.json")):
        return
    if not keep_folder:
        shutil.rmtree(out, ignore_errors=True)
        return
    for name in own:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _run_stages(out: Path, stages: list[Stage], decisions: dict[str, tuple[str, str]],
                run_verb: Callable[[list[str]], int], recipe_path: Path) -> None:
    for i, stage in enumerate(stages, 1):
        action, why = decisions[stage.name]
        print(f"[{i}/{len(stages)}] {stage.name} ({stage.type}): {action} ({why})", file=sys.stderr, flush=True)
        if action == "reuse":
            continue
        if action == "run":
            _clear(out, stage)
        atomic_write_json(_state(out, stage, "started"), {"key": stage.key})
        began = time.monotonic()  # a duration: the wall clock jumps when NTP or a user sets it
        run_stage(out, stage, action == "resume", run_verb, recipe_path)
        atomic_write_json(_state(out, stage, "json"), {"key": stage.key, "settings": stage.settings,
                                                       "seconds": round(time.monotonic() - began, 1)})


def stage_seconds(out: Path) -> dict[str, Any]:
    """Seconds each finished stage took, from the state files."""
    found = {}
    for path in sorted((out / ".state").glob("*.json")):
        try:
            found[path.stem] = json.loads(path.read_text()).get("seconds")
        except (OSError, ValueError):
            continue
    return found
