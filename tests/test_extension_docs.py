"""The docs' "Adding a ...: one new file" examples, followed as a contributor would, so docs and code cannot drift.

Each example code block is written as the module the page names into a copy of the package (with its import in the
package's `__init__.py` where the page asks for one), and what the page promises is run against that copy in a fresh
interpreter: the name in `--help` and in did-you-mean errors, a real run on a tiny model, the conformance tests.
A contributor's mistake in such a file (a name taken twice, a missing method, torch imported at the top) is one line
and exit code 2, not a traceback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO

# page, its section's heading, the package __init__.py the page says to import the module in (None: no import)
EXAMPLES = {
    "merge": ("docs/merge.md", "## Adding a merge method: one new file", None),
    "quantize": ("docs/quantize.md", "## Adding a quantizer: one new file", "llmfast/quant/__init__.py"),
    "bench": ("docs/bench.md", "## Adding an engine", "llmfast/bench/engines/__init__.py"),
    "sparsify": ("docs/sparsify.md", "## Adding a sparsifier: one new file", "llmfast/sparse/__init__.py"),
}


def example(key: str) -> tuple[str, str]:
    """The example's module path (named in the section before its code block, or the block's first comment) and code."""
    page, heading, _ = EXAMPLES[key]
    text = (REPO / page).read_text(encoding="utf-8")
    assert heading in text, f"{page} lost its section {heading!r}"
    section = text[text.index(heading):]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found, f"{page}: no python example under {heading!r}"
    code = found.group(1)
    named = re.findall(r"`(llmfast/[\w/]+\.py)`", section[: found.start()]) + re.findall(r"^# (llmfast/\S+\.py)", code)
    assert named, f"{page}: the example does not say which file it is"
    return named[-1], code


def package_copy(root: Path, files: dict[str, str], imports: dict[str, str] | None = None) -> Path:
    """A copy of the llmfast package under `root` with `files` ({path: text}) added and each module of `imports`
    ({__init__.py path: module}) imported at the end of that __init__.py, as a contributor's checkout would be."""
    shutil.copytree(REPO / "llmfast", root / "llmfast", ignore=shutil.ignore_patterns("__pycache__"))
    for path, text in files.items():
        (root / path).write_text(text, encoding="utf-8")
    for init, module in (imports or {}).items():
        with open(root / init, "a", encoding="utf-8") as f:
            package, _, name = module.removesuffix(".py").replace("/", ".").rpartition(".")
            f.write(f"\nfrom {package} import {name}  # noqa: F401\n")
    return root


def with_example(key: str, root: Path) -> Path:
    path, code = example(key)
    init = EXAMPLES[key][2]
    return package_copy(root, {path: code}, {init: path} if init else None)


def llmfast(root: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m llmfast ARGS` on the copy at `root` (run from `cwd`, which holds no llmfast of its own)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-m", "llmfast", *args], capture_output=True, text=True, env=env,
                          cwd=cwd or root.parent, timeout=300)


def python(root: Path, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root.parent,
                          timeout=300)


def conformance(root: Path, module: str, calls: str) -> str:
    """Code that runs the repository's conformance tests of `tests/MODULE.py` on the copy at `root` (`calls`: the
    test functions called with their fixtures' values; pytest itself would double the time of each example)."""
    for name in ("tests", "eval", "recipes"):
        if not (root / name).exists():
            (root / name).symlink_to(REPO / name)
    paths = [str(root), str(root / "tests")]
    return f"import sys\nsys.path[:0] = {paths!r}\nfrom tests.{module} import *\n{calls}\n"


def one_line(p: subprocess.CompletedProcess, *needles: str) -> str:
    line = p.stderr.strip()
    assert p.returncode == 2 and line.startswith("llmfast: error: ") and "\n" not in line, p.stderr[-3000:]
    for n in needles:
        assert n in line, line
    return line


def fine_tunes(tiny_dir: Path, root: Path, n: int) -> list[Path]:
    out = []
    for i in range(1, n + 1):
        ft = shutil.copytree(tiny_dir, root / f"ft{i}")
        g = torch.Generator().manual_seed(i)
        sd = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in load_file(ft / "model.safetensors").items()}
        save_file(sd, ft / "model.safetensors", metadata={"format": "pt"})
        out.append(ft)
    return out


def test_every_registry_has_its_extension_documented():
    """A new registry is a new extension point: it gets an entry in docs/architecture.md's list (and a page example
    above where it is a new file)."""
    kinds = set()
    for f in set((REPO / "llmfast").rglob("*.py")) - {REPO / "llmfast" / "registry.py"}:  # its docstring has one
        kinds |= set(re.findall(r"Registry(?:\[[^\]]*\])?\(\"([^\"]+)\"", f.read_text(encoding="utf-8")))
    assert kinds == {"merge_method", "quantization method", "sparsification method", "bench engine", "optimizer",
                     "stage type"}, kinds
    arch = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    for entry in ("**A merge method**", "**A quantizer**", "**A sparsifier**", "**A bench engine**", "**An optimizer**",
                  "**A chain stage type**"):
        assert entry in arch
    for key in EXAMPLES:
        example(key)


def test_the_merge_method_example_lists_checks_and_merges(tmp_path, tiny_dir):
    root = with_example("merge", tmp_path / "pkg")
    assert "task_median" in " ".join(llmfast(root, "merge", "--help").stdout.split())
    base, fts = tiny_dir, fine_tunes(tiny_dir, tmp_path, 3)
    models = "".join(f"  - model: {m}\n" for m in fts)
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"merge_method: task_median\nbase_model: {base}\nmodels:\n{models}parameters:\n  lambda: 0.5\n")
    assert llmfast(root, "merge", str(cfg), str(tmp_path / "out"), "--no-progress").returncode == 0
    got, b = load_file(tmp_path / "out" / "model.safetensors"), load_file(base / "model.safetensors")
    ft = [load_file(m / "model.safetensors") for m in fts]
    for k, v in b.items():
        median = torch.stack([f[k] - v for f in ft]).median(dim=0).values  # 3 inputs: the middle one, exactly
        torch.testing.assert_close(got[k], v + 0.5 * median, rtol=0, atol=1e-6)
    typo = tmp_path / "typo.yaml"
    typo.write_text(cfg.read_text().replace("task_median", "task_medain"))
    one_line(llmfast(root, "merge", str(typo), str(tmp_path / "o2"), "--no-progress"), "did you mean 'task_median'?")
    bad = tmp_path / "bad.yaml"
    bad.write_text(cfg.read_text().replace("lambda: 0.5", "lambda: lots"))
    one_line(llmfast(root, "merge", str(bad), str(tmp_path / "o3"), "--no-progress"), "'lambda' must be a number")
    (tmp_path / "c1").mkdir(), (tmp_path / "c2").mkdir()
    family = {"base": base, "ft1": fts[0], "ft2": fts[1], "root": tmp_path}
    p = python(root, conformance(root, "test_merge_methods", f"""
family = {{k: Path(v) for k, v in {json.dumps({k: str(v) for k, v in family.items()})}.items()}}
test_method_merges_three_models_deterministically("task_median", family, Path({str(tmp_path / 'c1')!r}))
test_method_validates_its_parameters("task_median", family, Path({str(tmp_path / 'c2')!r}))
test_every_method_module_registers_and_lists_in_help()
print("conforms")"""))
    assert p.returncode == 0 and p.stdout.split()[-1] == "conforms", p.stderr[-3000:]


def test_the_quantizer_example_parses_loads_and_conforms(tmp_path, tiny_dir):
    root = with_example("quantize", tmp_path / "pkg")
    p = python(root, conformance(root, "test_quant", "test_every_quantizer_conforms('int8')") + f"""
from llmfast.errors import UserError
from llmfast.models import load_model
from llmfast.quant import parse_quantization
assert parse_quantization("llm.int8") == parse_quantization({{"method": "int8"}})
for bad in ("in8", {{"method": "int8", "treshold": 3}}):
    try:
        parse_quantization(bad)
    except UserError as e:
        print(e)
model = load_model({str(tiny_dir)!r}, "float32", quantization="int8")
print(sorted({{type(m).__name__ for m in model.modules() if "8bit" in type(m).__name__}}))
""")
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert "did you mean 'int8'?" in lines[0] and "did you mean 'threshold'?" in lines[1]
    assert lines[2] == "['Linear8bitLt']"  # the example's load_kwargs quantized the plain model as it loaded


def test_the_engine_example_generates_and_conforms(tmp_path, tiny_dir):
    root = with_example("bench", tmp_path / "pkg")
    name = re.search(r"ENGINES\.add\(\"([^\"]+)\"", example("bench")[1]).group(1)
    p = python(root, conformance(root, "test_bench", f"""
from llmfast.models import load_model, load_tokenizer
tiny = Path({str(tiny_dir)!r})
test_every_engine_conforms({name!r}, tiny, (load_model(tiny), load_tokenizer(tiny)))
print(ENGINES.names())
ENGINES.get({name[:-1] + "x"!r})"""))
    assert repr(name) in p.stdout and f"did you mean '{name}'?" in p.stderr, p.stderr[-3000:]


def test_the_sparsifier_example_sparsifies_and_is_refused_where_its_files_would_be_dropped(tmp_path, tiny_dir):
    root = with_example("sparsify", tmp_path / "pkg")
    recipe = tmp_path / "s.yaml"
    data = (f"{{text: {REPO / 'eval' / 'text' / 'persuasion.txt'}, skip_tokens: 4096, calibration_tokens: 1024, "
            "heldout_tokens: 1024, window: 128}")
    recipe.write_text(f"model: {tiny_dir}\nsparsify: {{method: teal_down, config: {{target: 0.6}}}}\n"
                      f"data: {data}\noutput: {tmp_path / 'out'}\n")
    p = llmfast(root, "sparsify", str(recipe))
    assert p.returncode == 0, p.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "llmfast.json").read_text())
    assert manifest["sparsity"]["method"] == "teal_down"
    held = manifest["metrics"]["heldout_sparsity"]
    assert abs(held["down_in"]["mean"] - 0.6) < 0.05 and held["mlp_in"]["mean"] == 0  # the one site it thresholds
    typo = tmp_path / "typo.yaml"
    typo.write_text(recipe.read_text().replace("teal_down", "teal_dwn"))
    one_line(llmfast(root, "sparsify", str(typo)), "did you mean 'teal_down'?")
    # its thresholds live beside the weights: a merge would drop them without a word, so it is refused
    merge = tmp_path / "m.yaml"
    merge.write_text(f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'out'}\n    parameters: {{weight: 1}}\n"
                     f"  - model: {tiny_dir}\n    parameters: {{weight: 1}}\n")
    one_line(llmfast(root, "merge", str(merge), str(tmp_path / "merged"), "--no-progress"),
             "teal_down artifact", "files beside the weights")
    assert not (tmp_path / "merged").exists()


MERGE = "from llmfast.merge.methods.base import MergeMethod, register\n"
QUANT = "from llmfast.quant.base import QUANTIZERS, Quantizer\n"
SPARSE = "from llmfast.sparse.base import SPARSIFIERS, Sparsifier\n"
ENGINE = "from llmfast.bench.engines.base import ENGINES, OfflineEngine\n"
MISTAKES = {  # (file, its text, the __init__.py importing it, a command that imports it, what the line says)
    "merge name taken": ("llmfast/merge/methods/dup.py", MERGE + "@register('ties')\nclass Dup(MergeMethod):\n"
                         "    def merge(self, base, inputs, params, shared, ctx):\n        return base\n", None,
                         ["--help"], "'ties' is registered twice, by Dup in llmfast/merge/methods/dup.py and by Ties"),
    "merge without merge": ("llmfast/merge/methods/nomerge.py", MERGE + "@register('nomerge')\n"
                            "class NoMerge(MergeMethod):\n    pass\n", None, ["merge", "--help"],
                            "llmfast/merge/methods/nomerge.py: merge_method 'nomerge' (NoMerge): it does not implement "
                            "merge("),
    "merge importing torch": ("llmfast/merge/methods/heavy.py", "import torch\n" + MERGE + "@register('heavy')\n"
                              "class Heavy(MergeMethod):\n    def merge(self, base, inputs, params, shared, ctx):\n"
                              "        return base\n", None, ["--help"],
                              "llmfast/merge/methods/heavy.py imports `torch` (torch) at import time"),
    "quantizer named apart": ("llmfast/quant/q8.py", QUANT + "@QUANTIZERS.register('q8')\nclass Q8(Quantizer):\n"
                              "    name = 'int8'\n", "llmfast/quant/__init__.py", ["eval", "r.yaml"],
                              "llmfast/quant/q8.py: quantization method 'q8' (Q8): its name is 'int8'"),
    "sparsifier without sparsify": ("llmfast/sparse/nosparse.py", SPARSE + "@SPARSIFIERS.register('nosparse')\n"
                                    "class NoSparse(Sparsifier):\n    pass\n", "llmfast/sparse/__init__.py",
                                    ["sparsify", "r.yaml"], "(NoSparse): it does not implement sparsify("),
    "engine without generate": ("llmfast/bench/engines/nogen.py", ENGINE + "class NoGen(OfflineEngine):\n"
                                "    name = family = 'hf'\n\nENGINES.add('nogen', NoGen())\n",
                                "llmfast/bench/engines/__init__.py", ["bench", "offline", "--engine", "hf", "x"],
                                "llmfast/bench/engines/nogen.py: bench engine NoGen does not implement generate"),
}


@pytest.mark.parametrize("case", MISTAKES)
def test_a_mistake_in_a_contributors_file_is_one_line(case, tmp_path):
    path, text, init, command, needle = MISTAKES[case]
    root = package_copy(tmp_path / "pkg", {path: text}, {init: path} if init else None)
    (tmp_path / "r.yaml").write_text("model: x\nsparsify: {method: teal}\noutput: out\n")
    p = llmfast(root, *command, cwd=tmp_path)
    assert "Traceback" not in p.stderr
    one_line(p, needle)


def test_a_one_sided_range_says_which_side():
    from llmfast.merge.methods.base import Param

    with pytest.raises(ValueError, match=r"parameter 'x' must be at least 0 \(got -1\)"):
        Param("x", low=0.0).check(-1)
    with pytest.raises(ValueError, match=r"parameter 'x' must be at most 1 \(got 2\)"):
        Param("x", high=1.0).check(2)
    with pytest.raises(ValueError, match=r"must be between 0 and 1 \(got 2\)"):
        Param("x", low=0.0, high=1.0).check(2)


def test_two_objects_under_one_name_are_refused_even_when_one_function_made_both(monkeypatch):
    """Optimizer factories are closures of one function (optimizers._bnb): two of them are still two objects."""
    import types

    from llmfast.errors import UserError
    from llmfast.registry import Registry

    plugin = types.ModuleType("a_plugin")  # a module of its own: this test file imports torch at its top
    exec("def make():\n    def build():\n        return None\n    return build\n", plugin.__dict__)
    monkeypatch.setitem(sys.modules, "a_plugin", plugin)
    things = Registry("thing")
    things.add("a", plugin.make())
    things.add("a", things.get("a"))  # the same object again: nothing to refuse
    with pytest.raises(UserError, match=r"thing 'a' is registered twice, by make.<locals>.build in a_plugin and by "):
        things.add("a", plugin.make())


def test_a_users_own_module_may_import_torch_when_it_registers(monkeypatch):
    """The heavy-import rule keeps the package's `--help` instant; a user's script or notebook registering a method
    has imported torch for its own reasons, and is not refused for it."""
    import types

    from llmfast.registry import Registry

    script = types.ModuleType("users_script")
    exec("import torch\ndef build():\n    return torch.zeros(1)\n", script.__dict__)
    monkeypatch.setitem(sys.modules, "users_script", script)
    things = Registry("thing")
    things.add("mine", script.build)
    assert things.get("mine") is script.build
