"""`llmfast export`: outputs that could lose files are refused before anything loads; adapters from plain
PEFT (no tokenizer, no manifest) and adapters of another base are handled in one line."""

import json
import shutil

import pytest
import torch

from conftest import run_cli


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory, tiny_dir):
    """An adapter as plain PEFT saves it: adapter files only, random B so the merge changes the model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    out = tmp_path_factory.mktemp("peft") / "adapter"
    peft.save_pretrained(out)
    assert not (out / "tokenizer_config.json").exists() and not (out / "llmfast.json").exists()
    return out


def _snapshot(d):
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_plain_peft_adapter_exports_with_the_base_tokenizer(tmp_path, tiny_dir, peft_adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    code, out, err = run_cli("export", str(peft_adapter), str(tmp_path / "merged"))
    assert code == 0, err
    merged_dir = tmp_path / "merged"
    assert AutoTokenizer.from_pretrained(merged_dir).get_vocab() == AutoTokenizer.from_pretrained(tiny_dir).get_vocab()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), peft_adapter).eval()
    with torch.no_grad():
        ref, got = peft(ids).logits, AutoModelForCausalLM.from_pretrained(merged_dir).eval()(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)  # float32 rounding of x(W+sBA) vs xW+s(xA)B
    assert json.loads((merged_dir / "llmfast.json").read_text())["base_quantization"] is None


def test_existing_output_needs_overwrite(tmp_path, peft_adapter):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli("export", str(peft_adapter), str(out))
    assert code == 2 and "already exists" in err and "--overwrite" in err and "Traceback" not in err
    assert (out / "notes.txt").read_text() == "mine"
    code, _, err = run_cli("export", str(peft_adapter), str(out), "--overwrite")  # not llmfast's: kept (s42)
    assert code == 2 and "holds files llmfast did not write" in err and (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    assert run_cli("export", str(peft_adapter), str(out), "--overwrite")[0] == 0  # an empty folder
    code, _, err = run_cli("export", str(peft_adapter), str(out), "--overwrite")  # an export: replaced
    assert code == 0, err
    assert (out / "model.safetensors").is_file() and (out / "llmfast.json").is_file()


@pytest.mark.parametrize("target", ["adapter", "folder holding the adapter", "base"])
def test_an_input_is_never_the_output(tmp_path, tiny_dir, peft_adapter, target):
    adapter = tmp_path / "runs" / "ad"
    shutil.copytree(peft_adapter, adapter)
    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(base)}))
    out = {"adapter": adapter, "folder holding the adapter": adapter.parent, "base": base}[target]
    before = _snapshot(adapter), _snapshot(base)
    code, _, err = run_cli("export", str(adapter), str(out), "--overwrite")
    assert code == 2 and "would destroy the input" in err and len(err.strip().splitlines()) == 1, err
    assert (_snapshot(adapter), _snapshot(base)) == before


def test_an_adapter_naming_a_hub_base_exports_with_base(tmp_path, tiny_dir, peft_adapter, monkeypatch):
    """A plain PEFT adapter names its base by hub id: export refused it as "not a local directory" with no way
    to give a local copy (s42's review). Offline, the fetch fails in one line that says --base; --base takes a
    local copy, and refuses other weights where the recorded base is here to compare."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    adapter = tmp_path / "ad"
    shutil.copytree(peft_adapter, adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "someorg/tiny"}))
    code, _, err = run_cli("export", str(adapter), str(tmp_path / "out"))
    last = err.strip().splitlines()[-1]
    assert code == 2 and "its base model someorg/tiny: could not fetch 'someorg/tiny'" in last, err
    assert "--base" in last and len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    assert run_cli("export", str(adapter), str(tmp_path / "out"), "--base", str(tiny_dir))[0] == 0
    assert run_cli("export", str(peft_adapter), str(tmp_path / "ref"))[0] == 0  # its recorded base: tiny_dir
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        got, ref = (AutoModelForCausalLM.from_pretrained(tmp_path / d).eval()(ids).logits for d in ("out", "ref"))
    assert torch.equal(got, ref)
    other = tmp_path / "other"
    shutil.copytree(tiny_dir, other)
    from safetensors.torch import load_file, save_file

    weights = {k: v * 2 for k, v in load_file(other / "model.safetensors").items()}
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli("export", str(peft_adapter), str(tmp_path / "o2"), "--base", str(other))
    assert code == 2 and f"was trained on {tiny_dir}, whose weights differ" in err and not (tmp_path / "o2").exists()
    AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    shutil.copy(tiny_dir / "tokenizer.json", tmp_path / "bf16")
    shutil.copy(tiny_dir / "tokenizer_config.json", tmp_path / "bf16")
    code, _, err = run_cli("export", str(peft_adapter), str(tmp_path / "o3"), "--base", str(tmp_path / "bf16"))
    assert code == 0, err[-1500:]  # the same base in bfloat16 (its bf16 release) is the same base


def test_adapter_of_another_base_is_one_line(tmp_path, peft_adapter):
    from llmfast.testing import build_tiny_llama

    other = build_tiny_llama(tmp_path / "other", hidden_size=64, num_heads=1, head_dim=64)
    adapter = tmp_path / "ad"
    shutil.copytree(peft_adapter, adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(other)}))
    code, _, err = run_cli("export", str(adapter), str(tmp_path / "out"))
    last = err.strip().splitlines()[-1]
    assert code == 2 and "does not fit the model" in last and "has another shape" in last, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_a_merge_that_is_not_finite_is_refused(tmp_path, tiny_dir, peft_adapter):
    """float16 turned a base weight beyond its range into inf, and a diverged adapter merged as NaN: both exported
    with exit 0 into a model whose perplexity was NaN (found by hand, s42)."""
    from safetensors.torch import load_file, save_file

    big = tmp_path / "big"
    shutil.copytree(tiny_dir, big)
    weights = load_file(big / "model.safetensors")
    weights["model.layers.0.mlp.down_proj.weight"][0, 0] = 1e6
    save_file(weights, big / "model.safetensors", metadata={"format": "pt"})
    on_big = tmp_path / "on-big"
    shutil.copytree(peft_adapter, on_big)
    cfg = json.loads((on_big / "adapter_config.json").read_text())
    (on_big / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(big)}))
    code, _, err = run_cli("export", str(on_big), str(tmp_path / "fp16"), "--dtype", "float16")
    assert code == 2 and err.strip().splitlines()[-1] == (
        "llmfast: error: model.layers.0.mlp.down_proj.weight is not finite once merged in float16: export in bfloat16 "
        "or float32 (--dtype): a weight is beyond float16's range (+-65504)"), err
    assert run_cli("export", str(on_big), str(tmp_path / "bf16"), "--dtype", "bfloat16")[0] == 0
    nan = tmp_path / "nan"
    shutil.copytree(peft_adapter, nan)
    lora = load_file(nan / "adapter_model.safetensors")
    key = next(k for k in lora if "lora_B" in k)
    lora[key][0, 0] = float("nan")
    save_file(lora, nan / "adapter_model.safetensors")
    code, _, err = run_cli("export", str(nan), str(tmp_path / "out"))
    assert code == 2 and "is not finite once merged in float32: the base model or the adapter holds inf or NaN" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16", "big", "nan", "on-big"]


def test_arguments_are_refused_before_torch_is_imported(tmp_path, peft_adapter):
    """A missing adapter, an existing output and an unknown dtype: one line and exit 2 from the files alone (s53: it
    took 5.7 s, importing transformers and torch before looking at its arguments; every other verb took 0.2 s)."""
    from tests.test_cli import _errs_without_torch

    missing = tmp_path / "nonexistent"
    assert _errs_without_torch("export", str(missing), str(tmp_path / "x")).splitlines() == [
        f"llmfast: error: {missing} is not a PEFT adapter directory (no adapter_config.json)"]
    (tmp_path / "out").mkdir()
    err = _errs_without_torch("export", str(peft_adapter), str(tmp_path / "out"))
    assert len(err.splitlines()) == 1 and "already exists" in err and "--overwrite" in err, err
    assert _errs_without_torch("export", str(peft_adapter), str(tmp_path / "y"), "--dtype", "bf16").splitlines() == [
        "llmfast: error: export dtype 'bf16' unknown: use one of float32, bfloat16, float16"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_run_without_its_adapter_yet_says_resume_continues_it(tmp_path):
    """A finetune stopped before its end was "not a PEFT adapter directory" to export (s43's review)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.json").write_text("{}")
    (run / "train_log.jsonl").write_text("")
    code, _, err = run_cli("export", str(run), str(tmp_path / "out"))
    assert code == 2 and "is a finetune run that has no adapter yet" in err and "--resume` continues it" in err, err


def test_a_recipes_relative_model_path_is_never_fetched_from_the_hub(tmp_path, peft_adapter, monkeypatch):
    """`models/tiny` has a hub id's form: after a project moved, export tried to download it (and could merge into
    a hub model of that name). Only a plain PEFT adapter's recorded base is fetched (s43's diff review)."""
    import llmfast.models

    def no_fetch(repo_id):
        raise AssertionError(f"fetched {repo_id} from the hub")

    monkeypatch.setattr(llmfast.models, "_download_from_hub", no_fetch)
    adapter = tmp_path / "ad"
    shutil.copytree(peft_adapter, adapter)
    (adapter / "llmfast.json").write_text(json.dumps({"stage": "finetune", "base_model_path": "/gone/models/tiny",
                                                      "recipe": {"model": "models/tiny"}}))
    # as an earlier llmfast wrote it, the base as typed in adapter_config.json too: still not a hub id (s46)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "models/tiny"}))
    code, _, err = run_cli("export", str(adapter), str(tmp_path / "out"))
    assert code == 2 and "its base model '/gone/models/tiny' is not a local directory" in err, err
    assert "--base" in err and "run from the folder its recipe's model path is relative to" in err


def test_an_adapter_that_ships_its_own_tokenizer_exports_with_it(tmp_path, tiny_dir, peft_adapter):
    """An adapter saved with its tokenizer (llmfast's own, or one with a chat template of its fine-tune) is exported
    with that tokenizer, not the base's (s44's mutation audit: the base's could replace it unnoticed)."""
    from transformers import AutoTokenizer

    adapter = shutil.copytree(peft_adapter, tmp_path / "adapter")
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.chat_template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    tok.save_pretrained(adapter)
    assert AutoTokenizer.from_pretrained(tiny_dir).chat_template != tok.chat_template
    code, _, err = run_cli("export", str(adapter), str(tmp_path / "merged"))
    assert code == 0, err
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == tok.chat_template


@pytest.mark.parametrize("saved_in", ["tokenizer_config.json", "chat_template.jinja"])
def test_an_adapter_with_its_template_but_no_vocabulary_exports_with_that_template(tmp_path, tiny_dir, peft_adapter,
                                                                                    saved_in):
    """An adapter folder with the chat template it was trained with but no vocabulary file gives the merged model
    that template on the base's tokens, as eval prompts the adapter (serve --lora refuses it and says to export it:
    with the base's template the merged model would be served with the wrong one)."""
    from transformers import AutoTokenizer

    adapter = shutil.copytree(peft_adapter, tmp_path / "adapter")
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    if saved_in == "tokenizer_config.json":
        cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())
        (adapter / saved_in).write_text(json.dumps({**cfg, "chat_template": template}))
    else:
        (adapter / saved_in).write_text(template)
    assert AutoTokenizer.from_pretrained(tiny_dir).chat_template != template
    code, _, err = run_cli("export", str(adapter), str(tmp_path / "merged"))
    assert code == 0, err
    merged = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert merged.chat_template == template
    assert merged.get_vocab() == AutoTokenizer.from_pretrained(tiny_dir).get_vocab()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_export_writes_the_merge_in_the_dtype_asked_for(tmp_path, tiny_dir, peft_adapter, dtype):
    """--dtype bfloat16/float16: every weight written in it, each PEFT's float32 merge rounded to it once (the
    float32 base is merged in float32, not rounded before the merge and again after it), and the dtype recorded in
    llmfast.json and config.json (s46's mutation audit: a bfloat16 export written in float32 passed)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    code, _, err = run_cli("export", str(peft_adapter), str(tmp_path / "out"), "--dtype", dtype)
    assert code == 0, err
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert {v.dtype for v in got.values()} == {getattr(torch, dtype)}
    base = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict().items()}
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), peft_adapter).merge_and_unload()
    ref = {k: v for k, v in ref.state_dict().items() if k in got}
    assert ref.keys() == got.keys()
    merged = 0
    for k, v in got.items():  # rounded once from the float32 merge (s53: loaded in bfloat16, W was rounded first)
        assert torch.equal(v, ref[k].to(v.dtype)), k
        merged += bool((ref[k] - base[k]).abs().max() > 1e-3)
    assert merged == 4, "q_proj and v_proj of both layers changed by the adapter"
    manifest = json.loads((tmp_path / "out" / "llmfast.json").read_text())
    assert manifest["stage"] == "export" and manifest["recipe"] == {"dtype": dtype}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == dtype


@pytest.mark.parametrize("dtype, trained_in", [("bfloat16", None), ("float16", None), ("float32", "bfloat16")])
def test_a_qlora_export_is_its_nf4_base_plus_the_delta_rounded_once(tmp_path, tiny_dir, peft_adapter, dtype,
                                                                    trained_in):
    """A QLoRA adapter exported: each merged weight is its NF4 base weight as trained (bitsandbytes quantizes the
    stored weight in the training's dtype, float32 where the manifest records none, and decodes it in that dtype)
    plus s B @ A, computed here in float64 and rounded once: within half a step of the output dtype at that value,
    plus float32's own error on the merge (a few 2^-24 of its terms).
    s53: in 16 bits the base was quantized from rounded weights (some NF4 codes one level off, errors up to 2.4e-2
    where one rounding is 4.9e-4), dequantized in that dtype and rounded again with the delta added; in float32 an
    adapter trained in bfloat16 was merged into a base quantized from float32 weights (other scales and codes)."""
    import bitsandbytes as bnb
    import numpy as np
    from safetensors.torch import load_file

    from tests.test_dtypes import _bound

    adapter = shutil.copytree(peft_adapter, tmp_path / "qlora")
    (adapter / "llmfast.json").write_text(json.dumps({
        "stage": "finetune", "base_model_path": str(tiny_dir), "metrics": {"dtype": trained_in} if trained_in else {},
        "quantization": {"method": "bnb4", "type": "nf4", "double_quant": True}}))
    code, _, err = run_cli("export", str(adapter), str(tmp_path / "out"), "--dtype", dtype)
    assert code == 0, err
    got, stored = load_file(tmp_path / "out" / "model.safetensors"), load_file(tiny_dir / "model.safetensors")
    lora = {k.removeprefix("base_model.model."): v.double() for k, v in
            load_file(adapter / "adapter_model.safetensors").items()}
    checked = 0
    for name in (k.removesuffix(".lora_A.weight") for k in lora if k.endswith(".lora_A.weight")):
        weight = stored[f"{name}.weight"].to(getattr(torch, trained_in or "float32"))
        packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
        w = bnb.functional.dequantize_4bit(packed, state).double()
        b, a = lora[f"{name}.lora_B.weight"], lora[f"{name}.lora_A.weight"]
        ref, scale = (w + (8 / 4) * (b @ a)).numpy(), (w.abs() + (8 / 4) * (b.abs() @ a.abs())).numpy()
        out = got[f"{name}.weight"]
        assert out.dtype == getattr(torch, dtype)
        tag = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[dtype]
        err = np.abs(out.double().numpy() - ref) - _bound(ref, scale, tag)
        assert (err <= 0).all(), (name, err.max(), (err > 0).sum())
        checked += 1
    assert checked == 4  # q_proj and v_proj of both layers


def test_a_qlora_merge_holds_one_layer_in_float32_at_a_time(tiny_dir, peft_adapter):
    """A QLoRA export decodes its NF4 base in float32 one layer at a time, rounding each to --dtype before the next
    (s53: the whole model was decoded to float32 first, twice the memory of the bfloat16 model it writes). After
    each LoRA layer's merge, the float32 weights held (bytes of storage; LoRA's own A and B aside) are that layer's
    plus a 4-byte stand-in for each changed layer still in 4 bits; the merged model is all bfloat16."""
    from llmfast.finetune.export import _merge
    from llmfast.quant import manifest_quantization

    quant = manifest_quantization({"quantization": {"method": "bnb4", "type": "nf4", "double_quant": True}})
    held = []

    def count(model):
        storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for name, p in
                    model.named_parameters() if p.dtype == torch.float32 and ".lora_" not in name}
        held.append(sum(storages.values()))

    merged = _merge(tiny_dir, peft_adapter, "bfloat16", quant, None, "float32", on_layer=count)
    attn = merged.model.layers[0].self_attn
    q, v = (layer.weight.numel() * 4 for layer in (attn.q_proj, attn.v_proj))
    assert held == [q + 3 * 4, v + 2 * 4, q + 4, v]  # layer 0's q_proj, v_proj, then layer 1's
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}


def test_a_bfloat16_merge_holds_one_layer_in_float32_at_a_time(tiny_dir, peft_adapter, tmp_path):
    """A base stored in bfloat16, exported in bfloat16: each LoRA layer is widened to float32 for its merge and
    rounded before the next (s53 widened every changed layer first: with `all-linear`, nearly the whole model)."""
    from transformers import AutoModelForCausalLM

    from llmfast.finetune.export import _merge

    base = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16).save_pretrained(base)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir / f, base / f)
    held = []

    def count(model):
        held.append(sum(p.numel() * 4 for name, p in model.named_parameters()
                        if p.dtype == torch.float32 and ".lora_" not in name))

    merged = _merge(base, peft_adapter, "bfloat16", None, None, "float32", on_layer=count)
    attn = merged.model.layers[0].self_attn
    q, v = (layer.weight.numel() * 4 for layer in (attn.q_proj, attn.v_proj))
    assert held == [q, v, q, v]  # layer 0's q_proj, v_proj, then layer 1's: one at a time
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}


def test_a_gpt2_adapter_merges_to_what_export_writes(tmp_path, tiny_dir):
    """GPT-2 keeps its projections in Conv1D layers (weights stored inputs by outputs), so PEFT's adapter is
    fan_in_fan_out and its delta is (B @ A).T; merge refused such adapters outright (found by driving every verb on
    other families, s47). Task arithmetic of one adapter at weight 1 is the adapter merged in: export's weights."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=1024, n_positions=64, n_embd=64, n_layer=1, n_head=2)).save_pretrained(base)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir / f, base / f)
    torch.manual_seed(0)
    peft = get_peft_model(GPT2LMHeadModel.from_pretrained(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    assert run_cli("export", str(tmp_path / "adapter"), str(tmp_path / "exported"))[0] == 0
    (tmp_path / "ta.yaml").write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                                      f"  - {{model: {tmp_path / 'adapter'}, parameters: {{weight: 1.0}}}}\n")
    code, _, err = run_cli("merge", str(tmp_path / "ta.yaml"), str(tmp_path / "merged"))
    assert code == 0, err
    merged, exported = (load_file(tmp_path / d / "model.safetensors") for d in ("merged", "exported"))
    before = load_file(base / "model.safetensors")
    key = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(exported[key], before[key])  # the adapter changes it
    for k, v in exported.items():
        torch.testing.assert_close(merged[k], v, rtol=0, atol=1e-6, msg=k)


def test_export_of_a_bfloat16_base_notes_its_float32_output(tmp_path, tiny_dir):
    """export writes float32 by default (the whole delta, rounded once): for a bfloat16 base that is twice its size,
    said in one note naming the flag that keeps bfloat16; with --dtype bfloat16 no note."""

    from safetensors.torch import load_file, save_file

    from tests.test_foreign_adapters import _make

    base = tmp_path / "bf16"
    shutil.copytree(tiny_dir, base)
    sd = load_file(base / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, base / "model.safetensors", metadata={"format": "pt"})
    ad = _make(base, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj"])
    code, _, err = run_cli("export", str(ad), str(tmp_path / "f32"))
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("llmfast: note:")]
    assert len(notes) == 1 and "stores its full-precision tensors in float32 (--dtype)" in notes[0], err
    assert notes[0].endswith("--dtype bfloat16 keeps them as stored")
    code, _, err = run_cli("export", str(ad), str(tmp_path / "bf"), "--dtype", "bfloat16")
    assert code == 0 and "llmfast: note:" not in err, err
