"""Where llmfast keeps what it makes once per machine: prepared models, hub downloads, built kernels."""

from __future__ import annotations

import os
from pathlib import Path

from llmfast.errors import UserError


def cache_dir() -> Path:
    """`$LLMFAST_CACHE`, else `$XDG_CACHE_HOME/llmfast` (an absolute one, as the XDG spec says), else
    `~/.cache/llmfast` (a one-line error where there is no home folder).

    A relative `$LLMFAST_CACHE` is refused: it would be another cache in each working folder, so models were
    converted again and, worse, the output locks kept there would not see each other across folders."""
    given = os.environ.get("LLMFAST_CACHE")
    if not given:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        if os.path.isabs(xdg):  # a user who moved their caches off a small home folder: ours goes there too
            return Path(xdg) / "llmfast"
        try:
            return Path.home() / ".cache" / "llmfast"
        except RuntimeError:  # HOME unset and this uid not in /etc/passwd (a container run as an arbitrary user)
            raise UserError(f"no home folder to keep llmfast's cache in ($HOME is unset and uid {os.getuid()} has no "
                            "entry in the user database): set LLMFAST_CACHE (or HOME) to an absolute folder") from None
    path = Path(given).expanduser()
    if not path.is_absolute():
        raise UserError(f"$LLMFAST_CACHE is the relative path {given!r}: give an absolute one (e.g. "
                        f"LLMFAST_CACHE={Path(given).absolute()}); a relative cache is another cache in each folder")
    return path
