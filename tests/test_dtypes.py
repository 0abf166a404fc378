"""Models stored in bfloat16 (most hub releases), and ones that keep their norms in float32 beside bfloat16
linears, through the verbs: the output's stored dtype, its numbers against a float64 reference computed here, and
a note where an output stores its weights wider than its source did.

The session's tiny Llama in bfloat16; the mixed model and two "fine-tunes" of it are edits of its safetensors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from llmfast.modelfiles import safetensors_header
from tests.conftest import run_cli

TEXT = Path(__file__).resolve().parent.parent / "eval" / "text" / "persuasion.txt"
WEIGHTS = [0.7, 0.5]  # the two task vectors' weights in the merges below


def _copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    sd = edit(load_file(dst / "model.safetensors"))
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dtypes")
    bf16 = _copy(tiny_dir, root / "bf16", lambda sd: {k: v.to(torch.bfloat16) for k, v in sd.items()})
    cfg = json.loads((bf16 / "config.json").read_text(encoding="utf-8"))
    (bf16 / "config.json").write_text(json.dumps({**cfg, "dtype": "bfloat16"}), encoding="utf-8")
    g = torch.Generator().manual_seed(5)

    def mixed(sd):  # norms in float32, at values bfloat16 cannot hold
        return {k: (1 + 0.1 * torch.randn(v.shape, generator=g)).float() if "norm" in k else v for k, v in sd.items()}

    found = {"bf16": bf16, "mixed": _copy(bf16, root / "mixed", mixed)}
    for i in (1, 2):
        found[f"ft{i}"] = _copy(found["mixed"], root / f"ft{i}", lambda sd: {
            k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in sd.items()})
    return found


def _tags(model: Path) -> dict[str, str]:
    return {k: v["dtype"] for k, v in safetensors_header(model / "model.safetensors", "").items()
            if k != "__metadata__"}


def _f64(model: Path) -> dict[str, np.ndarray]:
    return {k: v.double().numpy() for k, v in load_file(model / "model.safetensors").items()}


def _merge(tmp: Path, models: dict[str, Path], method: str, **params) -> Path:
    cfg = {"merge_method": method, "base_model": str(models["mixed"]),
           "models": [{"model": str(models[f"ft{i + 1}"]), "parameters": {"weight": w, **params}}
                      for i, w in enumerate(WEIGHTS)]}
    (tmp / f"{method}.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = run_cli("merge", str(tmp / f"{method}.yaml"), str(tmp / method), "--no-progress")
    assert code == 0, err
    return tmp / method


def _bound(ref: np.ndarray, scale: np.ndarray, tag: str) -> np.ndarray:
    """|merged - ref| allowed: the output's one rounding (half a step of its dtype at ref) plus float32 arithmetic
    on terms of magnitude `scale` (a few float32 roundings, each at most 2^-24 relative)."""
    mantissa, least = {"BF16": (8, -126), "F16": (11, -14), "F32": (24, -126)}[tag]  # bits; smallest normal's exponent
    step = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(ref), 2.0 ** least))) - (mantissa - 1))
    return step / 2 + 4 * 2.0 ** -24 * scale


def test_merge_keeps_each_tensors_stored_dtype(models, tmp_path):
    """No dtype in the config: float32 norms stay float32 (rounded to bfloat16 they changed the model), bfloat16
    linears stay bfloat16, each within one rounding of base + sum w * (ft - base) in float64."""
    out = _merge(tmp_path, models, "task_arithmetic")
    tags = _tags(out)
    assert {t for k, t in tags.items() if "norm" in k} == {"F32"}
    assert {t for k, t in tags.items() if "norm" not in k} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    base, fts, merged = _f64(models["mixed"]), [_f64(models["ft1"]), _f64(models["ft2"])], _f64(out)
    for k, b in base.items():
        tvs = [ft[k] - b for ft in fts]
        ref = b + sum(w * tv for w, tv in zip(WEIGHTS, tvs))
        scale = np.abs(b) + sum(w * np.abs(tv) for w, tv in zip(WEIGHTS, tvs))
        assert (np.abs(merged[k] - ref) <= _bound(ref, scale, tags[k])).all(), k


def test_ties_of_bfloat16_models_against_float64(models, tmp_path):
    """TIES (density 0.5, normalize) on the stored weights, recomputed here in float64: trim each task vector to
    its larger half by magnitude, elect the sign of the weighted sum (ties to +, as mergekit), average the weighted
    entries that agree with it. Entries whose weighted sum is within float32 error of 0 may take either sign, and
    are left out."""
    out = _merge(tmp_path, models, "ties", density=0.5)
    tags = _tags(out)
    base, fts, merged = _f64(models["mixed"]), [_f64(models["ft1"]), _f64(models["ft2"])], _f64(out)
    checked = 0
    for k, b in base.items():
        tvs = [ft[k] - b for ft in fts]
        kept = []
        for tv in tvs:  # the larger half; of entries tied at the threshold, the first by position (as mergekit)
            top = np.zeros(tv.size, bool)
            top[np.argsort(-np.abs(tv).ravel(), kind="stable")[:int(round(0.5 * tv.size))]] = True
            kept.append(np.where(top.reshape(tv.shape), tv, 0.0))
        total = sum(w * t for w, t in zip(WEIGHTS, kept))
        mass = sum(w * np.abs(t) for w, t in zip(WEIGHTS, kept))
        clear = (mass == 0) | (np.abs(total) > 2.0 ** -20 * mass)  # none kept, or a sign float32 agrees on
        sign = np.where(total >= 0, 1.0, -1.0)
        agree = [(np.sign(t) == sign) & (t != 0) for t in kept]
        num = sum(w * t * a for w, t, a in zip(WEIGHTS, kept, agree))
        den = sum(w * a for w, a in zip(WEIGHTS, agree))
        ref = b + np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)
        scale = np.abs(b) + sum(w * np.abs(t) for w, t in zip(WEIGHTS, kept))
        ok = np.abs(merged[k] - ref) <= _bound(ref, scale, tags[k])
        assert ok[clear].all(), k
        checked += int(clear.sum())
    assert checked > 0.99 * sum(b.size for b in base.values())


def test_quantize_notes_a_float32_artifact_of_a_bfloat16_model(models, tmp_path):
    """dtype float32 (the default) on a bfloat16 model writes what stays unquantized in float32, twice its stored
    size: said on stderr with the sizes and the setting that keeps them; dtype bfloat16 keeps them, and no note.
    The 4-bit codes are the same either way (bfloat16 weights widen to float32 exactly)."""
    notes = {}
    for dtype in ("float32", "bfloat16"):
        recipe = tmp_path / f"{dtype}.yaml"
        recipe.write_text(f"model: {models['bf16']}\nquantization: {{method: bnb4, type: nf4}}\n"
                          f"dtype: {dtype}\noutput: {tmp_path / dtype}\n")
        code, _, err = run_cli("quantize", str(recipe))
        assert code == 0, err
        notes[dtype] = [line for line in err.splitlines() if line.startswith("llmfast: note:")]
        floats = {t for t in _tags(tmp_path / dtype).values() if t in ("F32", "BF16")}
        assert floats == ({"F32"} if dtype == "float32" else {"BF16", "F32"})  # bnb's own absmax stays float32
    codes = [load_file(tmp_path / d / "model.safetensors") for d in ("float32", "bfloat16")]
    packed = [k for k, v in codes[0].items() if k.endswith("proj.weight")]
    assert len(packed) == 14 and all(torch.equal(codes[0][k], codes[1][k]) for k in packed)  # the same NF4 codes
    embed = 1024 * 128 + 2 * 2 * 128 + 128  # the embedding, four norms of 128 and the final one
    assert notes == {"bfloat16": [], "float32": [
        f"llmfast: note: {tmp_path / 'float32'} stores its full-precision tensors in float32 (dtype), "
        f"{models['bf16']}'s are bfloat16: {round(embed * 4 / 2**20, 1)} MiB where bfloat16 would take "
        f"{round(embed * 2 / 2**20, 1)} MiB; "
        "set dtype: bfloat16 keeps them as stored"]}


def test_relufy_notes_a_float32_copy_of_a_bfloat16_model(models, tmp_path):
    recipe = tmp_path / "relufy.yaml"
    recipe.write_text(f"model: {models['bf16']}\nsparsify: {{method: relufy, config: {{steps: 0}}}}\n"
                      f"data: {{text: {TEXT}, skip_tokens: 2048, calibration_tokens: 512, heldout_tokens: 256, "
                      f"window: 128}}\noutput: {tmp_path / 'out'}\n")
    code, _, err = run_cli("sparsify", str(recipe))
    assert code == 0, err
    assert set(_tags(tmp_path / "out").values()) == {"F32"}
    assert f"llmfast: note: {tmp_path / 'out'} stores its full-precision tensors in float32 (dtype), " \
           f"{models['bf16']}'s are bfloat16: " in err


def test_perplexity_in_bfloat16_is_transformers_forward(models):
    """eval's perplexity of a bfloat16 model loaded in bfloat16 is transformers' own bfloat16 forward, scored the
    same way (one window here: the text is shorter than the context); the mixed model's float32 norms are cast."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from llmfast.calibration import text_token_ids
    from llmfast.evaluate import perplexity
    from llmfast.models import load_model, load_tokenizer

    tok = load_tokenizer(models["mixed"])
    text = TEXT.read_text(encoding="utf-8")[:2000]
    got = perplexity(load_model(models["mixed"], dtype="bfloat16"), tok, text, context=1024, stride=512)
    ref = AutoModelForCausalLM.from_pretrained(models["mixed"], dtype=torch.bfloat16)
    assert {p.dtype for p in ref.parameters()} == {torch.bfloat16}
    ids = torch.tensor(text_token_ids(tok, text))[None]
    assert ids.shape[1] <= 1024
    with torch.no_grad():
        nll = F.cross_entropy(ref(ids).logits[0, :-1].float(), ids[0, 1:], reduction="none").double().mean().item()
    assert got["tokens"] == ids.shape[1] - 1
    assert got["nll"] == pytest.approx(nll, rel=1e-6)  # float32 vs float64 sums of the same float32 losses


@pytest.mark.parametrize("model, kind", [("mixed", "lora"), ("mixed", "qlora"), ("bf16", "lora")])
def test_export_in_bfloat16_keeps_float32_norms_and_rounds_each_merge_once(models, tmp_path, model, kind):
    """`export --dtype bfloat16` of the mixed model: as merge without a dtype, each tensor keeps the dtype the base
    stores it in (the float32 norms bit for bit: rounded, they changed the model; s53), the bfloat16 ones stay
    bfloat16, bit for bit where the adapter does not reach. Each merged weight is the base's (a QLoRA base's: its NF4
    decoding by bitsandbytes in float32) plus s B @ A in float64, rounded to bfloat16 once (s53: a QLoRA base was
    dequantized in bfloat16, then rounded again with the delta added). The bfloat16 model, loaded in bfloat16 (nothing
    wider to keep), merges to the same single rounding."""
    import bitsandbytes as bnb

    from tests.test_foreign_adapters import _make

    adapter = _make(models[model], tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    if kind == "qlora":
        (adapter / "llmfast.json").write_text(json.dumps({
            "stage": "finetune", "base_model_path": str(models[model]),
            "quantization": {"method": "bnb4", "type": "nf4", "double_quant": True}}))
    code, _, err = run_cli("export", str(adapter), str(tmp_path / "out"), "--dtype", "bfloat16")
    assert code == 0 and "llmfast: note:" not in err, err
    base, tags = load_file(models[model] / "model.safetensors"), _tags(tmp_path / "out")
    assert tags == {k: "F32" if "norm" in k and model == "mixed" else "BF16" for k in base}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    got = load_file(tmp_path / "out" / "model.safetensors")
    lora = {k.removeprefix("base_model.model."): v.double() for k, v in
            load_file(adapter / "adapter_model.safetensors").items()}
    merged = 0
    for k, v in base.items():
        layer = k.removesuffix(".weight")
        quantized = kind == "qlora" and k.endswith("proj.weight")  # bitsandbytes' 4-bit layers: every Linear
        if f"{layer}.lora_A.weight" not in lora and not quantized:
            assert torch.equal(got[k], v), k
            continue
        w = v.double()
        if quantized:  # bitsandbytes quantizes a weight from its float32 values
            packed, state = bnb.functional.quantize_4bit(v.float(), blocksize=64, quant_type="nf4",
                                                         compress_statistics=True)
            w = bnb.functional.dequantize_4bit(packed, state).double()
        ref, scale = w.numpy(), np.abs(w.numpy())
        if f"{layer}.lora_A.weight" in lora:
            b, a = (lora[f"{layer}.lora_{x}.weight"] for x in "BA")
            ref, scale = ref + 2 * (b @ a).numpy(), scale + 2 * (b.abs() @ a.abs()).numpy()
            merged += 1
        assert (np.abs(got[k].double().numpy() - ref) <= _bound(ref, scale, "BF16")).all(), k
    assert merged == 4


def test_export_in_bfloat16_of_a_bfloat16_base_rounds_an_embedding_lora_once(tmp_path):
    """A bfloat16 base exported in bfloat16 loads in bfloat16, but the layers its adapter changes merge in float32:
    PEFT rounds a LoRA embedding's delta to the weight's dtype before adding it (s53: 28% of the embedding's entries
    were a step off PEFT's float32 merge rounded once). Every weight here, a saved head (modules_to_save) too, is that
    float32 merge rounded once, bit for bit."""
    from llmfast.testing import build_tiny_llama
    from tests.test_foreign_adapters import _make, _peft

    base = _copy(build_tiny_llama(tmp_path / "untied", tie_word_embeddings=False), tmp_path / "bf16",
                 lambda sd: {k: v.to(torch.bfloat16) for k, v in sd.items()})
    adapter = _make(base, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"],
                    modules_to_save=["lm_head"])
    code, _, err = run_cli("export", str(adapter), str(tmp_path / "out"), "--dtype", "bfloat16")
    assert code == 0, err
    got, ref = load_file(tmp_path / "out" / "model.safetensors"), _peft(base, adapter)[1]
    assert {v.dtype for v in got.values()} == {torch.bfloat16}
    assert [k for k, v in got.items() if not torch.equal(v, ref[k].to(torch.bfloat16))] == []
    stored = load_file(base / "model.safetensors")
    assert not torch.equal(got["model.embed_tokens.weight"], stored["model.embed_tokens.weight"])  # it merged
