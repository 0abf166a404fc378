"""Output for people and for scripts: a closed pipe, progress bars in a log file, JSON other tools can parse."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

# The console script (`sys.exit(main())`, pyproject's entry point) and `python -m llmfast` end differently.
ENTRIES = {"console script": ["-c", "import sys; from llmfast.cli import main; sys.exit(main())"],
           "python -m": ["-m", "llmfast"]}


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("args", [["tasks"], ["tasks", "dates", "--train", "5", "--test", "5"], ["finetune", "--help"],
                                  ["--version"]])
@pytest.mark.parametrize("buffered", [True, False])
def test_a_closed_pipe_ends_quietly_with_sigpipes_status(tmp_path, entry, args, buffered):
    """`llmfast VERB | head -1`: the reader is gone before the first write. A Unix tool ends by SIGPIPE (status 141
    in a shell) and says nothing; this printed a BrokenPipeError traceback (status 1), or "Exception ignored" at
    exit (status 120; --help and --version too: argparse's own write is buffered)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "" if buffered else "1"}
    r, w = os.pipe()
    os.close(r)  # the reader has left before the command writes its first line
    try:
        p = subprocess.run([sys.executable, *ENTRIES[entry], *args], stdout=w, stderr=subprocess.PIPE, text=True,
                           env=env, timeout=120, cwd=tmp_path)
    finally:
        os.close(w)
    # argparse ignores a failed write of its own help (unbuffered, it fails there): status 0, quietly
    said = args[-1] in ("--help", "--version") and not buffered
    assert (p.returncode, p.stderr) == (0 if said else 141, "")


def _finetune_recipe(tmp_path, tiny_dir, steps=8):
    rows = [{"messages": [{"role": "user", "content": f"Repeat: {w}"}, {"role": "assistant", "content": w}]}
            for w in ["alpha", "bravo", "charlie", "delta"] * 4]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {tiny_dir}\ndata: {{train: {tmp_path / 'train.jsonl'}, max_length: 32}}\n"
                    f"lora: {{r: 4, alpha: 8}}\ntrain: {{steps: {steps}, batch_size: 2, log_every: 1}}\n"
                    f"output: {tmp_path / 'run'}\n")
    return path


def test_progress_bars_in_a_log_file_repaint_rarely(tmp_path, tiny_dir):
    """stderr to a file (CI, nohup): the bar repainted at every step, twice (set_postfix refreshed past tqdm's
    mininterval), and every 0.1 s, each repaint kept in the log; now once at the start and once at the end. The
    files written are JSON a strict parser takes."""
    path = _finetune_recipe(tmp_path, tiny_dir)
    with open(tmp_path / "log", "w") as log:
        p = subprocess.run([sys.executable, "-m", "llmfast", "finetune", str(path)], stdout=subprocess.PIPE,
                           stderr=log, text=True, timeout=300)
    err = (tmp_path / "log").read_text()
    assert p.returncode == 0, err[-2000:]
    assert p.stdout.startswith("adapter: ") and len(p.stdout.splitlines()) == 1  # the summary, alone on stdout
    assert err.count("finetune:") <= 3, err
    _parse_every_json(tmp_path / "run")


def _refuse_constant(name):
    raise ValueError(f"{name} is not JSON (jq, JavaScript's JSON.parse refuse it)")


def _parse_every_json(folder):
    """Every JSON (and JSON Lines) file under `folder` parses with a strict parser: no NaN, Infinity."""
    files = [*folder.rglob("*.json"), *folder.rglob("*.jsonl")]
    assert files
    for f in files:
        for text in f.read_text().splitlines() if f.suffix == ".jsonl" else [f.read_text()]:
            json.loads(text, parse_constant=_refuse_constant)



def test_no_progress_bar_overrides_tqdm_disable():
    """tqdm takes TQDM_DISABLE=1 (its own switch, as HF users set it in CI) only where a bar is not given `disable`:
    finetune's, merge's, bench serve's and distillation's teacher bar passed `disable=False` and ignored it. A bar may
    be given `disable` only as a splat that adds it when it is to be off."""
    import ast

    given = []
    for f in sorted((REPO / "llmfast").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "tqdm":
                given += [f"{f.name}:{node.lineno}" for k in node.keywords if k.arg == "disable"]
    assert not given, given


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_stream_closed_at_the_start_is_no_error(tmp_path, entry):
    """`llmfast ... >&-` or `2>&-` (a service started with a stream closed): Python makes it None, and the flush added
    for closed pipes, and the check whether stderr is a terminal, were an AttributeError (status 1) after the work."""
    command = [sys.executable, *ENTRIES[entry], "tasks", "dates", "--train", "2", "--test", "2", "--out"]
    for closed in (">&-", "2>&-"):
        out = tmp_path / closed
        p = subprocess.run(["sh", "-c", f'exec "$@" {closed}', "sh", *command, str(out)], text=True,
                           capture_output=closed == ">&-", env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
        assert p.returncode == 0 and (out / "dates" / "train.jsonl").is_file(), (closed, p.stderr)
    p = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", sys.executable, *ENTRIES[entry], "--version"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert p.returncode == 0 and p.stderr.startswith("llmfast "), p.stderr  # argparse writes it to stderr then
