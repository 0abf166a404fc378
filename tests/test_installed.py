"""llmfast installed from its wheel (`pip install /path/to/llmfast`, not editable) and run outside the checkout: the
wheel holds every file the package reads beside its modules, and those reads find the installed copies.

The wheel is built for real (setuptools' backend, no isolation: about a second) from a copy of the files it is
made of, and unpacked as pip unpacks it; the unpacked folder goes first on PYTHONPATH of a `python` run in an
empty folder, so neither the checkout nor its eval/ folder is in reach."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

pytest.importorskip("setuptools", reason="building the wheel needs setuptools (pip's build backend)")
tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

# The files llmfast reads beside its modules: the C kernels (each module's SOURCE, compiled at first use) and what
# shipped_file finds (the book; the task sets, which recipes copied from recipes/ name).
EVAL_FILES = ["eval/text/persuasion.txt", "eval/text/PROVENANCE.md", "eval/tasks/README.md",
              "eval/tasks/dates/test.jsonl", "eval/tasks/units/test.jsonl", "eval/tasks/extract/test.jsonl"]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]


def _sources_read_beside_modules() -> list[Path]:
    """Every `Path(__file__).with_name("NAME")` in llmfast/: the files a module opens next to itself."""
    found = []
    for py in sorted((REPO / "llmfast").rglob("*.py")):
        for name in re.findall(r"Path\(__file__\)\.with_name\(\"([^\"]+)\"\)", py.read_text(encoding="utf-8")):
            found.append(py.with_name(name))
    return found


def test_every_package_is_listed_and_every_runtime_file_is_package_data():
    """pyproject lists its packages (eval/ is mapped in as llmfast.eval): a new llmfast/ subpackage left off the
    list would be missing from the wheel; a kernel source or eval file no pattern matches, likewise."""
    tool = _pyproject()
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "llmfast").rglob("__init__.py")}
    assert sorted(tool["packages"]) == sorted(on_disk | {"llmfast.eval"})
    assert tool["package-dir"] == {"llmfast.eval": "eval"}
    data = tool["package-data"]
    sources = _sources_read_beside_modules()
    assert len(sources) >= 3  # the merge, sparse and ternary kernels
    for src in sources:
        assert src.is_file(), src
        assert any(fnmatch.fnmatch(src.name, pat) for pat in data["*"]), src
    for rel in EVAL_FILES:
        assert (REPO / rel).is_file(), rel
        assert any(fnmatch.fnmatch(rel.removeprefix("eval/"), pat) for pat in data["llmfast.eval"]), rel
    # every eval/ file a shipped recipe names is one of them
    named = {m for y in (REPO / "recipes").glob("*.yaml")
             for m in re.findall(r"(?<![\w/.])eval/[\w./-]+", y.read_text(encoding="utf-8"))}
    assert named and named <= set(EVAL_FILES), named - set(EVAL_FILES)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the wheel, the folder it is unpacked into)."""
    root = tmp_path_factory.mktemp("wheel")
    src, out, site = root / "src", root / "dist", root / "site"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("llmfast", "eval"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    build = "import sys; from setuptools import build_meta as b; print(b.build_wheel(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", build, str(out)], cwd=src, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    wheel = out / done.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    return wheel, site


def test_the_wheel_holds_every_module_kernel_source_eval_file_and_entry_point(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "llmfast").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    for src in _sources_read_beside_modules():
        assert src.relative_to(REPO).as_posix() in names, src
    for rel in EVAL_FILES:
        assert f"llmfast/{rel}" in names, rel
    assert zipfile.ZipFile(wheel).read(f"llmfast/{EVAL_FILES[0]}") == (REPO / EVAL_FILES[0]).read_bytes()
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry).decode()
    assert "[vllm.general_plugins]\nllmfast_relu_llama = llmfast.serve.vllm_plugin:register" in text
    assert "[console_scripts]\nllmfast = llmfast.cli:main" in text


# Run in an empty folder with the unpacked wheel first on the path: where llmfast and its data come from.
_PROBE = """
import json, llmfast
from llmfast.data.text import shipped_file, shipped_hint
from llmfast.testing import _default_corpus
print(json.dumps({"package": llmfast.__file__, "book": str(shipped_file("eval/text/persuasion.txt")),
                  "tasks": [str(shipped_file(f"eval/tasks/{t}/test.jsonl")) for t in ("dates", "units", "extract")],
                  "outside": [str(shipped_file(p)) for p in ("eval/../pyproject.toml", "llmfast/cli.py", "eval")],
                  "hint": shipped_hint("eval/tasks/units/test.jsonl"), "corpus": _default_corpus()[0]}))
"""


def test_an_installed_llmfast_reads_its_own_copies_from_any_folder(installed, tmp_path):
    """The tiny test models' tokenizer is trained on the book: an installed llmfast used to skip it silently (its
    path was found from the checkout), so the same build_tiny_llama call made another model outside the checkout."""
    _, site = installed
    elsewhere = tmp_path / "project"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", _PROBE], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout)
    pkg = site / "llmfast"
    assert got["package"] == str(pkg / "__init__.py")
    assert got["book"] == str(pkg / "eval" / "text" / "persuasion.txt")
    assert got["tasks"] == [str(pkg / "eval" / "tasks" / t / "test.jsonl") for t in ("dates", "units", "extract")]
    assert got["outside"] == ["None", "None", "None"]
    assert got["hint"] == (f"; llmfast ships this file as {pkg / 'eval' / 'tasks' / 'units' / 'test.jsonl'}: "
                           "give that path, or copy it here")
    assert got["corpus"] == (REPO / "eval/text/persuasion.txt").read_text(encoding="utf-8")[:200_000]


def test_a_checkout_reads_its_own_eval_folder_from_any_folder(tmp_path, monkeypatch):
    from llmfast.data.text import shipped_file, shipped_hint

    monkeypatch.chdir(tmp_path)
    assert shipped_file("eval/text/persuasion.txt").resolve() == REPO / "eval" / "text" / "persuasion.txt"
    assert shipped_hint(REPO / "eval" / "text" / "persuasion.txt") == ""  # an absolute path is the user's own
    assert shipped_hint("eval/text/missing.txt") == ""


def test_a_copied_recipe_run_elsewhere_is_told_where_the_shipped_file_is(tmp_path, monkeypatch):
    """recipes/ names eval/... relative to the working directory: run from another folder, the refusal names
    llmfast's own copy (a checkout's here; an installed llmfast's package data, shown by the probe above)."""
    from llmfast.errors import UserError
    from llmfast.recipe import EvalRecipe, load_recipe

    shutil.copy2(REPO / "recipes" / "eval_smollm2.yaml", tmp_path / "eval.yaml")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        load_recipe("eval.yaml", EvalRecipe)
    book = REPO / "eval" / "text" / "persuasion.txt"
    assert str(e.value) == (
        "eval.yaml:9: eval.perplexity.text: file not found: eval/text/persuasion.txt (paths are relative to the "
        f"directory you run llmfast from); llmfast ships this file as {book}: give that path, or copy it here "
        "(got 'eval/text/persuasion.txt')")
