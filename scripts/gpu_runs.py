"""What scripts/gpu_bitnet_qat.py and scripts/gpu_relufy.py share (imported by them, not run): the median time of a
distillation step, and one `llmfast` run per learning rate, all at once on the GPU."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent


def distill_step_seconds(student: Any, teacher: Any, batch: int, window: int, device: str, steps: int = 8) -> float:
    """Median seconds of one distillation step of `student` towards `teacher` (random windows) after warm-up."""
    from llmfast.distill import DistillSettings, distill, gpu_autocast

    rows = torch.randint(0, student.config.vocab_size, (batch * steps, window))
    marks: list[float] = []
    with tempfile.TemporaryDirectory() as work:
        distill(student, teacher, rows, DistillSettings(steps=steps, batch_size=batch, save_every=10**9), Path(work),
                before_step=lambda step: marks.append(time.perf_counter()),
                autocast=gpu_autocast(torch.device(device), torch.float32))
    return statistics.median(b - a for a, b in zip(marks[3:], marks[4:]))  # the loss's .item() syncs every step


def run_at_once(verb: str, jobs: list[tuple[float, Path, Path]]) -> list[dict]:
    """`llmfast VERB recipe` for each (lr, recipe, log) at once; per job lr, rc, wall seconds, the recipe and, on a
    failure, the log's tail (also printed)."""
    env = dict(os.environ, TQDM_MININTERVAL="20", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    procs = []
    for lr, recipe, log in jobs:
        handle = open(log, "w")
        procs.append((lr, recipe, log, handle, time.time(), subprocess.Popen(
            [sys.executable, "-c", "import sys; from llmfast.cli import main; sys.exit(main())", verb, str(recipe)],
            stdout=handle, stderr=subprocess.STDOUT, env=env)))
    runs = []
    for lr, recipe, log, handle, start, proc in procs:
        rc = proc.wait()
        handle.close()
        run = {"lr": lr, "rc": rc, "wall_s": round(time.time() - start, 1), "recipe": recipe.read_text()}
        if rc != 0:
            run["log_tail"] = log.read_text()[-3000:]
            print(run["log_tail"], file=sys.stderr)
        runs.append(run)
    return runs
