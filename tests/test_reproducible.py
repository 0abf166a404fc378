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
    assert json.loads((a / "llmfast.json").read_text())["metrics"]["teacher_samples"] == 2
    weights = [(d / "model.safetensors").read_bytes() for d in (a, again, b)]
    assert weights[0] == weights[1]  # the same seed: the same bytes
    assert weights[0] != weights[2], "quantization.seed 0 and 1 wrote the same model"
