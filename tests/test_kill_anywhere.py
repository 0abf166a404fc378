"""SIGKILL every writing verb at seeded random moments, run the same command again, and check that it succeeds
with a complete output and that no temporary sibling (`.NAME.tmp-*`, `.NAME.old-*`) is left anywhere.

The moments are fractions of an uninterrupted run of the same command (measured here only to place them, not
asserted): early ones land in start-up, later ones in the writes. `finetune` is re-run with `--resume` when
its output folder exists, `export` and `merge` with `--overwrite` (a kill after the rename leaves a complete
output, which a plain re-run rightly refuses), `tasks` and `eval` unchanged. The uninterrupted run and the killed
ones are processes of their own (`python -m llmfast.cli`: a kill may land in the start-up too); the re-run is the
same command run in this process (`main`: its exit code, stdout and stderr as the CLI's), which spares the
interpreter's imports of a process for each of them.
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from conftest import run_cli
from llmfast.modelfiles import check_adapter_dir, check_model_dir

pytestmark = pytest.mark.slow
MOMENTS = 2  # kills per verb
TEMP = re.compile(r"^\..+\.(tmp|old)-")

TRAIN = [{"messages": [{"role": "user", "content": f"Repeat: {w}"}, {"role": "assistant", "content": w}]}
         for w in ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"] * 4]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmfast.cli", *args]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=cwd)


def _kill_after(args: list[str], seconds: float, cwd: Path) -> bool:
    """Start `args`, SIGKILL it after `seconds`; True if it was killed (False: it finished first)."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd)
    try:
        proc.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if TEMP.match(p.name)]


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_dir) -> Path:
    w = tmp_path_factory.mktemp("kill")
    (w / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TRAIN))
    (w / "ft.yaml").write_text(f"model: {tiny_dir}\ndata: {{train: {w / 'train.jsonl'}, max_length: 64}}\n"
                               "lora: {r: 8, alpha: 16}\ntrain: {steps: 8, batch_size: 2, save_every: 2, "
                               "keep_checkpoints: 1}\noutput: OUT\nexport_merged: false\n")
    (w / "eval.yaml").write_text(f"model: {tiny_dir}\neval:\n  tasks:\n    - {{name: t, path: {w / 'train.jsonl'}, "
                                 "limit: 4}\n  max_new_tokens: 4\n")
    code, _, err = run_cli("finetune", str(w / "ft.yaml"), "--set", f"output={w / 'adapter-run'}")
    assert code == 0, err
    (w / "merge.yaml").write_text(f"merge_method: task_arithmetic\nbase_model: {tiny_dir}\nmodels:\n"
                                  f"  - model: {w / 'adapter-run' / 'adapter'}\n    parameters: {{weight: 1.0}}\n"
                                  "dtype: float32\n")
    return w


def _finetune(w: Path, out: Path) -> list[str]:
    return ["finetune", str(w / "ft.yaml"), "--set", f"output={out}"]


def _check_finetune(out: Path) -> None:
    check_adapter_dir(out / "adapter")
    assert json.loads((out / "metrics.json").read_text())["steps"] == 8


VERBS: dict[str, tuple[Callable[[Path, Path], list[str]], Callable[[Path, Path], list[str]],
                       Callable[[Path], None]]] = {
    # verb: (its arguments, the re-run's, the check of its output)
    "tasks": (lambda w, o: ["tasks", "all", "--out", str(o), "--train", "500", "--test", "50"],
              lambda w, o: ["tasks", "all", "--out", str(o), "--train", "500", "--test", "50"],
              lambda o: all(len((o / t / "train.jsonl").read_text().splitlines()) == 500
                            for t in ("dates", "units", "extract")) or pytest.fail("incomplete task files")),
    "finetune": (_finetune,
                 lambda w, o: _finetune(w, o) + (["--resume"] if o.exists() else []),
                 _check_finetune),
    "export": (lambda w, o: ["export", str(w / "adapter-run" / "adapter"), str(o)],
               lambda w, o: ["export", str(w / "adapter-run" / "adapter"), str(o), "--overwrite"],
               check_model_dir),
    "merge": (lambda w, o: ["merge", str(w / "merge.yaml"), str(o), "--no-progress"],
              lambda w, o: ["merge", str(w / "merge.yaml"), str(o), "--no-progress", "--overwrite"],
              check_model_dir),
    "eval": (lambda w, o: ["eval", str(w / "eval.yaml"), "--output", str(o / "res.json")],
             lambda w, o: ["eval", str(w / "eval.yaml"), "--output", str(o / "res.json")],
             lambda o: json.loads((o / "res.json").read_text())["tasks"]["t"]["n"] == 4
             or pytest.fail("incomplete results")),
}


@pytest.mark.parametrize("verb", list(VERBS))
def test_sigkill_at_random_moments_then_rerun_succeeds_and_leaves_no_temporaries(work: Path, verb: str,
                                                                                 monkeypatch: pytest.MonkeyPatch):
    command, rerun, check = VERBS[verb]
    monkeypatch.chdir(work)  # where the processes run: the re-run in this one too
    t0 = time.perf_counter()
    ref = _run(_cli(*command(work, work / f"{verb}-ref")), work)
    duration = time.perf_counter() - t0
    assert ref.returncode == 0, ref.stderr
    rng = random.Random(f"kill:{verb}")
    for k in range(MOMENTS):
        out = work / f"{verb}-{k}"
        moment = rng.uniform(0.3, 1.0) * duration  # seeded; where it lands depends on this machine's speed
        _kill_after(_cli(*command(work, out)), moment, work)
        if verb == "finetune" and (out / "metrics.json").is_file():
            check(out)  # killed after the run was complete (metrics.json is its last file): nothing to resume
            continue
        again = rerun(work, out)
        code, stdout, stderr = run_cli(*again)
        assert code == 0, f"re-run after a kill at {moment:.2f} s of {duration:.2f} s: {stderr[-2000:]}"
        check(out)
        if "--resume" in again:  # from its last checkpoint, or from step 0 when killed before the first one
            assert ("llmfast: resuming" in stderr or "starting from step 0" in stderr) and "resuming" not in stdout
    assert _leftovers(work) == []
