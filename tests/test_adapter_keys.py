"""An adapter whose weights file holds tensors the model has no module for (trained on a deeper model of the family,
or with its modules renamed): PEFT and vLLM skip them without a word and run the adapter in part, or not at all.
Every verb that reads an adapter refuses it in one line naming the first such tensors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from llmfast.errors import UserError
from tests.conftest import run_cli

HUB_BASE = "HuggingFaceTB/SmolLM2-360M"  # a base named as the hub names it: not here to compare architectures


@pytest.fixture(scope="module")
def deeper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-layer model of the tiny Llama's family (the tiny one has 2 layers)."""
    from llmfast.testing import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("deeper") / "deep", num_layers=3)


def _adapter(base: Path, out: Path, base_name: str, target_modules: list[str] | None = None) -> Path:
    """A LoRA adapter trained (moved off its initial values) on `base`, recording `base_name` as its base."""
    import peft
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules or ["q_proj"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    cfg = out / "adapter_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "base_model_name_or_path": base_name}))
    return out


def _rename(adapter: Path, out: Path, old: str, new: str) -> Path:
    shutil.copytree(adapter, out)
    f = out / "adapter_model.safetensors"
    save_file({k.replace(old, new): v for k, v in load_file(f).items()}, f)
    return out


FIRST = "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"


def test_peft_skips_an_adapters_extra_layers_without_a_word(tiny_dir, deeper, tmp_path):
    """The behaviour the checks stand in for: the deeper model's adapter loads onto the shallower base with no
    error, its layer 2 dropped; PEFT 0.21 said nothing, 0.22 warns (one warning among a run's many, listing the
    keys), and the model runs either way."""
    import warnings

    import peft
    from packaging.version import Version
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ad = _adapter(deeper, tmp_path / "ad", str(deeper))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(ad))
    said = [str(w.message) for w in caught if "layers.2" in str(w.message)]
    if Version(peft.__version__) < Version("0.22"):
        assert not said
    else:
        assert len(said) == 1 and "unexpected adapter keys" in said[0], said
    assert sum(n.endswith("q_proj.lora_A") for n, _ in model.named_modules()) == 2


def test_eval_and_bench_load_refuses_an_adapter_of_a_deeper_model(tiny_dir, deeper, tmp_path):
    """load_model (eval, bench's transformers engine) ran layers 0-1 of the adapter and dropped layer 2 (fixed)."""
    from llmfast.models import load_model

    ad = _adapter(deeper, tmp_path / "ad", HUB_BASE)
    with pytest.raises(UserError, match=rf"adapter_model\.safetensors: 2 of its tensors match no module of {tiny_dir} "
                                        rf"\({FIRST}, .*lora_B\.weight\): PEFT would skip them .* trained on another "
                                        r"model \(more layers"):
        load_model(tiny_dir, adapter=ad)
    load_model(deeper, adapter=ad)  # on its own base it loads


def test_renamed_modules_are_named_as_unknown_not_as_an_incomplete_file(tiny_dir, tmp_path):
    """Modules renamed (another naming of the family): every tensor is unknown; this was "N LoRA tensor(s) its
    config needs are missing: the file is incomplete", though the file is whole."""
    from llmfast.models import load_model

    ad = _rename(_adapter(tiny_dir, tmp_path / "ad", str(tiny_dir)), tmp_path / "ren", "model.layers.", "model.h.")
    with pytest.raises(UserError, match=r"4 of its tensors match no module of .*\(base_model\.model\.model\.h\.0\."
                                        r"self_attn\.q_proj\.lora_A\.weight"):
        load_model(tiny_dir, adapter=ad)
    # one line: PEFT's warning listing every missing key came before it (a process of its own: pytest records
    # warnings, the command prints them)
    p = subprocess.run([sys.executable, "-m", "llmfast", "export", str(ad), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    lines = [line for line in p.stderr.strip().splitlines() if not line.startswith("Loading weights")]
    assert p.returncode == 2 and len(lines) == 1 and "4 of its tensors match no module" in lines[0], p.stderr[-2000:]


def test_lora_on_a_module_the_config_does_not_target_is_refused(tiny_dir, tmp_path):
    """The file's k_proj matrices with a config that targets q_proj alone: PEFT puts no LoRA on k_proj, and skipped
    them in silence."""
    from llmfast.models import load_model

    ad = _adapter(tiny_dir, tmp_path / "ad", str(tiny_dir), ["q_proj", "k_proj"])
    cfg = ad / "adapter_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "target_modules": ["q_proj"]}))
    with pytest.raises(UserError, match=r"4 of its tensors match no module .*layers\.0\.self_attn\.k_proj\.lora_A"):
        load_model(tiny_dir, adapter=ad)


def test_export_refuses_an_adapter_of_a_deeper_model_in_one_line(tiny_dir, deeper, tmp_path):
    ad = _adapter(deeper, tmp_path / "ad", str(tiny_dir))  # its recorded base re-pointed at the shallower model
    code, _, err = run_cli("export", str(ad), str(tmp_path / "out"))
    last = err.strip().splitlines()[-1]
    assert code == 2 and f"2 of its tensors match no module of {tiny_dir} ({FIRST}" in last, err[-2000:]
    assert "Traceback" not in err and "Found missing adapter keys" not in err and not (tmp_path / "out").exists()


def test_merge_refuses_an_adapter_of_a_deeper_model(tiny_dir, deeper, tmp_path):
    """Merge reads the adapter itself (merge/adapters.py): a module the base lacks was already one line."""
    ad = _adapter(deeper, tmp_path / "ad", str(tiny_dir))
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(tiny_dir),
                                   "models": [{"model": str(ad), "parameters": {"weight": 1.0}}]}))
    code, _, err = run_cli("merge", str(cfg), str(tmp_path / "out"), "--no-progress")
    assert code == 2 and "changes model.layers.2.self_attn.q_proj.weight, which the base model lacks" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("for_vllm", [True, False], ids=["serve", "bench"])
def test_serve_refuses_an_adapter_of_a_deeper_model_before_vllm_starts(tiny_dir, deeper, tmp_path, for_vllm):
    """vLLM 0.32 (LoRAModelManager.activate_adapter) sets each of its modules' LoRA from the adapter and skips the
    rest: only a debug log, and only when no module at all got one. With the recorded base on the hub (its
    architecture not here to compare), the served model's modules are the check."""
    from llmfast.serve.lora import check_lora

    ad = _adapter(deeper, tmp_path / "ad", HUB_BASE)
    with pytest.raises(UserError, match=rf"LoRA 'x': {ad}/adapter_model\.safetensors: 2 of its tensors match no module "
                                        rf"of the served model {tiny_dir} \({FIRST}, "):
        check_lora("x", ad, base=tiny_dir, for_vllm=for_vllm)
    assert check_lora("x", ad, base=deeper, for_vllm=for_vllm).rank == 4
    ren = _rename(ad, tmp_path / "ren", "model.layers.", "model.h.")
    with pytest.raises(UserError, match=r"6 of its tensors match no module of the served model .*model\.h\.0\."):
        check_lora("x", ren, base=deeper, for_vllm=for_vllm)
    if not for_vllm:  # the tied head is in no stored weight's name, but is a module: transformers runs its LoRA
        head = _adapter(tiny_dir, tmp_path / "head", str(tiny_dir), ["q_proj", "lm_head"])
        assert "has a LoRA on lm_head" in check_lora("x", head, base=tiny_dir, for_vllm=False).vllm_refusal


def test_resume_refuses_a_checkpoint_adapter_with_tensors_the_run_lacks(tiny_dir, tmp_path):
    """finetune --resume: a checkpoint's adapter with another layer's LoRA was already refused by name."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from llmfast.finetune.checkpoint import SavedTraining, load_adapter

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir), LoraConfig(r=4, target_modules=["q_proj"]))
    adapter = dict(get_peft_model_state_dict(model))
    adapter[FIRST] = adapter[FIRST.replace("layers.2", "layers.1")].clone()
    with pytest.raises(UserError, match=rf"adapter\.safetensors: does not fit this run's adapter \(unexpected {FIRST}"):
        load_adapter(model, tmp_path, SavedTraining(adapter, {}, {}, {}))


def test_loading_an_adapter_asks_no_hub_for_its_recorded_base(tiny_dir, tmp_path, recwarn):
    """The check of the adapter's tensors took PEFT's state dict with its "auto" saved embeddings, which looks the
    base up on the hub by the id the config records (every downloaded adapter names one): a request per load, and
    offline (as here) a warning that it "could not find a config file"."""
    from llmfast.models import load_model

    load_model(tiny_dir, adapter=_adapter(tiny_dir, tmp_path / "ad", HUB_BASE))
    assert not [w for w in recwarn if "Could not find a config file" in str(w.message)]


def test_a_saved_module_with_children_loads_and_one_of_a_deeper_model_is_refused(tiny_dir, deeper, tmp_path):
    """modules_to_save on a block (an MLP): the file holds its children by their own names (mlp.down_proj.weight),
    which in the loaded model are below PEFT's wrapper (mlp.modules_to_save.default.down_proj): a whole adapter was
    refused as matching no module. It runs as PEFT runs it; a deeper model's saved block is still refused."""
    from tests.test_foreign_adapters import IDS, _make, _peft

    from llmfast.models import load_model

    ad = _make(tiny_dir, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj"],
               modules_to_save=["model.layers.1.mlp"])
    with torch.no_grad():
        assert torch.equal(load_model(tiny_dir, adapter=ad)(IDS).logits, _peft(tiny_dir, ad)[0])
    deep = _make(deeper, tmp_path / "deep", r=4, lora_alpha=8, target_modules=["q_proj"],
                 modules_to_save=["model.layers.2.mlp"])
    with pytest.raises(UserError, match=r"match no module .*layers\.2\."):
        load_model(tiny_dir, adapter=deep)
