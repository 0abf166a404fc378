"""An architecture vLLM has no class for is refused before vLLM starts (serve/vllm_archs.py): found by reading the
installed vLLM's registry source, which must agree with vLLM's own registry."""

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli

FOO = "FooForCausalLM"


@pytest.fixture(scope="module")
def foo_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama, its config.json naming an architecture no vLLM has (transformers loads it by model_type)."""
    d = Path(shutil.copytree(tiny_dir, tmp_path_factory.mktemp("foo") / "foo-llama"))
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": [FOO]}))
    return d


@pytest.fixture()
def fresh():
    """The lookup is cached per process: cleared around tests that change what it reads."""
    from llmfast.serve.vllm_archs import vllm_architectures

    vllm_architectures.cache_clear()
    yield
    vllm_architectures.cache_clear()


def test_serve_refuses_an_unknown_architecture_before_starting_vllm(foo_dir: Path) -> None:
    """Fixed: vLLM started (~30 s) and only then failed with "Model architectures ['FooForCausalLM'] are not
    supported" deep in its start."""
    code, _, err = run_cli("serve", str(foo_dir), "--port", "0")
    assert code == 2 and err.strip().count("\n") == 0, err[-2000:]
    assert "starting vLLM" not in err
    assert err.strip() == (
        f"llmfast: error: {foo_dir}: its config.json names the architecture {FOO}, for which this vLLM has no model class: "
        "run it on transformers (`bench run` measures it there, `bench offline --engine hf`), or use a vLLM that "
        "has that class")


def test_bench_measures_it_on_transformers(foo_dir: Path) -> None:
    """`bench run` picks the transformers engine for it, and its report's note says why (runner.py)."""
    from llmfast.bench.engines import ENGINES, Variant
    from llmfast.bench.runner import choose_engine

    variant = Variant("foo", foo_dir)
    assert f"names the architecture {FOO}, for which this vLLM has no model class" in ENGINES.get("vllm").can_run(
        variant)
    assert ENGINES.get("vllm-offline").can_run(variant) == ENGINES.get("vllm").can_run(variant)
    assert choose_engine(variant, "auto").name == "hf"


def test_the_check_accepts_what_vllm_serves_and_refuses_only_what_it_cannot() -> None:
    from llmfast.serve.vllm_archs import unserved_architecture
    from llmfast.serve.vllm_plugin import ARCHITECTURE

    for arch in ("LlamaForCausalLM", "Qwen2ForCausalLM", ARCHITECTURE, "MistralForCausalLM"):
        assert unserved_architecture({"architectures": [arch]}) is None, arch
    assert unserved_architecture({"architectures": [FOO]}) == FOO
    assert unserved_architecture({"architectures": [FOO, "LlamaForCausalLM"]}) is None  # vLLM takes any it knows
    # vLLM maps a task suffix onto a name it knows (LlamaForSequenceClassification: a LlamaForCausalLM converted)
    assert unserved_architecture({"architectures": ["Qwen2ForTokenClassification"]}) is None
    # vLLM serves a transformers class it lacks through its Transformers backend; an auto_map class only under
    # --trust-remote-code, which llmfast never passes: refused like any unknown name
    assert unserved_architecture({"architectures": ["BioGptForCausalLM"]}) is None
    assert unserved_architecture({"architectures": [FOO], "auto_map": {"AutoModelForCausalLM": "m.Foo"}}) == FOO
    for flags in (['--hf-overrides={"architectures": ["LlamaForCausalLM"]}'], ["--model_impl", "transformers"],
                  ["--model-class-overrides", '{"A": "b:C"}']):  # flags that choose the class (more spellings:
        # tests/test_flags_after_dashdash.py)
        assert unserved_architecture({"architectures": [FOO]}, ["--max-num-seqs", "2", *flags]) is None, flags


def test_biogpt_is_a_transformers_class_vllm_lacks() -> None:
    """The premise of the backend case above: no vLLM class by that name, and transformers has one."""
    import transformers

    from llmfast.serve.vllm_archs import vllm_architectures

    assert "BioGptForCausalLM" not in vllm_architectures() and hasattr(transformers, "BioGptForCausalLM")


def test_plugins_vllm_loads_decide(fresh, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, foo_dir: Path) -> None:
    """VLLM_PLUGINS naming other plugins leaves ours out (vLLM refuses our ReLU Llama then); another installed plugin
    may register any name, so nothing is refused."""
    from llmfast.serve.vllm_archs import unserved_architecture, vllm_architectures
    from llmfast.serve.vllm_plugin import ARCHITECTURE

    monkeypatch.setenv("VLLM_PLUGINS", "someone_else")
    assert unserved_architecture({"architectures": [ARCHITECTURE]}) == ARCHITECTURE
    relu = tmp_path / "relu"  # serve's line says what loads our plugin, not to use another vLLM
    shutil.copytree(foo_dir, relu)
    cfg = json.loads((relu / "config.json").read_text())
    (relu / "config.json").write_text(json.dumps({**cfg, "architectures": [ARCHITECTURE]}))
    code, _, err = run_cli("serve", str(relu), "--port", "0")
    assert code == 2 and err.strip() == (
        f"llmfast: error: {relu}: its config.json names llmfast's ReLU Llama ({ARCHITECTURE}), which vLLM serves "
        "through llmfast's plugin, and vLLM would not load that plugin: install llmfast (`pip install -e .` in its "
        "checkout registers it), and leave VLLM_PLUGINS unset or list llmfast_relu_llama in it")
    monkeypatch.delenv("VLLM_PLUGINS")
    vllm_architectures.cache_clear()
    info = tmp_path / "other_plugin-1.0.dist-info"  # a real installed distribution's metadata, on sys.path
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: other-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[vllm.general_plugins]\nother = other_plugin:register\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert vllm_architectures() is None and unserved_architecture({"architectures": [FOO]}) is None


def test_a_registry_of_another_shape_refuses_nothing(fresh, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """vLLM's source changed shape (or vLLM is absent): no refusal, vLLM's start decides as before."""
    from llmfast.serve import vllm_archs

    changed = tmp_path / "registry.py"
    changed.write_text("_VLLM_MODELS = build_models()\n")
    with pytest.raises(ValueError, match="not a dict literal"):
        vllm_archs.in_tree_architectures(changed)
    for source in (changed, None):
        vllm_archs.vllm_architectures.cache_clear()
        monkeypatch.setattr(vllm_archs, "registry_source", lambda s=source: s)
        assert vllm_archs.unserved_architecture({"architectures": [FOO]}) is None


@pytest.fixture(scope="module")
def vllm_registry() -> set[str]:
    """vLLM's own registry, its general plugins (ours) loaded as its server loads them: ~7 s of imports."""
    from vllm.model_executor.models.registry import ModelRegistry
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    return set(ModelRegistry.get_supported_archs())


def test_the_source_read_agrees_with_vllms_registry(vllm_registry: set[str]) -> None:
    from llmfast.serve.vllm_archs import vllm_architectures
    from llmfast.serve.vllm_plugin import ARCHITECTURE

    vllm_architectures.cache_clear()
    assert vllm_architectures() == vllm_registry
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM", ARCHITECTURE} <= vllm_registry and FOO not in vllm_registry
