"""A model folder's own Python code (config.json's `auto_map` for a model_type transformers lacks) never runs, whoever
loads the folder: an audit on 2026-12-07 after tests/test_untrusted_files.py found the loaders of llmfast's own
formats (the ternary and w4 artifacts) read config.json with transformers' AutoConfig without trust_remote_code, so a
library user's `load_model(DIR)` asked on the terminal and imported the folder's configuration_x.py on a 'y'. The CLI
refused such a folder already (modelfiles.check_model_dir); now every loader in llmfast.loading does, in one line.
Also here: such a folder served by vLLM, and a vLLM `--config` file given in another spelling."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from llmfast.errors import UserError
from llmfast.testing import run_forked

TEXT = REPO / "eval" / "text" / "persuasion.txt"
CODE = "import pathlib\npathlib.Path({mark!r}).write_text('ran')\n"
AUTO_MAP = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
REFUSED = ("names the model's own Python code (auto_map, for trust_remote_code), and llmfast does not run a model's "
           "own code: use a copy of the model saved with classes transformers has (its own model_type and "
           "tokenizer_class)")


def _with_code(source: Path, folder: Path, mark: Path, **config: object) -> Path:
    """A copy of `source` whose config.json names Python files beside it that write `mark` when imported."""
    shutil.copytree(source, folder)
    for f in ("configuration_x.py", "modeling_x.py"):
        (folder / f).write_text(CODE.format(mark=str(mark)))
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "auto_map": AUTO_MAP, **config}))
    return folder


def _quantize(tmp: Path, base: Path, name: str, quantization: dict[str, object]) -> Path:
    out = tmp / name
    recipe = tmp / f"{name}.yaml"
    recipe.write_text(json.dumps({"model": str(base), "output": str(out), "quantization": quantization,
                                  "data": {"text": str(TEXT), "skip_tokens": 16384, "calibration_tokens": 1024,
                                           "heldout_tokens": 512, "window": 128}}))
    code, _, err = run_cli("quantize", str(recipe))
    assert code == 0, err[-2000:]
    return out


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> dict[str, Path]:
    """The tiny model quantized by llmfast (ternary; w4 where auto-round is installed), as it was written."""
    tmp = tmp_path_factory.mktemp("loaders")
    made = {"tiny": tiny_dir, "ternary": _quantize(tmp, tiny_dir, "ternary", {"method": "bitnet", "qat_steps": 0})}
    if importlib.util.find_spec("auto_round") is None:
        return made
    made["w4"] = _quantize(tmp, tiny_dir, "w4", {"method": "w4", "group_size": 32})
    return made


# The library's loaders, run in a child process that answers transformers' prompt with 'y' (the way a user at the
# terminal runs the code). Each prints what it returned, or its one-line refusal.
_LOADERS = """
import sys
from pathlib import Path
from llmfast.errors import UserError
from llmfast.models import load_model
from llmfast.quant.bitnet.convert import load_ternary
from llmfast.quant.w4_format import load_dequantized
path = Path(sys.argv[1])
for name, load in (("load_model", lambda: load_model(path)), ("load_ternary", lambda: load_ternary(path)),
                   ("load_dequantized", lambda: load_dequantized(path, 32, "float32"))):
    try:
        print(name, "loaded", type(load()).__name__)
    except UserError as e:
        print(name, "refused", e)
"""


@pytest.fixture(scope="module")
def loaded_with_yes(artifacts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """kind: (its copy naming its own code, the file that code writes, what _LOADERS printed) for each artifact, each
    folder loaded in a process of its own (forked from one that imported the loaders' libraries once)."""
    tmp = tmp_path_factory.mktemp("with-code")
    kinds = {kind: (_with_code(made, tmp / f"{kind}-code", tmp / f"RAN-{kind}", model_type="xllama"),
                    tmp / f"RAN-{kind}") for kind, made in artifacts.items()}
    env = {**os.environ, "PYTHONPATH": str(REPO), "LLMFAST_CACHE": str(tmp / "cache")}
    done = run_forked([{"code": _LOADERS, "argv": [str(folder)], "stdin": "y\ny\ny\n"} for folder, _ in kinds.values()],
                      ["torch", "transformers", "transformers.modeling_utils", "llmfast.models",
                       "llmfast.quant.bitnet.convert", "llmfast.quant.w4_format"], tmp / "jobs", env=env, cwd=tmp,
                      timeout=600)
    return {kind: (folder, mark, ran) for (kind, (folder, mark)), ran in zip(kinds.items(), done)}


@pytest.mark.parametrize("kind", ["ternary", "w4", "tiny"])
def test_a_folder_naming_its_own_code_is_refused_by_every_loader(loaded_with_yes: dict[str, tuple],
                                                                  kind: str) -> None:
    """Fixed: `echo y | python -c 'load_model(DIR)'` on a ternary or w4 artifact whose config.json names a model_type
    of its own and an auto_map imported DIR/configuration_x.py (llmfast's loaders of those formats called AutoConfig
    without trust_remote_code=False); the plain model's loader said 'transformers cannot load this model
    (ValueError: ... custom code ...)'. Now each loader is the one line the CLI gives, and nothing is imported."""
    if kind not in loaded_with_yes:
        pytest.skip("auto-round is not installed: no w4 artifact")
    folder, mark, (code, out, err) = loaded_with_yes[kind]
    assert not mark.exists(), f"the folder's code ran: {err[-1000:]}"
    assert code == 0 and "[y/N]" not in out + err, out + err[-2000:]
    lines = out.splitlines()
    loaders = ("load_model", "load_ternary", "load_dequantized")
    assert [ln.split(" ", 1)[0] for ln in lines] == list(loaders), lines
    for line in lines:
        assert line.split(" ", 2)[1:] == ["refused", f"{folder}: its config.json (model_type 'xllama') {REFUSED}"], line


@pytest.mark.parametrize("kind", ["ternary", "w4"])
def test_code_beside_a_model_type_transformers_has_loads_the_format(artifacts: dict[str, Path], tmp_path: Path,
                                                                     kind: str) -> None:
    """An auto_map beside model_type llama: transformers uses its own Llama classes and imports nothing from the
    folder, so the artifact loads, with the logits of the artifact as written."""
    import torch

    from llmfast.models import load_model

    if kind not in artifacts:
        pytest.skip("auto-round is not installed: no w4 artifact")
    mark = tmp_path / "RAN"
    folder = _with_code(artifacts[kind], tmp_path / f"{kind}-code", mark)
    ids = torch.tensor([[1, 5, 9, 200]])
    with torch.no_grad():
        assert torch.equal(load_model(folder)(ids).logits, load_model(artifacts[kind])(ids).logits)
    assert not mark.exists()


def test_serve_refuses_a_class_only_the_folders_own_code_has_before_vllm_starts(tiny_dir: Path,
                                                                               tmp_path: Path) -> None:
    """Fixed: an architecture vLLM lacks, with an auto_map naming the folder's class for it, was left to vLLM (its
    Transformers backend imports that class, but only under --trust-remote-code, which llmfast never passes): vLLM
    started, and failed deep in its start ('Model architectures [...] are not supported'). Now one line naming the
    folder and where it runs (transformers, which loads the Llama the model_type names), before vLLM starts; bench
    chooses transformers for it."""
    from llmfast.bench.engines import ENGINES, Variant
    from llmfast.bench.runner import choose_engine
    from llmfast.serve.server import prepare_spec

    mark = tmp_path / "RAN"
    folder = _with_code(tiny_dir, tmp_path / "code-arch", mark, architectures=["XForCausalLM"])
    with pytest.raises(UserError) as e:
        prepare_spec(str(folder))  # what `llmfast serve` checks before it starts vLLM
    assert str(e.value).startswith(f"{folder}: its config.json names the architecture XForCausalLM, for which this "
                                   "vLLM has no model class: run it on transformers"), e.value
    assert "has no model class" in ENGINES.get("vllm").can_run(Variant("x", folder))
    assert choose_engine(Variant("x", folder), "auto").name == "hf"
    assert not mark.exists()


@pytest.mark.parametrize("spelling", ["--config={d}/a.yaml", "--config={d}/ok.yaml", "--config.max-num-seqs=4"])
def test_a_vllm_config_file_in_a_spelling_vllm_does_not_read_is_refused(tmp_path: Path, spelling: str) -> None:
    """Fixed: `-- --config=FILE` passed every check (they looked for the word `--config`), and vLLM's parser took it
    as a value it never reads: the server started without the file's settings, and a vLLM that reads that spelling
    would take a trust-remote-code in it unchecked. Now one line saying to write `--config FILE`."""
    from llmfast.serve.vllm_flags import parse

    (tmp_path / "a.yaml").write_text("trust-remote-code: true\n")
    (tmp_path / "ok.yaml").write_text("max-num-seqs: 4\n")
    flag = spelling.format(d=tmp_path)
    with pytest.raises(UserError) as e:
        parse([flag])
    assert str(e.value) == (f"the vLLM flags after --: {flag}: vLLM reads a config file only given as `--config FILE` "
                            "(two words), and would start without this one's settings: write it so")


@pytest.mark.parametrize("flag", ["--conf", "--confi", "--con"])
def test_abbreviations_of_config_are_refused_by_vllms_parser(tmp_path: Path, flag: str) -> None:
    """argparse takes a flag's unique prefix, and vLLM's parser too; every prefix of --config is one of
    --config-format's as well, so vLLM refuses it (one line here) and reads no file."""
    from llmfast.serve.vllm_flags import parse

    (tmp_path / "a.yaml").write_text("trust-remote-code: true\n")
    with pytest.raises(UserError, match=f"ambiguous option: {flag} could match --config, .*--config-format"):
        parse([flag, str(tmp_path / "a.yaml")])


def test_serve_refuses_config_equals_before_vllm_starts(tiny_dir: Path, tmp_path: Path) -> None:
    """`llmfast serve DIR -- --config=FILE`: refused by the checks serve makes before it starts vLLM."""
    from llmfast.serve.server import prepare_spec

    config = tmp_path / "vllm.yaml"
    config.write_text("max-num-seqs: 4\n")
    with pytest.raises(UserError, match="vLLM reads a config file only given as `--config FILE`"):
        prepare_spec(str(tiny_dir), extra_args=[f"--config={config}"])


def test_a_tokenizer_naming_its_own_code_is_one_line_from_both_tokenizer_loaders(tiny_dir: Path,
                                                                                    tmp_path: Path) -> None:
    """A tokenizer_config.json whose auto_map names the folder's own tokenizer class: load_tokenizer said
    transformers' 'custom code' error and then to restore tokenizer.json (wrong advice), and bench online's
    --tokenizer DIR was a raw ValueError; both now give the refusal every model loader gives. Nothing ran either way."""
    from llmfast.bench.online import _tokenizer_for
    from llmfast.models import load_tokenizer

    folder = tmp_path / "tok"
    shutil.copytree(tiny_dir, folder)
    mark = tmp_path / "ran"
    (folder / "tokenization_x.py").write_text(CODE.format(mark=str(mark)))
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**tok, "tokenizer_class": "XTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}}))
    for load in (lambda: load_tokenizer(folder), lambda: _tokenizer_for(str(folder), [], "m")):
        with pytest.raises(UserError) as e:
            load()
        assert str(e.value) == f"{folder}: its tokenizer_config.json (tokenizer_class 'XTokenizer') {REFUSED}"
    assert not mark.exists()
