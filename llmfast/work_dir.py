"""The work folder of a training verb (OUTPUT.checkpoints, beside its output): marked as llmfast's, with the run it
holds recorded in the mark, so that a user's folder is never deleted and `--resume` continues only the same run."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any, Iterator

from llmfast.artifacts import atomic_write_json
from llmfast.errors import UserError

WORK_MARK = ".llmfast-work"  # in OUTPUT.checkpoints: the folder is llmfast's, to remove when the artifact is done


def check_work_dir(work: Path) -> None:
    """A training verb's work folder beside its output (OUTPUT.checkpoints) is removed when the run starts afresh
    and when the artifact is complete: refuse one that llmfast did not mark as its own rather than delete a user's
    files (an empty folder holds none). A mark that is not what llmfast writes (a JSON object), an empty one above
    all (`touch`ed by hand; an llmfast before 2026-12-07 wrote them so), is not taken at its word either where the
    folder holds more."""
    if work.is_symlink() or (work.exists() and not work.is_dir()):
        raise UserError(f"{work} is not a folder llmfast made (a link or a file): move it away, or choose another "
                        "output")
    if not work.exists() or not any(work.iterdir()):
        return
    mark = work / WORK_MARK
    if not mark.is_file():
        raise UserError(f"{work} exists and is not a work folder llmfast made (it keeps a run's checkpoints there "
                        "and deletes it when done): move it away, or choose another output (a run of an llmfast "
                        "before 2026-12-05 did not record the model it trained, so it is not resumed: delete it)")
    if holds_work(work) and _read_mark(mark) is None:
        raise UserError(f"{work} holds files and its mark {WORK_MARK} is empty or not llmfast's (made by hand, or by "
                        "an llmfast before 2026-12-07, which recorded no run), so llmfast will not delete the folder "
                        "on its word: look inside, and delete it yourself if it holds only an earlier run's "
                        "checkpoints, or choose another output")


def _read_mark(mark: Path) -> dict[str, Any] | None:
    """The mark's record (a JSON object, as llmfast writes it), or None for one it did not write whole."""
    try:
        data = json.loads(mark.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_resumed_run(work: Path, run: dict[str, Any]) -> None:
    """`--resume` continues only the run the work folder's mark records (`run`: the source model, the method, its
    settings...), so checkpoints of another model or other settings are refused, naming what differs. A folder
    `check_work_dir` accepted; a mark that records no run (distill's) is not compared."""
    recorded = (_read_mark(work / WORK_MARK) or {}).get("run")
    if not isinstance(recorded, dict):
        return  # marked by a verb that records no run (distill)
    from llmfast.modelfiles import same_weights  # the weights decide, not the path (a moved project resumes)
    same = same_weights(run.get("model", ""), recorded.get("weights"), run.get("weights"))
    for key, value in run.items():
        was = recorded.get(key)
        if key == "weights":  # a mark of an earlier version recorded none
            if was is not None and not same:
                raise UserError(f"--resume: {work} holds a run on other weights than those of {run.get('model')} now "
                                "(the model was re-made or re-saved since?): resume with the model it started from, "
                                "or start again with --overwrite")
            continue
        if was != value and not (key == "model" and same):
            where = key
            if isinstance(was, dict) and isinstance(value, dict):  # name the setting, not the whole section
                inner = sorted(k for k in {*was, *value} if was.get(k) != value.get(k))[0]
                where, was, value = f"{key}.{inner}", was.get(inner), value.get(inner)
            raise UserError(f"--resume: {work} holds a run with {where} {_short(was)}, this one has {_short(value)}: "
                            "resume with the same recipe, or start again with --overwrite")


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def mark_work_dir(work: Path, run: dict[str, Any] | None = None) -> Path:
    """Create (or keep) the work folder, marked as llmfast's (the verb checked it with `check_work_dir`); `run`
    (the source model, method and settings) is recorded in the mark so that `--resume` can check it."""
    work.mkdir(parents=True, exist_ok=True)
    mark = work / WORK_MARK
    if run is not None or not mark.exists():  # never empty: check_work_dir does not trust an empty mark
        atomic_write_json(mark, {"run": run})
    return work


@contextlib.contextmanager
def marked_work_dir(work: Path, run: dict[str, Any] | None = None, resume: bool = False) -> Iterator[Path]:
    """The verb's work folder, marked for the run; if the run fails before anything but the mark is in it (a
    setting the method refuses), it is removed again, so a refused run leaves nothing. A resumed run keeps the
    mark of the run it continues."""
    mark_work_dir(work, None if resume and (work / WORK_MARK).is_file() else run)
    try:
        yield work
    except BaseException:
        if not holds_work(work):
            shutil.rmtree(work, ignore_errors=True)
        raise


def holds_work(work: Path) -> bool:
    """Whether an earlier run left anything in the work folder besides the mark."""
    return work.is_dir() and any(p.name != WORK_MARK for p in work.iterdir())
