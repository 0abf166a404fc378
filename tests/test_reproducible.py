"""Reproducibility: a seed reaches the artifact wherever the verb's randomness is real."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import REPO, run_cli

TEXT = REPO / "eval" / "text" / "persuasion.txt"


def _bitnet(tmp: Path, model: Path, seed: int, name: str) -> Path:
    """BitNet QAT of 3 steps of 2 rows over 16 text windows and 2 rows the teacher samples with `seed`."""
    out = tmp / name
    q = {"method": "bitnet", "qat_steps": 3, "batch_size": 2, "teacher_samples": 2, "seed": seed}
    data = {"text": str(TEXT), "skip_tokens": 16384, "calibration_tokens": 512, "heldout_tokens": 64, "window": 32}
    recipe = tmp / f"{name}.yaml"
    recipe.write_text(json.dumps({"model": str(model), "quantization": q, "data": data, "output": str(out)}))
    code, _, err = run_cli("quantize", str(recipe))
    assert code == 0, err
    return out


def test_bitnet_teacher_samples_are_trained_on_in_a_short_run(tmp_path, tiny_dir):
    """The teacher's samples sit among the text windows, not after all 16 of them: 3 steps of 2 rows reach one, so
    quantization.seed (which draws them) changes the model. Appended, they were never trained on: seeds 0 and 1 gave
    the same bytes while the manifest counted 2 samples."""
    a, again, b = (_bitnet(tmp_path, tiny_dir, seed, name) for seed, name in [(0, "a"), (0, "again"), (1, "b")])
    metrics = json.loads((a / "llmfast.json").read_text())["metrics"]
    # 16 text windows and 2 samples interleaved: the 6 rows 3 steps of 2 walk hold the first sample only
    assert (metrics["teacher_samples"], metrics["teacher_samples_trained"], metrics["train_windows"]) == (2, 1, 18)
    weights = [(d / "model.safetensors").read_bytes() for d in (a, again, b)]
    assert weights[0] == weights[1]  # the same seed: the same bytes
    assert weights[0] != weights[2], "quantization.seed 0 and 1 wrote the same model"


def test_dates_task_is_the_same_under_any_locale(tmp_path):
    """The same seed writes the same dates rows in a process whose LC_TIME is German: calendar's month names follow
    the locale ('Mär 23, 2018'), so the generator spells its own. The locale is compiled into tmp_path (localedef)."""
    import os
    import shutil
    import subprocess
    import sys

    import pytest

    if shutil.which("localedef") is None:
        pytest.skip("no localedef to compile a German locale with")
    made = subprocess.run(["localedef", "-i", "de_DE", "-f", "UTF-8", str(tmp_path / "de_DE.UTF-8")],
                          capture_output=True, text=True)
    if not (tmp_path / "de_DE.UTF-8").is_dir():
        pytest.skip(f"localedef could not compile de_DE here: {made.stderr.strip()[:120]}")
    script = ("import locale\nfrom llmfast.data.tasks import generate\nbefore = generate('dates', 200, 0)\n"
              "locale.setlocale(locale.LC_ALL, 'de_DE.UTF-8')\n"
              "assert locale.setlocale(locale.LC_TIME) == 'de_DE.UTF-8'\n"
              "print(sum(a != b for a, b in zip(before, generate('dates', 200, 0))))\n")
    env = {**os.environ, "LOCPATH": str(tmp_path), "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "0", f"{p.stdout.strip()} of 200 rows changed under a German LC_TIME"
