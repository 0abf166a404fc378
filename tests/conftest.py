"""Session-wide fixtures: one fresh model cache, one converted built-in model, one tiny model.

The cache is new for every test session so the GGUF conversion really runs (and removed when it ends); set
LLMFAST_TEST_REUSE_CACHE=1 to use your normal cache instead while iterating.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Under pytest-xdist (`make test` runs two workers) the workers inherit the cache the controlling process made here,
# so the built-in model is converted once for the session (in `pytest_configure`, before the workers start).
# The folders made here are this session's: the process that made them removes them when it ends (pytest_unconfigure);
# one that came through the environment (the user's, or the controller's in a worker) is never removed.
_MADE: list[str] = []
_MADE_BY = os.getpid()


def _session_folder(variable: str, prefix: str) -> None:
    os.environ[variable] = tempfile.mkdtemp(prefix=prefix)
    _MADE.append(os.environ[variable])


if not os.environ.get("LLMFAST_TEST_REUSE_CACHE") and not os.environ.get("PYTEST_XDIST_WORKER"):
    _session_folder("LLMFAST_CACHE", "llmfast-test-cache-")
# torch.compile's kernel cache too (transformers' BitNet layers compile): a cache shared with runs under another
# ATEN_CPU_CAPABILITY/ONEDNN_MAX_CPU_ISA (which its key does not hold) aborted the whole session (SIGABRT, s52).
# Not os.environ.setdefault: its default was made, and left in /tmp, in every worker too.
if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
    _session_folder("TORCHINDUCTOR_CACHE_DIR", "llmfast-test-inductor-")
# Nothing in the tests may reach the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config: pytest.Config) -> None:
    """With workers (`-n 2`), the controlling process converts the built-in model before it starts them: two
    workers converting into one cache at once would each replace the other's folder."""
    if getattr(config, "workerinput", None) is None and getattr(config.option, "numprocesses", None):
        from llmfast.models import resolve_model

        resolve_model("builtin:smollm2-135m")


# `make test` runs two workers with --dist loadfile: a file's tests stay on one worker, which takes the next file in
# the collection's order when it has (almost) none left. xdist's own order (most tests first) handed out the files of
# a few tests of a minute or more each (vLLM starts, killed and re-run subprocesses) late: test_serve_vllm.py (13
# tests, the longest file: 20 min alone on the shared machine, about a third of that in CI) 36th of 63 files,
# test_serve_relu.py, test_kill_anywhere.py (a third of it each) and test_triton_kernels.py 52nd, 55th and 56th,
# where one worker could be left running them while the other idled (s55). Longest first leaves the short files to
# fill the end: these (from per-file runs and CI's slowest tests, s55), then the rest with the most tests first
# (xdist's order). The Makefile turns xdist's own reordering off. tests/test_suite_order.py catches a rename here.
LONGEST_FIRST = ("test_serve_vllm.py", "test_finetune.py", "test_serve_relu.py", "test_kill_anywhere.py",
                 "test_chain.py", "test_leftovers.py", "test_library_use.py", "test_offline.py",
                 "test_python_api_docs.py", "test_engine_leftovers.py", "test_engine_choice.py",
                 "test_quant_bitnet.py", "test_quant_w4.py", "test_triton_kernels.py", "test_untrusted_files.py",
                 "test_gpu_scripts.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    counts: dict[str, int] = {}
    for item in items:
        counts[item.path.name] = counts.get(item.path.name, 0) + 1
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    # stable: a file's own tests keep their order (and stay together)
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), -counts[item.path.name], item.path.name))


# With --durations (CI passes it), the time each file took and on which worker: LONGEST_FIRST's order comes from this,
# and a file that grew, or a worker left running alone at the end, shows here.
_FILE_SECONDS: dict[str, list] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    node = getattr(report, "node", None)  # under xdist, in the controller: the worker that ran it
    seconds = _FILE_SECONDS.setdefault(report.nodeid.split("::")[0], [0.0, ""])
    seconds[0] += report.duration
    seconds[1] = getattr(getattr(node, "gateway", None), "id", "") or seconds[1]


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if config.option.durations is None or os.environ.get("PYTEST_XDIST_WORKER") or not _FILE_SECONDS:
        return
    tr = terminalreporter
    tr.write_sep("=", "seconds per test file (setup + call + teardown), longest first")
    per_worker: dict[str, float] = {}
    for name, (seconds, worker) in sorted(_FILE_SECONDS.items(), key=lambda kv: -kv[1][0]):
        per_worker[worker] = per_worker.get(worker, 0.0) + seconds
        tr.write_line(f"{seconds:8.1f}  {worker or '-':4}  {name}")
    tr.write_line("  ".join(f"{w or 'all'}: {s:.1f} s" for w, s in sorted(per_worker.items())))


def pytest_unconfigure(config: pytest.Config) -> None:
    """The session's own cache (~600 MB: the converted built-in model) and kernel cache go when it ends, in the
    process that made them (a worker's copy of this module made none; a forked child never gets here)."""
    import shutil

    if os.getpid() == _MADE_BY:
        for path in _MADE:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def builtin_dir() -> Path:
    from llmfast.models import resolve_model

    return resolve_model("builtin:smollm2-135m")


@pytest.fixture(scope="session")
def builtin(builtin_dir: Path):
    from llmfast.models import load_model, load_tokenizer

    return load_model(builtin_dir), load_tokenizer(builtin_dir)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llmfast.testing import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path):
    from llmfast.models import load_model, load_tokenizer

    return load_model(tiny_dir), load_tokenizer(tiny_dir)


# As root, file modes do not hold (root reads a mode-000 file): commands run under this prefix lose the capabilities
# that bypass them, so permission errors are real.
DROP_FILE_OVERRIDE = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps",
                      "-dac_override,-dac_read_search"]


def file_modes_prefix(tmp_path: Path) -> list[str]:
    """The command prefix under which file modes hold for a subprocess ([] for a user other than root), checked on
    a mode-000 file; skips the test where none does (root without setpriv, or a container that refuses it)."""
    import shutil
    import subprocess

    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: file modes cannot be made to hold here")
    probe = tmp_path / "mode-probe"
    probe.write_text("x")
    probe.chmod(0)
    p = subprocess.run([*DROP_FILE_OVERRIDE, "cat", str(probe)], capture_output=True, text=True)
    probe.unlink()
    if p.returncode == 0 or "Permission denied" not in p.stderr:
        pytest.skip(f"setpriv could not drop root's file-mode override here: {p.stderr.strip()[:120]}")
    return DROP_FILE_OVERRIDE


def run_cli(*args: str) -> tuple[int, str, str]:
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    import contextlib
    import io

    from llmfast.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def relu_cut_copy(model: Path, out: Path, text: Path) -> tuple["torch.Tensor", list[float]]:
    """A copy of `model` at `out` made a ReLU model with a shifted cut in its config.json, calibrated to zero 80% of
    the activation on the text past its first 20,000 tokens (as relufy's `target` writes it); returns the text's
    token ids and the cut."""
    import json
    import shutil

    from llmfast.loading import from_pretrained
    from llmfast.models import load_tokenizer
    from llmfast.sparse.relu_cut import THRESHOLDS_KEY, calibrated_cut

    shutil.copytree(model, out)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu"}))
    ids = load_tokenizer(out)(text.read_text(encoding="utf-8"), add_special_tokens=False,
                              return_tensors="pt").input_ids[0]
    cut = calibrated_cut(from_pretrained(out, "float32"), ids[20000:20512].reshape(4, 128), 0.8)
    (out / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu", THRESHOLDS_KEY: cut}))
    return ids, cut
