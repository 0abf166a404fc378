"""llmfast called from a user's own Python (a notebook, a script) rather than as the `llmfast` command: a call leaves
the caller's process as it found it (generators, environment, signal handlers, threads, descriptors, loggers...),
a mistake is a UserError to catch, and calling again gives what one call in a fresh process gives."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO

ROWS = [{"messages": [{"role": "user", "content": f"Repeat: {w}"}, {"role": "assistant", "content": w}]}
        for w in ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"] * 3]


def _finetune_recipe(tmp: Path, model: Path, data: Path, out: str):
    from llmfast.recipe import FinetuneRecipe, load_recipe

    path = tmp / f"{out}.yaml"
    path.write_text(f"model: {model}\ndata: {{train: {data}, max_length: 48, eval_fraction: 0.2}}\n"
                    f"lora: {{r: 4, alpha: 8, dropout: 0.1}}\ntrain: {{steps: 2, batch_size: 2, lr: 0.003, seed: 3}}\n"
                    f"output: {tmp / out}\n")
    return load_recipe(path, FinetuneRecipe, [])


def _eval_recipe(tmp: Path, model: Path, tasks: Path, out: str):
    from llmfast.recipe import EvalRecipe, load_recipe

    path = tmp / f"{out}.yaml"
    text = REPO / "eval" / "text" / "persuasion.txt"
    path.write_text(f"model: {model}\neval:\n"
                    f"  perplexity: {{text: {text}, max_tokens: 256, context: 128, stride: 64}}\n"
                    f"  tasks: [{{name: dates, path: {tasks}}}]\n  max_new_tokens: 4\noutput: {tmp / out}.json\n")
    return load_recipe(path, EvalRecipe, [])


def _process_state() -> dict:
    """What a library call could change in its caller's process and leave changed."""
    loggers = ("", "transformers", "peft", "accelerate", "torch", "huggingface_hub", "llmfast")
    mask = os.umask(0)
    os.umask(mask)
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return {
        "signals": {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD)},
        "torch": (torch.get_num_threads(), torch.get_num_interop_threads(), torch.get_default_dtype(),
                  torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
                  torch.are_deterministic_algorithms_enabled(), torch.get_float32_matmul_precision()),
        "environ": dict(os.environ), "cwd": os.getcwd(), "umask": mask,
        "loggers": {n: (logging.getLogger(n).level, len(logging.getLogger(n).handlers)) for n in loggers},
        "warnings": list(warnings.filters), "streams": (sys.stdout, sys.stderr),
        "threads": sorted(t.name for t in threading.enumerate()), "fds": fds,
    }


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def test_finetune_and_eval_twice_in_one_process_leave_it_as_they_found_it(tmp_path, tiny_dir):
    """The second call of each gives the first one's results and changes nothing of the process's state; the first
    may import and start what a process keeps (tqdm's monitor thread, accelerate's atexit hooks)."""
    from llmfast.data.tasks import generate
    from llmfast.evaluate import run_eval
    from llmfast.finetune.trainer import run_finetune
    from llmfast.models import load_model

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    tasks = tmp_path / "dates.jsonl"
    tasks.write_text("".join(json.dumps(r) + "\n" for r in generate("dates", 4, seed=5)))
    first = run_finetune(_finetune_recipe(tmp_path, tiny_dir, data, "ft1"))
    evaluated = run_eval(_eval_recipe(tmp_path, tiny_dir, tasks, "ev1"))
    load_model(tiny_dir, adapter=tmp_path / "ft1" / "adapter")
    before = _process_state()
    again = run_finetune(_finetune_recipe(tmp_path, tiny_dir, data, "ft2"))
    evaluated_again = run_eval(_eval_recipe(tmp_path, tiny_dir, tasks, "ev2"))
    load_model(tiny_dir, adapter=tmp_path / "ft2" / "adapter")
    after = _process_state()
    for key in before:
        assert after[key] == before[key], key
    losses = ("final_train_loss", "final_eval_loss")
    assert [again[k] for k in losses] == [first[k] for k in losses]
    a, b = _adapter(tmp_path / "ft1"), _adapter(tmp_path / "ft2")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert evaluated_again["perplexity"]["ppl"] == evaluated["perplexity"]["ppl"]
    assert evaluated_again["tasks"]["dates"]["correct"] == evaluated["tasks"]["dates"]["correct"]


@pytest.mark.parametrize("data_ok", [True, False], ids=["trained", "refused"])
def test_finetune_gives_the_caller_its_own_torch_generator_back(tmp_path, tiny_dir, data_ok):
    """The run seeds torch's global generator with train.seed (LoRA's initial weights, dropout): a notebook that
    seeded torch went on, after the run or its error, from train.seed's sequence instead of its own, the same
    after every run."""
    from llmfast.errors import UserError
    from llmfast.finetune.trainer import run_finetune

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS) if data_ok else '{"messages": [}\n')
    recipe = _finetune_recipe(tmp_path, tiny_dir, data, "ft")
    torch.manual_seed(1234)
    torch.rand(5)
    expected = torch.rand(5)
    torch.manual_seed(1234)
    torch.rand(5)
    if data_ok:
        run_finetune(recipe)
    else:
        with pytest.raises(UserError, match="not valid JSON"):
            run_finetune(recipe)
        assert not (tmp_path / "ft").exists()
    assert torch.equal(torch.rand(5), expected)


def test_main_called_from_a_script_leaves_its_environment_alone(tmp_path):
    """The command paces progress bars written into a log file through TQDM_* variables it sets for itself and its
    children; a script whose stderr is a file (nohup, a batch job) calling main([...]) kept them in its os.environ,
    and every tqdm it imported later took them up. As the process's command (main() reading sys.argv) it still sets
    them."""
    code = ("import os, sys\nfrom llmfast.cli import main\n"
            "how, sys.argv = sys.argv[1], ['llmfast', 'tasks']\n"
            "assert (main(['tasks']) if how == 'call' else main()) == 0\n"
            "print(sorted(k for k in os.environ if k.startswith('TQDM_')))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    said = {}
    for how in ("call", "command"):
        with open(tmp_path / f"{how}.log", "w") as log:
            p = subprocess.run([sys.executable, "-c", code, how], stdout=subprocess.PIPE, stderr=log, text=True,
                               env=env, timeout=120)
        assert p.returncode == 0, (tmp_path / f"{how}.log").read_text()[-2000:]
        said[how] = p.stdout.split("\n")[-2]
    assert said["call"] == "[]"
    assert said["command"] == "['TQDM_MAXINTERVAL', 'TQDM_MININTERVAL']"


def test_main_called_from_a_script_leaves_its_own_process_group_up(tmp_path):
    """main() ends the torch.distributed group of a launch it ran (gloo aborts at finalization otherwise); it also
    ended one a script had set up itself before calling main([...]), whose next collective then failed."""
    code = ("import torch, torch.distributed as dist\nfrom llmfast.cli import main\n"
            f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'rendezvous'}', rank=0, world_size=1)\n"
            "assert main(['tasks']) == 0\n"
            "t = torch.ones(1); dist.all_reduce(t); print(dist.is_initialized(), float(t))\n"
            "dist.destroy_process_group()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split("\n")[-2] == "True 1.0"


def _draws() -> tuple[float, float, float]:
    import random

    import numpy as np

    return random.random(), float(np.random.rand()), float(torch.rand(1))


def _draws_after(call: Callable[[], object]) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """What a script that seeded Python's, numpy's and torch's generators draws next: without `call`, and after it."""
    import random

    import numpy as np

    for seed in (random.seed, np.random.seed, torch.manual_seed):
        seed(77)
    expected = _draws()
    for seed in (random.seed, np.random.seed, torch.manual_seed):
        seed(77)
    call()
    return _draws(), expected


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, tiny_dir) -> Path:
    from llmfast.finetune.trainer import run_finetune

    tmp = tmp_path_factory.mktemp("adapter")
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    run_finetune(_finetune_recipe(tmp, tiny_dir, data, "ft"))
    return tmp / "ft"


def _incomplete_adapter(tmp: Path, run: Path) -> Path:
    """A copy of the run's adapter without its first module's pair of LoRA tensors (load_model refuses it after PEFT
    made its layers)."""
    import shutil

    from safetensors.torch import save_file

    adapter = shutil.copytree(run / "adapter", tmp / "incomplete")
    tensors = _adapter(run)
    save_file(dict(sorted(tensors.items())[2:]), adapter / "adapter_model.safetensors")
    return adapter


@pytest.mark.parametrize("what", ["load_model", "load_model refused", "export_merged", "run_eval", "bitnet qat"])
def test_adapters_and_qat_give_the_caller_its_generators_back(tmp_path, tiny_dir, adapter_run, what):
    """PEFT draws each LoRA layer's initial weights from torch's global generator before the adapter's file replaces
    them, and BitNet QAT made each BitLinear as an nn.Linear (initial weights drawn, then replaced): a script that
    seeded torch and loaded, exported or evaluated an adapter, or trained a ternary model, drew other numbers next
    than it would have without the call (the refused adapter too: PEFT had made its layers)."""
    from llmfast.errors import UserError
    from llmfast.evaluate import run_eval
    from llmfast.finetune.export import export_merged
    from llmfast.models import load_model
    from llmfast.quant.run import run_quantize
    from llmfast.recipe import EvalRecipe, QuantizeRecipe, load_recipe

    def call() -> None:
        if what == "load_model":
            load_model(tiny_dir, adapter=adapter_run / "adapter")
        elif what == "load_model refused":
            with pytest.raises(UserError, match="missing"):
                load_model(tiny_dir, adapter=_incomplete_adapter(tmp_path, adapter_run))
        elif what == "export_merged":
            assert export_merged(adapter_run / "adapter", tmp_path / "merged") == tmp_path / "merged"
        elif what == "run_eval":
            path = tmp_path / "eval.yaml"
            text = REPO / "eval" / "text" / "persuasion.txt"
            path.write_text(f"model: {tiny_dir}\nadapter: {adapter_run / 'adapter'}\noutput: {tmp_path / 'e.json'}\n"
                            f"eval: {{perplexity: {{text: {text}, max_tokens: 128, context: 64, stride: 64}}}}\n")
            assert run_eval(load_recipe(path, EvalRecipe, []))["perplexity"]["ppl"] > 1
        else:
            path = tmp_path / "qat.yaml"
            path.write_text(json.dumps({"model": str(tiny_dir), "output": str(tmp_path / "qat"),
                                        "quantization": {"method": "bitnet", "qat_steps": 1, "batch_size": 2},
                                        "data": {"text": str(REPO / "eval" / "text" / "persuasion.txt"),
                                                 "skip_tokens": 16384, "calibration_tokens": 512,
                                                 "heldout_tokens": 256, "window": 128}}))
            assert run_quantize(load_recipe(path, QuantizeRecipe, []))[1]["qat_steps"] == 1

    got, expected = _draws_after(call)
    assert got == expected


def test_merge_sparsify_and_quantize_twice_leave_the_process_as_they_found_it(tmp_path, tiny_dir, adapter_run):
    """The other verbs a script calls (a merge of adapters, which sets torch's threads for its own; a TEAL
    sparsification; a ternary rounding), each run twice: the second leaves the process's state as it found it, the
    caller's generators included, and writes what the first wrote."""
    from llmfast.merge.merge import run_merge
    from llmfast.merge.plan import plan_merge
    from llmfast.quant.run import run_quantize
    from llmfast.recipe import QuantizeRecipe, load_recipe
    from llmfast.sparse.run import load_sparsify_recipe, run_sparsify

    text = REPO / "eval" / "text" / "persuasion.txt"
    merge = tmp_path / "merge.yaml"
    merge.write_text(f"merge_method: ties\nbase_model: {tiny_dir}\nmodels:\n"
                     + "".join(f"  - {{model: {adapter_run / 'adapter'}, parameters: {{weight: {w}, density: 0.5}}}}\n"
                               for w in (1.0, 0.5)) + "dtype: float32\n")
    teal = tmp_path / "teal.yaml"
    quant = tmp_path / "bitnet.yaml"
    quant.write_text(json.dumps({"model": str(tiny_dir), "quantization": {"method": "bitnet"}}))

    def calls(n: int) -> None:
        run_merge(plan_merge(merge), tmp_path / f"merged{n}", adapter_rank="4", progress=False)
        teal.write_text(json.dumps({"model": str(tiny_dir), "output": str(tmp_path / f"teal{n}"),
                                    "sparsify": {"method": "teal", "config": {"target": 0.5}},
                                    "data": {"text": str(text), "skip_tokens": 4096, "calibration_tokens": 1024,
                                             "heldout_tokens": 1024, "window": 256}}))
        run_sparsify(*load_sparsify_recipe(teal))
        run_quantize(load_recipe(quant, QuantizeRecipe, [f"output={tmp_path / f'ternary{n}'}"]))

    calls(1)
    before = _process_state()
    got, expected = _draws_after(lambda: calls(2))
    after = _process_state()
    for key in before:
        assert after[key] == before[key], key
    assert got == expected
    for name, file in (("merged", "adapter_model.safetensors"), ("ternary", "model.safetensors")):
        first, second = load_file(tmp_path / f"{name}1" / file), load_file(tmp_path / f"{name}2" / file)
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    thresholds = [json.loads((tmp_path / f"teal{n}" / "llmfast.json").read_text())["metrics"]["heldout_sparsity"]
                  for n in (1, 2)]
    assert thresholds[0] == thresholds[1]


def test_w4_quantize_gives_the_caller_its_generators_and_environment_back(tmp_path, tiny_dir, monkeypatch):
    """AutoRound seeds Python's, numpy's and torch's global generators (transformers' set_seed) and sets
    CUBLAS_WORKSPACE_CONFIG in os.environ: after a w4 run a notebook drew the recipe seed's numbers, not its own."""
    pytest.importorskip("auto_round")
    from llmfast.quant.run import run_quantize
    from llmfast.recipe import QuantizeRecipe, load_recipe

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    path = tmp_path / "w4.yaml"
    path.write_text(json.dumps({"model": str(tiny_dir), "output": str(tmp_path / "w4"),
                                "quantization": {"method": "w4", "group_size": 32, "iters": 0},
                                "data": {"text": str(REPO / "eval" / "text" / "persuasion.txt"),
                                         "calibration_tokens": 512, "window": 128}}))
    recipe = load_recipe(path, QuantizeRecipe, [])
    got, expected = _draws_after(lambda: run_quantize(recipe))
    assert got == expected
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
