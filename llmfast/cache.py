"""Where llmfast keeps what it makes once per machine: prepared models, hub downloads, built kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$LLMFAST_CACHE`, else `~/.cache/llmfast`."""
    return Path(os.environ.get("LLMFAST_CACHE") or Path.home() / ".cache" / "llmfast").expanduser()
