"""Output for people and for scripts: a closed pipe, progress bars in a log file, JSON other tools can parse."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO

# The console script (`sys.exit(main())`, pyproject's entry point) and `python -m llmfast` end differently.
ENTRIES = {"console script": ["-c", "import sys; from llmfast.cli import main; sys.exit(main())"],
           "python -m": ["-m", "llmfast"]}


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("args", [["tasks"], ["models"], ["tasks", "dates", "--train", "5", "--test", "5"]])
@pytest.mark.parametrize("buffered", [True, False])
def test_a_closed_pipe_ends_quietly_with_sigpipes_status(tmp_path, entry, args, buffered):
    """`llmfast VERB | head -1`: the reader is gone before the first write. A Unix tool ends by SIGPIPE (status 141
    in a shell) and says nothing; this printed a BrokenPipeError traceback (status 1), or "Exception ignored" at
    exit (status 120)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "" if buffered else "1"}
    r, w = os.pipe()
    os.close(r)  # the reader has left before the command writes its first line
    try:
        p = subprocess.run([sys.executable, *ENTRIES[entry], *args], stdout=w, stderr=subprocess.PIPE, text=True,
                           env=env, timeout=120, cwd=tmp_path)
    finally:
        os.close(w)
    assert (p.returncode, p.stderr) == (141, "")
