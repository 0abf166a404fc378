"""The fine-tuning speed in metrics.json and train_log.jsonl leaves out the invocation's first step (its warm-up:
allocation, lazy initialisation, CUDA's autotuning), a resumed invocation's first step too; checked against a
clock the test sets (each real step on the tiny model advances it by a chosen number of seconds), so the expected
figures follow from the tokens the real steps report, not from a measured time."""

import json

import pytest

from conftest import run_cli
from llmfast.finetune import trainer
from llmfast.finetune.metrics import steady_tokens_per_s

DATA = [{"messages": [{"role": "user", "content": f"Repeat: {w}"}, {"role": "assistant", "content": w * (i % 3 + 1)}]}
        for i, w in enumerate(["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"] * 2)]
FIRST, LATER = 5.0, 0.25  # seconds the set clock gives the invocation's first step and each later one
ROUND = 0.05 + 1e-9  # the figures are rounded to 0.1: half of that either way


def test_steady_speed_from_tokens_and_seconds():
    assert steady_tokens_per_s(1000, 9.0, 100, 5.0) == 900 / 4.0  # the first step's 100 tokens and 5 s left out
    assert steady_tokens_per_s(100, 5.0, 100, 5.0) == 20.0  # one step run: its own speed, the only figure
    assert steady_tokens_per_s(0, 0.0, 0, 0.0) is None  # no step run


@pytest.fixture
def set_clock(monkeypatch):
    """trainer's clock moves only when a (real) step ends: FIRST seconds for an invocation's first, LATER for each
    other; returns the list of (step, tokens) the steps reported, each invocation's list after a None."""
    now, steps = [0.0], []
    real = trainer.train_step

    def step(run, i):
        out = real(run, i)
        now[0] += FIRST if i == run.start_step else LATER
        steps.append((i, out[1]))
        if i == stop[0]:
            stop[0] = None
            raise KeyboardInterrupt  # as Ctrl-C between steps: the checkpoints stay for --resume
        return out

    stop = [None]
    monkeypatch.setattr(trainer, "train_step", step)
    monkeypatch.setattr(trainer, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: now[0])}))
    return steps, stop


def _recipe(tmp_path, tiny_dir, steps):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in DATA))
    path = tmp_path / "run.yaml"
    path.write_text(f"""
model: {tiny_dir}
data: {{train: {data}, max_length: 64, eval_fraction: 0}}
lora: {{r: 4, alpha: 8}}
train: {{steps: {steps}, batch_size: 2, lr: 0.001, seed: 1, log_every: 1, save_every: 2}}
output: {tmp_path / 'run'}
""")
    return path


def _log_speeds(run, steps):
    """tokens_per_s of the log lines of `steps` (1-based)."""
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    return [e["tokens_per_s"] for e in log if e["step"] in steps]


def _expected_log(tokens):
    """After an invocation's first step its own speed, the only figure there is; then the later steps' alone."""
    return [pytest.approx(tokens[0] / FIRST, abs=ROUND)] + [
        pytest.approx(sum(tokens[1:k + 1]) / (k * LATER), abs=ROUND) for k in range(1, len(tokens))]


def test_speed_leaves_out_the_first_step_of_a_run_and_of_its_resume(tmp_path, tiny_dir, set_clock):
    """A fresh run stopped after its 3rd step (Ctrl-C; its checkpoint at 2), then resumed: each invocation's first
    step is its warm-up, left out of the log's and metrics.json's speed; every step's is in the _all_steps figure."""
    got, stop = set_clock
    run, path = tmp_path / "run", _recipe(tmp_path, tiny_dir, 5)
    stop[0] = 2
    code, _, err = run_cli("finetune", str(path))
    assert code != 0 and (run / "checkpoints").is_dir(), err[-2000:]
    assert [i for i, _ in got] == [0, 1, 2]
    fresh = [t for _, t in got[:2]]  # steps 1 and 2 were logged (the 3rd was stopped before its line)
    assert len(set(fresh)) > 1  # steps of different sizes: leaving out another step than the first would show
    assert _log_speeds(run, {1, 2}) == _expected_log(fresh)
    got.clear()
    code, _, err = run_cli("finetune", str(path), "--resume")
    assert code == 0, err[-2000:]
    assert [i for i, _ in got] == [2, 3, 4]
    tokens = [t for _, t in got]
    assert _log_speeds(run, {3, 4, 5}) == _expected_log(tokens)
    m = json.loads((run / "metrics.json").read_text())
    assert m["resumed_from_step"] == 2 and m["train_tokens"] == sum(fresh) + sum(tokens)
    assert m["first_step_seconds"] == FIRST
    assert m["train_tokens_per_s"] == pytest.approx(sum(tokens[1:]) / (2 * LATER), abs=ROUND)
    assert m["train_tokens_per_s_all_steps"] == pytest.approx(sum(tokens) / (FIRST + 2 * LATER), abs=ROUND)
