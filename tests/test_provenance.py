"""Every record of numbers llmfast writes says what produced it and when, in one shape (llmfast/provenance.py): real
runs on tiny models (eval, quantize, bench offline/serve/run, a chain) carry llmfast's version and commit, the
libraries, the CPU, cores, threads and GPUs, their dates in UTC, and durations a clock change cannot bend."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import shutil
import subprocess
import time
import types
from pathlib import Path

import pytest

import test_bench
import test_installed
from conftest import REPO, run_cli
from llmfast import __version__
from llmfast.cli import main
from llmfast.provenance import CPU_FLAGS, describe, git_commit, provenance

TEXT = REPO / "eval" / "text" / "persuasion.txt"
fake_server = test_bench.fake_server  # the OpenAI-compatible server in a thread
installed = test_installed.installed  # (the wheel built from this checkout, the folder it is unpacked into)
HAS_GIT = shutil.which("git") is not None


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main", *args],
                          cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _utc(text: str) -> dt.datetime:
    """`text` parsed as ISO 8601; it must carry a UTC offset (a naive local time cannot be compared across machines)."""
    when = dt.datetime.fromisoformat(text)
    assert when.utcoffset() == dt.timedelta(0), text
    return when


@pytest.fixture
def far_zone():
    """Local time 5:45 ahead of UTC: a date written in local time is then caught as not UTC."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "Asia/Kathmandu"
    time.tzset()
    yield
    if before is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = before
    time.tzset()


def _near_now(when: dt.datetime) -> None:
    # local time here is 5:45 away from UTC; a run's record is written within minutes of this check
    assert abs(dt.datetime.now(dt.timezone.utc) - when) < dt.timedelta(minutes=30), when


def _cpu_flags_here() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.split(":")[0].strip().lower() in ("flags", "features"):
            return set(line.split(":", 1)[1].split()) & set(CPU_FLAGS)
    return set()


def _check(p: dict, libraries: tuple[str, ...] = ()) -> None:
    """A provenance as every record carries it, describing this process and machine."""
    import torch

    dirty = {"git_dirty"} if p["git_commit"] else set()  # whether the checkout had uncommitted changes
    assert set(p) == {"created", "llmfast", "git_commit", "python", "libraries", "machine"} | dirty
    _near_now(_utc(p["created"]))
    assert p["llmfast"] == __version__
    assert p["git_commit"] == (_git(REPO, "rev-parse", "HEAD") if HAS_GIT and (REPO / ".git").exists() else None)
    for name in libraries:
        assert p["libraries"][name], name
    assert p["libraries"]["torch"] == torch.__version__
    m = p["machine"]
    assert set(m) == {"cpu", "arch", "cpu_flags", "cores", "cores_total", "threads", "gpus", "os"}
    assert set(m["cpu_flags"]) == _cpu_flags_here() and m["cpu"]
    assert m["cores"] == len(os.sched_getaffinity(0)) and m["cores_total"] == os.cpu_count()
    assert m["threads"] == torch.get_num_threads()
    assert isinstance(m["gpus"], list) and (m["gpus"] != []) == os.path.isdir("/proc/driver/nvidia/gpus")


@pytest.mark.skipif(not HAS_GIT, reason="git makes the checkouts read here")
def test_the_commit_is_read_from_gits_own_files(tmp_path: Path) -> None:
    """Loose and packed branches, a detached HEAD and a worktree give `git rev-parse HEAD`; an unborn branch and a
    folder outside any checkout give None (llmfast installed from a wheel records no commit)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    assert git_commit(repo) is None  # no commit yet
    (repo / "f").write_text("1")
    _git(repo, "add", "f")
    _git(repo, "commit", "-qm", "one")
    first = _git(repo, "rev-parse", "HEAD")
    assert git_commit(repo) == first
    (repo / "f").write_text("2")
    _git(repo, "commit", "-qam", "two")
    _git(repo, "pack-refs", "--all")  # as `git gc` leaves it: no refs/heads/main file
    assert not (repo / ".git" / "refs" / "heads" / "main").exists()
    assert git_commit(repo) == _git(repo, "rev-parse", "HEAD") != first
    _git(repo, "checkout", "-q", "--detach", first)
    assert git_commit(repo) == first
    _git(repo, "worktree", "add", "-q", "-b", "other", str(tmp_path / "wt"), "main")
    (tmp_path / "wt" / "f").write_text("3")
    _git(tmp_path / "wt", "commit", "-qam", "three")
    assert git_commit(tmp_path / "wt") == _git(tmp_path / "wt", "rev-parse", "HEAD") not in (first, git_commit(repo))
    assert git_commit(tmp_path) is None
    assert git_commit() == (_git(REPO, "rev-parse", "HEAD") if (REPO / ".git").exists() else None)


def test_the_version_is_written_once(tmp_path: Path) -> None:
    """pyproject's version is llmfast.__version__, as setuptools reads it to build the wheel: changing
    __init__.py changes the package's version (two copies of it drifted apart unnoticed)."""
    from setuptools.config.pyprojecttoml import read_configuration

    assert read_configuration(REPO / "pyproject.toml")["project"]["version"] == __version__
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    (tmp_path / "llmfast").mkdir()
    (tmp_path / "eval").mkdir()
    (tmp_path / "llmfast" / "__init__.py").write_text('__version__ = "9.8.7"\n')
    assert read_configuration(tmp_path / "pyproject.toml")["project"]["version"] == "9.8.7"


def test_an_installed_llmfast_has_the_version_and_no_commit(installed: tuple[Path, Path], tmp_path: Path) -> None:
    """The wheel's version is __version__; installed, llmfast records its version and no commit (none is known)."""
    import subprocess
    import sys
    import zipfile

    wheel, site = installed
    meta = next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".dist-info/METADATA"))
    assert f"\nVersion: {__version__}\n" in zipfile.ZipFile(wheel).read(meta).decode()
    probe = "import json; from llmfast.provenance import provenance; print(json.dumps(provenance()))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(site)})
    assert done.returncode == 0, done.stderr[-3000:]
    p = json.loads(done.stdout)
    assert (p["llmfast"], p["git_commit"]) == (__version__, None) and p["libraries"] == {}


def test_a_provenance_describes_this_process_in_utc(far_zone: None) -> None:
    import torch

    p = provenance()
    _check(p, ("torch",))
    assert p["libraries"]["torch"] == torch.__version__ and f"torch {torch.__version__}" in describe(p)


def test_a_provenance_reads_no_library_it_was_not_told_of() -> None:
    """vLLM is recorded where imported or named as run elsewhere (a server), never imported to ask: seconds."""
    import sys

    if "vllm" in sys.modules:
        pytest.skip("vLLM was imported by an earlier test")
    assert "vllm" not in provenance()["libraries"] and "vllm" not in sys.modules
    assert ("vllm" in provenance(used=["vllm"])["libraries"]) == (importlib.util.find_spec("vllm") is not None)
    assert "vllm" not in sys.modules


def test_an_eval_record_says_what_produced_it(tiny_dir: Path, tmp_path: Path, far_zone: None) -> None:
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(f"model: {tiny_dir}\neval:\n  perplexity: {{text: {TEXT}, max_tokens: 64, context: 32, "
                      "stride: 32}\n")
    code, _, err = run_cli("eval", str(recipe), "--output", str(tmp_path / "r.json"))
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    _check(r["provenance"], ("torch", "transformers"))
    assert r["llmfast_version"] == __version__ and "machine" not in r  # the machine is in the provenance


def _jumping_clock() -> types.SimpleNamespace:
    """A `time` module whose wall clock steps an hour back at every reading (as NTP or a user may set it)."""
    real, steps = time.time, iter(range(1, 10**6))
    return types.SimpleNamespace(**{k: getattr(time, k) for k in ("perf_counter", "monotonic", "sleep")},
                                 time=lambda: real() - 3600 * next(steps))


def test_a_quantize_manifest_says_what_produced_it_and_its_duration_ignores_the_clock(
        tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, far_zone: None) -> None:
    import llmfast.quant.run as run

    monkeypatch.setattr(run, "time", _jumping_clock())
    recipe = tmp_path / "q.yaml"
    recipe.write_text(json.dumps({"model": str(tiny_dir), "output": str(tmp_path / "q"), "quantization": {
        "method": "bitnet", "qat_steps": 0}, "data": {"text": str(TEXT), "skip_tokens": 512, "calibration_tokens": 256,
                                                    "heldout_tokens": 128, "window": 64}}))
    assert main(["quantize", str(recipe)]) == 0
    m = json.loads((tmp_path / "q" / "llmfast.json").read_text())
    _check(m["provenance"], ("torch", "transformers"))
    _near_now(_utc(m["created"]))
    assert 0 <= m["metrics"]["wall_seconds"] < 600, m["metrics"]  # the clock stepped back an hour mid-run


def test_a_chain_stages_seconds_ignore_the_clock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import llmfast.chain.run as run

    monkeypatch.setattr(run, "time", _jumping_clock())
    recipe = tmp_path / "c.yaml"
    recipe.write_text(json.dumps({"output": str(tmp_path / "run"), "stages": {
        "data": {"type": "tasks", "with": {"tasks": ["dates"], "train": 4, "test": 2}}}}))
    assert main(["run", str(recipe)]) == 0
    seconds = json.loads((tmp_path / "run" / ".state" / "data.json").read_text())["seconds"]
    assert 0 <= seconds < 600, seconds


def test_a_bench_offline_record_is_dated_in_utc_and_says_what_produced_it(tiny_dir: Path, tmp_path: Path,
                                                                         far_zone: None) -> None:
    code, _, err = run_cli("bench", "offline", str(tiny_dir), "--engine", "hf", "--num-prompts", "2",
                           "--random-input-len", "6", "--random-output-len", "2", "--output", str(tmp_path / "r.json"))
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    _near_now(_utc(r["date"]))
    _check(r["provenance"], ("torch", "transformers"))


def test_two_bench_serve_runs_named_alike_keep_both_results(fake_server, tmp_path: Path, far_zone: None) -> None:
    """vLLM's default result name holds the time to the second: two runs in the same second (here: the same
    --metadata date) wrote one file, the second run's. Each is kept now; the date is UTC, in vLLM's form."""
    _, url = fake_server()

    def run(output_len: int, *extra: str) -> tuple[str, str]:
        code, out, err = run_cli("bench", "serve", "--base-url", url, "--num-prompts", "2", "--random-input-len", "8",
                                 "--random-output-len", str(output_len), "--disable-tqdm", "--save-result",
                                 "--result-dir", str(tmp_path), *extra)
        assert code == 0, err
        return out, err

    run(2)
    stamp = json.loads(next(tmp_path.iterdir()).read_text())["date"]
    _near_now(dt.datetime.strptime(stamp, "%Y%m%d-%H%M%S").replace(tzinfo=dt.timezone.utc))
    run(2, "--metadata", "date=20260101-000000")
    out, err = run(3, "--metadata", "date=20260101-000000")
    first, second = (tmp_path / f"openai-infqps-m-20260101-000000{n}.json" for n in ("", "-2"))
    assert f"result: {second}" in out and f"{first.name} exists (another run's result)" in err
    assert [json.loads(p.read_text())["total_output_tokens"] for p in (first, second)] == [4, 6]  # neither lost
    assert len(list(tmp_path.iterdir())) == 3  # no temporary file left
    _check(json.loads(second.read_text())["provenance"])


def test_a_bench_report_says_once_at_the_top_what_produced_it(tiny_dir: Path, tmp_path: Path, far_zone: None,
                                                             hf_in_process: None) -> None:
    from llmfast.bench.runner import run_bench
    from llmfast.recipe import BenchRecipe

    recipe = BenchRecipe.model_validate({"variants": [{"name": "plain", "model": str(tiny_dir), "engine": "hf"}],
                                         "workload": {"num_prompts": 2, "input_len": 6, "output_len": 2,
                                                      "max_concurrency": [1], "percentiles": [50]},
                                         "output": str(tmp_path / "bench")})
    report = run_bench(recipe).read_text()
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    _near_now(_utc(results["date"]))
    _check(results["provenance"], ("torch", "transformers"))
    line = f"Measured with {describe(results['provenance'])}."
    assert report.splitlines()[2] == line and report.count("Measured with") == 1
    assert results["provenance"]["machine"]["cpu"] in line and f"llmfast {__version__}" in line
    _check(json.loads((tmp_path / "bench" / "llmfast.json").read_text())["provenance"], ("torch",))


@pytest.fixture
def hf_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench run's transformers process (a pool of one) as a thread: the same engine, without a second torch start."""
    import concurrent.futures

    class InProcess(concurrent.futures.ThreadPoolExecutor):
        def __init__(self, max_workers=None, mp_context=None):
            super().__init__(max_workers)

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", InProcess)


def test_the_gpus_recorded_are_those_cuda_visible_devices_shows(tmp_path, monkeypatch):
    """Without CUDA started here, the names come from the NVIDIA driver's folder (the format of
    /proc/driver/nvidia/gpus/BUS/information); a run on GPU 1 of two (CUDA_VISIBLE_DEVICES=1, or its UUID) recorded
    both."""
    from llmfast import provenance

    for bus, model, uuid in (("0000:1b:00.0", "NVIDIA H100 80GB HBM3", "GPU-aaaa1111"),
                             ("0000:2c:00.0", "NVIDIA H200", "GPU-bbbb2222")):
        (tmp_path / bus).mkdir()
        (tmp_path / bus / "information").write_text(f"Model: \t\t {model}\nIRQ:  \t\t 42\nGPU UUID: \t {uuid}\n")
    monkeypatch.setattr(provenance, "NVIDIA_GPUS", tmp_path)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert provenance.gpus() == ["NVIDIA H100 80GB HBM3", "NVIDIA H200"]
    for visible, seen in (("1", ["NVIDIA H200"]), ("GPU-bbbb", ["NVIDIA H200"]), ("1,0", ["NVIDIA H200",
                          "NVIDIA H100 80GB HBM3"]), ("", []), ("-1", []), ("0,7,1", ["NVIDIA H100 80GB HBM3"])):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert provenance.gpus() == seen, visible
