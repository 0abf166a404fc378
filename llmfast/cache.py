"""Where llmfast keeps what it makes once per machine: prepared models, hub downloads, built kernels."""

from __future__ import annotations

import os
from pathlib import Path

from llmfast.errors import UserError


def cache_dir() -> Path:
    """`$LLMFAST_CACHE`, else `~/.cache/llmfast`.

    A relative `$LLMFAST_CACHE` is refused: it would be another cache in each working folder, so models were
    converted again and, worse, the output locks kept there would not see each other across folders."""
    given = os.environ.get("LLMFAST_CACHE")
    if not given:
        return Path.home() / ".cache" / "llmfast"
    path = Path(given).expanduser()
    if not path.is_absolute():
        raise UserError(f"$LLMFAST_CACHE is the relative path {given!r}: give an absolute one (e.g. "
                        f"LLMFAST_CACHE={Path(given).absolute()}); a relative cache is another cache in each folder")
    return path
