"""llmfast/quant: every registered quantizer conforms to the interface; recipes' `quantization:` in all its
forms; manifests old and new; load_model picks the loader from the artifact; bitsandbytes stays quiet."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmfast.errors import UserError
from llmfast.quant import QUANTIZERS, QuantSpec, engines_for, manifest_quantization, parse_quantization
from llmfast.quant.base import Quantizer
from llmfast.recipe import EvalRecipe, FinetuneRecipe, load_recipe

KNOWN_ENGINES = {"vllm", "hf"}


@pytest.mark.parametrize("name", QUANTIZERS.names())
def test_every_quantizer_conforms(name):
    cls = QUANTIZERS.get(name)
    q = cls()
    assert q.name == name and q.paper, "a method says what it is and where it comes from"
    default = cls.Config()  # every setting has a default
    spec = parse_quantization({"method": name})
    assert spec.config == default and spec.method == name
    # its own schema refuses unknown keys, with the method named
    with pytest.raises(UserError, match=f"unknown key 'no_such_key' for quantization method {name}"):
        parse_quantization({"method": name, "no_such_key": 1})
    engines = q.engines(default)
    assert engines and set(engines) <= KNOWN_ENGINES
    # manifest and command-line forms read back to the same setting
    assert parse_quantization(spec.manifest()) == spec
    assert parse_quantization(spec.as_arg()) == spec
    for word, preset in cls.shorthands.items():
        assert parse_quantization(word) == QuantSpec(method=name, config=cls.Config.model_validate(preset))
    # loading: where a method supports it, keyword arguments for from_pretrained
    for call in (lambda: q.training_load_kwargs(default, "float32", "cpu"), lambda: q.load_kwargs(default, "float32")):
        try:
            kwargs = call()
        except UserError as e:
            assert "cannot" in str(e)  # a method that does not support it says so in one line
            continue
        assert isinstance(kwargs, dict)
    # `dequantizes` says whether dequantize_for_merge is its own (export checks it before loading a base)
    assert q.dequantizes == (cls.dequantize_for_merge is not Quantizer.dequantize_for_merge)


def test_bnb4_forms_and_errors():
    nf4 = parse_quantization("nf4")
    assert nf4.method == "bnb4" and nf4.config.type == "nf4" and nf4.config.double_quant is True
    assert parse_quantization({"type": "fp4", "double_quant": False}).config.double_quant is False  # method: default
    assert parse_quantization({"method": "bnb4", "config": {"type": "fp4"}}).config.type == "fp4"  # manifest form
    assert parse_quantization({"bits": 4, "type": "nf4", "double_quant": True}) == nf4  # what recipes always said
    assert parse_quantization(None) is None
    with pytest.raises(UserError, match=r"unknown quantization method 'nf5' \(did you mean 'nf4'\?\)"):
        parse_quantization("nf5")
    with pytest.raises(UserError, match=r"unknown quantization method 'bnb5' \(did you mean 'bnb4'\?\)"):
        parse_quantization({"method": "bnb5"})
    with pytest.raises(UserError, match=r"unknown key 'double_qant' .*did you mean 'double_quant'"):
        parse_quantization({"double_qant": True})
    with pytest.raises(UserError, match=r"type: Input should be 'nf4' or 'fp4' \(got 'int8'\)"):
        parse_quantization({"type": "int8"})
    # a misspelt key and a bad value: the unknown key is the one line, whichever pydantic lists first
    for raw in ({"type": "int8", "double_qant": True}, {"double_qant": True, "type": "int8"}):
        with pytest.raises(UserError, match=r"unknown key 'double_qant' .*did you mean 'double_quant'"):
            parse_quantization(raw)
    assert engines_for(None) == ("vllm", "hf") and engines_for("nf4") == ("hf",) and engines_for(nf4) == ("hf",)


def _recipe(tmp_path, text):
    (tmp_path / "train.jsonl").write_text("{}\n")
    path = tmp_path / "r.yaml"
    path.write_text(f"model: m\ndata: {{train: {tmp_path / 'train.jsonl'}}}\noutput: {tmp_path / 'out'}\n{text}")
    return path


def test_recipes_validate_quantization_in_two_steps(tmp_path):
    r = load_recipe(_recipe(tmp_path, "quantization: {type: fp4, double_quant: false}\n"), FinetuneRecipe)
    assert r.quantization.method == "bnb4" and r.quantization.config.type == "fp4"
    r = load_recipe(_recipe(tmp_path, "quantization: {method: bnb4}\n"), FinetuneRecipe, ["quantization.type=fp4"])
    assert r.quantization.config.type == "fp4"
    assert load_recipe(_recipe(tmp_path, ""), FinetuneRecipe, ["quantization=nf4"]).quantization.config.type == "nf4"
    path = _recipe(tmp_path, "quantization:\n  type: nf4\n  double_qant: true\n")
    with pytest.raises(UserError) as e:
        load_recipe(path, FinetuneRecipe)
    assert str(e.value).startswith(f"{path}:4: quantization: unknown key 'double_qant'"), e.value
    assert "did you mean 'double_quant'" in str(e.value)
    with pytest.raises(UserError, match=r"\(--set quantization\): quantization: unknown quantization method 'nf5'"):
        load_recipe(_recipe(tmp_path, ""), FinetuneRecipe, ["quantization=nf5"])
    ev = EvalRecipe.model_validate({"model": "m", "quantization": "nf4", "eval": {}})
    assert ev.quantization == parse_quantization("nf4")
    # a validated recipe dumps to JSON that validates again to the same recipe (recipe.json, manifests)
    assert FinetuneRecipe.model_validate(json.loads(r.model_dump_json())).quantization == r.quantization


def test_manifests_old_and_new(tmp_path):
    from llmfast.artifacts import read_manifest

    new = {"quantization": {"method": "bnb4", "config": {"bits": 4, "type": "fp4", "double_quant": False}}}
    old = {"quantization": True, "recipe": {"quantization": {"bits": 4, "type": "fp4", "double_quant": False}}}
    assert manifest_quantization(new) == manifest_quantization(old) == parse_quantization(new["quantization"])
    (tmp_path / "llmfast.json").write_text(json.dumps(old))  # what older versions wrote is still read from disk
    assert manifest_quantization(read_manifest(tmp_path), tmp_path) == parse_quantization(new["quantization"])
    assert manifest_quantization({"quantization": False}) is None and manifest_quantization(None) is None
    assert manifest_quantization({"quantization": None}) is None


def _linear4bit(model):
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_load_model_follows_the_setting_and_the_artifact(tmp_path, tiny_dir):
    from llmfast.models import load_model

    plain = load_model(tiny_dir)
    assert not _linear4bit(plain)
    fp4 = _linear4bit(load_model(tiny_dir, quantization={"type": "fp4", "double_quant": False}))
    assert fp4 and all(m.weight.quant_state.quant_type == "fp4" and not m.weight.quant_state.nested for m in fp4)
    nf4 = _linear4bit(load_model(tiny_dir, quantization="nf4"))
    assert nf4 and all(m.weight.quant_state.quant_type == "nf4" and m.weight.quant_state.nested for m in nf4)
    # an artifact whose llmfast.json records its quantization loads that way without being told
    art = tmp_path / "art"
    shutil.copytree(tiny_dir, art)
    manifest = {"stage": "test", "quantization": parse_quantization("fp4").manifest()}
    (art / "llmfast.json").write_text(json.dumps(manifest))
    found = _linear4bit(load_model(art))
    assert found and all(m.weight.quant_state.quant_type == "fp4" for m in found)


def test_pickle_only_model_is_refused(tmp_path, tiny_dir):
    from llmfast.models import load_model

    d = tmp_path / "pickled"
    shutil.copytree(tiny_dir, d)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(UserError) as e:
        load_model(d)
    msg = str(e.value)
    assert "\n" not in msg and "pickle" in msg and "safe_serialization=True" in msg


def test_bitsandbytes_hub_kernel_warning_is_hidden(tmp_path, tiny_dir):
    """bitsandbytes logs it at import on CPUs with AVX512-BF16 (not every CPU), whoever imports it."""
    line = "Failed to load CPU gemm_4bit_forward from kernels-community"
    code = ("import logging, llmfast.quant, bitsandbytes; "
            f"logging.getLogger('bitsandbytes.backends.cpu.ops').warning('{line}: no kernels'); "
            "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('another warning')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and line not in p.stderr and "another warning" in p.stderr, p.stderr
    # offline, the `kernels` package (transformers 5.25 requires it) notes on the way that it skips the publisher
    # check: dropped for bitsandbytes' kernel only
    note = "Skipping publisher trust check for '{}' because Hugging Face Hub is in offline mode."
    code = ("import logging, llmfast.quant; log = logging.getLogger('kernels._internals.hf_hub'); "
            f"log.warning({note.format('kernels-community/quantization-bitsandbytes')!r}); "
            f"log.warning({note.format('someone/else')!r})")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stderr.strip() == note.format("someone/else"), p.stderr
    # a command that runs bitsandbytes on the CPU: perplexity of a 4-bit model
    (tmp_path / "text.txt").write_text("alpha bravo charlie delta echo foxtrot " * 20)
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(f"model: {tiny_dir}\nquantization: nf4\neval: {{perplexity: {{text: {tmp_path / 'text.txt'}, "
                      f"context: 32, stride: 16}}}}\noutput: {tmp_path / 'res.json'}\n")
    p = subprocess.run([sys.executable, "-m", "llmfast.cli", "eval", str(recipe)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert line not in p.stderr and "Skipping publisher trust check" not in p.stderr, p.stderr[-2000:]
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["quantization"] == parse_quantization("nf4").manifest()


@pytest.mark.parametrize("method,key", [("w4", "lr"), ("w4", "scale_lr"), ("bitnet", "lr")])
def test_a_learning_rate_float32_rounds_to_nothing_is_refused(method, key):
    """s46: 1e-300 (and any rate below float32's smallest normal number) made every update round to nothing: the
    run wrote the untrained model with exit 0. The smallest normal rate is taken."""
    with pytest.raises(UserError, match=f"quantization: {key}: must be at least 1.18e-38 .float32's smallest normal"):
        parse_quantization({"method": method, key: 1e-300})
    assert getattr(parse_quantization({"method": method, key: 1.1754943508222875e-38}).config, key) > 0
