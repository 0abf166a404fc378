"""`llmfast finetune` end to end on a tiny model: learning, outputs that peft loads, SIGKILL + --resume,
DDP and FSDP over two CPU processes, QLoRA with a dequantized export, and bad input."""

import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, run_cli

TINY_TRAIN = [{"messages": [{"role": "user", "content": f"Repeat: {w}"}, {"role": "assistant", "content": w}]}
              for w in ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"] * 4]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ftdata")
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TINY_TRAIN))
    return d / "train.jsonl"


def recipe(tmp_path, tiny_dir, data, out="run", extra=""):
    path = tmp_path / f"{out}.yaml"
    path.write_text(f"""
model: {tiny_dir}
data: {{train: {data}, max_length: 64, eval_fraction: 0.1}}
lora: {{r: 8, alpha: 16}}
train: {{steps: 8, batch_size: 2, lr: 0.003, warmup_ratio: 0.0, seed: 1}}
output: {tmp_path / out}
{extra}
""")
    return path


def _cmd(*args):
    return [sys.executable, "-m", "llmfast.cli", *args]


def _torchrun(*args):
    """The CLI over two processes (gloo on a CPU)."""
    return [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "-m", "llmfast.cli", *args]


def _workers_said(stderr: str) -> list[str]:
    """What a failed torchrun's workers said (its own traceback and the progress bars left out)."""
    keys = ("terminate", "error", "Error", "Fatal", "Abort")
    return [l for l in stderr.splitlines() if any(k in l for k in keys) and "torch/distributed" not in l][:20]


def _like_a_torchrun_worker(*args):
    """The CLI in this process with the intra-op threads of a torchrun worker (OMP_NUM_THREADS, 1 unless set).

    Matrix kernels may block their sums differently for another thread count (they do on AVX512 CPUs), and
    Adam turns such last-bit differences of near-zero gradients into updates of up to ~lr. With the same
    kernels a micro-batch's gradients are the same bits on either side, and DDP's sum of the processes'
    (doubled, then halved) gradients rounds exactly as one process's accumulation: the adapters agree to
    float32 rounding, whatever the CPU.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    try:
        return run_cli(*args)
    finally:
        torch.set_num_threads(before)


def _wait_for_a_checkpoint(proc, ckpts):
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not list(ckpts.glob("step-*/state.json")):
        time.sleep(0.02)


def _stopped_after_its_first_checkpoint(*args):
    """`llmfast finetune ARGS` in this process, stopped as Ctrl-C stops it right after its first checkpoint is
    written: the run folder a kill there leaves, at a known step (a SIGKILL's lands where the process happened to be,
    so its runs had to be long enough for it to land before the end). (exit code, stderr)."""
    from llmfast.finetune import checkpoint

    save = checkpoint.save_checkpoint

    def save_then_stop(*a, **k):
        save(*a, **k)
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "save_checkpoint", save_then_stop)
        code, _, err = run_cli("finetune", *args)
    return code, err


def _adapter(run):
    return load_file(Path(run) / "adapter" / "adapter_model.safetensors")


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_finetune_learns_and_writes_outputs(tmp_path, tiny_dir, data):
    path = recipe(tmp_path, tiny_dir, data, extra="export_merged: true")
    code, out, err = run_cli("finetune", str(path), "--set", "train.steps=30", "--set", "train.lr=0.01")
    assert code == 0, err
    assert f"llmfast: data: 32 rows of chat (messages) from {data}; 3 of them held out\n" in err, err
    run = tmp_path / "run"
    log = [json.loads(l) for l in (run / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 31))
    # a random 2-layer model moves slowly; without working updates the drop would be ~0
    assert sum(e["loss"] for e in log[-5:]) / 5 < sum(e["loss"] for e in log[:5]) / 5 - 0.5, "loss must fall"
    assert "loss_scale" not in log[0], "float32 needs no loss scaling"
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ["train_tokens_per_s", "peak_memory_gib", "final_train_loss", "final_eval_loss", "wall_seconds"]:
        assert metrics[key] is not None, key
    # a CPU's peak is the process's RSS, which has no reserved/allocated split (the CUDA figure: untested here)
    assert metrics["memory_kind"] == "process peak RSS" and metrics["peak_memory_reserved_gib"] is None
    assert metrics["steps"] == 30 and not (run / "checkpoints").exists()
    assert not (run / "encoded").exists()  # the rows a resume reads: dropped with the checkpoints
    manifest = json.loads((run / "adapter" / "llmfast.json").read_text())
    assert manifest["stage"] == "finetune" and manifest["parents"] == [str(tiny_dir)]

    # the adapter loads in plain peft and gives the same logits as the merged export
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 42, 99, 7]])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), run / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(run / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        a, b, c = peft_model(ids).logits, merged(ids).logits, base(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert (a - c).abs().max() > 1e-2, "the adapter changed the model"
    assert json.loads((run / "merged" / "llmfast.json").read_text())["stage"] == "export"


def _sharegpt(row):
    return {"conversations": [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                              for m in row["messages"]]}


def test_several_files_of_several_shapes_train_as_one_file_of_their_rows(tmp_path, tiny_dir):
    """data.train / data.eval as lists (Axolotl's `datasets:`, LLaMA-Factory's `dataset: a,b`): read one after
    another, each file of its own shape; the adapter is the bits of one file holding the same rows (s50)."""
    def write(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return tmp_path / name

    held = [{"instruction": "Repeat: kilo", "output": "kilo"}]  # one row: "1 row", not "1 rows"
    a, b = write("a.jsonl", TINY_TRAIN[:20]), write("b.jsonl", [_sharegpt(r) for r in TINY_TRAIN[20:]])
    one, c = write("one.jsonl", TINY_TRAIN), write("c.jsonl", held)
    steps = ["--set", "train.steps=4"]
    code, _, err = run_cli("finetune", str(recipe(tmp_path, tiny_dir, f"[{a}, {b}]", out="two")),
                           "--set", f"data.eval=[{c}]", *steps)
    assert code == 0, err
    assert (f"llmfast: data: 20 rows of chat (messages) from {a}, 12 rows of ShareGPT (conversations) from {b}; "
            f"held out: 1 row of Alpaca (instruction/output) from {c}\n") in err, err
    assert run_cli("finetune", str(recipe(tmp_path, tiny_dir, one, out="one")), "--set", f"data.eval={c}",
                   *steps)[0] == 0
    two, ref = _adapter(tmp_path / "two"), _adapter(tmp_path / "one")
    assert all(torch.equal(two[k], ref[k]) for k in ref), "the same rows in the same order: the same bits"
    # each file's rows are named by that file: a bad row of the second, before torch, and a row too long to pack
    bad = write("bad.jsonl", [TINY_TRAIN[0], {"conversations": "hi"}])
    long = write("long.jsonl", [TINY_TRAIN[1], {"prompt": "Repeat: " + "alpha " * 20, "completion": "alpha"}])
    for override, said in ((f"data.train=[{a}, {bad}]", f"{bad}:2: "), (f"data.train=[{one}, {long}]", f"{long}:2: "),
                           ("data.train=[]", "data.train"), (f"output={b}", str(b))):
        code, _, err = run_cli("finetune", str(recipe(tmp_path, tiny_dir, a, out="bad")), "--set", override,
                               "--set", "data.pack_length=30", "--set", "data.max_length=64")
        last = err.strip().splitlines()[-1]
        assert code == 2 and last.startswith("llmfast: error: ") and said in last, (override, err)
        assert not (tmp_path / "bad").exists()


# float16 also resumes its loss scale; its steps are ~5x slower on a CPU (no native float16 math), so fewer of them.
# Two checkpoints' steps after the first leave the kill, made as soon as that one is seen, time to land before the end.
@pytest.mark.parametrize("dtype,steps,every", [("float32", 30, 10), ("float16", 21, 5)])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_dir, data, dtype, steps, every):
    args = ["--set", f"train.steps={steps}", "--set", f"train.save_every={every}", "--set", "train.keep_checkpoints=1",
            "--set", f"train.dtype={dtype}", "--set", "train.log_every=3"]  # a log line across each checkpoint
    assert run_cli("finetune", str(recipe(tmp_path, tiny_dir, data, out="ref")), *args)[0] == 0
    path = recipe(tmp_path, tiny_dir, data, out="killed")
    proc = subprocess.Popen(_cmd("finetune", str(path), *args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "killed" / "checkpoints"
    _wait_for_a_checkpoint(proc, ckpts)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "adapter").exists(), "killed before the end"
    saved = sorted(ckpts.glob("step-*/state.json"))[-1].parent
    assert (saved / "scaler.pt").is_file() == (dtype == "float16"), "the loss scale is part of a float16 checkpoint"
    # a checkpoint whose write was cut short is a hidden temporary directory, never a step-* one
    (ckpts / ".step-000099.tmp-half").mkdir(parents=True)
    if dtype == "float16":  # the scale is read back: a copy whose checkpoint holds another one goes on with it
        other = Path(shutil.copytree(tmp_path / "killed", tmp_path / "other-scale"))
        scaler = other / "checkpoints" / saved.name / "scaler.pt"
        state = torch.load(scaler, weights_only=True)
        assert float(state["scale"]) == 2.0 ** 16  # GradScaler's first scale: in 21 steps it neither grew nor halved
        torch.save({**state, "scale": 1024.0}, scaler)
        code, _, err = run_cli("finetune", str(recipe(tmp_path, tiny_dir, data, out="other-scale")), "--resume", *args)
        assert code == 0, err
        resumed = [json.loads(l) for l in (other / "train_log.jsonl").read_text().splitlines()]
        assert {e["loss_scale"] for e in resumed if e["step"] > int(saved.name.split("-")[1])} == {1024.0}, resumed
    code, out, err = run_cli("finetune", str(path), "--resume", *args)
    assert code == 0, err
    metrics = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert metrics["steps"] == steps and metrics["resumed_from_step"] % every == 0 and metrics["resumed_from_step"] > 0
    # every step's tokens, those before the checkpoint too (s47: only the resumed steps')
    assert metrics["train_tokens"] == json.loads((tmp_path / "ref" / "metrics.json").read_text())["train_tokens"]
    log, ref = ([json.loads(l) for l in (tmp_path / d / "train_log.jsonl").read_text().splitlines()]
                for d in ("killed", "ref"))
    assert [e["step"] for e in log] == list(range(3, steps + 1, 3)), "each line logged once"
    assert _max_diff(_adapter(tmp_path / "killed"), _adapter(tmp_path / "ref")) < 1e-5
    # the line after the checkpoint averages its 3 steps, as the uninterrupted run's does (s46: only those after it)
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(log, ref)) < 1e-4, (log, ref)
    assert json.loads((tmp_path / "killed" / "metrics.json").read_text())["final_train_loss"] == log[-1]["loss"]
    # docs/finetune.md: the checkpoints are removed when the run ends (s46's mutation audit: kept, no test failed)
    assert not (tmp_path / "killed" / "checkpoints").exists() and not (tmp_path / "ref" / "checkpoints").exists()


@pytest.mark.parametrize("sig,line", [(signal.SIGINT, "llmfast: interrupted"),
                                      (signal.SIGTERM, "llmfast: stopped by SIGTERM"),
                                      (signal.SIGHUP, "llmfast: stopped by SIGHUP")])
def test_ctrl_c_ends_with_its_own_line_after_the_progress_bar(tmp_path, tiny_dir, data, sig, line):
    """Ctrl-C mid-run: exit 130, `llmfast: interrupted` on the last line of its own (the open bar used to repaint
    itself after it), no adapter, and the checkpoints kept for --resume. SIGTERM (`timeout`, Slurm, docker stop)
    and SIGHUP (a closed terminal) ended the process silently, a checkpoint being written left half (s43): they
    are met as Ctrl-C is, exit 128 + the signal."""
    path = recipe(tmp_path, tiny_dir, data, out="run")
    args = ["--set", "train.steps=100000", "--set", "train.save_every=10"]
    # SIGINT as at a terminal: a test run started as a non-interactive shell's background job has SIGINT ignored,
    # which its children inherit (and then, as any Python program, rightly keep ignoring Ctrl-C)
    proc = subprocess.Popen(_cmd("finetune", str(path), *args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for_a_checkpoint(proc, tmp_path / "run" / "checkpoints")
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + sig and "Traceback" not in err, err[-2000:]
    assert err.replace("\r", "\n").rstrip("\n").splitlines()[-1] == line
    assert not (tmp_path / "run" / "adapter").exists()
    assert list((tmp_path / "run" / "checkpoints").glob("step-*/state.json"))
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]  # no checkpoint left half-written


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, tiny_dir, data):
    """A run stopped after its checkpoint of step 10 of 20: (its recipe, its folder), for tampering with copies of it.
    (test_sigkill_then_resume_matches_an_uninterrupted_run SIGKILLs a run; here only the checkpoint matters.)"""
    d = tmp_path_factory.mktemp("killed")
    path = recipe(d, tiny_dir, data, extra="")
    text = path.read_text().replace("steps: 8,", "steps: 20, save_every: 10, keep_checkpoints: 1,")
    path.write_text(text)
    code, err = _stopped_after_its_first_checkpoint(str(path))
    assert code == 130 and not (d / "run" / "adapter").exists(), err
    assert [p.parent.name for p in (d / "run" / "checkpoints").glob("step-*/state.json")] == ["step-000010"]
    return path, d / "run"


def _tamper(ckpt, case):
    from safetensors.torch import save_file

    if case == "adapter-lacks-lora-A":
        tensors = load_file(ckpt / "adapter.safetensors")
        save_file({k: v for k, v in tensors.items() if "lora_A" not in k}, ckpt / "adapter.safetensors")
    elif case == "adapter-deleted":
        (ckpt / "adapter.safetensors").unlink()
    elif case == "step-beyond-the-run":
        state = json.loads((ckpt / "state.json").read_text())
        (ckpt / "state.json").write_text(json.dumps({**state, "step": 999}))
    elif case == "optimizer-of-another-shape":
        optim = torch.load(ckpt / "optimizer.pt", weights_only=True)
        first = optim["state"][0]
        first["exp_avg"] = torch.zeros(first["exp_avg"].shape[0] + 1, *first["exp_avg"].shape[1:])
        torch.save(optim, ckpt / "optimizer.pt")
    elif case == "scheduler-a-tensor":
        torch.save(torch.zeros(2), ckpt / "scheduler.pt")
    elif case == "rng-not-bytes":
        torch.save(torch.zeros(3), ckpt / "rng.pt")
    elif case == "log-line-not-json":
        with open(ckpt.parent.parent / "train_log.jsonl", "a") as f:
            f.write("not json\n")
    elif case == "optimizer-empty":
        torch.save({}, ckpt / "optimizer.pt")
    elif case == "optimizer-a-parameter-short":
        optim = torch.load(ckpt / "optimizer.pt", weights_only=True)
        optim["param_groups"][0]["params"].pop()
        torch.save(optim, ckpt / "optimizer.pt")
    elif case == "adapter-of-a-wider-model":  # whole pairs of the recipe's rank, of another model's widths
        tensors = load_file(ckpt / "adapter.safetensors")
        save_file({k: torch.zeros(v.shape[0], v.shape[1] + 8) if "lora_A" in k else torch.zeros(v.shape[0] + 8, 8)
                   for k, v in tensors.items()}, ckpt / "adapter.safetensors")
    elif case == "base-re-saved-since":  # the model's path as the run's, its weights not (other weights saved there)
        (ckpt.parent.parent / "base.json").write_text(json.dumps({"weights": "0" * 32}))
    elif case == "step-negative":
        state = json.loads((ckpt / "state.json").read_text())
        (ckpt / "state.json").write_text(json.dumps({**state, "step": -10}))
    elif case == "state-window-not-a-pair":
        state = json.loads((ckpt / "state.json").read_text())
        (ckpt / "state.json").write_text(json.dumps({**state, "window": [1.5]}))
    elif case == "state-without-total-steps":
        (ckpt / "state.json").write_text(json.dumps({"step": 10}))
    elif case == "rng-deleted":
        (ckpt / "rng.pt").unlink()
    elif case == "recipe-of-another-rank":
        recipe = ckpt.parent.parent.parent / "r.yaml"
        recipe.write_text(recipe.read_text().replace("r: 8,", "r: 4,"))


@pytest.mark.parametrize("case,expected", [
    ("adapter-lacks-lora-A", "adapter.safetensors: does not fit this run's adapter (missing"),
    ("adapter-deleted", "adapter.safetensors: cannot be read"),
    ("step-beyond-the-run", "step 999 of 20 is not a step of the run"),
    ("step-negative", "step -10 of 20 is not a step of the run"),  # s46: trained 10 more steps, in silence
    ("optimizer-of-another-shape", "optimizer.pt: its exp_avg state has shape"),
    ("scheduler-a-tensor", "scheduler.pt: holds a Tensor of torch.float32, not the state llmfast writes"),
    ("rng-not-bytes", "rng.pt: holds a Tensor of torch.float32"),
    ("log-line-not-json", "is not JSON: delete that line"),
    ("optimizer-empty", "optimizer.pt: does not fit this run's optimizer (not a torch optimizer state"),
    ("optimizer-a-parameter-short", "optimizer.pt: holds the state of 27 parameters, the checkpoint's adapter has 28"),
    ("adapter-of-a-wider-model", "which does not fit the model's layer of shape"),
    ("recipe-of-another-rank", "--resume: lora.r is 4, the run in"),  # the recipe compared first (s42)
    ("base-re-saved-since", "holds other weights than the run in"),
    ("state-without-total-steps", "state.json: not a checkpoint state llmfast wrote: delete that checkpoint folder"),
    ("state-window-not-a-pair", "state.json: not a checkpoint state llmfast wrote: delete that checkpoint folder"),
    ("rng-deleted", "rng.pt: cannot be read as a checkpoint file (FileNotFoundError"),  # s46: both were tracebacks
])
def test_resume_over_a_tampered_checkpoint_is_one_line_and_changes_nothing(case, expected, killed_run, tmp_path):
    """A checkpoint edited by hand: refused before anything is trained or rewritten (was: random LoRA values
    resumed in silence, NaN in metrics.json, or a traceback after the log was cut back)."""
    path, run = killed_run
    out = Path(shutil.copytree(run, tmp_path / "run"))
    path = tmp_path / "r.yaml"
    path.write_text(killed_run[0].read_text().replace(str(run), str(out)))
    with open(out / "train_log.jsonl", "a") as f:  # what a kill after the checkpoint leaves: a step past it
        f.write(json.dumps({"step": 11, "loss": 1.0}) + "\n")
    _tamper(sorted(out.glob("checkpoints/step-*"))[-1], case)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, _, err = run_cli("finetune", str(path), "--resume")
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("llmfast: error: ") and expected in lines[-1], err[-2000:]
    assert "Traceback" not in err
    assert len(lines) == 1, err  # checked before the model loads: its progress bar does not come first
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_resumed_run_keeps_a_users_own_encoded_folder_when_it_completes(killed_run, tmp_path):
    """A run folder whose `encoded/` holds the user's own files (a run started before llmfast kept its rows there):
    the resume neither reads nor replaces it, and the finished run does not drop it with its checkpoints."""
    path, run = killed_run
    out = Path(shutil.copytree(run, tmp_path / "run"))
    path = tmp_path / "r.yaml"
    path.write_text(killed_run[0].read_text().replace(str(run), str(out)))
    shutil.rmtree(out / "encoded", ignore_errors=True)
    (out / "encoded").mkdir()
    (out / "encoded" / "notes.txt").write_text("mine")
    code, _, err = run_cli("finetune", str(path), "--resume")
    assert code == 0, err[-2000:]
    assert (out / "adapter").is_dir() and not (out / "checkpoints").exists()
    assert [p.name for p in (out / "encoded").iterdir()] == ["notes.txt"]


def test_resume_over_optimizer_moments_of_another_parameter_is_one_line_and_changes_nothing(killed_run, tmp_path):
    """The moments of lora_A and lora_B swapped: every shape one the adapter has, so only the check against the loaded
    parameters finds them (s46's mutation audit: dropping it passed; torch would take them, and its first step fail
    after the log was cut back)."""
    path, run = killed_run
    out = Path(shutil.copytree(run, tmp_path / "run"))
    path = tmp_path / "r.yaml"
    path.write_text(killed_run[0].read_text().replace(str(run), str(out)))
    ckpt = sorted(out.glob("checkpoints/step-*"))[-1]
    optim = torch.load(ckpt / "optimizer.pt", weights_only=True)
    a, b = optim["state"][0], optim["state"][1]
    assert a["exp_avg"].shape != b["exp_avg"].shape, "an A and a B of one layer"
    optim["state"][0], optim["state"][1] = b, a
    torch.save(optim, ckpt / "optimizer.pt")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, _, err = run_cli("finetune", str(path), "--resume")
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert last.startswith(f"llmfast: error: {ckpt / 'optimizer.pt'}: its exp_avg state has shape "
                           f"{list(b['exp_avg'].shape)} for a parameter of shape {list(a['exp_avg'].shape)}"), last
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_resume_with_another_recipe_is_refused(killed_run, tmp_path, tiny_dir):
    """--resume continued a checkpoint with another model, data or learning rate: a mixed adapter whose records
    disagreed (found by hand, s42). Saving and logging settings may change; the rest is the run's."""
    path, run = killed_run
    out = Path(shutil.copytree(run, tmp_path / "run"))
    path = tmp_path / "r.yaml"
    path.write_text(killed_run[0].read_text().replace(str(run), str(out)))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other = tmp_path / "other"
    shutil.copytree(tiny_dir, other)
    for override, key in (("train.lr=0.05", "train.lr is 0.05, the run in"), (f"model={other}", "model is '"),
                          ("lora.dropout=0.3", "lora.dropout is 0.3")):
        code, _, err = run_cli("finetune", str(path), "--resume", "--set", override)
        assert code == 2 and f"llmfast: error: --resume: {key}" in err.strip().splitlines()[-1], err[-2000:]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    code, _, err = run_cli("finetune", str(path))  # without --resume: told to pass it (the one folder it fits)
    assert code == 2 and err.strip().splitlines()[-1] == (f"llmfast: error: {out} already exists: pass --resume to "
                                                         "continue that run, or choose another output"), err[-2000:]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # the data file edited in place since the kill, the recipe's text the same: the rest trained on other rows (s51)
    train = Path(yaml.safe_load(path.read_text())["data"]["train"])
    original = train.read_bytes()
    try:
        train.write_text(original.decode().replace('"alpha"}', '"zulu"}'))
        code, _, err = run_cli("finetune", str(path), "--resume")
        assert code == 2 and err.strip().splitlines()[-1].startswith(
            "llmfast: error: --resume: the data encodes to other rows than the run in"), err[-2000:]
    finally:
        train.write_bytes(original)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # its one data file written as a list of that file (data.train takes lists since s50) is the same data
    listed = f"data.train=[{yaml.safe_load(path.read_text())['data']['train']}]"
    code, _, err = run_cli("finetune", str(path), "--resume", "--set", listed)
    assert code == 0 and (out / "adapter").is_dir(), err[-2000:]


def test_resume_without_checkpoint_and_existing_output(tmp_path, tiny_dir, data):
    path = recipe(tmp_path, tiny_dir, data)
    (tmp_path / "empty").mkdir()  # an empty folder is a new output (docs/finetune.md; s46's mutation audit)
    code, _, err = run_cli("finetune", str(path), "--set", f"output={tmp_path / 'empty'}", "--set", "train.steps=1")
    assert code == 0 and (tmp_path / "empty" / "adapter").is_dir(), err[-2000:]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("x")
    code, _, err = run_cli("finetune", str(path))  # a user's folder: --resume would refuse it too (s46's docs review)
    assert code == 2 and f"{tmp_path / 'run'} already exists and holds {tmp_path / 'run' / 'x'}, which a run of " \
        "llmfast does not write: choose another output" in err, err


def test_every_evaluation_is_logged(tmp_path, tiny_dir, data):
    """A line every log_every steps and at each eval_every step, the held-out loss on the latter (the last one is
    metrics.json's final_eval_loss); each line's loss averages the steps since the line before."""
    code, _, err = run_cli("finetune", str(recipe(tmp_path, tiny_dir, data)), "--set", "train.steps=7",
                           "--set", "train.eval_every=2", "--set", "train.log_every=3")
    assert code == 0, err
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [2, 3, 4, 6, 7]
    assert [e["step"] for e in log if "eval_loss" in e] == [2, 4, 6]
    assert all(math.isfinite(e["eval_loss"]) for e in log if "eval_loss" in e)
    assert math.isfinite(json.loads((tmp_path / "run" / "metrics.json").read_text())["final_eval_loss"])


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_again(tmp_path, tiny_dir, data):
    path = recipe(tmp_path, tiny_dir, data)
    run = tmp_path / "run"
    (run / "checkpoints" / ".step-000002.tmp-1-x").mkdir(parents=True)  # a checkpoint the kill cut short
    (run / "recipe.json").write_text(json.dumps({"model": "m", "data": {}, "lora": {}, "train": {}, "output": "o"}))
    (run / "train_log.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    code, _, err = run_cli("finetune", str(path))  # was "already exists: pass --resume to continue that run" (s43)
    assert code == 2 and "holds a run stopped before its first checkpoint: pass --resume to start it again" in err
    code, _, err = run_cli("finetune", str(path), "--resume")
    assert code == 0 and "starting from step 0" in err
    assert json.loads((run / "metrics.json").read_text())["resumed_from_step"] is None  # it started afresh (s47: 0)
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == sorted({e["step"] for e in log}) and log[0]["loss"] != 9.0
    code, _, err = run_cli("finetune", str(path), "--resume")  # now finished: nothing to resume
    assert code == 2 and "holds a finished run" in err
    code, _, err = run_cli("finetune", str(path))  # nor to continue: it said "pass --resume" (s46's docs review)
    assert code == 2 and f"{run} holds a finished run (adapter/, metrics.json): choose another output, or remove it " \
        "to train again" in err, err


def test_ddp_two_cpu_processes_equal_one_process_with_accumulation(tmp_path, tiny_dir, data):
    single = recipe(tmp_path, tiny_dir, data, out="single")
    code, _, err = _like_a_torchrun_worker("finetune", str(single), "--set", "train.grad_accum=2",
                                           "--set", "train.steps=4")
    assert code == 0, err
    ddp = recipe(tmp_path, tiny_dir, data, out="ddp")
    p = subprocess.run(_torchrun("finetune", str(ddp), "--set", "train.steps=4"), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, _workers_said(p.stderr)
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp["processes"] == 2 and ddp["memory_kind"] == "process peak RSS (process 0)"  # not the sum of both
    assert _max_diff(_adapter(tmp_path / "ddp"), _adapter(tmp_path / "single")) < 1e-5


def test_fsdp_two_cpu_processes_shard_and_resume_after_sigkill(tmp_path, tiny_dir, data):
    """FSDP over two gloo processes: the same adapter as one process with accumulation, half the layer weights
    per process, and a SIGKILL + --resume (sharded optimizer state through a whole checkpoint) changes nothing."""
    # 15 steps after the first checkpoint, for the kill made as soon as it is seen to land before the end
    args = ["--set", "train.steps=20", "--set", "train.save_every=5", "--set", "train.keep_checkpoints=1"]
    single = recipe(tmp_path, tiny_dir, data, out="single")
    assert _like_a_torchrun_worker("finetune", str(single), "--set", "train.grad_accum=2", *args)[0] == 0
    path = recipe(tmp_path, tiny_dir, data, out="fsdp")
    args += ["--set", "train.fsdp=true"]
    proc = subprocess.Popen(_torchrun("finetune", str(path), *args), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "fsdp" / "checkpoints"
    _wait_for_a_checkpoint(proc, ckpts)
    workers = psutil.Process(proc.pid).children(recursive=True)
    for p in [psutil.Process(proc.pid), *workers]:  # torchrun and both workers, at once
        p.kill()
    proc.wait()
    psutil.wait_procs(workers, timeout=30)
    assert not (tmp_path / "fsdp" / "adapter").exists(), "killed before the end"
    saved = sorted(ckpts.glob("step-*/state.json"))[-1]
    assert json.loads(saved.read_text())["fsdp"] is True
    # one process cannot take over a sharded run's checkpoint
    code, _, err = run_cli("finetune", str(path), "--resume", *args)
    assert code == 2 and "written with FSDP over several processes: resume it the same way" in err
    p = subprocess.run(_torchrun("finetune", str(path), "--resume", *args), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, _workers_said(p.stderr)
    assert p.stdout.count("adapter: ") == 1, "one summary, from process 0"
    metrics = json.loads((tmp_path / "fsdp" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["fsdp"] is True and metrics["resumed_from_step"] > 0
    one = json.loads((tmp_path / "single" / "metrics.json").read_text())
    # the layers are ~2/3 of the tiny model's weights; embedding, norm and head stay whole
    assert metrics["param_bytes_per_process"] < 0.7 * one["param_bytes_per_process"]
    assert _max_diff(_adapter(tmp_path / "fsdp"), _adapter(tmp_path / "single")) < 1e-5
    # held-out loss: one eval batch, so process 1 runs it too (FSDP gathers with every process) and counts none
    assert abs(metrics["final_eval_loss"] - one["final_eval_loss"]) < 1e-4
    # resumed once more, a finished run is one line from the launch: each process said it, or process 0, stopped by
    # torchrun once process 1 had failed, added a misleading 'llmfast: stopped by SIGTERM' (s47)
    p = subprocess.run(_torchrun("finetune", str(path), "--resume", *args), capture_output=True, text=True,
                       timeout=300)
    said = [line for line in p.stderr.splitlines() if line.startswith(("llmfast:", "[rank"))]
    assert p.returncode != 0 and len(said) == 1 and "holds a finished run" in said[0], said[:8]


def test_ddp_with_dropout_resumes_as_if_never_stopped(tmp_path, tiny_dir, data):
    """lora.dropout draws from each process's own RNG, and processes with batches of other shapes draw different
    amounts: a checkpoint kept process 0's state only, so a resumed process 1 masked other activations than the
    run that was never stopped (s47). Unpacked rows of several lengths make the shapes differ."""
    args = ["--set", "train.steps=16", "--set", "train.save_every=4", "--set", "train.keep_checkpoints=1",
            "--set", "lora.dropout=0.3", "--set", "data.packing=false"]
    whole = recipe(tmp_path, tiny_dir, data, out="whole")
    p = subprocess.run(_torchrun("finetune", str(whole), *args), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, _workers_said(p.stderr)
    path = recipe(tmp_path, tiny_dir, data, out="ddp")
    proc = subprocess.Popen(_torchrun("finetune", str(path), *args), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "ddp" / "checkpoints"
    _wait_for_a_checkpoint(proc, ckpts)
    workers = psutil.Process(proc.pid).children(recursive=True)
    for w in [psutil.Process(proc.pid), *workers]:
        w.kill()
    proc.wait()
    psutil.wait_procs(workers, timeout=30)
    assert not (tmp_path / "ddp" / "adapter").exists(), "killed before the end"
    p = subprocess.run(_torchrun("finetune", str(path), "--resume", *args), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, [l for l in p.stderr.splitlines() if "llmfast: error" in l]
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["resumed_from_step"] > 0
    assert _max_diff(_adapter(tmp_path / "ddp"), _adapter(tmp_path / "whole")) < 1e-6


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-3)])
def test_fsdp_with_accumulation_clipping_and_checkpointing(tmp_path, tiny_dir, data, dtype, tol):
    """Gradient sync only on a step's last micro-batch, a global gradient norm over shards, recompute in the
    backward pass, and (bfloat16) frozen 16-bit weights gathered with float32 LoRA weights."""
    args = ["--set", "train.steps=6", "--set", "train.max_grad_norm=0.001", "--set", f"train.dtype={dtype}",
            "--set", "train.gradient_checkpointing=true"]
    assert _like_a_torchrun_worker("finetune", str(recipe(tmp_path, tiny_dir, data, out="single")),
                                   "--set", "train.grad_accum=4", *args)[0] == 0
    p = subprocess.run(_torchrun("finetune", str(recipe(tmp_path, tiny_dir, data, out="fsdp")), *args,
                                 "--set", "train.grad_accum=2", "--set", "train.fsdp=true"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, _workers_said(p.stderr)
    single, fsdp = _adapter(tmp_path / "single"), _adapter(tmp_path / "fsdp")
    moved = max(v.abs().max().item() for k, v in single.items() if "lora_B" in k)  # B starts at zero
    assert moved > 1e-3, "the adapter trained"
    assert _max_diff(fsdp, single) < tol * max(1.0, moved)


def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path, killed_run):
    """optimizer.pt holding a pickled object whose unpickling creates a file: refused, and the file never made."""

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "marker"), "w"))

    out = Path(shutil.copytree(killed_run[1], tmp_path / "run"))
    path = tmp_path / "r.yaml"
    path.write_text(killed_run[0].read_text().replace(str(killed_run[1]), str(out)))
    ckpt = sorted(out.glob("checkpoints/step-*"))[-1]
    torch.save({"state": {0: Payload()}, "param_groups": []}, ckpt / "optimizer.pt")
    code, _, err = run_cli("finetune", str(path), "--resume")
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("llmfast: error: ") and "optimizer.pt: refused" in last, err
    assert "Traceback" not in err
    assert not (tmp_path / "marker").exists(), "the payload ran"
    assert "weights_only" not in err, "no advice to load it unsafely"
    assert not (tmp_path / "run" / "adapter").exists()
    with open(ckpt / "optimizer.pt", "wb") as f:  # a raw pickle, not torch.save's zip: one line, no torch warning
        pickle.dump({"state": {0: Payload()}, "param_groups": []}, f)
    code, _, err = run_cli("finetune", str(path), "--resume")
    # one line: no torch warning, and read before the model loads (its progress bar came first)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "optimizer.pt: refused" in err, err
    assert not (tmp_path / "marker").exists(), "the payload ran"
    (ckpt / "optimizer.pt").write_bytes(b"PK\x03\x04 cut short")  # a truncated file is one line too
    code, _, err = run_cli("finetune", str(path), "--resume")
    assert code == 2 and "optimizer.pt: cannot be read as a checkpoint file" in err.strip().splitlines()[-1], err


def test_no_unsafe_torch_load_in_the_package():
    for f in (REPO / "llmfast").rglob("*.py"):
        text = f.read_text()
        assert "weights_only=False" not in text, f
        for at in [i for i in range(len(text)) if text.startswith("torch.load(", i)]:
            call = text[at : text.find(")", at) + 200]
            assert "weights_only=True" in call, f"{f}: {text[at:at + 80]}"


def test_resume_refuses_another_number_of_processes(tmp_path, tiny_dir, data):
    path = recipe(tmp_path, tiny_dir, data)
    ckpt = tmp_path / "run" / "checkpoints" / "step-000004"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"step": 4, "total_steps": 8, "fsdp": False, "processes": 2}))
    code, _, err = run_cli("finetune", str(path), "--resume")
    assert code == 2 and "was written by 2 processes, this run has 1: resume with as many" in err


def test_accelerate_mixed_precision_is_refused(tmp_path, tiny_dir, data):
    """llmfast picks the dtype: an accelerate launch with mixed precision would scale the loss behind its back."""
    path = recipe(tmp_path, tiny_dir, data)
    p = subprocess.run(_cmd("finetune", str(path)), capture_output=True, text=True, timeout=300,
                       env={**os.environ, "ACCELERATE_MIXED_PRECISION": "fp16"})
    assert p.returncode == 2 and "launched with accelerate mixed precision fp16" in p.stderr, p.stderr[-1000:]
    assert not (tmp_path / "run").exists()


def test_qlora_trains_and_export_dequantizes(tmp_path, tiny_dir, data):
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = recipe(tmp_path, tiny_dir, data, extra="quantization: {type: nf4, double_quant: true}\nexport_merged: true")
    code, _, err = run_cli("finetune", str(path), "--set", "train.steps=10")
    assert code == 0, err
    run = tmp_path / "run"
    assert json.loads((run / "adapter" / "llmfast.json").read_text())["quantization"] == {
        "method": "bnb4", "config": {"bits": 4, "type": "nf4", "double_quant": True}}
    # reference: the trained model as it was trained, 4-bit base + adapter
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
    base4 = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=q, dtype=torch.float32,
                                                 device_map={"": "cpu"})
    layers4 = [m for m in base4.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers4
    # Training ran each 4-bit layer as "dequantize the weight, multiply in float32". In eval mode on a CPU with
    # AVX512-BF16, bitsandbytes would instead use a fused kernel that computes in bfloat16 (relative error
    # ~2^-8, logits off by ~0.007): switched off, the reference is the trained model's own float32 math.
    for m in layers4:
        m.support_avx512bf16_for_cpu = False
    trained = PeftModel.from_pretrained(base4, run / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(run / "merged").eval()
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        ref, got = trained(ids).logits, merged(ids).logits
    # Both are float32 over the same dequantized weights; they differ only in x(W + sBA) against xW + s(xA)B:
    # rounding of dot products of length <= 256, ~256 * 2^-24 ~ 2e-5 of the logits' scale per layer.
    scale = ref.abs().max().item()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * max(1.0, scale))
    # llmfast's loader (eval, bench) puts the adapter on the 4-bit base its manifest records, unasked.
    from llmfast.models import load_model

    via = load_model(tiny_dir, adapter=run / "adapter")
    via_layers = [m for m in via.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(via_layers) == len(layers4)
    for m in via_layers:
        m.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        torch.testing.assert_close(via(ids).logits, ref, rtol=0, atol=0)
    # and the results of eval and bench offline say so (they said quantization: null)
    from llmfast.models import effective_quantization

    assert effective_quantization(tiny_dir, run / "adapter").manifest()["config"]["type"] == "nf4"
    assert effective_quantization(tiny_dir) is None and effective_quantization(run / "merged") is None
    from llmfast.bench.engines.base import Variant, quantization_ran
    from llmfast.serve.lora import ServedLora

    served = Variant("q", tiny_dir, lora=ServedLora("q", run / "adapter", 8))
    assert quantization_ran(served, "hf") == "nf4" and quantization_ran(served, "vllm") is None  # vLLM: fp base


@pytest.mark.parametrize("dtype", ["nf4", "int4", "4bit"])  # s46: 4bit was only "unknown", not why
def test_export_refuses_4bit(tmp_path, dtype):
    (tmp_path / "ad").mkdir()
    code, _, err = run_cli("export", str(tmp_path / "ad"), str(tmp_path / "out"), "--dtype", dtype)
    assert code == 2 and f"merging into {dtype} weights is refused" in err and "rounded away" in err
    assert not (tmp_path / "out").exists()


BAD = [
    ("missing field", '{"prompt": "x"}\n', [], "train.jsonl:1: missing field 'completion'"),
    ("empty dataset", "", [], "the data set is empty"),
    ("too long, refused", '{"prompt": "x", "completion": "' + "word " * 80 + '"}\n', ["data.too_long=error"],
     "more than max_length 64"),
    ("targets match nothing", None, ["lora.target_modules=[nonexistent_proj]"], "match no layer of the model"),
    ("fsdp with QLoRA", None, ["train.fsdp=true", "quantization={type: nf4}"], "train.fsdp with QLoRA is not"),
    ("fsdp with float16", None, ["train.fsdp=true", "train.dtype=float16"], "train.fsdp with float16 is not"),
    ("fsdp with 8-bit AdamW", None, ["train.fsdp=true", "train.optimizer=adamw_8bit"],
     "train.optimizer adamw_8bit does not work on sharded weights"),
    ("LoRA on a tied lm_head", None, ["lora.target_modules=[q_proj, lm_head]"],
     "lora.target_modules: lm_head shares its weight with the input embeddings in this model (tie_word_embeddings)"),
    ("LoRA on tied embeddings", None, ["lora.target_modules=[embed_tokens]"],
     "embed_tokens shares its weight with the output head"),
    # was trained in a row longer than pack_length, past the positions preflight checked (s46's mutation audit)
    ("an example longer than pack_length", None, ["data.packing=true", "data.pack_length=16"],
     "tokens, more than data.pack_length 16 (a packed row's length): raise data.pack_length to data.max_length"),
]


@pytest.mark.parametrize("what,rows,override,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_input_one_line_exit_2_no_output(tmp_path, tiny_dir, data, what, rows, override, expected):
    train = data
    if rows is not None:
        train = tmp_path / "train.jsonl"
        train.write_text(rows)
    path = recipe(tmp_path, tiny_dir, train)
    code, _, err = run_cli("finetune", str(path), *[a for o in override for a in ("--set", o)])
    # progress bars of model loading may come first; the error itself is one line, the last
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("llmfast: error: ") and expected in last, err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists(), "no partial output directory"


def test_a_diverging_run_stops_in_one_line_without_an_adapter(tmp_path, tiny_dir, data):
    """A learning rate that sends the loss to NaN stopped with a traceback after saving an all-NaN adapter that export
    and eval then took (found by hand, s42); an infinite one passed the schema's `gt=0`."""
    code, _, err = run_cli("finetune", str(recipe(tmp_path, tiny_dir, data)), "--set", "train.lr=.inf")
    assert code == 2 and "train.lr" in err.strip().splitlines()[-1] and "finite" in err.strip().splitlines()[-1], err
    assert not (tmp_path / "run").exists()
    code, _, err = run_cli("finetune", str(recipe(tmp_path, tiny_dir, data)), "--set", "train.lr=1e30")
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert last.startswith("llmfast: error: finetune: the training loss became nan at step ")
    assert "lower train.lr" in last and "no adapter was saved" in last
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("lr, steps, held_out, said", [
    # each step's loss is taken before its update: a rate that broke the last one saved that adapter, with a NaN
    # held-out loss in metrics.json (written NaN, not JSON) and exit 0 (s46)
    ("1e30", 1, 0.1, "the held-out loss became nan after the last step"),
    # without held-out rows nothing looked after the last update: an adapter that makes NaN, exit 0 (s47)
    ("1e30", 1, 0, "the training loss became nan after the last step (on its own batches)"),
    # Adam's first update is 10x the rate: a traceback; without clipping the message says it is off
    ("3e38", 2, 0.1, "the update overflowed float32 at step 1"),
])
def test_a_run_that_diverges_on_its_last_update_or_overflows_it_saves_nothing(tmp_path, tiny_dir, data, lr, steps,
                                                                                held_out, said):
    unclipped = lr == "3e38"
    code, _, err = run_cli("finetune", str(recipe(tmp_path, tiny_dir, data)), "--set", f"train.lr={lr}", "--set",
                           f"train.steps={steps}", "--set", f"data.eval_fraction={held_out}",
                           *(["--set", "train.max_grad_norm=null"] if unclipped else []))
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert last.startswith(f"llmfast: error: finetune: {said} (train.lr {float(lr)}): lower train.lr"), last
    assert ("or set train.max_grad_norm (clipping is off)" in last) == unclipped, last
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "metrics.json").exists()


def test_an_output_inside_the_model_folder_is_refused(tmp_path, tiny_dir, data):
    """As export, merge, quantize and sparsify refuse it: the model folder is an input (it was written into)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    path = recipe(tmp_path, model, data)
    code, _, err = run_cli("finetune", str(path), "--set", f"output={model / 'run'}")
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"llmfast: error: output {model / 'run'} is inside the input {model}: writing it would change the input; "
        "choose a directory outside it"), err
    assert sorted(p.name for p in model.iterdir()) == sorted(p.name for p in tiny_dir.iterdir())


def test_qlora_without_bitsandbytes_is_one_line(tmp_path, tiny_dir, data, monkeypatch):
    path = recipe(tmp_path, tiny_dir, data, extra="quantization: {type: nf4}")
    # in this process (an interpreter start-up fewer): any `import bitsandbytes` from here on fails, as uninstalled
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    code, _, err = run_cli("finetune", str(path))
    assert code == 2 and "QLoRA needs bitsandbytes" in err, err[-1000:]
    assert not (tmp_path / "run").exists()


def test_adamw_8bit_on_cpu_tracks_torch_adamw():
    """bitsandbytes' 8-bit AdamW runs on a CPU (its CPU backend) and follows torch's AdamW closely."""
    from llmfast.finetune.trainer import make_optimizer

    torch.manual_seed(0)
    w = torch.randn(4096, 64)  # >= 4096 elements: bitsandbytes keeps smaller tensors' states in 32-bit
    ref, q = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    opt_ref = make_optimizer([ref], "adamw_torch", 1e-2, 0.0, cuda=False)
    opt_q = make_optimizer([q], "adamw_8bit", 1e-2, 0.0, cuda=False)
    for _ in range(20):
        g = torch.randn_like(w)
        for p, opt in ((ref, opt_ref), (q, opt_q)):
            p.grad = g.clone()
            opt.step()
    state = opt_q.state[q]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8, "8-bit states"
    moved = (ref - w).abs().mean().item()
    assert moved > 0.03
    # each weight moved ~0.04 in 20 steps; the 8-bit states change that by well under a tenth of it
    assert (ref - q).abs().mean().item() < 0.05 * moved
    assert (ref - q).abs().max().item() < 0.5 * moved


def test_finetune_with_8bit_adamw_learns(tmp_path, tiny_dir, data):
    path = recipe(tmp_path, tiny_dir, data)
    # 20 steps: the loss fell 0.88 here (0.94 in 30), the bar is 0.5
    code, _, err = run_cli("finetune", str(path), "--set", "train.optimizer=adamw_8bit", "--set", "lora.r=64",
                           "--set", "train.steps=20", "--set", "train.lr=0.01")
    assert code == 0, err
    log = [json.loads(l) for l in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert sum(e["loss"] for e in log[-5:]) / 5 < sum(e["loss"] for e in log[:5]) / 5 - 0.5, "loss must fall"


def test_float16_scales_the_loss_and_learns(tmp_path, tiny_dir, data):
    path = recipe(tmp_path, tiny_dir, data)
    # 24 steps: the loss fell 0.79 here (0.81 in 30), the bar is 0.5
    code, _, err = run_cli("finetune", str(path), "--set", "train.dtype=float16", "--set", "train.steps=24",
                           "--set", "train.lr=0.01")
    assert code == 0, err
    log = [json.loads(l) for l in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["loss_scale"] == 2.0**16, "float16 starts from torch.amp's loss scale"
    assert sum(e["loss"] for e in log[-5:]) / 5 < sum(e["loss"] for e in log[:5]) / 5 - 0.5, "loss must fall"
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["dtype"] == "float16"


def test_optimizer_names_come_from_the_registry(tmp_path, tiny_dir, data):
    from llmfast.errors import UserError
    from llmfast.finetune.optimizers import OPTIMIZERS
    from llmfast.recipe import FinetuneRecipe, load_recipe

    assert {"adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"} <= set(OPTIMIZERS.names())
    path = recipe(tmp_path, tiny_dir, data)
    assert load_recipe(path, FinetuneRecipe, ["train.optimizer=adamw_8bit"]).train.optimizer == "adamw_8bit"
    with pytest.raises(UserError, match=r"train.optimizer: unknown optimizer 'adamw8bit' \(did you mean 'adamw_8bit'"):
        load_recipe(path, FinetuneRecipe, ["train.optimizer=adamw8bit"])


@pytest.mark.parametrize("name", __import__("llmfast.finetune.optimizers", fromlist=["OPTIMIZERS"]).OPTIMIZERS.names())
def test_every_optimizer_trains_and_resumes_from_a_safe_checkpoint(name, tmp_path):
    """The optimizer conformance test: each registered optimizer lowers a loss on this machine, and its state goes
    through a checkpoint as the trainer writes and reads it (torch.save, then safe_load: tensors and plain
    containers only), so a resumed step is the uninterrupted one, bit for bit."""
    import torch

    from llmfast.finetune.checkpoint import safe_load
    from llmfast.finetune.optimizers import OPTIMIZERS

    torch.manual_seed(0)
    target = torch.randn(64, 64)
    start = torch.randn(64, 64)

    def step(opt, w):
        opt.zero_grad()
        loss = ((w - target) ** 2).mean()
        loss.backward()
        opt.step()
        return float(loss)

    w = torch.nn.Parameter(start.clone())
    opt = OPTIMIZERS.get(name)([w], 1e-2, 0.01, False)
    losses = [step(opt, w) for _ in range(20)]
    assert losses[-1] < 0.9 * losses[0], losses
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    resumed_w = torch.nn.Parameter(w.detach().clone())
    resumed = OPTIMIZERS.get(name)([resumed_w], 1e-2, 0.01, False)
    resumed.load_state_dict(safe_load(tmp_path / "optimizer.pt"))
    step(opt, w)
    step(resumed, resumed_w)
    assert torch.equal(w, resumed_w)


def test_a_relufied_base_trains_with_its_shifted_cut(tmp_path, tiny_dir):
    """Found by hand (2026-12-05): finetune loaded a relufy model's weights without the cut its config.json holds
    (53% zeros entering down_proj where every other verb runs it at 81%), so the adapter trained on another model.
    A cut above every activation: nothing enters down_proj as finetune loads the base."""
    from types import SimpleNamespace

    from llmfast.finetune.lora import load_base
    from llmfast.sparse.relu_cut import THRESHOLDS_KEY

    base = Path(shutil.copytree(tiny_dir, tmp_path / "relu"))
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu", THRESHOLDS_KEY: [1e9, 1e9]}))
    model = load_base(str(base), SimpleNamespace(quantization=None), "float32", "cpu")
    seen = []
    for layer in model.model.layers:
        layer.mlp.down_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    model(torch.arange(3, 19).reshape(2, 8))
    assert len(seen) == 2 and all(bool((x == 0).all()) for x in seen)
    plain = json.loads((base / "config.json").read_text())
    del plain[THRESHOLDS_KEY]
    (base / "config.json").write_text(json.dumps(plain))
    seen.clear()
    model = load_base(str(base), SimpleNamespace(quantization=None), "float32", "cpu")
    for layer in model.model.layers:
        layer.mlp.down_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    model(torch.arange(3, 19).reshape(2, 8))
    assert all(0 < float((x == 0).float().mean()) < 1 for x in seen)  # plain ReLU: some zeros, not all


def test_an_adapter_of_a_model_given_by_a_relative_path_exports_from_any_folder(tmp_path, tiny_dir, data,
                                                                               monkeypatch):
    """Found by hand (2026-12-05): the adapter recorded its base as typed ('m'), so `export` from another folder
    said "its base model 'm' is not a local directory"; lineage (`parents`) was relative too."""
    shutil.copytree(tiny_dir, tmp_path / "m")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    path = recipe(tmp_path, "m", data, extra="").read_text().replace(f"output: {tmp_path / 'run'}", "output: run")
    (tmp_path / "rel.yaml").write_text(path.replace("steps: 8", "steps: 1"))
    code, _, err = run_cli("finetune", "rel.yaml")
    assert code == 0, err
    adapter = tmp_path / "run" / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tmp_path / "m")
    # PEFT writes its set of modules in the process's hash order: two equal runs wrote different bytes (s49)
    assert saved["target_modules"] == sorted(saved["target_modules"]) and len(saved["target_modules"]) == 14
    assert json.loads((adapter / "llmfast.json").read_text())["parents"] == [str(tmp_path / "m")]
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, _, err = run_cli("export", "../run/adapter", "merged")
    assert code == 0, err
    assert json.loads((tmp_path / "elsewhere" / "merged" / "llmfast.json").read_text())["parents"] == [
        str(tmp_path / "run" / "adapter")]
    # the project moved (the recorded absolute base is gone): found from the project's folder by the recipe's path
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("m", "run"):
        shutil.move(tmp_path / name, moved / name)
    monkeypatch.chdir(moved)
    code, _, err = run_cli("export", "run/adapter", "merged")
    assert code == 0, err
    (moved / "mg.yaml").write_text("merge_method: task_arithmetic\nbase_model: m\nmodels:\n  - model: run/adapter\n"
                                   "    parameters: {weight: 1.0}\ndtype: float32\n")
    code, _, err = run_cli("merge", "mg.yaml", "merged-again", "--no-progress")
    assert code == 0, err


@pytest.mark.parametrize("dora,optimizer", [(False, "adamw_torch"), (True, "adamw_torch"), (True, "adamw_8bit")])
def test_the_pre_load_checkpoint_check_takes_what_the_trainer_saves(dora, optimizer, tiny_dir):
    """`check_fit` runs before the model exists, on the adapter and optimizer files alone: the state of a real
    step (DoRA's magnitude vectors, bitsandbytes' blockwise 8-bit moments) passes it, and the same files against
    another rank or a model of other widths do not."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from llmfast.errors import UserError
    from llmfast.finetune.checkpoint import SavedTraining, check_fit
    from llmfast.finetune.optimizers import OPTIMIZERS
    from llmfast.loading import from_pretrained
    from llmfast.modelfiles import stored_shapes

    model = get_peft_model(from_pretrained(str(tiny_dir), "float32"),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_dora=dora))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = OPTIMIZERS.get(optimizer)(params, 1e-3, 0.0, False)
    model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
    opt.step()
    adapter = get_peft_model_state_dict(model)
    assert len(adapter) == len(params) and any("magnitude" in k for k in adapter) == dora
    saved = SavedTraining(adapter, opt.state_dict(), {}, torch.get_rng_state())
    base = stored_shapes(tiny_dir, "")
    check_fit(saved, Path("ckpt"), 8, base)
    with pytest.raises(UserError, match=r"its LoRA rank is 8 .*, the recipe's lora.r is 16"):
        check_fit(saved, Path("ckpt"), 16, base)
    wider = {k: [v[0] * 2, v[1] * 2] if len(v) == 2 else v for k, v in base.items()}
    with pytest.raises(UserError, match=r"and its lora_B map \d+ inputs to \d+ outputs, which does not fit the "
                                         r"model's layer of shape \[\d+, \d+\]"):
        check_fit(saved, Path("ckpt"), 8, wider)
    check_fit(saved, Path("ckpt"), 8, {k: v[::-1] for k, v in base.items()})  # GPT-2's Conv1D: stored (in, out)


def test_the_pre_load_checkpoint_check_takes_gpt2_conv1d_layers(tmp_path):
    """GPT-2's Conv1D layers store their weight as (in, out), the transpose of nn.Linear's: a pair of the right
    sizes passes against the stored shapes whichever way they are laid out."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmfast.finetune.checkpoint import SavedTraining, check_fit
    from llmfast.modelfiles import stored_shapes

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16)).save_pretrained(
        tmp_path / "gpt2")
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"),
                           LoraConfig(r=4, target_modules="all-linear", fan_in_fan_out=True))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params)
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    opt.step()
    base = stored_shapes(tmp_path / "gpt2", "")
    assert base["transformer.h.0.attn.c_attn.weight"] == [32, 96]  # (in, out)
    check_fit(SavedTraining(get_peft_model_state_dict(model), opt.state_dict(), {}, torch.get_rng_state()),
              Path("ckpt"), 4, base)


def test_fsdp_refuses_lora_outside_the_decoder_layers(tmp_path, data):
    """On a model whose head is its own weight (untied), LoRA on lm_head passes the tied check and meets FSDP's:
    it shards the decoder layers only."""
    from llmfast.testing import build_tiny_llama

    untied = build_tiny_llama(tmp_path / "untied", tie_word_embeddings=False)
    path = recipe(tmp_path, untied, data)
    code, _, err = run_cli("finetune", str(path), "--set", "train.fsdp=true", "--set",
                           "lora.target_modules=[q_proj, lm_head]")
    assert code == 2 and "lm_head.lora_A.default.weight is trainable outside them" in err.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


def test_rows_beyond_a_resolved_models_positions_are_refused(tmp_path, data, builtin_dir):
    """The positions check ran for local model folders only; the built-in model (8,192 positions), GGUF files and
    hub ids are resolved by the trainer, which now checks them before anything is written (s43's review)."""
    path = recipe(tmp_path, "builtin:smollm2-135m", data, extra="")
    code, _, err = run_cli("finetune", str(path), "--set", "data.max_length=9000")
    last = err.strip().splitlines()[-1]
    assert code == 2 and f"data.max_length is 9000 tokens, beyond the 8192 positions of {builtin_dir}" in last, last
    assert not (tmp_path / "run").exists()
    code, _, err = run_cli("finetune", str(path), "--set", "data.pack_length=8193", "--set", "data.packing=true")
    assert code == 2 and "data.pack_length is 8193 tokens, beyond the 8192 positions" in err.strip().splitlines()[-1]


@pytest.mark.parametrize("batch_size,grad_accum", [(4, 1), (2, 2), (1, 4)])
def test_a_step_over_micro_batches_of_unequal_answers_takes_the_gradient_of_the_whole_batch(
        tmp_path, tiny_dir, batch_size, grad_accum):
    """A step's gradient is that of (sum of its token losses) / (its target tokens), however its rows are split into
    micro-batches: each micro-batch averaged on its own would weigh a one-word answer as much as a long one. The
    reference: plain transformers forwards of each example alone, cross-entropy summed by hand, torch.autograd."""
    import torch.nn.functional as F

    from llmfast.data.chat import IGNORE
    from llmfast.finetune.trainer import _prepare_training, _setup, train_step
    from llmfast.recipe import FinetuneRecipe, load_recipe

    # answers of 1, 5, 20 and 60 words: however the 4 rows pair up, two micro-batches of two differ in targets
    rows = [{"prompt": f"Say {n} words.", "completion": " ".join(["word"] * n)} for n in (1, 5, 20, 60)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "r.yaml"
    path.write_text(f"""
model: {tiny_dir}
data: {{train: {train}, max_length: 128, eval_fraction: 0, packing: false}}
lora: {{r: 4, alpha: 8, dropout: 0}}
train: {{steps: 1, batch_size: {batch_size}, grad_accum: {grad_accum}, lr: 0.001, seed: 3, dtype: float32}}
output: {tmp_path / 'run'}
""")
    run = _setup(load_recipe(path, FinetuneRecipe), False)
    _prepare_training(run)
    model = run.model
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    torch.manual_seed(0)
    with torch.no_grad():  # B starts at zero, which leaves A without a gradient: give it one
        for n, p in params.items():
            if "lora_B" in n:
                p.normal_(std=0.05)
    assert len(run.rows) == 4 and run.micro_per_step * batch_size == 4, "the one step sees every row"
    examples = [e for row in run.rows for e in row]
    counts = [e.target_tokens for e in examples]
    assert max(counts) > 10 * min(counts)

    device = run.acc.device
    total, targets = torch.zeros((), device=device), 0
    for e in examples:
        ids = torch.tensor([e.input_ids], device=device)
        labels = torch.tensor(e.labels[1:], device=device)
        logits = model(input_ids=ids).logits[0, :-1].float()
        keep = labels != IGNORE
        total = total + F.cross_entropy(logits[keep], labels[keep], reduction="sum")
        targets += int(keep.sum())
    ref_loss = total / targets
    ref = dict(zip(params, torch.autograd.grad(ref_loss, list(params.values()))))

    got = {}
    for n, p in params.items():
        p.register_post_accumulate_grad_hook(lambda q, n=n: got.__setitem__(n, q.grad.detach().clone()))
    loss, _ = train_step(run, 0)
    assert math.isclose(loss, ref_loss.item(), rel_tol=1e-5)
    assert got.keys() == ref.keys()
    scale = max(g.abs().max().item() for g in ref.values())
    assert scale > 0
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-5 * scale, msg=n)


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_save_checkpoint_keeps_the_newest_keep_checkpoints(tmp_path, tiny_dir, keep):
    """train.keep_checkpoints: after each save, the `keep` highest steps remain (numerically: step 10 is newer than
    step 9), the rest removed; each kept one complete and naming its own step."""
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model

    from llmfast.finetune.checkpoint import save_checkpoint
    from llmfast.loading import from_pretrained

    model = get_peft_model(from_pretrained(str(tiny_dir), "float32"),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    acc = Accelerator(cpu=True)
    out = tmp_path / "run"
    for step in range(7, 13):  # crosses step 9 -> 10
        save_checkpoint(acc, model, opt, sched, None, out, step, 20, keep, False, 1)
        names = sorted(p.name for p in (out / "checkpoints").iterdir())
        newest = list(range(max(7, step - keep + 1), step + 1))
        assert names == [f"step-{s:06d}" for s in newest], (step, names)
        for s in newest:
            assert json.loads((out / "checkpoints" / f"step-{s:06d}" / "state.json").read_text())["step"] == s


def test_resume_after_the_data_grew_is_refused_and_changes_nothing(tmp_path, tiny_dir):
    """The step count of a recipe without train.steps follows from its data: rows appended to the data file after a
    kill give another count (the recipe text, which --resume compares, is the same). Resuming would cut a schedule
    and an epoch shuffle of another length at the checkpoint's step: refused in one line, nothing touched."""
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in TINY_TRAIN))  # 32 rows
    path = tmp_path / "r.yaml"
    path.write_text(f"""
model: {tiny_dir}
data: {{train: {train}, max_length: 64, eval_fraction: 0, packing: false}}
lora: {{r: 8, alpha: 16}}
train: {{epochs: 4, batch_size: 2, lr: 0.003, seed: 1, save_every: 5, keep_checkpoints: 1}}
output: {tmp_path / 'run'}
""")
    run = tmp_path / "run"
    assert _stopped_after_its_first_checkpoint(str(path))[0] == 130
    saved = sorted(run.glob("checkpoints/step-*/state.json"))
    assert saved and not (run / "adapter").exists(), "stopped after a checkpoint, before the end"
    # 32 rows, one per micro-batch of 2, over 4 epochs: 64 steps
    assert json.loads(saved[-1].read_text())["total_steps"] == 4 * 32 // 2
    with open(train, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in TINY_TRAIN[:8]))  # 40 rows: 80 steps
    with open(run / "train_log.jsonl", "a") as f:  # what a kill after the checkpoint leaves: a step past it
        f.write(json.dumps({"step": json.loads(saved[-1].read_text())["step"] + 1, "loss": 1.0}) + "\n")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, _, err = run_cli("finetune", str(path), "--resume")
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == ("llmfast: error: --resume: the recipe now gives 80 steps, the run had 64: "
                                            "resume with the same recipe"), err[-2000:]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("rslora,dora", [(False, False), (True, False), (False, True)])
def test_lora_options_reach_the_adapter(tmp_path, tiny_dir, data, rslora, dora):
    """`lora.rslora` scales by alpha / sqrt(r) and `lora.dora` adds magnitude vectors (s44's mutation audit: both
    could be dropped on the way to PEFT without a test failing)."""
    import math

    from transformers import AutoModelForCausalLM

    from llmfast.finetune.lora import attach_lora
    from llmfast.recipe import FinetuneRecipe, load_recipe

    path = recipe(tmp_path, tiny_dir, data, extra=f"lora: {{r: 4, alpha: 8, rslora: {str(rslora).lower()}, "
                                                   f"dora: {str(dora).lower()}, dropout: 0.25}}")
    text = path.read_text()
    path.write_text(text.replace("lora: {r: 8, alpha: 16}\n", ""))
    model = attach_lora(AutoModelForCausalLM.from_pretrained(tiny_dir), load_recipe(path, FinetuneRecipe))
    layers = [m for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)]
    assert layers and {m.scaling["default"] for m in layers} == {8 / math.sqrt(4) if rslora else 8 / 4}
    magnitudes = [n for n, _ in model.named_parameters() if "lora_magnitude_vector" in n]
    assert bool(magnitudes) == dora
    # lora.dropout (s46's mutation audit: dropped, PEFT's default 0.0 trained without it)
    assert {m.lora_dropout["default"].p for m in layers} == {0.25}


def test_auto_picks_float32_and_torchs_adamw_on_a_cpu_and_paged_8bit_adamw_on_a_gpu():
    """docs/finetune.md's `auto`s (s46's mutation audit: bfloat16 on a CPU, or torch's AdamW on a GPU, passed)."""
    from llmfast.finetune.lora import pick_compute_dtype
    from llmfast.finetune.optimizers import resolve_optimizer

    if not torch.cuda.is_available():
        assert pick_compute_dtype("auto") == "float32"
    assert pick_compute_dtype("float16") == "float16" and pick_compute_dtype("bfloat16") == "bfloat16"
    assert resolve_optimizer("auto", cuda=False) == "adamw_torch"
    assert resolve_optimizer("auto", cuda=True) == "paged_adamw_8bit"
    assert resolve_optimizer("adamw_8bit", cuda=False) == "adamw_8bit"


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_every_optimizer_takes_the_recipes_weight_decay_and_lr(weight_decay):
    """A dropped weight_decay falls back to the optimizer's own default (torch's AdamW: 0.01, not the recipe's 0)."""
    from llmfast.finetune.optimizers import OPTIMIZERS, make_optimizer

    for name in OPTIMIZERS.names():
        opt = make_optimizer([torch.nn.Parameter(torch.zeros(4))], name, 3e-4, weight_decay, cuda=False)
        group = opt.param_groups[0]
        assert (group["weight_decay"], group["lr"]) == (weight_decay, 3e-4), name


def test_the_lr_follows_cosine_with_warmup_and_a_log_line_averages_its_window(tmp_path, tiny_dir, data):
    """The lr each log line records (after its step: the next step's) is transformers' cosine schedule with
    round(warmup_ratio * steps) linear warm-up steps, written out by hand; with log_every 3 a line's loss is the
    mean of its own steps' losses and the last step is logged too (s46's mutation audit: a dropped warm-up, a
    scheduler never stepped, a window never reset and a last partial window left out all passed)."""
    args = ["--set", "train.warmup_ratio=0.25", "--set", "train.lr=0.003"]  # steps 8: 2 warm-up steps
    assert run_cli("finetune", str(recipe(tmp_path, tiny_dir, data, out="every")), *args)[0] == 0
    every = [json.loads(l) for l in (tmp_path / "every" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in every] == list(range(1, 9))

    def lr(t):
        return 0.003 * (t / 2 if t < 2 else 0.5 * (1 + math.cos(math.pi * (t - 2) / 6)))

    for e in every:
        assert math.isclose(e["lr"], lr(e["step"]), rel_tol=1e-9, abs_tol=1e-15), e
    assert every[0]["lr"] == 0.0015 and every[-1]["lr"] < 1e-12  # half way up; the end of the cosine

    code, _, err = run_cli("finetune", str(recipe(tmp_path, tiny_dir, data, out="windows")), *args,
                           "--set", "train.log_every=3")
    assert code == 0, err
    windows = [json.loads(l) for l in (tmp_path / "windows" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in windows] == [3, 6, 8]
    for e, (lo, hi) in zip(windows, [(0, 3), (3, 6), (6, 8)]):
        mean = sum(x["loss"] for x in every[lo:hi]) / (hi - lo)  # the same run, step for step
        assert abs(e["loss"] - mean) < 2e-6, (e, mean)  # each logged loss rounded to 1e-6
    assert json.loads((tmp_path / "windows" / "metrics.json").read_text())["final_train_loss"] == windows[-1]["loss"]


def _prepared(tmp_path, tiny_dir, rows, data="", train="", dtype="float32"):
    """A run as `run_finetune` sets it up (model, rows, optimizer), to drive its steps by hand."""
    from llmfast.finetune.trainer import _prepare_training, _setup
    from llmfast.recipe import FinetuneRecipe, load_recipe

    path = tmp_path / "r.yaml"
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path.write_text(f"""
model: {tiny_dir}
data: {{train: {tmp_path / 'train.jsonl'}, max_length: 64, packing: false{data}}}
lora: {{r: 4, alpha: 8}}
train: {{lr: 0.001, seed: 3, dtype: {dtype}{train}}}
output: {tmp_path / 'run'}
""")
    run = _setup(load_recipe(path, FinetuneRecipe), False)
    _prepare_training(run)
    return run


def test_the_steps_of_a_run_of_epochs_take_every_row_once_an_epoch_in_a_new_order(tmp_path, tiny_dir):
    """7 rows in micro-batches of 2 over 2 epochs: 4 steps an epoch, the last of one row (s46's mutation audit: a
    step count from the whole micro-batches only, which ends an epoch's run before its last micro-batch, and one
    shuffle for every epoch both passed)."""
    rows = [{"prompt": f"Name {w}.", "completion": w} for w in ("ant", "bee", "cat", "dog", "eel", "fox", "gnu")]
    run = _prepared(tmp_path, tiny_dir, rows, data=", eval_fraction: 0", train=", epochs: 2, batch_size: 2")
    assert len(run.rows) == 7 and run.total_steps == 8
    row_of = {tuple(row[0].input_ids): row[0].row for row in run.rows}

    def rows_in(batch):  # each row's example: its ids up to where the padding's positions restart at 0
        return [row_of[tuple(ids[: (pos[1:].index(0) + 1) if 0 in pos[1:] else len(pos)])]
                for ids, pos in zip(batch.input_ids, batch.position_ids)]

    epochs = [[r for i in range(e * 4, e * 4 + 4) for r in rows_in(run.micro(i))] for e in range(2)]
    assert [len(rows_in(run.micro(i))) for i in range(8)] == [2, 2, 2, 1] * 2
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(row_of.values()) and len(row_of) == 7, epochs
    assert epochs[0] != epochs[1], "each epoch reshuffled"


def test_split_eval_holds_out_at_least_one_row_and_leaves_one_to_train_on():
    """eval_fraction's default 0.02 of 10 rows rounds to none: one is held out still (else final_eval_loss is null
    for a small data set; s46's mutation audit); never all of them."""
    from llmfast.finetune.trainer import split_eval

    rows = list(range(10))
    for fraction, held in ((0.02, 1), (0.25, 2), (0.5, 5), (0.99, 9)):
        train, ev = split_eval(rows, fraction, seed=4)
        assert len(ev) == held and sorted(train + ev) == rows and train == sorted(train), (fraction, ev)
    assert split_eval(rows, 0.0, 4) == (rows, [])
    assert split_eval(rows, 0.25, 4) == split_eval(rows, 0.25, 4) != split_eval(rows, 0.25, 5)


@pytest.mark.parametrize("dtype,max_grad_norm", [("float32", 0.01), ("float32", None), ("float16", 0.01)])
def test_a_step_clips_the_whole_gradient_to_max_grad_norm(tmp_path, tiny_dir, dtype, max_grad_norm):
    """What the optimizer steps with: the step's gradient scaled by max_grad_norm / its global norm (torch's
    clip_grad_norm_, eps 1e-6, written out by hand), or as it is with null; in float16 the norm of the unscaled
    gradient, not of the loss-scaled one (s46's mutation audit: a dropped clip passed, the FSDP comparison clipping
    on both sides, and so did clipping before the unscale: Adam hardly minds a gradient 65536 times too small)."""
    rows = [{"prompt": f"Say {n} words.", "completion": " ".join(["word"] * n)} for n in (1, 5, 9, 13)]
    extra = f", steps: 1, batch_size: 2, grad_accum: 2, max_grad_norm: {'null' if max_grad_norm is None else 0.01}"
    run = _prepared(tmp_path, tiny_dir, rows, data=", eval_fraction: 0", train=extra, dtype=dtype)
    from llmfast.finetune.trainer import train_step

    params = {n: p for n, p in run.model.named_parameters() if p.requires_grad}
    torch.manual_seed(0)
    with torch.no_grad():  # B starts at zero, which leaves A without a gradient: give it one
        for n, p in params.items():
            if "lora_B" in n:
                p.normal_(std=0.05)
    accumulated, stepped = {}, {}
    for n, p in params.items():
        p.register_post_accumulate_grad_hook(lambda q, n=n: accumulated.__setitem__(n, q.grad.detach().clone()))
    run.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: stepped.update({n: p.grad.detach().clone() for n, p in params.items()}))
    assert (run.scaler is not None) == (dtype == "float16") and (run.scaler is None or run.scaler.get_scale() == 2**16)
    if run.scaler is not None:  # far from float16's overflow on any CPU; a clip before the unscale still off 256x
        run.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    loss_scale = run.scaler.get_scale() if run.scaler is not None else 1.0
    train_step(run, 0)
    assert stepped.keys() == accumulated.keys() == params.keys(), "a step (float16: no overflow skipped it)"
    accumulated = {n: g / loss_scale for n, g in accumulated.items()}  # a power of two: exact
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in accumulated.values()))
    assert norm > 10 * 0.01, "a gradient the clip acts on"
    scale = 1.0 if max_grad_norm is None else max_grad_norm / (norm + 1e-6)
    for n in params:
        torch.testing.assert_close(stepped[n], accumulated[n] * scale, rtol=1e-5, atol=1e-7 * scale, msg=n)


def test_evaluate_is_the_mean_loss_per_labelled_token_of_the_held_out_rows(tmp_path, tiny_dir, monkeypatch):
    """Summed cross-entropy of every held-out row's answer tokens over their number, not over the rows' real tokens
    (prompts included) (s46's mutation audit); the reference: transformers forwards of each row alone. Each batch
    is collated as its turn comes (s52: all of them up front held the held-out rows' tokens again)."""
    import torch.nn.functional as F

    from llmfast.data.chat import IGNORE
    from llmfast.data.packing import collate
    from llmfast.finetune import trainer
    from llmfast.finetune.trainer import evaluate

    rows = [{"prompt": f"Say {n} words, please.", "completion": " ".join(["word"] * n)} for n in range(1, 9)]
    run = _prepared(tmp_path, tiny_dir, rows, data=", eval_fraction: 0.5", train=", steps: 1, batch_size: 3")
    held = [e for row in run.eval_rows for e in row]
    assert len(held) == 4 and len({len(e) for e in held}) > 1, "a padded batch"
    with torch.no_grad():
        lora_b = [p for n, p in run.model.named_parameters() if "lora_B" in n]
        for p in lora_b:
            p.normal_(std=0.05, generator=torch.Generator().manual_seed(1))  # the adapter counts in the loss
        total, count = 0.0, 0
        for e in held:
            logits = run.model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1].double()
            labels = torch.tensor(e.labels[1:])
            keep = labels != IGNORE
            total += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            count += int(keep.sum())
    assert count < sum(len(e) for e in held) / 2, "prompts outweigh answers"
    collated = []
    monkeypatch.setattr(trainer, "collate", lambda rows, pad: collated.append(len(rows)) or collate(rows, pad))
    seen = []  # how many batches were collated when each forward ran: one more each (not all of them up front)
    hook = run.acc.unwrap_model(run.wrapped).register_forward_pre_hook(lambda *_: seen.append(len(collated)))
    assert math.isclose(evaluate(run), total / count, rel_tol=1e-5)
    hook.remove()
    assert seen == [1, 2] and collated == [3, 1], (seen, collated)
    assert run.wrapped.training, "training mode again after the evaluation"


def test_a_checkpoint_gives_back_the_optimizer_schedule_rng_and_its_process_count(tmp_path, tiny_dir):
    """save_checkpoint, then what --resume reads and restores: the optimizer's moments, the schedule's position, the
    RNG state (lora.dropout draws from it: a resumed run would mask other activations) and the number of processes
    the run had, which check_resumable compares (s46's mutation audit: a dropped RNG restore, and state.json
    without `processes`, passed every test)."""
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model
    from transformers import get_cosine_schedule_with_warmup

    from llmfast.errors import UserError
    from llmfast.finetune.checkpoint import (check_resumable, load_training_state, read_state, read_training_state,
                                             save_checkpoint)
    from llmfast.loading import from_pretrained

    def fresh():
        torch.manual_seed(0)
        model = get_peft_model(from_pretrained(str(tiny_dir), "float32"),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], lora_dropout=0.1))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        return model, opt, get_cosine_schedule_with_warmup(opt, 2, 10)

    model, opt, sched = fresh()
    for _ in range(3):
        model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
        opt.step(), sched.step(), opt.zero_grad()
    save_checkpoint(Accelerator(cpu=True), model, opt, sched, None, tmp_path / "run", 3, 10, 1, False, 2)
    rng = torch.get_rng_state()
    ckpt = tmp_path / "run" / "checkpoints" / "step-000003"
    state = read_state(ckpt)
    check_resumable(ckpt, state, 10, False, 2)
    with pytest.raises(UserError, match="was written by 2 processes, this run has 1: resume with as many"):
        check_resumable(ckpt, state, 10, False, 1)

    model2, opt2, sched2 = fresh()
    torch.rand(5)  # the RNG moved on since
    assert not torch.equal(torch.get_rng_state(), rng)
    saved = read_training_state(ckpt, False, torch.device("cpu"), False)
    load_training_state(saved, ckpt, model2, opt2, sched2, None, False)
    assert torch.equal(torch.get_rng_state(), rng)
    assert sched2.last_epoch == 3 and sched2.get_last_lr() == sched.get_last_lr()
    for p, q in zip(opt.param_groups[0]["params"], opt2.param_groups[0]["params"]):
        assert torch.equal(opt.state[p]["exp_avg"], opt2.state[q]["exp_avg"])
        assert torch.equal(opt.state[p]["exp_avg_sq"], opt2.state[q]["exp_avg_sq"])


def test_each_process_resumes_its_own_rng_state():
    """rng.pt holds a row per process (and the GPU's states on a GPU): process r takes row r; an older rng.pt, one
    state, goes to every process; another form is one line. The rows are copies: a row view (at an offset into the
    stacked tensor) given to torch.set_rng_state crashed the process with SIGSEGV (s47)."""
    from llmfast.errors import UserError
    from llmfast.finetune.rng import check_states, restore_states

    torch.manual_seed(1)
    first = torch.get_rng_state()
    torch.manual_seed(2)
    second = torch.get_rng_state()
    states = check_states({"cpu": torch.stack([first, second])}, Path("rng.pt"), 2, "fix")
    restore_states(states, 1, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), second)
    restore_states(states, 0, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), first)
    old = check_states(second, Path("rng.pt"), 2, "fix")
    restore_states(old, 0, torch.device("cpu"))
    a = torch.rand(3)
    restore_states(old, 1, torch.device("cpu"))
    assert torch.equal(torch.rand(3), a)
    for bad, said in (({"cpu": torch.stack([first, second])}, "holds a dict of cpu, not the 3 processes' RNG"),
                      ({"cpu": first[None].repeat(3, 1), "numpy": first}, "holds a dict of cpu, numpy, not the 3"),
                      (torch.zeros(3), "holds a Tensor of torch.float32, not the 3 processes' RNG states"),
                      ([first], "holds a list, not")):
        with pytest.raises(UserError, match=f"^rng.pt: {re.escape(said)}.*; fix$"):
            check_states(bad, Path("rng.pt"), 3, "fix")


def test_check_resumable_names_how_the_checkpoint_was_sharded():
    from llmfast.errors import UserError
    from llmfast.finetune.checkpoint import check_resumable

    ckpt = Path("run/checkpoints/step-000004")
    with pytest.raises(UserError, match="step-000004 was written with FSDP over several processes: resume it the same"):
        check_resumable(ckpt, {"step": 4, "total_steps": 8, "fsdp": True, "processes": 2}, 8, False, 2)
    with pytest.raises(UserError, match="step-000004 was written without FSDP over several processes: resume it"):
        check_resumable(ckpt, {"step": 4, "total_steps": 8, "fsdp": False, "processes": 2}, 8, True, 2)
    check_resumable(ckpt, {"step": 4, "total_steps": 8}, 8, False, 1)  # an older state.json: one process, no FSDP


def test_resume_takes_other_saving_logging_and_eval_settings_and_nothing_else(tmp_path):
    """The keys docs/finetune.md says a resumed run may change pass check_same_recipe; any other is refused by name
    (s46's mutation audit: log_every left out of the allowed ones passed)."""
    from llmfast.errors import UserError
    from llmfast.finetune.checkpoint import check_same_recipe

    was = {"model": "m", "data": {"train": "t.jsonl"}, "lora": {"r": 8}, "output": "/x/run",
           "train": {"lr": 0.001, "save_every": 10, "keep_checkpoints": 2, "log_every": 1, "eval_every": None}}
    (tmp_path / "recipe.json").write_text(json.dumps(was))
    now = json.loads(json.dumps(was))
    now["train"].update(save_every=5, keep_checkpoints=4, log_every=3, eval_every=7)
    now["output"] = "/x/./run"
    check_same_recipe(tmp_path, now)
    for key, value in (("lr", 0.002), ("seed", 1)):
        other = json.loads(json.dumps(now))
        other["train"][key] = value
        with pytest.raises(UserError, match=rf"--resume: train\.{key} is {value!r}, the run in .* was started with"):
            check_same_recipe(tmp_path, other)


def test_foreign_run_files_takes_only_what_a_run_killed_before_its_first_checkpoint_leaves(tmp_path):
    """What --resume may delete to start again: llmfast's own files, looked into; anything else is named (s46's
    mutation audit: a symlinked recipe.json and a log of rows without a step were taken, and a step- folder without
    its state.json refused, without a test failing)."""
    from llmfast.finetune.run_files import foreign_run_files

    def run(name):
        out = tmp_path / name
        (out / "checkpoints" / ".step-000002.tmp-1-x").mkdir(parents=True)
        (out / "checkpoints" / "step-000001").mkdir()  # renamed into place, its state.json not there
        (out / "recipe.json").write_text(json.dumps({"model": "m", "data": {}, "lora": {}, "train": {}, "output": "o"}))
        (out / "base.json").write_text(json.dumps({"weights": "ab" * 16}))
        (out / "train_log.jsonl").write_text('{"step": 1, "loss": 2.0}\n\n')
        return out

    assert foreign_run_files(run("ok")) is None
    assert foreign_run_files(tmp_path / "absent") is None
    out = run("symlink")
    (tmp_path / "mine.json").write_text((out / "recipe.json").read_text())
    (out / "recipe.json").unlink()
    (out / "recipe.json").symlink_to(tmp_path / "mine.json")
    assert foreign_run_files(out) == str(out / "recipe.json")
    out = run("log")
    (out / "train_log.jsonl").write_text('{"epoch": 1, "loss": 2.0}\n')
    assert foreign_run_files(out) == str(out / "train_log.jsonl")
    out = run("ckpt")
    (out / "checkpoints" / "checkpoint-500").mkdir()
    assert foreign_run_files(out) == str(out / "checkpoints" / "checkpoint-500")
    out = run("base")
    (out / "base.json").write_text(json.dumps({"weights": 3}))
    assert foreign_run_files(out) == str(out / "base.json")
    out = run("recipe")
    (out / "recipe.json").write_text(json.dumps({"model": "m"}))
    assert foreign_run_files(out) == str(out / "recipe.json")
    # its saved examples (finetune/encoded_cache.py), and what a kill mid-write leaves of them or of recipe.json
    out = run("encoded")
    (out / "encoded").mkdir()
    for name in ("meta.json", "ids.npy"):
        (out / "encoded" / name).write_text("")
    (out / ".encoded.tmp-1234-abcd").mkdir()
    (out / ".recipe.json.tmp-1234-abcd").write_text("")
    assert foreign_run_files(out) is None
    (out / "encoded" / "mine.txt").write_text("")
    assert foreign_run_files(out) == str(out / "encoded")
    out = run("encoded-file")
    (out / "encoded").write_text("")
    assert foreign_run_files(out) == str(out / "encoded")
    out = run("encoded-link")
    (out / "encoded").symlink_to(tmp_path)
    assert foreign_run_files(out) == str(out / "encoded")
    out = run("other-temp")
    (out / ".notes.txt.tmp-1-x").write_text("")
    assert foreign_run_files(out) == str(out / ".notes.txt.tmp-1-x")


@pytest.mark.parametrize("lora, train, needle", [
    ({"alpha": 1e-300}, {}, "lora: alpha: the adapter's scale lora.alpha / lora.r = 1e-300 / 16 = 6.25e-302 is outside"),
    ({"alpha": 1e-38, "r": 1000}, {}, "lora.alpha / lora.r = 1e-38 / 1000"),
    ({"alpha": 1e300, "rslora": True}, {}, "lora.alpha / sqrt(lora.r) = 1e+300 / sqrt(16) = 2.5e+299 is outside"),
    ({}, {"lr": 1e-40}, "train.lr: must be at least 1.18e-38 (float32's smallest normal number: a smaller rate"),
    ({}, {"lr": 0}, "train.lr: must be at least 1.18e-38 (float32's"),  # said as relufy/dejavu/w4 say it (s50)
    ({}, {"max_grad_norm": 1e-300}, "train.max_grad_norm: must be at least 1.18e-38 (float32's smallest normal "
                                    "number: clipping to a smaller norm"),
])
def test_values_that_round_away_in_float32_are_refused_by_key(tmp_path, lora, train, needle):
    """lora.alpha 1e-300 (a scale alpha/r of 0 in float32: no gradient reaches B), train.lr 1e-40 and
    train.max_grad_norm 1e-300 (clipped gradients of 0) trained nothing and saved the base's adapter with exit 0;
    alpha 1e300 was a NaN blamed on train.lr (fuzz pass 10, F2)."""
    from llmfast.errors import UserError
    from llmfast.recipe import FinetuneRecipe, validate

    (tmp_path / "t.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    data = {"model": "x", "data": {"train": str(tmp_path / "t.jsonl")}, "lora": lora, "train": train,
            "output": str(tmp_path / "out")}
    with pytest.raises(UserError) as e:
        validate(data, FinetuneRecipe, "r.yaml")
    assert needle in str(e.value) and "\n" not in str(e.value)
    for ok_lora, ok_train in (({"alpha": 1e-30}, {}), ({"alpha": 1e30}, {"lr": 1e-30, "max_grad_norm": 1e-30})):
        validate({**data, "lora": ok_lora, "train": ok_train}, FinetuneRecipe, "r.yaml")  # extreme, but float32 holds


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, tiny_dir, data):
    """A run stopped in this process (Ctrl-C right after its checkpoint of step 10 of 20) and the adapter of the same
    run uninterrupted: (recipe, run folder, the uninterrupted adapter's bytes). Its model is a copy of the tiny one,
    whose tokenizer a test may change (and put back)."""
    d = tmp_path_factory.mktemp("stopped")
    model = Path(shutil.copytree(tiny_dir, d / "model"))
    path = recipe(d, model, data, extra="")
    path.write_text(path.read_text().replace("steps: 8,", "steps: 20, save_every: 10, keep_checkpoints: 1,"))
    assert run_cli("finetune", str(path), "--set", f"output={d / 'ref'}")[0] == 0
    code, err = _stopped_after_its_first_checkpoint(str(path))
    assert code == 130 and not (d / "run" / "adapter").exists() and list((d / "run").glob("checkpoints/step-*")), err
    return path, d / "run", (d / "ref" / "adapter" / "adapter_model.safetensors").read_bytes()


def _copy_of(stopped_run, tmp_path):
    path, run, _ = stopped_run
    out = Path(shutil.copytree(run, tmp_path / "run"))
    copy = tmp_path / "r.yaml"
    copy.write_text(path.read_text().replace(str(run), str(out)))
    return copy, out


def test_resume_reads_the_rows_it_saved_and_trains_as_if_never_stopped(stopped_run, tmp_path, monkeypatch):
    """The examples encoded on the first start are saved in the run (never pickled), and a resume with the same data
    files, tokenizer and settings reads them instead of encoding the data again (minutes for a million rows): the
    adapter is the bytes of the uninterrupted run's, as is that of a resume that encodes again (no saved copy)."""
    from llmfast.finetune import data_setup

    path, out = _copy_of(stopped_run, tmp_path)
    assert sorted(p.name for p in (out / "encoded").iterdir()) == ["examples.npy", "ids.npy", "labels.npy",
                                                                   "meta.json"]
    for name in ("ids.npy", "labels.npy", "examples.npy"):
        assert np.load(out / "encoded" / name, allow_pickle=False).dtype.kind == "i"
    shutil.copytree(out, tmp_path / "again")
    shutil.rmtree(tmp_path / "again" / "encoded")  # a run of an earlier version: the data is encoded again
    with monkeypatch.context() as mp:
        mp.setattr(data_setup, "read_examples", lambda *a, **k: pytest.fail("the data was encoded again"))
        code, _, err = run_cli("finetune", str(path), "--resume")
    assert code == 0, err
    assert (f"llmfast: data: 32 rows of chat (messages) from {yaml.safe_load(path.read_text())['data']['train']}; "
            f"3 of them held out (as encoded when the run started: {out / 'encoded'})\n") in err, err
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == stopped_run[2]
    code, _, err = run_cli("finetune", str(path), "--resume", "--set", f"output={tmp_path / 'again'}")
    assert code == 0 and "as encoded when the run started" not in err, err
    assert (tmp_path / "again" / "adapter" / "adapter_model.safetensors").read_bytes() == stopped_run[2]


def test_resume_with_another_tokenizer_encodes_again_and_is_refused(stopped_run, tmp_path):
    """The tokenizer's files are part of what the saved rows were encoded from: a chat template changed since the
    stop gives other rows, refused as when nothing was saved (read from the saved copy, the run went on with the old
    template's rows: the data and the recipe are the same). Nothing in the run changes."""
    from llmfast.models import load_tokenizer

    path, out = _copy_of(stopped_run, tmp_path)
    model = Path(yaml.safe_load(path.read_text())["model"])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    files = {p: p.read_bytes() for p in model.iterdir() if p.is_file()}
    try:
        tok = load_tokenizer(model)
        tok.chat_template = "{{ 'Chat: ' }}" + tok.chat_template
        tok.save_pretrained(model)
        code, _, err = run_cli("finetune", str(path), "--resume")
    finally:
        for p in model.iterdir():
            p.unlink()
        for p, b in files.items():
            p.write_bytes(b)
    assert code == 2 and err.strip().splitlines()[-1].startswith(
        "llmfast: error: --resume: the data encodes to other rows than the run in"), err[-2000:]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("case,said", [
    ("truncated", "ids.npy: not a .npy array llmfast wrote (ValueError"),
    ("a pickle", "examples.npy: not a .npy array llmfast wrote (ValueError"),
    ("meta not JSON", "meta.json: JSONDecodeError"), ("ids edited", "holds other rows than the run started on")])
def test_a_damaged_saved_copy_of_the_rows_is_said_in_a_line_and_the_data_encoded_again(stopped_run, tmp_path, case,
                                                                                     said):
    """The saved rows are llmfast's own copy of what the data files give: damaged (cut short, replaced by a pickle,
    edited by hand so that they are other rows than base.json records), the data is encoded again, as with no copy,
    and the run goes on as if never stopped. One line says so (a resume is then slow); nothing is unpickled."""

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "marker"), "w"))

    path, out = _copy_of(stopped_run, tmp_path)
    saved = out / "encoded"
    if case == "truncated":
        (saved / "ids.npy").write_bytes((saved / "ids.npy").read_bytes()[:-4])
    elif case == "a pickle":
        (saved / "examples.npy").write_bytes(pickle.dumps(Payload()))
    elif case == "meta not JSON":
        (saved / "meta.json").write_text("{")
    else:
        ids = np.load(saved / "ids.npy")
        ids[-1] = (ids[-1] + 1) % 1000
        np.save(saved / "ids.npy", ids)
    code, _, err = run_cli("finetune", str(path), "--resume")
    assert code == 0 and "Traceback" not in err, err
    notes = [l for l in err.splitlines() if l.startswith("llmfast: note: ")]
    assert len(notes) == 1 and said in notes[0] and notes[0].endswith(": encoding the data again"), err
    assert not (tmp_path / "marker").exists(), "the payload ran"
    assert "allow_pickle" not in err, "no advice to load it unsafely"
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == stopped_run[2]


def test_the_saved_rows_read_back_as_encoded_from_several_files(tmp_path, tiny):
    """Every example's ids, labels, row and place (FILE:LINE, a `datasets` folder's `row N`), from files of several
    shapes, with the held-out split, the warnings and the line saying what was read; a key of other inputs finds
    nothing."""
    import datasets

    from llmfast.finetune import encoded_cache
    from llmfast.finetune.data_setup import encode_data
    from llmfast.recipe import FinetuneRecipe

    _, tok = tiny
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in TINY_TRAIN[:6]))
    datasets.Dataset.from_list([{"text": f"Row {i}: " + "word " * (3 + 40 * (i == 2))} for i in range(4)]).save_to_disk(
        str(tmp_path / "ds"))
    rec = FinetuneRecipe.model_validate({"model": "m", "output": str(tmp_path / "run"), "data": {
        "train": [str(chat), str(tmp_path / "ds")], "max_length": 32, "eval_fraction": 0.3}})

    class Acc:
        is_main_process = False

    got = encode_data(rec, tok, Acc(), None)
    assert got.warnings and got.eval and {e.where.split(":")[0].split(" row ")[0] for e in got.train} == {
        str(chat), str(tmp_path / "ds")}
    key = encoded_cache.input_key(rec, Path(tok.name_or_path), 1024)
    encoded_cache.save(tmp_path, key, got.train, got.eval, got.said, got.warnings)
    back = encoded_cache.load(tmp_path, json.loads(json.dumps(key)))
    assert back is not None and (back.train, back.eval, back.said, back.warnings) == (
        got.train, got.eval, got.said, got.warnings)
    assert encoded_cache.load(tmp_path, {**key, "settings": {**key["settings"], "max_length": 64}}) is None
    with open(chat, "a") as f:
        f.write(json.dumps(TINY_TRAIN[7]) + "\n")
    assert encoded_cache.input_key(rec, Path(tok.name_or_path), 1024)["train"] != key["train"]
