"""Adapters made by other tools (PEFT directly, TRL, Unsloth, Axolotl, LLaMA-Factory), with the options our finetune
never writes, through every verb that takes one: export and merge give what PEFT's own merge_and_unload gives, and
eval/bench (transformers) what PEFT's model gives, or the verb refuses in one line before anything is written.
Serve's checks refuse first what vLLM would refuse only after its start-up (no vLLM starts here)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from llmfast.errors import UserError
from tests.conftest import run_cli

IDS = torch.tensor([[1, 5, 9, 30, 200, 7, 3, 11]])


def _make(base: Path, out: Path, kind: str = "lora", seed: int = 0, **options) -> Path:
    """A PEFT adapter as another tool saves it, every trainable tensor moved off its initial value."""
    import peft
    from transformers import AutoModelForCausalLM

    save = options.pop("save_embedding_layers", "auto")
    torch.manual_seed(seed)
    config = {"lora": peft.LoraConfig, "prompt": peft.PromptTuningConfig}[kind](**options)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out, save_embedding_layers=save)
    return out


def _peft(base: Path, adapter: Path) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PEFT's own answer: the adapted model's logits and its merge_and_unload's weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter))
    with torch.no_grad():
        logits = model.eval()(IDS).logits
    return logits, model.merge_and_unload().state_dict()


def _logits(model_dir: Path, adapter: Path | None = None) -> torch.Tensor:
    from llmfast.models import load_model

    with torch.no_grad():
        return load_model(model_dir, "float32", adapter=adapter)(IDS).logits


def _merge_config(tmp: Path, base: Path, adapter: Path) -> Path:
    cfg = tmp / "merge.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(base),
                                   "models": [{"model": str(adapter), "parameters": {"weight": 1.0}}]}))
    return cfg


LORA = {"r": 4, "lora_alpha": 8, "task_type": "CAUSAL_LM"}


@pytest.mark.parametrize("options", [
    {"target_modules": r".*\.(q|up)_proj"},  # a regex string
    {"target_modules": "all-linear", "exclude_modules": ["v_proj", "down_proj"]},
    {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
    {"target_modules": ["q_proj", "v_proj"], "task_type": None},
], ids=["regex", "exclude", "layers", "no-task-type"])
def test_foreign_options_export_merge_and_run_as_peft_does(tiny_dir, tmp_path, options):
    ad = _make(tiny_dir, tmp_path / "ad", **{**LORA, **options})
    live, merged = _peft(tiny_dir, ad)
    assert run_cli("export", str(ad), str(tmp_path / "exp"))[0] == 0
    code, _, err = run_cli("merge", str(_merge_config(tmp_path, tiny_dir, ad)), str(tmp_path / "mrg"), "--no-progress")
    assert code == 0, err
    for out in (tmp_path / "exp", tmp_path / "mrg"):
        got = load_file(out / "model.safetensors")
        for k, v in got.items():
            torch.testing.assert_close(v, merged[k], rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(tiny_dir, ad), live, rtol=0, atol=1e-6)  # eval's and bench hf's model


def test_fan_in_fan_out_on_linear_layers_merges_untransposed(tiny_dir, tmp_path):
    """PEFT ignores fan_in_fan_out on a torch Linear (it warns and sets it false): merge read the config's flag and
    merged q_proj and o_proj (square here) transposed, 0.83 off in logits, exit 0."""
    ad = _make(tiny_dir, tmp_path / "ad", **LORA, target_modules=["q_proj", "o_proj"])
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "fan_in_fan_out": True}))
    _, merged = _peft(tiny_dir, ad)
    code, _, err = run_cli("merge", str(_merge_config(tmp_path, tiny_dir, ad)), str(tmp_path / "mrg"), "--no-progress")
    assert code == 0, err
    got = load_file(tmp_path / "mrg" / "model.safetensors")
    assert not torch.equal(got["model.layers.0.self_attn.o_proj.weight"],
                           load_file(tiny_dir / "model.safetensors")["model.layers.0.self_attn.o_proj.weight"])
    for k, v in got.items():
        torch.testing.assert_close(v, merged[k], rtol=0, atol=1e-6)


def test_lora_bias_runs_unmerged_as_peft_runs_it(tiny_dir, tmp_path):
    """lora_bias saves `lora_B.bias`, which has no lora_A partner: it was refused everywhere as an incomplete file."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ad = _make(tiny_dir, tmp_path / "ad", **LORA, target_modules=["q_proj"], lora_bias=True)
    with torch.no_grad():
        live = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(ad)).eval()(IDS).logits
    torch.testing.assert_close(_logits(tiny_dir, ad), live, rtol=0, atol=1e-6)


def _retype(ad: Path, **changes) -> Path:
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))
    return ad


# (how the adapter is made, the verb, what the one line says); each ran, or ran wrong, before
REFUSED = {
    "seq-cls": (lambda b, d: _make(b, d, **{**LORA, "task_type": "SEQ_CLS"}, target_modules=["q_proj"]),
                "export", "task_type SEQ_CLS: the adapter was trained for another task"),
    "prompt-tuning": (lambda b, d: _make(b, d, "prompt", num_virtual_tokens=4, task_type="CAUSAL_LM"),
                      "export", "peft_type PROMPT_TUNING adds learned virtual tokens"),
    "layer-replication": (lambda b, d: _make(b, d, **LORA, target_modules=["q_proj"],
                                             layer_replication=[[0, 2], [1, 2]]),
                          "export", "layer_replication \\[\\[0, 2\\], \\[1, 2\\]\\]: the adapter stacks copies"),
    "tied-embedding-lora": (lambda b, d: _make(b, d, **LORA, target_modules=["q_proj", "embed_tokens"]),
                            "export", "LoRA on model.embed_tokens .* ties its input embedding and output head"),
    "tied-head-lora": (lambda b, d: _make(b, d, **LORA, target_modules=["q_proj", "lm_head"]),
                       "export", "LoRA on lm_head .* ties its input embedding and output head"),
    "dora-weights-no-flag": (lambda b, d: _retype(_make(b, d, **LORA, target_modules=["q_proj"], use_dora=True),
                                                  use_dora=False),
                             "export", "lora_magnitude_vector .* no 'use_dora: true', so PEFT would skip them"),
    "lora-bias-without-bias": (lambda b, d: _make(b, d, **LORA, target_modules=["q_proj"], lora_bias=True),
                               "export", "lora_bias: .* which has none, so PEFT cannot merge it"),
    "merge-tied-embedding-lora": (lambda b, d: _make(b, d, **LORA, target_modules=["q_proj", "embed_tokens"],
                                                     save_embedding_layers=False),
                                  "merge", "LoRA on model.embed_tokens of a base that ties its input embedding"),
    "pissa": (lambda b, d: _make(b, d, **LORA, target_modules=["q_proj"], init_lora_weights="pissa"),
              "merge", "init_lora_weights 'pissa' changes the base weights when PEFT loads the adapter"),
    # its blocks were read as whole matrices: refused as trained on another base, or as of two ranks
    "bdlora": (lambda b, d: _make(b, d, **LORA, target_modules=["q_proj", "o_proj"], use_bdlora={
        "target_modules_bd_a": ["q_proj"], "target_modules_bd_b": ["o_proj"], "nblocks": 2}),
               "merge", "use_bdlora: BD-LoRA stores its block-diagonal A or B as their blocks"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_foreign_adapters_refused_in_one_line(tiny_dir, tmp_path, case):
    make, verb, message = REFUSED[case]
    ad = make(tiny_dir, tmp_path / "ad")
    out = tmp_path / "out"
    args = ("export", str(ad), str(out)) if verb == "export" else \
        ("merge", str(_merge_config(tmp_path, tiny_dir, ad)), str(out), "--no-progress")
    code, _, err = run_cli(*args)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err) and str(ad) in err, err
    assert not out.exists()


@pytest.mark.parametrize("options,message", [
    ({"modules_to_save": ["lm_head"]}, "modules_to_save \\['lm_head'\\], which vLLM cannot serve"),
    ({"bias": "all"}, "bias 'all', which vLLM cannot serve"),
    ({"lora_bias": True}, "lora_bias, which vLLM cannot serve"),
    ({"init_lora_weights": "olora"}, "init_lora_weights 'olora', which vLLM cannot serve"),
    ({"trainable_token_indices": [1, 2]}, "trainable_token_indices, which vLLM cannot serve"),
    ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication, .*: run it on transformers"),
], ids=["modules-to-save", "bias", "lora-bias", "olora", "trainable-tokens", "layer-replication"])
def test_serve_refuses_what_vllm_refuses_after_starting(tiny_dir, tmp_path, options, message):
    """vLLM's own check (PEFTHelper) refuses these once the server has started: serve's check says so first, and
    bench's transformers engine still takes them."""
    from llmfast.serve.lora import check_lora

    ad = _make(tiny_dir, tmp_path / "ad", **LORA, target_modules=["q_proj"], **options)
    with pytest.raises(UserError, match=message):
        check_lora("x", ad, base=tiny_dir)
    assert check_lora("x", ad, base=tiny_dir, for_vllm=False).vllm_refusal


def test_serve_refuses_tensors_vllm_cannot_read(tiny_dir, tmp_path):
    """A tensor other than a LoRA matrix (trainable token rows here, with the config key gone) stops vLLM's load of
    the adapter after its start-up."""
    from llmfast.serve.lora import check_lora

    ad = _make(tiny_dir, tmp_path / "ad", **LORA, target_modules=["q_proj"], trainable_token_indices=[1, 2])
    _retype(ad, trainable_token_indices=None)
    with pytest.raises(UserError, match="holds .*trainable_tokens_delta .* which vLLM cannot load"):
        check_lora("x", ad, base=tiny_dir)
    shutil.rmtree(ad)
    check_lora("x", _make(tiny_dir, ad, **LORA, target_modules=["q_proj", "embed_tokens"]), base=tiny_dir)


def test_adapter_on_a_prequantized_4bit_base_exports_onto_its_dequantized_weights(tiny_dir, tmp_path):
    """An adapter trained on a bitsandbytes 4-bit model that only its config.json says is quantized (Unsloth's
    `*-bnb-4bit` bases; no llmfast.json): export merged into the 4-bit weights and transformers failed to save them
    (NotImplementedError, a traceback). Now each weight is the base's dequantized weight plus scale * B @ A."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    q4 = tmp_path / "bnb-4bit"
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    model.save_pretrained(q4)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(q4)
    ad = _make(q4, tmp_path / "ad", **LORA, target_modules=["q_proj"])
    code, _, err = run_cli("export", str(ad), str(tmp_path / "exp"))
    assert code == 0, err
    got, lora = load_file(tmp_path / "exp" / "model.safetensors"), load_file(ad / "adapter_model.safetensors")
    for name in ("q_proj", "k_proj"):
        layer = getattr(model.model.layers[1].self_attn, name)
        want = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        key = f"base_model.model.model.layers.1.self_attn.{name}"
        if name == "q_proj":
            want += 8 / 4 * lora[f"{key}.lora_B.weight"] @ lora[f"{key}.lora_A.weight"]
        torch.testing.assert_close(got[f"model.layers.1.self_attn.{name}.weight"], want, rtol=0, atol=1e-6)


def test_adapter_on_a_base_quantized_in_another_format_is_refused(tiny_dir, tmp_path):
    """A base whose config.json names a format export cannot dequantize (GPTQ here) is one line naming --base."""
    base = Path(shutil.copytree(tiny_dir, tmp_path / "gptq"))
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq", "bits": 4}}))
    ad = _retype(_make(tiny_dir, tmp_path / "ad", **LORA, target_modules=["q_proj"]), base_model_name_or_path=str(base))
    code, _, err = run_cli("export", str(ad), str(tmp_path / "exp"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"its base {base} is quantized (gptq)" in err and "--base" in err and not (tmp_path / "exp").exists()


def test_merge_of_an_adapter_naming_a_hub_base_says_how_to_name_a_local_copy(tiny_dir, tmp_path):
    """Adapters from the hub record their base as a hub id, which merge cannot compare with a local base_model: the
    refusal says how to name the local copy (it said only that task vectors must share the base)."""
    ad = _retype(_make(tiny_dir, tmp_path / "ad", **LORA, target_modules=["q_proj"]),
                 base_model_name_or_path="someorg/tiny-llama")
    cfg = _merge_config(tmp_path, tiny_dir, ad)
    code, _, err = run_cli("merge", str(cfg), str(tmp_path / "out"), "--no-progress")
    assert code == 2 and "set base_model_name_or_path in" in err and str(ad / "adapter_config.json") in err, err
    _retype(ad, base_model_name_or_path=str(tiny_dir))
    assert run_cli("merge", str(cfg), str(tmp_path / "out"), "--no-progress")[0] == 0


def _added_tokens_adapter(base: Path, out: Path, modules: list[str], save: str | bool = "auto") -> torch.Tensor:
    """As Axolotl and Unsloth do when tokens are added: resize the base, train LoRA plus the whole resized modules,
    save the tokenizer beside the adapter. Returns the trained model's logits on ids that use the new tokens."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens(["<tool>", "</tool>"])
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    torch.manual_seed(0)
    model = peft.get_peft_model(model, peft.LoraConfig(**LORA, target_modules=["q_proj"], modules_to_save=modules))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
        logits = model.eval()(torch.cat([IDS, torch.tensor([[len(tokenizer) - 1]])], dim=1)).logits
    model.save_pretrained(out, save_embedding_layers=save)  # "auto": PEFT saves the resized embedding and head too
    tokenizer.save_pretrained(out)
    return logits


def test_adapter_with_added_tokens_exports_onto_the_resized_base(tiny_dir, tmp_path):
    """The saved embedding has more rows than the base's: PEFT refused it ("does not fit the model ... use it with
    the base model it was trained on", which it was). Export now grows the base to the saved rows first."""
    live = _added_tokens_adapter(tiny_dir, tmp_path / "ad", ["embed_tokens"])  # tied: the head is the same matrix
    code, _, err = run_cli("export", str(tmp_path / "ad"), str(tmp_path / "exp"))
    assert code == 0, err
    with torch.no_grad():
        ids = torch.cat([IDS, torch.tensor([[live.shape[-1] - 1]])], dim=1)
        from llmfast.models import load_model

        torch.testing.assert_close(load_model(tmp_path / "exp", "float32")(ids).logits, live, rtol=0, atol=1e-5)
        # eval and bench's transformers engine (the base with the adapter on it) grow the base the same way
        with_adapter = load_model(tiny_dir, "float32", adapter=tmp_path / "ad")(ids).logits
        torch.testing.assert_close(with_adapter, live, rtol=0, atol=1e-5)
    # an untied head whose new rows the adapter did not save (PEFT's embedding layers not saved): never kept
    untied = Path(shutil.copytree(tiny_dir, tmp_path / "untied"))
    weights = load_file(untied / "model.safetensors")
    from safetensors.torch import save_file

    save_file({**weights, "lm_head.weight": weights["model.embed_tokens.weight"].clone()}, untied / "model.safetensors")
    (untied / "config.json").write_text(json.dumps({**json.loads((untied / "config.json").read_text()),
                                                    "tie_word_embeddings": False}))
    _added_tokens_adapter(untied, tmp_path / "ad2", ["embed_tokens"], save=False)
    code, _, err = run_cli("export", str(tmp_path / "ad2"), str(tmp_path / "exp2"))
    assert code == 2 and "but not lm_head with as many" in err and not (tmp_path / "exp2").exists(), err


def test_serve_refuses_an_embedding_lora_trained_with_added_tokens(tiny_dir, tmp_path):
    """PEFT saves the resized embedding beside an embedding LoRA; vLLM skips it and then fails on the LoRA's
    vocabulary (1026 against the served 1024) after its start-up."""
    import peft
    from transformers import AutoModelForCausalLM

    from llmfast.serve.lora import check_lora

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model.resize_token_embeddings(model.config.vocab_size + 2, mean_resizing=False)
    peft.get_peft_model(model, peft.LoraConfig(**LORA, target_modules=["embed_tokens"])).save_pretrained(tmp_path / "a")
    with pytest.raises(UserError, match="saved .*embed_tokens.base_layer.weight with 1026 rows, not the served model's "
                                        "1024 \\(tokens added in training\\)"):
        check_lora("x", tmp_path / "a", base=tiny_dir)


@pytest.fixture(scope="module")
def plain_adapter(tiny_dir, tmp_path_factory) -> Path:
    return _make(tiny_dir, tmp_path_factory.mktemp("plain") / "ad", **LORA, target_modules=["q_proj"])


def _verbs(tiny_dir: Path) -> dict:
    """Each verb's checks of an adapter folder before anything loads, as the verb runs them."""
    from llmfast.finetune.export import _check_unmergeable_options
    from llmfast.merge.adapters import LoraAdapter
    from llmfast.modelfiles import check_adapter_dir
    from llmfast.serve.lora import check_lora

    return {"serve": lambda ad: check_lora("x", ad, base=tiny_dir),
            "merge": lambda ad: LoraAdapter.open(check_adapter_dir(ad)),
            "export": lambda ad: _check_unmergeable_options(check_adapter_dir(ad))}


def _judged(verbs: dict, plain: Path, tmp: Path, example: dict) -> dict[str, str | None]:
    """verb -> its one line for the plain adapter with `example` in its config (None: taken)."""
    ad = Path(shutil.copytree(plain, tmp))
    _retype(ad, **example)
    said = {}
    for verb, check in verbs.items():
        try:
            check(ad)
            said[verb] = None
        except UserError as e:
            said[verb] = str(e)
    shutil.rmtree(ad)
    return said


def test_every_adapter_option_is_judged_by_every_verb_as_the_table_says(tiny_dir, plain_adapter, tmp_path):
    """llmfast/adapter_options.py is the one table of what serve, merge and export do with each PEFT option: each
    option's example, put in a plain adapter's config, is refused by a verb with the table's line exactly where the
    table says refused (or common: check_adapter_dir's), and taken where it says fine or handled."""
    from llmfast import adapter_options as ao

    verbs = _verbs(tiny_dir)
    for option in ao.OPTIONS:
        cfg = {**json.loads((plain_adapter / "adapter_config.json").read_text()), **option.example}
        assert option.found(cfg), option.name
        said = _judged(verbs, plain_adapter, tmp_path / "ad", option.example)
        for verb in ao.VERBS:
            verdict, line = option.verdict(verb), said[verb]
            where = f"{option.name}, {verb}: {line}"
            if verdict.kind in ("fine", "handled"):
                assert line is None, where
            elif verdict.kind == "common":
                assert line is not None and verdict.text in line, where
            else:
                found = ao.refusal(cfg, verb)
                assert found is not None and found.option is option, where
                ad = tmp_path / "ad"
                assert line is not None and line.startswith(found.message(
                    verb, path=ad, cfg_path=ad / "adapter_config.json", name="x")), where


def test_the_verbs_read_the_table_at_each_call(tiny_dir, plain_adapter, tmp_path, monkeypatch):
    """With every refusal of the table turned to fine, no verb refuses those options (none keeps a list of its own),
    and an option added to the table is refused by every verb it names."""
    from llmfast import adapter_options as ao

    probe = ao.AdapterOption("probe", "llmfast_probe", {"llmfast_probe": True}, lambda cfg: cfg.get("llmfast_probe"),
                             serve=ao.refused("LoRA '{name}' has the probe"), merge=ao.refused("{path}: the probe"),
                             export=ao.refused("{cfg_path}: the probe {value}"))
    judged = [o for o in ao.OPTIONS if o.key != "peft_type" and any(
        o.verdict(v).kind == "refused" for v in ao.VERBS) and all(o.verdict(v).kind != "common" for v in ao.VERBS)]
    assert len(judged) >= 10
    import dataclasses

    taken = ao.fine("probe")
    monkeypatch.setattr(ao, "OPTIONS", (probe, *(dataclasses.replace(o, serve=taken, merge=taken, export=taken)
                                                 for o in ao.OPTIONS)))
    verbs = _verbs(tiny_dir)
    for option in judged:
        assert _judged(verbs, plain_adapter, tmp_path / "ad", option.example) == dict.fromkeys(ao.VERBS), option.name
    ad = tmp_path / "ad"
    said = _judged(verbs, plain_adapter, ad, probe.example)
    assert said["serve"].startswith(f"LoRA 'x' has the probe ({ad / 'adapter_config.json'}): run it on "
                                    "transformers"), said
    assert said["merge"] == f"{ad}: the probe" and said["export"] == f"{ad / 'adapter_config.json'}: the probe True"


def test_serve_names_export_only_where_export_takes_every_option_set(tiny_dir, plain_adapter, tmp_path):
    """serve's way round for an option vLLM refuses is `llmfast export` only where export takes the whole config: with
    modules_to_save (export merges it) and layer_replication (export refuses it) it sent the user to export, which
    refused; and a peft_type null (read as not set) is no LoRA, for serve and merge as before the table."""
    ad = tmp_path / "ad"
    said = _judged(_verbs(tiny_dir), plain_adapter, ad, {"modules_to_save": ["lm_head"],
                                                         "layer_replication": [[0, 2], [1, 2]]})
    assert said["serve"] == (f"LoRA 'x' has modules_to_save ['lm_head'], which vLLM cannot serve "
                             f"({ad / 'adapter_config.json'}): run it on transformers (eval, bench --engine hf)")
    assert said["export"].startswith(f"{ad / 'adapter_config.json'}: layer_replication [[0, 2], [1, 2]]")
    said = _judged(_verbs(tiny_dir), plain_adapter, ad, {"peft_type": None})
    assert said["serve"] == f"LoRA 'x': {ad / 'adapter_config.json'} is a None adapter; vLLM serves LoRA only"
    assert said["merge"] == f"{ad}: a None adapter; only LoRA adapters can be merged"
