"""Where engine chatter goes: vLLM logs hundreds of lines, and results must stay readable on stdout.

`engine_output(log)` sends everything written to file descriptors 1 and 2 (by this process and the engine
processes it starts, which inherit them) to `log` for the duration, or to stderr when `log` is None (the
--verbose case). vLLM's logger is pointed at stderr as well, so nothing of it reaches stdout either way.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator


def send_vllm_logs_to_stderr() -> None:
    """Before vLLM is imported: its logger writes to stdout by default (VLLM_LOGGING_STREAM)."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


@contextlib.contextmanager
def engine_output(log: Path | None) -> Iterator[None]:
    send_vllm_logs_to_stderr()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    target = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if log is not None else os.dup(2)
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, target):
            os.close(fd)
