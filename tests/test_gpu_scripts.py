"""The scripts a lent GPU runs (scripts/gpu_*.py, scripts/gpu_session.sh) work before one comes: a GPU's 15 minutes
are not for finding a stale import or a typo. The kernels', QAT's and relufy's scripts have their CPU smoke runs in
test_triton_kernels, test_quant_bitnet and test_sparse."""

import json
import subprocess
import sys

import pytest

from conftest import REPO
from llmfast.testing import run_forked

GPU_SCRIPTS = sorted(p.name for p in (REPO / "scripts").glob("gpu_*.py"))


def test_the_small_gpu_checks_run_on_a_cpu_and_say_what_they_skipped(tmp_path):
    """scripts/gpu_small_checks.py --device cpu: every check that runs on a CPU passes against its reference, the
    CUDA-only ones say so, the table lists each, and the JSON holds each with its numbers."""
    run = subprocess.run([sys.executable, "scripts/gpu_small_checks.py", "--device", "cpu", "--ft-steps", "20",
                          "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_small_checks.json").read_text())
    checks = result["checks"]
    assert result["device"] == "cpu"
    assert {k: v["status"] for k, v in checks.items()} == {
        "provenance_gpus": "skipped: no CUDA", "load_no_kernels": "skipped: no CUDA", "chunked_kl_bf16": "pass",
        "chunked_ce_bf16": "pass", "peak_memory_stages": "pass", "lora_dropout_resume": "pass",
        "qlora_export": "pass"}
    # the kill landed mid-run and the resumed run is the uninterrupted one, bit for bit on a CPU
    assert checks["lora_dropout_resume"]["resumed_from_step"] == 10
    resumed = checks["lora_dropout_resume"]
    assert resumed["loss_max_diff"] == 0 and resumed["adapter_max_diff"] == 0
    # the second stage's peak is its own (about 32 MiB over what the process holds), not the first's 512 MiB more
    peaks = checks["peak_memory_stages"]
    assert peaks["big_stage_peak_gib"] - peaks["small_stage_peak_gib"] > 0.4
    assert checks["load_no_kernels"]["swapped_on_cpu"] == []  # the scan for hub kernels ran
    assert checks["chunked_kl_bf16"]["value_rel_err"] < 1e-5 and checks["chunked_ce_bf16"]["grad_rel_err"] < 1e-5
    lines = run.stdout.splitlines()
    table = lines[lines.index(next(l for l in lines if l.startswith("check "))):]
    assert [l.split()[0] for l in table[1:8]] == list(checks)
    assert table[-1].startswith("0 failed of 7")


def test_the_small_gpu_checks_refuse_cuda_where_there_is_none(tmp_path):
    run = subprocess.run([sys.executable, "scripts/gpu_small_checks.py", "--device", "cuda", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin"},
                         timeout=300)
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1] == (
        "--device cuda: torch sees no CUDA GPU here; pass --device cpu")
    assert not list(tmp_path.iterdir())


# `python scripts/NAME --help`, as Python runs a script: its folder first on sys.path, the file run as __main__
_AS_SCRIPT = "import runpy, sys; sys.argv = [{path!r}, '--help']; sys.path[0] = {folder!r}; " \
             "runpy.run_path({path!r}, run_name='__main__')"


@pytest.fixture(scope="module")
def helps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, str]]:
    """What each script's --help did, each in a process of its own (forked from one that imported torch once)."""
    run = [s for s in GPU_SCRIPTS if s != "gpu_runs.py"]  # imported by two of them, not run
    jobs = [{"code": _AS_SCRIPT.format(path=str(REPO / "scripts" / s), folder=str(REPO / "scripts"))} for s in run]
    return dict(zip(run, run_forked(jobs, ["torch"], tmp_path_factory.mktemp("helps"), cwd=REPO,
                                    timeout=300)))


@pytest.mark.parametrize("script", GPU_SCRIPTS)
def test_each_gpu_script_compiles_and_imports_against_the_present_api(script, helps):
    """Each scripts/gpu_*.py compiles, its --help runs (its llmfast imports at the top resolve); the names it
    imports from llmfast inside functions exist (the API changed over many sessions while no GPU came)."""
    import ast
    import importlib

    path = REPO / "scripts" / script
    compile(path.read_text(), str(path), "exec")
    if script != "gpu_runs.py":  # imported by two of them, not run
        code, out, err = helps[script]
        assert code == 0 and "usage" in out, err[-2000:]
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("llmfast", "gpu_runs"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name) or importlib.util.find_spec(f"{node.module}.{alias.name}"), (
                        f"{script}:{node.lineno}: {node.module} has no {alias.name}")
    finally:
        sys.path.remove(str(REPO / "scripts"))


def test_gpu_session_script_is_valid_bash_and_lists_its_modes():
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / "gpu_session.sh")]).returncode == 0
    run = subprocess.run(["bash", str(REPO / "scripts" / "gpu_session.sh")], capture_output=True, text=True)
    assert run.returncode == 2 and "small | kernels | train" in run.stderr
