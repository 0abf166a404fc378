"""`llmfast run`: a chain of real stages on a tiny model: plan, reuse, a changed setting, kill and continue, errors."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from llmfast.cli import main

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "eval" / "text" / "persuasion.txt"


def chain(model: Path, out: Path, qat_steps: int = 0) -> dict:
    finetune = {
        "model": str(model),
        "data": {"train": "${data}/dates/train.jsonl", "max_length": 128, "too_long": "truncate"},
        "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
        "train": {"steps": 6, "batch_size": 2, "lr": 1e-3, "save_every": 2, "log_every": 1, "eval_every": 100},
        "export_merged": True,
    }
    text = {"text": str(TEXT), "calibration_tokens": 1024, "heldout_tokens": 512, "window": 128}
    evaluate = {"eval": {"perplexity": {"text": str(TEXT), "max_tokens": 256, "context": 128, "stride": 128},
                         "tasks": [{"name": "dates", "path": "${data}/dates/test.jsonl", "limit": 4}],
                         "batch_size": 4, "max_new_tokens": 8}}
    return {"output": str(out), "stages": {
        "data": {"type": "tasks", "with": {"tasks": ["dates"], "train": 24, "test": 4}},
        "lora": {"type": "finetune", "with": finetune},
        "ternary": {"type": "quantize", "with": {"model": "${lora}/merged", "data": text,
                                                 "quantization": {"method": "bitnet", "qat_steps": qat_steps,
                                                                  "batch_size": 2, "save_every": 2}}},
        "eval-merged": {"type": "eval", "with": {"model": "${lora}/merged", **evaluate}},
        "eval-ternary": {"type": "eval", "with": {"model": "${ternary}", **evaluate}},
    }}


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> Path:
    """The session's tiny model (build_tiny_llama's defaults), read only: a test that changes a model copies it."""
    return tiny_dir


def write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def results(out: Path) -> dict:
    keep = ("perplexity", "tasks")
    found = {}
    for name in ("eval-merged", "eval-ternary"):
        data = json.loads((out / name / "results.json").read_text())
        found[name] = {k: {kk: vv for kk, vv in (data[k] or {}).items() if kk not in ("seconds", "path")}
                       for k in keep}
        found[name]["tasks"] = {t: {kk: vv for kk, vv in v.items() if kk not in ("seconds", "path")}
                                for t, v in data["tasks"].items()}
    return found


def test_chain_runs_reuses_and_reruns_only_what_changed(tiny: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    recipe = write(tmp_path / "chain.yaml", chain(tiny, out))
    assert main(["run", str(recipe), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert plan.splitlines()[0].split()[1:4] == ["run", "data", "tasks"] and "new" in plan
    assert not out.exists()  # a dry run writes nothing

    assert main(["run", str(recipe)]) == 0
    first = results(out)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    capsys.readouterr()
    assert main(["run", str(recipe)]) == 0  # everything reused: no file touched
    assert "reuse" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and ".state" not in p.parts
            and p.name != "llmfast-run.json"} == {p: t for p, t in stamps.items() if ".state" not in p.parts
                                                   and p.name != "llmfast-run.json"}

    # A quantize setting changed: quantize and what follows it run again, nothing else.
    assert main(["run", str(recipe), "--set", "stages.ternary.with.quantization.qat_steps=2", "--dry-run"]) == 0
    lines = {line.split()[2]: line.split()[1] for line in capsys.readouterr().out.splitlines()}
    assert lines == {"data": "reuse", "lora": "reuse", "eval-merged": "reuse", "ternary": "run",
                     "eval-ternary": "run"}
    # Killed as the changed stage starts: its earlier output (written whole by quantize) is still there, complete,
    # and not reused: the next run makes it again and swaps it in.
    import llmfast.chain.run as chain_run

    old_weights = (out / "ternary" / "model.safetensors").read_bytes()
    real_run_stage = chain_run.run_stage

    def killed(out_dir, stage, *args):
        if stage.name == "ternary":
            raise KeyboardInterrupt
        return real_run_stage(out_dir, stage, *args)

    monkeypatch.setattr(chain_run, "run_stage", killed)
    assert main(["run", str(recipe), "--set", "stages.ternary.with.quantization.qat_steps=2"]) == 130
    monkeypatch.setattr(chain_run, "run_stage", real_run_stage)
    assert (out / "ternary" / "model.safetensors").read_bytes() == old_weights
    assert main(["run", str(recipe), "--set", "stages.ternary.with.quantization.qat_steps=2", "--dry-run"]) == 0
    assert "run     ternary" in capsys.readouterr().out
    assert main(["run", str(recipe), "--set", "stages.ternary.with.quantization.qat_steps=2"]) == 0
    assert (out / "ternary" / "model.safetensors").read_bytes() != old_weights  # 2 QAT steps moved the weights
    assert (out / "lora" / "merged" / "model.safetensors").stat().st_mtime_ns == \
        stamps[out / "lora" / "merged" / "model.safetensors"]
    assert results(out)["eval-merged"] == first["eval-merged"]


def test_a_chain_killed_anywhere_ends_as_an_uninterrupted_one(tiny: Path, tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "llmfast.cli", "run",
                           str(write(tmp_path / "whole.yaml", chain(tiny, whole, qat_steps=4)))],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    # Kill moments inside the length of an uninterrupted process on this machine, start-up included: drawn from a
    # fixed range, most landed after the run had ended on a fast machine, and nothing was killed.
    length = time.monotonic() - started
    killed = tmp_path / "killed"
    recipe = write(tmp_path / "killed.yaml", chain(tiny, killed, qat_steps=4))
    cmd = [sys.executable, "-m", "llmfast.cli", "run", str(recipe)]
    rng = random.Random(0)
    for i in range(2):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:  # killed at that moment, unless it finished before it (the second run reuses the first's stages)
            proc.wait(timeout=rng.uniform(0.5, 0.9 * length))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert i or proc.returncode == -signal.SIGKILL, "the first kill landed after the run had ended"
    assert main(["run", str(recipe)]) == 0
    assert results(killed) == results(whole)
    assert not [p for p in killed.rglob(".*.tmp-*")]


def test_an_interrupted_stage_resumes_from_its_checkpoint(tiny: Path, tmp_path: Path) -> None:
    """A fine-tune stage killed after a checkpoint is resumed: its verb gets --resume with the checkpoint still there,
    and the stage finishes (s45's mutation audit: clearing the stage's folder before a resume too, so it trained
    again from step 0, passed every test, since the end result is the same)."""
    from llmfast.chain.plan import ChainRecipe
    from llmfast.chain.run import run_chain
    from llmfast.cli import parse_args
    from llmfast.recipe import load_recipe

    out = tmp_path / "run"
    finetune = {**chain(tiny, out)["stages"]["lora"]["with"], "export_merged": False}
    # 18 steps after the first checkpoint for the kill, made as soon as it is seen, to land before the end
    finetune["train"] = {**finetune["train"], "steps": 20, "save_every": 2}
    recipe = write(tmp_path / "c.yaml", {"output": str(out), "stages": {
        "data": {"type": "tasks", "with": {"tasks": ["dates"], "train": 24, "test": 4}},
        "lora": {"type": "finetune", "with": finetune}}})
    proc = subprocess.Popen([sys.executable, "-m", "llmfast.cli", "run", str(recipe)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not list(out.glob("lora/checkpoints/step-*/state.json")):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = sorted(p.parent.name for p in out.glob("lora/checkpoints/step-*/state.json"))
    assert kept and not (out / ".state" / "lora.json").exists(), "killed after a checkpoint, before the end"
    seen = []

    def run_verb(argv: list[str]) -> int:  # the CLI's own dispatch (as `llmfast run` hands it in), watched
        seen.append(("--resume" in argv, sorted(p.parent.name for p in out.glob("lora/checkpoints/step-*/state.json"))))
        args = parse_args(argv)
        return args.func(args)

    run_chain(load_recipe(recipe, ChainRecipe), recipe, run_verb)
    assert seen == [(True, kept)]
    assert (out / ".state" / "lora.json").is_file() and (out / "lora" / "adapter" / "adapter_config.json").is_file()


LATE = {  # found before the first stage runs, not when the stage's turn comes (found by hand, s42)
    "a misspelled key in the last stage": ("eval-ternary (eval)", "with: unknown key 'eval.perplexty' (did you mean "
                                                                  "'perplexity'?)"),
    "a misspelled key holding a stage": ("ternary (quantize)", "with: unknown key 'modle' (did you mean 'model'?)"),
    "a missing text": ("eval-merged (eval)", "with: eval.perplexity.text: file not found: /nonexistent/t.txt"),
    "a model not there": ("lora (finetune)", "with.model: model 'tinyy' not found"),
    "a quantization setting": ("ternary (quantize)", "with: quantization: unknown key 'qat_stepz'"),
    "a flag the chain sets": ("eval-merged (eval)", "flags: --output is the chain's to set"),
}


@pytest.mark.parametrize("case", ["cycle", "unknown parent", "unknown type", "owned by another recipe",
                                  "a stage name too long for a file name", *LATE])
def test_bad_chains_are_one_line_and_write_nothing(case: str, tiny: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    recipe = chain(tiny, out)
    path = tmp_path / "bad.yaml"
    late = {k: f"stage {stage} of {path}: {said}" for k, (stage, said) in LATE.items()}
    expected = {"cycle": "cycle: ", "unknown parent": "not a stage", "unknown type": "unknown stage type 'finetun'",
                "owned by another recipe": "belongs to the chain recipe",
                "a stage name too long for a file name": "is 230 bytes: at most 200", **late}[case]
    stages = recipe["stages"]
    if case == "a misspelled key holding a stage":
        stages["ternary"]["with"]["modle"] = stages["ternary"]["with"].pop("model")
    if case == "a misspelled key in the last stage":
        stages["eval-ternary"]["with"]["eval"] = dict(stages["eval-ternary"]["with"]["eval"])
        stages["eval-ternary"]["with"]["eval"]["perplexty"] = stages["eval-ternary"]["with"]["eval"].pop("perplexity")
    if case == "a missing text":
        stages["eval-merged"]["with"]["eval"] = {**stages["eval-merged"]["with"]["eval"],
                                                 "perplexity": {"text": "/nonexistent/t.txt"}}
    if case == "a flag the chain sets":
        stages["eval-merged"]["flags"] = ["--output", str(tmp_path / "elsewhere.json")]
    if case == "a model not there":
        stages["lora"]["with"]["model"] = "tinyy"
    if case == "a quantization setting":
        stages["ternary"]["with"]["quantization"]["qat_stepz"] = stages["ternary"]["with"]["quantization"].pop(
            "qat_steps")
    if case == "cycle":
        recipe["stages"]["data"]["with"]["seed"] = "${eval-ternary}"
    if case == "a stage name too long for a file name":  # failed when its turn came, after the stages before it (s43)
        recipe["stages"]["s" * 230] = recipe["stages"].pop("eval-ternary")
    if case == "unknown parent":
        recipe["stages"]["lora"]["with"]["model"] = "${basee}"
    if case == "unknown type":
        recipe["stages"]["lora"]["type"] = "finetun"
    if case == "owned by another recipe":
        out.mkdir()
        (out / "llmfast-run.json").write_text(json.dumps({"recipe": "/somewhere/else.yaml"}))
    before = sorted(p for p in tmp_path.rglob("*"))
    write(path, recipe)
    capsys.readouterr()
    for dry in ([], ["--dry-run"]):  # --dry-run tells what would fail, too
        assert main(["run", str(path), *dry]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("llmfast: error:") and expected in err[0], err
        assert sorted(p for p in tmp_path.rglob("*")) == sorted([*before, path])


@pytest.mark.parametrize("empty_output", [False, True])
def test_a_chain_whose_first_stage_fails_leaves_nothing(empty_output: bool, tiny: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    if empty_output:
        out.mkdir()
    recipe = chain(tiny, out)
    # a value only the verb refuses, when the stage runs (an unknown task name or flag is refused before any runs)
    recipe["stages"]["data"]["flags"] = ["--train", "0"]
    path = write(tmp_path / "bad.yaml", recipe)
    before = sorted(p for p in tmp_path.rglob("*"))
    capsys.readouterr()
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("llmfast: error: stage data (tasks): ") and "--train and --test must be" in err[-1], err
    assert sorted(p for p in tmp_path.rglob("*")) == before  # no run folder (or an empty one, as it was)
    # and the output is not claimed: another recipe may take it
    other = chain(tiny, out)
    other["stages"] = {"data": {"type": "tasks", "with": {"tasks": ["dates"], "train": 4, "test": 2}}}
    assert main(["run", str(write(tmp_path / "other.yaml", other))]) == 0
    assert (out / "data" / "dates" / "train.jsonl").is_file()


@pytest.mark.parametrize("listed", [False, True])  # data.train as a list of files (s50): planned as one file is
def test_a_stage_file_an_earlier_stage_did_not_write_is_named_in_the_chain_recipe(
        tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], listed: bool) -> None:
    recipe = chain(tiny, tmp_path / "run")
    recipe["stages"] = {k: recipe["stages"][k] for k in ("data", "lora")}
    missing = "${data}/dates/missing.jsonl"
    recipe["stages"]["lora"]["with"]["data"]["train"] = ["${data}/dates/train.jsonl", missing] if listed else missing
    path = write(tmp_path / "chain.yaml", recipe)
    assert main(["run", str(path), "--dry-run"]) == 0  # its files are the data stage's, not there yet
    capsys.readouterr()
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("llmfast: error: stage lora (finetune): ") and "missing.jsonl" in err, err
    assert f"{path} (stages.lora): data.train{'.1' if listed else ''}: not found" in err, err
    assert ".recipes" not in err, err  # was: the generated .recipes/lora.yaml


def test_a_stage_runs_under_torchrun(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = chain(tiny, out)
    stages = {k: recipe["stages"][k] for k in ("data", "lora")}
    stages["lora"]["launch"] = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]
    stages["lora"]["with"]["export_merged"] = False
    path = write(tmp_path / "ddp.yaml", {"output": str(out), "stages": stages})
    assert main(["run", str(path)]) == 0
    metrics = json.loads((out / "lora" / "metrics.json").read_text())
    assert metrics["steps"] == 6 and (out / "lora" / "adapter" / "adapter_config.json").is_file()


def test_sigterm_to_the_chain_reaches_a_stages_launcher(tiny: Path, tmp_path: Path) -> None:
    """subprocess.run SIGKILLed the launcher 0.25 s after the chain was stopped: torchrun could not stop its
    workers, which trained on, orphaned (s43's diff review). The signal is passed on and the launcher waited for."""
    import signal
    import subprocess
    import time

    out = tmp_path / "run"
    recipe = chain(tiny, out)
    stages = {k: recipe["stages"][k] for k in ("data", "lora")}
    # stands for torchrun (a recipe's launcher is torchrun or accelerate, found on $PATH: chain/launchers.py): logs the
    # signal it is sent, then stops
    launcher = tmp_path / "bin" / "torchrun"
    launcher.parent.mkdir()
    log = tmp_path / "launcher.log"
    launcher.write_text(f"#!{sys.executable}\nimport signal, sys, time\nopen({str(log)!r}, 'a').write('start\\n')\n"
                        f"def stop(sig, frame):\n    open({str(log)!r}, 'a').write(f'{{sig}}\\n')\n    sys.exit(3)\n"
                        "signal.signal(signal.SIGTERM, stop)\ntime.sleep(120)\n")
    launcher.chmod(0o755)
    stages["lora"]["launch"] = ["torchrun"]
    path = write(tmp_path / "launched.yaml", {"output": str(out), "stages": stages})
    proc = subprocess.Popen([sys.executable, "-m", "llmfast.cli", "run", str(path)], stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent,
                            env={**os.environ, "PATH": f"{launcher.parent}:{os.environ.get('PATH', '')}"})
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and "start" in log.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert log.read_text().split() == ["start", str(int(signal.SIGTERM))]
    assert err.strip().splitlines()[-1] == "llmfast: stopped by SIGTERM"


def test_a_stage_calibrates_on_an_earlier_stages_chats(tiny: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """data.conversations naming `${data}` files: the stage depends on the data stage, its paths are checked only
    once that stage has written them, and the artifact records the chats it calibrated on."""
    out = tmp_path / "run"
    recipe = write(tmp_path / "c.yaml", {"output": str(out), "stages": {
        "data": {"type": "tasks", "with": {"tasks": ["dates"], "train": 40, "test": 4}},
        "teal": {"type": "sparsify", "with": {
            "model": str(tiny), "sparsify": {"method": "teal", "config": {"target": 0.5}},
            "data": {"text": str(TEXT), "skip_tokens": 1024, "calibration_tokens": 1024, "heldout_tokens": 512,
                     "window": 128, "conversations": ["${data}/dates/train.jsonl"]}}}}})
    assert main(["run", str(recipe), "--dry-run"]) == 0
    assert re.search(r"2\. run +teal +sparsify +new <- data\n", capsys.readouterr().out)
    assert not out.exists()
    assert main(["run", str(recipe)]) == 0
    mixed = json.loads((out / "teal" / "llmfast.json").read_text())["metrics"]["conversations"]["calibration"]
    assert mixed["paths"] == [str(out / "data" / "dates" / "train.jsonl")] and mixed["windows"] == 4


@pytest.mark.parametrize("name", __import__("llmfast.chain.stages", fromlist=["STAGES"]).STAGES.names())
def test_every_stage_type_calls_its_verb_with_flags_the_verb_takes(name: str, tmp_path: Path) -> None:
    """Each registered stage type's command line parses with the CLI's own parser into that verb, resumed or
    not; one that replaces its output whole asks the verb to (--overwrite), as the run directory owns it."""
    from llmfast.chain.stages import STAGES
    from llmfast.cli import parse_args

    stage = STAGES.get(name)
    for resume in (False, True):
        argv = stage.argv({"model": "m"}, tmp_path / "out", tmp_path / "recipe.yaml", resume)
        args = parse_args(argv)
        assert callable(getattr(args, "func", None)) and args.verb == argv[0], argv
        assert getattr(args, "resume", False) == (resume and name in ("finetune", "quantize", "sparsify")), argv
        if stage.replaces_whole:
            assert args.overwrite is True, argv


def test_a_tasks_stage_passes_every_setting_to_its_verb(tmp_path: Path) -> None:
    """A tasks stage's train, test and seed reach `llmfast tasks` (s45's mutation audit: a dropped seed passed)."""
    from llmfast.chain.stages import STAGES
    from llmfast.cli import parse_args

    section = {"tasks": ["dates", "repeat"], "train": 24, "test": 4, "seed": 3}
    args = parse_args(STAGES.get("tasks").argv(section, tmp_path / "out", tmp_path / "r.yaml", False))
    assert (args.verb, args.train, args.test, args.seed) == ("tasks", 24, 4, 3)


def test_a_stage_named_like_a_work_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Stage A's work folder is A.checkpoints beside its output: a stage of that name would share it (s45's mutation
    audit: the check was untested)."""
    stages = {"a": {"type": "tasks", "with": {"tasks": ["dates"]}},
              "a.checkpoints": {"type": "tasks", "with": {"tasks": ["dates"]}}}
    recipe = write(tmp_path / "c.yaml", {"output": str(tmp_path / "run"), "stages": stages})
    capsys.readouterr()
    assert main(["run", str(recipe), "--dry-run"]) == 2
    assert "stage name 'a.checkpoints' is taken by the run folder's own files" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_stage_name_of_the_longest_length_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A stage name of MAX_OUTPUT_NAME bytes runs (its folder and .state files fit 255 bytes); one byte more is refused
    before anything is written (s45's audit: the bound itself was untested)."""
    from llmfast.artifacts import MAX_OUTPUT_NAME

    for extra, code in ((1, 2), (0, 0)):
        name = "s" * (MAX_OUTPUT_NAME + extra)
        recipe = write(tmp_path / "c.yaml", {"output": str(tmp_path / "run"), "stages": {
            name: {"type": "tasks", "with": {"tasks": ["dates"], "train": 4, "test": 2}}}})
        capsys.readouterr()
        assert main(["run", str(recipe)]) == code
        if code:
            assert f"is {MAX_OUTPUT_NAME + 1} bytes: at most {MAX_OUTPUT_NAME}" in capsys.readouterr().err
            assert not (tmp_path / "run").exists()
    assert len((tmp_path / "run" / name / "dates" / "test.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "run" / ".state" / f"{name}.json").is_file()


def test_paths_through_a_symbolic_link_loop_are_one_line(tmp_path: Path, tiny: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """An output, or a stage's input file, through a link that loops back to itself: Python 3.11's resolve() raises
    RuntimeError, which was the chain's traceback (s46's audit of artifacts.py found it there first)."""
    (tmp_path / "lk").symlink_to("lk")
    looped = {"output": str(tmp_path / "lk" / "run"),
              "stages": {"data": {"type": "tasks", "with": {"tasks": ["dates"]}}}}
    text = {"output": str(tmp_path / "run"), "stages": {"ev": {"type": "eval", "with": {
        "model": str(tiny), "eval": {"perplexity": {"text": str(tmp_path / "lk" / "t.txt")}}}}}}
    for recipe, said in ((looped, "goes through a symbolic link that loops back to itself"),
                         (text, "eval.perplexity.text: file not found")):
        capsys.readouterr()
        assert main(["run", str(write(tmp_path / "c.yaml", recipe)), "--dry-run"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "lk"]


def test_a_stages_flags_are_parsed_before_any_stage_runs(tmp_path: Path, tiny: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A misspelled flag passed --dry-run and failed only when its stage's turn came, after the stages before it
    (s46's fuzzing); the verb's own parser now reads every stage's command line first."""
    stages = {"data": {"type": "tasks", "with": {"tasks": ["dates"], "train": 4, "test": 2}},
              "ev": {"type": "eval", "with": {"model": str(tiny), "eval": {"tasks": [
                  {"name": "dates", "path": "${data}/dates/test.jsonl", "limit": 2}], "max_new_tokens": 2}},
                     "flags": ["--bogus"]}}
    recipe = write(tmp_path / "c.yaml", {"output": str(tmp_path / "run"), "stages": stages})
    for dry in (["--dry-run"], []):
        capsys.readouterr()
        assert main(["run", str(recipe), *dry]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"llmfast: error: stage ev (eval) of {recipe}: ") \
            and "unrecognized arguments: --bogus" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]
    stages["ev"]["flags"] = ["--set", "eval.batch_size=2"]  # a flag the verb takes still runs
    write(recipe, {"output": str(tmp_path / "run"), "stages": stages})
    assert main(["run", str(recipe)]) == 0 and (tmp_path / "run" / "ev" / "results.json").is_file()


def test_from_a_stage_that_is_not_there_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--from` a misspelled stage is one line naming the stages, before anything is written; it was ignored, and
    the chain ran as if no stage were named (s45's mutation audit: the check was untested)."""
    recipe = write(tmp_path / "c.yaml", {"output": str(tmp_path / "run"), "stages": {
        "data": {"type": "tasks", "with": {"tasks": ["dates"]}}}})
    for dry in (["--dry-run"], []):
        capsys.readouterr()
        assert main(["run", str(recipe), "--from", "dat", *dry]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--from dat: no such stage" in err[0] and "the stages are data" in err[0], err
    assert not (tmp_path / "run").exists()


def test_quantize_and_sparsify_stages_resume_from_their_checkpoints(tmp_path):
    """A killed stage resumes when its verb left a checkpoint: relufy's and bitnet's in OUTPUT.checkpoints/checkpoints,
    w4's scale tuning's in OUTPUT.checkpoints/scales/checkpoints, or w4's finished rounding (the stage was rerun from
    the start, AutoRound again)."""
    from llmfast.chain.stages import STAGES

    out = tmp_path / "q"
    for kind in ("quantize", "sparsify"):
        assert not STAGES.get(kind).resumable(out)
    for where in ("checkpoints", "scales/checkpoints"):
        state = tmp_path / "q.checkpoints" / where / "step-000050" / "state.json"
        state.parent.mkdir(parents=True)
        state.write_text("{}")
        assert STAGES.get("quantize").resumable(out) and STAGES.get("sparsify").resumable(out)
        shutil.rmtree(tmp_path / "q.checkpoints")
    (tmp_path / "q.checkpoints" / "autoround").mkdir(parents=True)  # a rounding cut short: nothing to take
    assert not STAGES.get("quantize").resumable(out)
    (tmp_path / "q.checkpoints" / "autoround" / "w4-settings.json").write_text("{}")  # written last: finished
    assert STAGES.get("quantize").resumable(out)


def test_a_stage_that_will_refuse_its_parents_artifact_is_refused_when_planned(tiny: Path, tmp_path: Path,
                                                                                capsys: pytest.CaptureFixture[str]
                                                                                ) -> None:
    """Found by hand (2026-12-05): a quantize stage over a TEAL stage's artifact was planned, and refused only once
    the TEAL stage had run (on the shipped chains, after an hour of relufy). The verbs' rules (llmfast/sources.py)
    are known from the stage types: one line, nothing run or written. A relufy parent, or NF4 under LoRA, plans."""
    out = tmp_path / "run"
    data = {"text": str(TEXT), "skip_tokens": 1024, "calibration_tokens": 1024, "heldout_tokens": 512, "window": 128}
    stages = {
        "teal": {"type": "sparsify", "with": {"model": str(tiny), "sparsify": {"method": "teal"}, "data": data}},
        "q": {"type": "quantize", "with": {"model": "${teal}", "quantization": "nf4"}},
    }
    recipe = write(tmp_path / "c.yaml", {"output": str(out), "stages": stages})
    capsys.readouterr()
    assert main(["run", str(recipe), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"llmfast: error: {recipe}: stages.q: ${{teal}} is a teal artifact: its sparsity lives in files "
                   "beside the weights that quantize does not carry over; quantize the model it was made from (a "
                   "relufy model, whose ReLU is in its config, can be quantized)"], err
    w4 = {"type": "quantize", "with": {"model": str(tiny), "quantization": {"method": "w4", "group_size": 32}}}
    merge = {"type": "merge", "with": {"merge_method": "linear", "models": [
        {"model": "${w4}", "parameters": {"weight": 1.0}}, {"model": str(tiny), "parameters": {"weight": 1.0}}]}}
    write(recipe, {"output": str(out), "stages": {"w4": w4, "m": merge}})
    assert main(["run", str(recipe), "--dry-run"]) == 2
    assert "stages.m: ${w4} is already quantized (w4): merge the full-precision models" in capsys.readouterr().err
    nf4 = {"type": "quantize", "with": {"model": str(tiny), "quantization": "nf4"}}
    relufy = {"type": "sparsify", "with": {"model": str(tiny), "sparsify": {"method": "relufy"}, "data": data}}
    (tmp_path / "x.jsonl").write_text("")  # the stage's own check wants its data file there (s42)
    lora = {"type": "finetune", "with": {"model": "${nf4}", "data": {"train": str(tmp_path / "x.jsonl")}}}
    over_relu = {"type": "quantize", "with": {"model": "${relufy}", "quantization": "nf4"}}
    write(recipe, {"output": str(out), "stages": {"nf4": nf4, "lora": lora, "relufy": relufy, "qr": over_relu}})
    assert main(["run", str(recipe), "--dry-run"]) == 0
    assert not out.exists()


def test_a_changed_input_file_runs_its_stage_again(tiny: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A stage's key holds the size and time of the files its `with:` names (a text, a model folder's files): a
    result made from other files is not reused (it was: stale perplexities under "reuse"); untouched, it is."""
    model, text = tmp_path / "model", tmp_path / "text.txt"
    shutil.copytree(tiny, model)
    text.write_text(TEXT.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    ev = {"model": str(model), "eval": {"perplexity": {"text": str(text), "max_tokens": 128, "context": 64,
                                                       "stride": 64}}}
    recipe = write(tmp_path / "c.yaml", {"output": str(tmp_path / "run"), "stages": {
        "ev": {"type": "eval", "with": ev}, "again": {"type": "eval", "with": {**ev, "model": str(tiny)}}}})

    def plan() -> dict[str, str]:
        capsys.readouterr()
        assert main(["run", str(recipe), "--dry-run"]) == 0
        rows = [line.split(None, 3) for line in capsys.readouterr().out.splitlines() if line.strip()]
        return {r[2]: f"{r[1]} {r[3].split('  ', 1)[-1].strip()}" for r in rows}

    assert main(["run", str(recipe)]) == 0
    first = json.loads((tmp_path / "run" / "ev" / "results.json").read_text())["perplexity"]["ppl"]
    assert all(v.startswith("reuse") for v in plan().values())
    text.write_text(TEXT.read_text(encoding="utf-8")[20000:40000], encoding="utf-8")
    assert plan() == {"ev": "run an input file changed", "again": "run an input file changed"}
    assert main(["run", str(recipe)]) == 0
    assert json.loads((tmp_path / "run" / "ev" / "results.json").read_text())["perplexity"]["ppl"] != first
    weights = model / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    decided = plan()
    assert decided["ev"].startswith("run") and decided["again"].startswith("reuse"), decided


def test_settings_given_as_flags_are_checked_with_the_section(tiny: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A stage may give a setting as `flags: [--set, KEY=VALUE]` (the verb applies it to its recipe): the check before
    the first stage applies it too, so the stage is not refused as missing it (the review of s42 found it was)."""
    stage = {"type": "quantize", "with": {"quantization": {"method": "bnb4"}}, "flags": ["--set", f"model={tiny}"]}
    recipe = write(tmp_path / "c.yaml", {"output": str(tmp_path / "run"), "stages": {"q": stage}})
    assert main(["run", str(recipe), "--dry-run"]) == 0
    stage["flags"] = ["--set", "quantization.typo=1", "--set", f"model={tiny}"]
    write(recipe, {"output": str(tmp_path / "run"), "stages": {"q": stage}})
    capsys.readouterr()
    assert main(["run", str(recipe), "--dry-run"]) == 2
    assert "unknown key 'typo'" in capsys.readouterr().err
    stage["flags"] = [f"--set=model={tiny}"]  # the one-word form is a setting too (s45's mutation audit)
    write(recipe, {"output": str(tmp_path / "run"), "stages": {"q": stage}})
    assert main(["run", str(recipe), "--dry-run"]) == 0
    stage["flags"] = ["--set=quantization.typo=1", f"--set=model={tiny}"]
    write(recipe, {"output": str(tmp_path / "run"), "stages": {"q": stage}})
    capsys.readouterr()
    assert main(["run", str(recipe), "--dry-run"]) == 2
    assert "unknown key 'typo'" in capsys.readouterr().err


def test_a_flag_swapping_the_model_and_a_bench_variant_not_there_are_refused_when_planned(
        tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A stage's `flags: [--model, X]` would swap the model its `with:` names (the chain's to set), and a bench stage's
    variant naming a model that is not there would fail only when its turn came: both are one line before anything
    runs (s45's mutation audit: neither was tested)."""
    cases = {
        "flag": ({"type": "eval", "with": {"model": str(tiny), "eval": {"perplexity": {"text": str(TEXT)}}},
                  "flags": ["--model", str(tiny)]}, "stage s (eval) of {path}: flags: --model is the chain's to set"),
        "variant": ({"type": "bench", "with": {"variants": [{"name": "a", "model": str(tiny)},
                                                            {"name": "b", "model": "tinyy"}]}},
                    "stage s (bench) of {path}: with.variants.1.model: model 'tinyy' not found"),
    }
    for name, (stage, said) in cases.items():
        path = write(tmp_path / f"{name}.yaml", {"output": str(tmp_path / "run"), "stages": {"s": stage}})
        capsys.readouterr()
        assert main(["run", str(path), "--dry-run"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said.format(path=path) in err[0], err
    assert not (tmp_path / "run").exists()


def test_one_run_of_a_chain_at_a_time(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A second `llmfast run` of a running chain cleared the running stage's folder before the stage's verb refused
    it: the run folder's lock refuses it first, and --dry-run still answers."""
    out = tmp_path / "run"
    recipe = write(tmp_path / "c.yaml", {"output": str(out), "stages": {
        "data": {"type": "tasks", "with": {"tasks": ["dates"], "train": 4, "test": 2}}}})
    hold = ("import sys, time\nfrom llmfast.output_lock import output_lock\nwith output_lock(sys.argv[1]):\n"
            "    print('held', flush=True)\n    time.sleep(300)\n")
    proc = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert main(["run", str(recipe), "--dry-run"]) == 0
        assert main(["run", str(recipe)]) == 2
        assert f"output {out} is being written by another llmfast run (pid {proc.pid})" in capsys.readouterr().err
        assert not (out / "data").exists()
    finally:
        proc.kill()
        proc.wait()
    assert main(["run", str(recipe)]) == 0 and (out / "data" / "dates").is_dir()


def test_the_run_folder_is_not_an_input_file(tmp_path: Path) -> None:
    """A path into the chain's own run folder (an earlier stage's files named outright) changes as stages run: it is
    not fingerprinted, or its stage would run again every time."""
    from llmfast.chain.plan import input_files

    run = tmp_path / "run"
    (run / "a").mkdir(parents=True)
    (run / "a" / "w.bin").write_bytes(b"x")
    (tmp_path / "t.txt").write_text("text")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / ".hidden").write_text("h")
    (tmp_path / "m" / "config.json").write_text("{}")
    found = input_files({"a": str(run / "a"), "b": [str(tmp_path / "t.txt"), str(tmp_path / "m")]}, run.resolve())
    assert sorted(found) == [str(tmp_path / "m") + "/config.json", str(tmp_path / "t.txt")]


def test_a_stage_key_holds_its_parents_keys(tiny: Path, tmp_path: Path) -> None:
    """A parent's new settings change every descendant's key, not only the parent's: the run's "rerun" set lasts
    one run, so a chain stopped after the parent re-ran would otherwise reuse the child's stale result next time
    (s44's mutation audit)."""
    from llmfast.chain.plan import ChainRecipe, plan
    from llmfast.chain.stages import STAGES

    def keys(target: float) -> dict[str, str]:
        recipe = ChainRecipe.model_validate({"output": str(tmp_path / "run"), "stages": {
            "sp": {"type": "sparsify", "with": {"model": str(tiny), "sparsify": {"method": "teal",
                                                                               "config": {"target": target}},
                                               "data": {"text": str(TEXT)}}},
            "ev": {"type": "eval", "with": {"model": "${sp}", "eval": {"perplexity": {"text": str(TEXT)}}}},
            "other": {"type": "eval", "with": {"model": str(tiny), "eval": {"perplexity": {"text": str(TEXT)}}}}}})
        return {s.name: s.key for s in plan(recipe, "c.yaml", STAGES.names())}

    before, after = keys(0.4), keys(0.5)
    assert before["sp"] != after["sp"] and before["ev"] != after["ev"] and before["other"] == after["other"]


def test_a_stage_key_holds_its_flags(tiny: Path, tmp_path: Path) -> None:
    """A setting given as `flags: [--set, KEY=VALUE]` is part of the stage's key like its `with:`: a changed flag runs
    the stage and what follows it again, and nothing else (s44's mutation audit: a key without the flags reused a
    result made with other settings)."""
    from llmfast.chain.plan import ChainRecipe, plan
    from llmfast.chain.stages import STAGES

    def keys(qat_steps: int, max_tokens: int) -> dict[str, str]:
        ppl = {"eval": {"perplexity": {"text": str(TEXT)}}}
        recipe = ChainRecipe.model_validate({"output": str(tmp_path / "run"), "stages": {
            "q": {"type": "quantize", "with": {"model": str(tiny), "quantization": {"method": "bitnet"}},
                  "flags": ["--set", f"quantization.qat_steps={qat_steps}"]},
            "ev": {"type": "eval", "with": {"model": "${q}", **ppl}},
            "other": {"type": "eval", "with": {"model": str(tiny), **ppl},
                      "flags": ["--set", f"eval.perplexity.max_tokens={max_tokens}"]}}})
        return {s.name: s.key for s in plan(recipe, "c.yaml", STAGES.names())}

    base = keys(2, 128)
    assert keys(2, 128) == base  # the same flags: the same keys
    changed = keys(4, 128)
    assert changed["q"] != base["q"] and changed["ev"] != base["ev"] and changed["other"] == base["other"]
    other = keys(2, 256)
    assert other["other"] != base["other"] and other["q"] == base["q"] and other["ev"] == base["ev"]


def test_a_parent_referred_to_only_in_flags_runs_first(tiny: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`${NAME}` in a stage's flags makes NAME a parent as one in `with:` does: listed after its child, the parent
    is still planned (and run) before it (s44's mutation audit)."""
    stages = {
        "b": {"type": "eval", "with": {"eval": {"perplexity": {"text": str(TEXT)}}}, "flags": ["--set", "model=${a}"]},
        "a": {"type": "quantize", "with": {"model": str(tiny), "quantization": "nf4"}},
    }
    recipe = write(tmp_path / "c.yaml", {"output": str(tmp_path / "run"), "stages": stages})
    capsys.readouterr()
    assert main(["run", str(recipe), "--dry-run"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [(r[0], r[1], r[2]) for r in rows] == [("1.", "run", "a"), ("2.", "run", "b")], rows
    assert rows[1][-2:] == ["<-", "a"], rows  # b's parent, from its flags


def test_a_missing_parent_output_runs_it_and_its_children_again(tiny: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A finished stage whose output folder is gone runs again, and so does every stage that reads it, though their
    keys are unchanged; `--from` a stage runs it and its descendants, and reuses an unrelated stage (s44's mutation
    audit: a recorded key alone was taken as done, and a child of a stage that runs again was reused)."""
    out = tmp_path / "run"
    recipe = write(tmp_path / "c.yaml", {"output": str(out), "stages": {
        "data": {"type": "tasks", "with": {"tasks": ["dates"], "train": 4, "test": 2}},
        "ev": {"type": "eval", "with": {"model": str(tiny), "eval": {
            "tasks": [{"name": "dates", "path": "${data}/dates/test.jsonl", "limit": 2}], "batch_size": 2,
            "max_new_tokens": 4}}},
        "other": {"type": "tasks", "with": {"tasks": ["dates"], "train": 2, "test": 2, "seed": 1}},
    }})

    def plan(*extra: str) -> dict[str, str]:
        capsys.readouterr()
        assert main(["run", str(recipe), "--dry-run", *extra]) == 0
        rows = [line.split(None, 3) for line in capsys.readouterr().out.splitlines() if line.strip()]
        return {r[2]: f"{r[1]} {r[3].split('  ', 1)[-1].strip()}" for r in rows}

    assert main(["run", str(recipe)]) == 0
    assert (out / "ev" / "results.json").is_file()
    decided = plan()
    assert all(v.startswith("reuse") for v in decided.values()), decided
    assert plan("--from", "data") == {"data": "run --from", "ev": "run --from <- data",
                                      "other": decided["other"]}
    shutil.rmtree(out / "data")
    assert plan() == {"data": "run output missing", "ev": "run a parent runs again <- data",
                      "other": decided["other"]}
    assert main(["run", str(recipe)]) == 0
    assert (out / "data" / "dates" / "test.jsonl").is_file()
    assert all(v.startswith("reuse") for v in plan().values())


@pytest.mark.parametrize("bad, needle", [
    ({"tasks": ["datez"]}, "with: unknown task 'datez'"),
    ({"tasks": ["all", "dates"]}, "'all' alone"),
    ({"train": 0}, "with: train and test must be at least 1 (got 0 and 200)"),
    ({"test": 10**12}, "rows a task: at most 1,000,000"),
    ({"train": "abc"}, "with.train: a whole number, not 'abc'"),
    ({"seed": 1.5}, "with.seed: a whole number, not 1.5"),
    ({"test": True}, "with.test: a whole number, not True"),
])
def test_a_tasks_stage_the_verb_would_refuse_is_refused_before_any_stage_runs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: dict, needle: str) -> None:
    """An unknown task name, a size of 0 or a seed of 1.5 in a later tasks stage passed --dry-run and was refused only
    when its turn came, after every stage before it had run (fuzz pass 10, F2)."""
    stages = {"first": {"type": "tasks", "with": {"tasks": ["dates"], "train": 2, "test": 2}},
              "later": {"type": "tasks", "with": {"tasks": ["units"], **bad}}}
    recipe = write(tmp_path / "c.yaml", {"output": str(tmp_path / "run"), "stages": stages})
    for flags in (["--dry-run"], []):
        capsys.readouterr()
        assert main(["run", str(recipe), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("llmfast: error: stage later (tasks) of ") and needle in err and "\n" not in err, err
        assert not (tmp_path / "run" / "first").exists()


def test_a_stage_folder_that_is_a_link_is_one_line_and_its_target_kept(tmp_path: Path) -> None:
    """Clearing a stage's earlier output through a symbolic link (a user keeping it on another disk) raised
    shutil.rmtree's OSError (a traceback); it is one line naming the link, and the target's files stay."""
    from llmfast.chain.plan import Stage
    from llmfast.chain.run import _clear
    from llmfast.errors import UserError

    elsewhere = tmp_path / "disk" / "ft"
    elsewhere.mkdir(parents=True)
    (elsewhere / "keep.txt").write_text("mine")
    out = tmp_path / "run"
    out.mkdir()
    (out / "ft").symlink_to(elsewhere)
    stage = Stage(name="ft", type="finetune", section={}, flags=(), launch=(), parents=(), key="k")
    with pytest.raises(UserError, match=r"run/ft is a symbolic link, and stage 'ft' must clear"):
        _clear(out, stage)
    assert (elsewhere / "keep.txt").read_text() == "mine"
