"""A fine-tuning launch over several processes encodes its data once: process 0 reads and tokenizes the rows and
sends the others its examples (finetune/data_setup.shared_encoding). Every process ends with the examples a
one-process run encodes, in the same order; a bad row is one line, from process 0, and stops every process, the
others not left waiting for examples that never come."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

ROWS = [{"messages": [{"role": "user", "content": f"Repeat: {w}"}, {"role": "assistant", "content": w}]}
        for w in ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"] * 3]
# a chat of two answers: with a template that renders each turn apart, one example a turn (its parts)
ROWS.insert(5, {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                             {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Hello again"}]})
# longer than max_length under too_long: error: refused while encoding (a row of a bad shape is refused by preflight,
# in every process, before any is encoded)
BAD = {"messages": [{"role": "user", "content": "Repeat: " + "word " * 80}, {"role": "assistant", "content": "ok"}]}

WORKER = r'''
import json, sys
from pathlib import Path
from accelerate import Accelerator
from llmfast.finetune import data_setup
from llmfast.models import load_tokenizer
from llmfast.modelfiles import describe_model_dir
from llmfast.recipe import FinetuneRecipe, load_recipe

calls = []
real = data_setup.read_examples
def counted(*args, **kwargs):  # the real reader, counted: which process read the data
    calls.append(str(args[0]))
    return real(*args, **kwargs)
data_setup.read_examples = counted
acc = Accelerator(cpu=True)
recipe = load_recipe(sys.argv[1], FinetuneRecipe)
model = Path(recipe.model)
data = data_setup.run_data(recipe, load_tokenizer(model), acc, describe_model_dir(model)["vocab"], model,
                           Path(recipe.output), False)
def said(bins):
    return [[e.input_ids, e.labels, e.row, e.where, e.part] for b in bins for e in b]
Path(f"{sys.argv[2]}.{acc.process_index}").write_text(json.dumps(
    {"calls": calls, "rows": said(data.rows), "eval": said(data.eval_rows), "digest": data.digest,
     "said": data.said}))
# as finetune ends a launch: a gloo group left to the interpreter's exit can abort one process (std::terminate of a
# thread still joinable; SIGABRT of process 1 once in a full run, s57)
import torch.distributed as dist
if dist.is_initialized():
    acc.wait_for_everyone()
    dist.destroy_process_group()
'''


def _recipe(tmp_path: Path, tiny_dir: Path, rows: list, too_long: str = "truncate") -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {tiny_dir}\ndata: {{train: {data}, max_length: 64, eval_fraction: 0.2, "
                    f"too_long: {too_long}}}\n"
                    f"lora: {{r: 8}}\ntrain: {{steps: 2, batch_size: 2, seed: 3}}\noutput: {tmp_path / 'run'}\n")
    return path


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _torchrun(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", *args]


def test_process_zero_encodes_and_every_process_gets_the_same_examples(tmp_path, tiny_dir):
    recipe = _recipe(tmp_path, tiny_dir, ROWS)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    p = subprocess.run(_torchrun(str(worker), str(recipe), str(tmp_path / "launch")), env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [json.loads(Path(f"{tmp_path / 'launch'}.{i}").read_text()) for i in range(2)]
    env = {k: v for k, v in _env().items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    p = subprocess.run([sys.executable, str(worker), str(recipe), str(tmp_path / "one")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    one = json.loads(Path(f"{tmp_path / 'one'}.0").read_text())
    assert ranks[0]["calls"] == one["calls"] == [str(tmp_path / "train.jsonl")]
    assert ranks[1]["calls"] == []  # process 1 read no row: it received process 0's examples
    assert len(one["rows"]) >= 20 and one["eval"]
    assert any(e[4] for e in one["rows"] + one["eval"]) or not any(e[4] for e in ranks[0]["rows"])
    for r in ranks:  # ids, labels, row, where and part, in the one-process run's order
        assert (r["rows"], r["eval"], r["digest"], r["said"]) == (one["rows"], one["eval"], one["digest"],
                                                                  one["said"])


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("llmfast: error:")]


def test_a_bad_last_row_is_one_line_from_process_zero_and_stops_every_process(tmp_path, tiny_dir):
    recipe = _recipe(tmp_path, tiny_dir, [*ROWS, BAD], "error")
    bad_row = len(ROWS) + 1
    p = subprocess.run(_torchrun("-m", "llmfast.cli", "finetune", str(recipe)), env=_env(), capture_output=True,
                       text=True, timeout=300)
    said = _error_lines(p.stderr)
    assert p.returncode != 0 and len(said) == 1, p.stderr[-3000:]
    assert f"train.jsonl:{bad_row}" in said[0] and "process 0" not in said[0]
    assert "exitcode  : 2" in p.stderr  # torchrun's report of process 0: the CLI's bad-input code
    assert not (tmp_path / "run").exists()  # nothing left on disk


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_without_a_launcher_to_stop_them_the_others_stop_on_process_zeros_error(tmp_path, tiny_dir):
    """Started by hand (as on several nodes, where no launcher stops the others when process 0 fails): process 1
    stops with process 0's bad-input code, told so, rather than wait in the broadcast for examples never sent (gloo
    fails it once process 0's connection closes: exit 1; a collective may otherwise wait out its timeout)."""
    recipe = _recipe(tmp_path, tiny_dir, [*ROWS, BAD], "error")
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**_env(), "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "llmfast.cli", "finetune", str(recipe)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("a process was still waiting 120 s after process 0 refused the data")
    assert [p.returncode for p in procs] == [2, 2]
    first = _error_lines(outs[0][1])
    assert len(first) == 1 and f"train.jsonl:{len(ROWS) + 1}" in first[0]
    # process 1, left running by no launcher, says why it stopped (after PEER_GRACE_S), not the row again
    assert all("process 0 stopped while encoding" in line for line in _error_lines(outs[1][1])), outs[1][1][-2000:]
    assert not (tmp_path / "run").exists()
