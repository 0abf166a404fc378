"""Artifact directories: what a stage writes, with its lineage, and never half-written.

An artifact is a directory that Hugging Face tools open as it is (a model or a PEFT adapter) plus
`llmfast.json`, the manifest: which stage made it, from which parents, with which recipe, and its metrics.
Every write goes to a temporary sibling that is renamed into place only when complete, so a crash or a
Ctrl-C leaves either the old artifact or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from llmfast import __version__
from llmfast.errors import UserError

MANIFEST = "llmfast.json"


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str], overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; rename it to `final` if the block succeeds, delete it if not."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise UserError(f"{final} already exists: choose another output directory or remove it")
    final.parent.mkdir(parents=True, exist_ok=True)
    # A sibling, so the rename stays on one filesystem and is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; an artifact is an ordinary directory
        yield tmp
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write a file through a temporary sibling and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_manifest(
    directory: str | os.PathLike[str],
    stage: str,
    parents: list[str] | None = None,
    recipe: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Write `llmfast.json` into an artifact directory (usually the temporary one inside `atomic_dir`)."""
    manifest = {
        "stage": stage,
        "parents": list(parents or []),
        "recipe": recipe or {},
        "metrics": metrics or {},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "llmfast_version": __version__,
        **extra,
    }
    atomic_write_json(Path(directory) / MANIFEST, manifest)
    return manifest


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest of an artifact directory, or None for a directory llmfast did not make."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}): delete or fix it") from None
