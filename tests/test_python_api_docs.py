"""docs/python_api.md as a script's author reads it, so the page and the code cannot drift apart.

Every ```python block runs as written, each in a process of its own (forked from one that only imported the
libraries: no name or state of the blocks before it), in the page's order, in one empty folder (a block uses what the
blocks before it wrote, as the page says); every signature the page gives in backticks is the function's own. The
vLLM block starts a real server (a minute or two): it runs last, in the same folder.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from llmfast.testing import VERB_IMPORTS, run_forked

PAGE = REPO / "docs" / "python_api.md"
# what a script calls to do each thing the kit does: each must keep its signature (and so its section) on the page
DOCUMENTED = {"llmfast.models.load_model", "llmfast.models.resolve_model", "llmfast.models.load_tokenizer",
              "llmfast.recipe.load_recipe", "llmfast.finetune.trainer.run_finetune",
              "llmfast.finetune.export.export_merged", "llmfast.merge.plan.plan_merge",
              "llmfast.merge.merge.run_merge", "llmfast.quant.run.run_quantize",
              "llmfast.sparse.run.load_sparsify_recipe", "llmfast.sparse.run.run_sparsify",
              "llmfast.evaluate.run_eval", "llmfast.cli.main", "llmfast.serve.server.prepare_spec",
              "llmfast.serve.server.VllmServer", "llmfast.testing.build_tiny_llama"}


def blocks() -> list[tuple[int, str]]:
    """(line on the page, code) of every python block, in order."""
    text = PAGE.read_text(encoding="utf-8")
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in re.finditer(r"^```python\n(.*?)^```$", text,
                                                                                   re.S | re.M)]


def _starts_vllm(code: str) -> bool:
    return "VllmServer(" in code


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _run(code: str, line: int, cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=_env(),
                       timeout=timeout)
    assert p.returncode == 0, f"docs/python_api.md:{line}: the block failed\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return p


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The folder every block but vLLM's ran in, in order, and what each printed."""
    cwd = tmp_path_factory.mktemp("python-api")
    run = [(line, code) for line, code in blocks() if not _starts_vllm(code)]
    # each block in a process of its own, forked from one that imported the libraries once (~4 s a process)
    done = run_forked([{"code": code} for _, code in run], VERB_IMPORTS, tmp_path_factory.mktemp("python-api-jobs"),
                      env=_env(), cwd=cwd, timeout=1800)
    for (line, _), (code, out, err) in zip(run, done):
        assert code == 0, f"docs/python_api.md:{line}: the block failed\n{out[-2000:]}\n{err[-4000:]}"
    return cwd, [out for _, out, _ in done]


def test_every_block_runs_as_written_in_the_pages_order(folder):
    """Each block exits 0 (their asserts hold: a caller's generators kept, UserError's one line, the outputs
    written) and says something: a block that printed nothing would show the reader nothing to compare with."""
    cwd, printed = folder
    assert len(printed) == len([c for _, c in blocks() if not _starts_vllm(c)]) >= 10
    assert all(out.strip() for out in printed), printed
    assert (cwd / "runs" / "ft-ternary" / "llmfast.json").is_file() and (cwd / "runs" / "eval" / "ft.json").is_file()


@pytest.mark.slow
def test_the_vllm_block_serves_the_adapter_and_stops(folder):
    """The serving block, after the blocks that made its model and adapter: a real vLLM server on the tiny model,
    the adapter's completion, the server stopped when the block ends."""
    pytest.importorskip("vllm")
    cwd, _ = folder
    served = [(line, code) for line, code in blocks() if _starts_vllm(code)]
    assert len(served) == 1
    assert _run(served[0][1], served[0][0], cwd, 900).stdout.strip()


def _rendered(name: str) -> str:
    module, _, attr = name.rpartition(".")
    sig = inspect.signature(getattr(importlib.import_module(module), attr))
    return f"{name}{sig}"


def _plain(signature: str) -> str:
    """A signature without quotes (annotations are strings under `from __future__ import annotations`)."""
    return re.sub(r"['\"]", "", signature)


def test_every_signature_on_the_page_is_the_codes():
    """A parameter renamed, added or retyped, or a function moved, fails here until the page says so; and the
    functions a script needs for each verb all keep their place on the page."""
    text = PAGE.read_text(encoding="utf-8")
    given = re.findall(r"`(llmfast\.[\w.]+\(.*?\)(?: -> [^`]+)?)`", text)
    names = {g[: g.index("(")] for g in given}
    assert DOCUMENTED <= names, DOCUMENTED - names
    for g in given:
        name, code = g[: g.index("(")], _plain(_rendered(g[: g.index("(")]))
        head, cut, tail = _plain(g).partition(", ...)")  # the first parameters, the rest left out
        same = code.startswith(head + ", ") and code.endswith(")" + tail) if cut else _plain(g) == code
        assert same, f"docs/python_api.md gives {g}; the code: {_rendered(name)}"
