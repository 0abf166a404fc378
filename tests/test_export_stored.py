"""A 16-bit export of a base stored in float32 or in mixed dtypes: each weight read again by name from its file and
rounded once (stored_float32), never the whole model in float32; the bytes are those of the base loaded whole in
float32, merged and rounded (s54's path, still taken where tensors cannot be read again by name)."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli


def _mixed(src, dst):
    """`src` stored as many bfloat16 checkpoints are: bfloat16 weights, float32 norms (here off bfloat16's grid, so
    rounding them shows), and one float16 weight."""
    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(3)
    sd = {}
    for k, v in load_file(src / "model.safetensors").items():
        if k.endswith("norm.weight"):
            sd[k] = v + 1e-3 * torch.randn(v.shape, generator=g)
        else:
            sd[k] = v.to(torch.float16 if k == "model.layers.1.mlp.up_proj.weight" else torch.bfloat16)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from llmfast.testing import build_tiny_llama

    root = tmp_path_factory.mktemp("stored")
    untied = build_tiny_llama(root / "float32", tie_word_embeddings=False)
    sharded = shutil.copytree(untied, root / "sharded", ignore=shutil.ignore_patterns("model.safetensors"))
    AutoModelForCausalLM.from_pretrained(untied).save_pretrained(sharded, max_shard_size="300KB")
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    return {"float32": untied, "mixed": _mixed(untied, root / "mixed"), "sharded": sharded}


def _stored(base):
    return {k: v for f in sorted(base.glob("model*.safetensors")) for k, v in load_file(f).items()}


def _export(adapter, out, monkeypatch=None):
    if monkeypatch is not None:  # s54's path: the base loaded whole in float32
        monkeypatch.setattr("llmfast.finetune.export.rereadable", lambda base: None)
    code, _, err = run_cli("export", str(adapter), str(out), "--dtype", "bfloat16")
    assert code == 0, err
    return load_file(out / "model.safetensors")


def _same_file(a, b):
    return (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


@pytest.mark.parametrize("kind", ["float32", "mixed", "sharded"])
def test_a_wider_or_mixed_base_exports_its_float32_merge_rounded_once(bases, tmp_path, kind, monkeypatch):
    """All-linear LoRA, a LoRA on the embedding and a saved head: every weight is PEFT's merge of the base loaded in
    float32, rounded to bfloat16 once; the float32 norms of the mostly-bfloat16 base stay as stored, bit for bit.
    The same bytes as the base loaded whole in float32 (s54); a sharded base is read again shard by shard."""
    from tests.test_foreign_adapters import _make, _peft

    base = bases[kind]
    adapter = _make(base, tmp_path / "ad", r=4, lora_alpha=8, modules_to_save=["lm_head"], target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"])
    got = _export(adapter, tmp_path / "out")
    ref, stored = _peft(base, adapter)[1], _stored(base)
    keep = {k for k, v in stored.items() if v.dtype == torch.float32} if kind == "mixed" else set()
    assert len(keep) == (5 if kind == "mixed" else 0)  # 2 layers x 2 norms, the final norm
    assert got.keys() == stored.keys()
    for k, v in got.items():
        want = torch.float32 if k in keep else torch.bfloat16
        assert v.dtype == want and torch.equal(v, ref[k].to(want)), k
        if k in keep:
            assert torch.equal(v, stored[k]), k
    assert not torch.equal(got["model.embed_tokens.weight"], stored["model.embed_tokens.weight"].bfloat16())
    _export(adapter, tmp_path / "whole", monkeypatch)
    assert _same_file(tmp_path / "out", tmp_path / "whole")


def test_an_adapter_with_added_tokens_exports_the_same_bytes(tiny_dir, tmp_path, monkeypatch):
    """Tokens added in training: the tied embedding grows to the adapter's saved rows after the base loads, and its
    stored rows are read again below the new ones."""
    from tests.test_foreign_adapters import _added_tokens_adapter

    _added_tokens_adapter(tiny_dir, tmp_path / "ad", ["embed_tokens"])
    got = _export(tmp_path / "ad", tmp_path / "out")
    assert got["model.embed_tokens.weight"].shape[0] == 1026 and {v.dtype for v in got.values()} == {torch.bfloat16}
    _export(tmp_path / "ad", tmp_path / "whole", monkeypatch)
    assert _same_file(tmp_path / "out", tmp_path / "whole")


@pytest.mark.parametrize("kind", ["float32", "mixed", "sharded"])
def test_a_wider_base_merges_holding_one_layer_in_float32(bases, tmp_path, kind):
    """Exported in bfloat16, a base stored in float32 (or mostly bfloat16 with float32 norms) holds its weights in
    bfloat16 and one LoRA layer at a time in float32 beside its float32 norms (s54 loaded it whole in float32:
    every weight was float32 at every layer's merge)."""
    from tests.test_foreign_adapters import _make

    from llmfast.finetune.export import _merge

    adapter = _make(bases[kind], tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    held = []

    def count(model):
        held.append(sum(p.numel() * 4 for name, p in model.named_parameters()
                        if p.dtype == torch.float32 and ".lora_" not in name))

    merged = _merge(bases[kind], adapter, "bfloat16", None, None, "float32", on_layer=count)
    attn = merged.model.layers[0].self_attn
    q, v = (layer.weight.numel() * 4 for layer in (attn.q_proj, attn.v_proj))
    norms = 5 * 128 * 4 if kind == "mixed" else 0
    assert held == [q + norms, v + norms, q + norms, v + norms]  # layer 0's q_proj, v_proj, then layer 1's
    assert {p.dtype for n, p in merged.named_parameters() if not n.endswith("norm.weight")} == {torch.bfloat16}


def test_a_safetensors_without_the_pread_backend_exports_the_same_bytes(bases, tmp_path, monkeypatch):
    """safe_open's `backend` is new in safetensors 0.8; pyproject allows 0.4.3, and 0.7.0's safe_open (its signature
    stood in for here) raised TypeError on every 16-bit export of a float32 base. It reads the file mapped instead."""
    import safetensors

    from tests.test_foreign_adapters import _make

    adapter = _make(bases["float32"], tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    _export(adapter, tmp_path / "pread")
    real = safetensors.safe_open

    def before_0_8(filename, framework, device="cpu", **backend):
        if backend:
            raise TypeError("safe_open.__new__() got an unexpected keyword argument 'backend'")
        return real(filename, framework, device=device)

    monkeypatch.setattr(safetensors, "safe_open", before_0_8)
    _export(adapter, tmp_path / "mapped")
    assert _same_file(tmp_path / "pread", tmp_path / "mapped")
