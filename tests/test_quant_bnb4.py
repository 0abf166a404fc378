"""`llmfast quantize` with bitsandbytes 4-bit: the saved checkpoint holds the NF4 codes of the original weights,
transformers loads it alone, llmfast loads it from its manifest and evaluates it like the model quantized while
loading; bad input is one line, exit 2, nothing on disk. bitsandbytes runs for real on the CPU."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_cli

from llmfast.cli import main
from llmfast.errors import UserError
from llmfast.testing import build_tiny_llama

pytest.importorskip("bitsandbytes")

IDS = [[1, 17, 42, 99, 7, 300, 12, 5, 64, 3, 250, 8]]
BLOCK = 64  # bitsandbytes' 4-bit block size in transformers


def _recipe(tmp: Path, model: Path, out: Path, **quant: object) -> Path:
    path = tmp / f"{out.name}.yaml"
    path.write_text(json.dumps({"model": str(model), "output": str(out),
                                "quantization": {"method": "bnb4", **quant}}))
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("bnb4")
    base = build_tiny_llama(tmp / "base")
    out = tmp / "nf4"
    assert main(["quantize", str(_recipe(tmp, base, out, type="nf4", double_quant=True))]) == 0
    return base, out


def _linear4bit(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    import bitsandbytes as bnb

    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def _dequantized(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each 4-bit layer's weight as bitsandbytes decodes it (read before any eval forward, which may repack it)."""
    import bitsandbytes as bnb

    return {n: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
            for n, m in _linear4bit(model).items()}


def test_checkpoint_holds_the_nf4_codes_of_the_original_weights(saved: tuple[Path, Path]) -> None:
    from safetensors import safe_open

    from llmfast.models import load_model

    base, out = saved
    manifest = json.loads((out / "llmfast.json").read_text())
    assert manifest["quantization"] == {"method": "bnb4", "config": {"bits": 4, "type": "nf4", "double_quant": True}}
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["bnb_4bit_quant_type"] == "nf4"
    assert qc["bnb_4bit_use_double_quant"] and qc["bnb_4bit_quant_storage"] == "uint8"
    assert (out / "tokenizer.json").is_file()
    model = load_model(out)
    deq = _dequantized(model)
    assert len(deq) == 2 * 7  # every Linear of both layers; the head stays full precision
    table = model.model.layers[0].self_attn.q_proj.weight.quant_state.code.float()  # the 16 NF4 levels
    assert table.min().item() == -1.0 and table.max().item() == 1.0
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        for name, dq in deq.items():
            w = f.get_tensor(f"{name}.weight").float().reshape(-1, BLOCK)
            dq = dq.reshape(-1, BLOCK)
            # A block's largest weight lands on level +-1, so max|dq| is the block's stored (double-quantized) scale.
            scale = dq.abs().amax(dim=1, keepdim=True)
            got = (dq / scale).unsqueeze(-1).sub(table).abs().argmin(-1)
            # Reference: NF4 rounds w / max|w| of its block to the nearest level, with the exact scale.
            x = (w / w.abs().amax(dim=1, keepdim=True)).unsqueeze(-1)
            dist = x.sub(table).abs()
            want = dist.argmin(-1)
            near_tie = (dist.sort(-1).values[..., 1] - dist.min(-1).values) < 1e-4
            assert ((got == want) | near_tie).all(), name
            # Double quant stores the scale in 8 bits (blocks of 256 scales): close to the exact one.
            torch.testing.assert_close(scale, w.abs().amax(dim=1, keepdim=True), rtol=0.02, atol=0.0)
    size = manifest["metrics"]
    assert size["weights_file_bytes"] == (out / "model.safetensors").stat().st_size
    n_linear = sum(t.numel() for t in deq.values())
    # 4 bits per weight and one 8-bit scale per block, plus per layer at most 2 KiB: the 256 float32 levels of
    # the scales' own code book, the 16 NF4 levels, one float32 per 256 scales and the serialized state.
    floor = n_linear / 2 + n_linear / BLOCK
    assert floor <= size["linear_weight_bytes"] <= floor + len(deq) * 2048


_PLAIN = """
import sys, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(int(sys.argv[3]))
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
with torch.no_grad():
    torch.save(model(torch.tensor({ids})).logits, sys.argv[2])
"""


def test_transformers_alone_and_llmfast_give_the_logits_of_quantizing_while_loading(
        saved: tuple[Path, Path], tmp_path: Path) -> None:
    from llmfast.models import load_model

    base, out = saved
    code = _PLAIN.format(ids=IDS)
    # A fresh interpreter that never imports llmfast: transformers reads quantization_config alone.
    argv = [sys.executable, "-c", code, str(out), str(tmp_path / "logits.pt"), str(torch.get_num_threads())]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 0, p.stderr[-2000:]
    theirs = torch.load(tmp_path / "logits.pt")
    on_the_fly = load_model(base, quantization="nf4")
    artifact = load_model(out)  # from its manifest alone
    assert {n: m.weight.quant_state.quant_type for n, m in _linear4bit(artifact).items()} == \
        {n: "nf4" for n in _linear4bit(on_the_fly)}
    a, b = _dequantized(on_the_fly), _dequantized(artifact)
    assert all(torch.equal(a[n], b[n]) for n in a)  # the same codes and scales, bit for bit
    with torch.no_grad():
        want = on_the_fly(torch.tensor(IDS)).logits
        ours = artifact(torch.tensor(IDS)).logits
    # Same weights, both in eval mode, so the same kernel (bfloat16 on AVX512-BF16 CPUs, float32 elsewhere) with the
    # same thread count: equal up to the order of float32 sums.
    tol = 1e-5 * want.abs().max().item()
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=tol)
    torch.testing.assert_close(theirs, want, rtol=1e-5, atol=tol)


def test_eval_scores_the_artifact_like_the_model_quantized_while_loading(saved: tuple[Path, Path],
                                                                          tmp_path: Path) -> None:
    base, out = saved
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog and runs away " * 12)
    ppl = {}
    for name, model, quant in (("artifact", out, None), ("on-the-fly", base, "nf4")):
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(json.dumps({"model": str(model), "quantization": quant, "output": str(tmp_path / name),
                                      "eval": {"perplexity": {"text": str(text), "context": 32, "stride": 16}}}))
        assert main(["eval", str(recipe)]) == 0
        res = json.loads((tmp_path / name).read_text())
        ppl[name] = res["perplexity"]["ppl"]
        # what it ran with, recorded either way (an artifact's own format was recorded as null)
        assert res["quantization"]["method"] == "bnb4" and res["quantization"]["config"]["type"] == "nf4", res
    assert ppl["artifact"] == pytest.approx(ppl["on-the-fly"], rel=1e-5)


def test_fp4_without_double_quant(saved: tuple[Path, Path], tmp_path: Path) -> None:
    from llmfast.errors import UserError
    from llmfast.models import load_model

    base, nf4 = saved
    out = tmp_path / "fp4"
    assert main(["quantize", str(_recipe(tmp_path, base, out, type="fp4", double_quant=False))]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["bnb_4bit_quant_type"] == "fp4" and not qc["bnb_4bit_use_double_quant"]
    a = _dequantized(load_model(out))
    b = _dequantized(load_model(base, quantization={"type": "fp4", "double_quant": False}))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    # the checkpoint says how it is quantized; asking for another setting is refused, not silently ignored
    with pytest.raises(UserError, match=r"saved in nf4 with double quant, not fp4 with double quant"):
        load_model(nf4, quantization="fp4")


def test_bad_input_is_one_line_and_nothing_on_disk(saved: tuple[Path, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from llmfast.errors import UserError
    from llmfast.quant.bnb4 import Bnb4, Bnb4Config

    base, nf4 = saved
    out = tmp_path / "out"
    cases = [  # (source, output, settings), what the one line says
        ((nf4, out, {}), "is already quantized (bnb4)"),
        ((base, out, {"type": "nf5"}), "type: Input should be 'nf4' or 'fp4' (did you mean 'nf4'?)"),
        ((base, nf4, {}), "exists"),
    ]
    for (model, output, settings), message in cases:
        capsys.readouterr()
        assert main(["quantize", str(_recipe(tmp_path, model, output, **settings))]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not out.exists() and not list(tmp_path.glob(".out.*"))

    class Embedder(torch.nn.Module):  # an architecture with no Linear layers but its head
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(8, 4)
            self.lm_head = torch.nn.Linear(4, 8)

    with pytest.raises(UserError, match=r"^bnb4: Embedder has no Linear layers besides the head"):
        Bnb4().check(Embedder(), Bnb4Config())


def test_requantizing_a_dequantized_nf4_model_gives_back_its_codes(saved: tuple[Path, Path], tmp_path: Path) -> None:
    """Path (b) of deploying a QLoRA adapter starts from the NF4 base dequantized (what `export` merges into). NF4 of
    those weights is the base's NF4 again, bit for bit (each block's largest weight sits on level +-1, so its scale
    comes back, and every weight is already on a level): a merged adapter changes a code only where it moves a
    weight past the midpoint to the next level (scripts/compare_qlora_deploy.py measures how many)."""
    from llmfast.models import load_model
    from llmfast.quant import parse_quantization

    base, _ = saved
    plain = {"type": "nf4", "double_quant": False}  # double quant would round the scales once more
    model = load_model(base, quantization=plain)
    before = _dequantized(model)
    spec = parse_quantization(plain)
    spec.quantizer.dequantize_for_merge(model, "float32")
    model.save_pretrained(tmp_path / "dequantized")
    (tmp_path / "dequantized" / "tokenizer.json").write_bytes((base / "tokenizer.json").read_bytes())
    (tmp_path / "dequantized" / "tokenizer_config.json").write_bytes((base / "tokenizer_config.json").read_bytes())
    out = tmp_path / "again"
    assert main(["quantize", str(_recipe(tmp_path, tmp_path / "dequantized", out, **plain))]) == 0
    after = _dequantized(load_model(out))
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def _write_chats(path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": f"Repeat: {w}"}, {"role": "assistant", "content": w}]}
            for w in ["alpha", "bravo", "charlie", "delta"] * 4]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_qlora_adapter_exported_then_quantized(saved: tuple[Path, Path], tmp_path: Path) -> None:
    """The documented path: `finetune` a QLoRA adapter with export_merged (the base dequantized, the adapter merged
    in float32), then `quantize` the merged model: accepted as full precision, lineage kept, loads in 4 bits."""
    from llmfast.models import load_model

    base, _ = saved
    _write_chats(tmp_path / "train.jsonl")
    recipe = tmp_path / "qlora.yaml"
    recipe.write_text(json.dumps({
        "model": str(base), "quantization": "nf4", "export_merged": True, "output": str(tmp_path / "run"),
        "data": {"train": str(tmp_path / "train.jsonl"), "max_length": 32, "eval_fraction": 0.25},
        "lora": {"r": 4, "alpha": 8}, "train": {"steps": 2, "batch_size": 2, "lr": 0.01, "seed": 1}}))
    assert main(["finetune", str(recipe)]) == 0
    merged, out = tmp_path / "run" / "merged", tmp_path / "deployed"
    assert main(["quantize", str(_recipe(tmp_path, merged, out))]) == 0
    manifest = json.loads((out / "llmfast.json").read_text())
    assert manifest["parents"] == [str(merged)] and manifest["quantization"]["method"] == "bnb4"
    assert json.loads((merged / "llmfast.json").read_text())["parents"] == [str(tmp_path / "run" / "adapter")]
    assert len(_linear4bit(load_model(out))) == 2 * 7


def test_adapter_trained_on_a_saved_nf4_artifact_exports_onto_its_dequantized_weights(
        saved: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Found by hand (2026-12-05): LoRA trained on an NF4 artifact itself (no `quantization:` in the recipe) then
    `export` raised transformers' NotImplementedError while saving. Each merged weight is the artifact's decoded
    4-bit weight plus the adapter's scaled B @ A, computed here from the files."""
    from safetensors.torch import load_file

    from llmfast.loading import from_pretrained

    _, nf4 = saved
    _write_chats(tmp_path / "train.jsonl")
    recipe = tmp_path / "lora.yaml"
    recipe.write_text(json.dumps({
        "model": str(nf4), "output": str(tmp_path / "run"),
        "data": {"train": str(tmp_path / "train.jsonl"), "max_length": 32, "eval_fraction": 0.25},
        "lora": {"r": 4, "alpha": 8}, "train": {"steps": 2, "batch_size": 2, "lr": 0.05, "seed": 1}}))
    # sharding its packed weights is refused as for QLoRA (it reached FSDP with a traceback)
    assert main(["finetune", str(recipe), "--set", "train.fsdp=true", "--set", f"output={tmp_path / 'fsdp'}"]) == 2
    assert "an NF4/FP4 artifact as the base is 4-bit too" in capsys.readouterr().err
    assert not (tmp_path / "fsdp").exists()
    assert main(["finetune", str(recipe)]) == 0
    out = tmp_path / "merged"
    assert main(["export", str(tmp_path / "run" / "adapter"), str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert json.loads((out / "llmfast.json").read_text())["base_quantization"]["method"] == "bnb4"
    decoded = _dequantized(from_pretrained(nf4, "float32"))
    lora = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    merged = load_file(out / "model.safetensors")
    assert len(decoded) == 2 * 7
    for name, weight in decoded.items():
        a = lora[f"base_model.model.{name}.lora_A.weight"]
        b = lora[f"base_model.model.{name}.lora_B.weight"]
        expected = weight + (8 / 4) * (b @ a)
        # float32 sums of r=4 products: a few ulps of the weight's scale
        torch.testing.assert_close(merged[f"{name}.weight"], expected, rtol=1e-6, atol=1e-6)
    assert float((b @ a).abs().max()) > 1e-4  # the adapter trained: the check above is not of zeros


def test_vllm_takes_bitsandbytes_on_cuda_only_and_bitnet_nowhere(saved: tuple[Path, Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Which engines run a format follows the machine: vLLM serves bitsandbytes checkpoints on CUDA (its docs), has
    no CPU kernels for them and no BitNet format at all; `llmfast serve` refuses what vLLM cannot run here, naming
    the machine, before any server starts."""
    from llmfast.quant import engines_for

    _, out = saved
    assert engines_for("nf4") == ("hf",) and engines_for("ternary") == ("hf",)
    code, _, err = run_cli("serve", str(out), "--port", "0")
    assert code == 2 and "vLLM cannot run on this CPU" in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the machine's answer, not vLLM's or the model's
    assert engines_for("nf4") == ("vllm", "hf") and engines_for("ternary") == ("hf",)
    assert engines_for({"method": "w4", "sym": False}) == ("vllm", "hf")
    from llmfast.serve.server import _check_servable_quantization

    _check_servable_quantization(out, json.loads((out / "llmfast.json").read_text()))  # bitsandbytes: served
    with pytest.raises(UserError, match="bitnet weights that vLLM cannot run on this GPU"):
        _check_servable_quantization(tmp_path, {"quantization": {"method": "bitnet", "config": {}}})
    # a config no shorthand names is the method alone, not a line of JSON (s47)
    with pytest.raises(UserError, match=r"holds bitnet weights that vLLM cannot run on this GPU: measure it with"):
        _check_servable_quantization(tmp_path, {"quantization": {"method": "bitnet", "config": {"qat_steps": 2,
                                                                                               "lr": 0.001}}})


def test_a_relufied_llama_keeps_its_architecture_through_nf4_and_export(tmp_path: Path) -> None:
    """Found by hand (2026-12-05): save_pretrained wrote LlamaForCausalLM into the NF4 artifact and the export of an
    adapter on a ReLU-fied model, so vLLM's plugin would not take them and `merge` refused the export beside its
    own relufy base ("only models of one architecture can be merged")."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmfast.serve.vllm_plugin import ARCHITECTURE

    base = build_tiny_llama(tmp_path / "relu")
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu", "architectures": [ARCHITECTURE]}))
    assert main(["quantize", str(_recipe(tmp_path, base, tmp_path / "nf4", type="nf4"))]) == 0
    assert json.loads((tmp_path / "nf4" / "config.json").read_text())["architectures"] == [ARCHITECTURE]
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj"]))
    peft.save_pretrained(tmp_path / "adapter")
    acfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**acfg, "base_model_name_or_path": str(base)}))
    assert main(["export", str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert merged["architectures"] == [ARCHITECTURE] and merged["hidden_act"] == "relu"


def test_a_saved_nf4_checkpoint_refuses_the_other_double_quant_setting(saved: tuple[Path, Path]) -> None:
    """The saved checkpoint's double quant is compared too, not only its 4-bit type: asking for NF4 without double
    quant on a checkpoint saved with it is refused, not silently loaded as saved."""
    from llmfast.models import load_model

    _, nf4 = saved
    qc = json.loads((nf4 / "config.json").read_text())["quantization_config"]
    assert qc["bnb_4bit_quant_type"] == "nf4" and qc["bnb_4bit_use_double_quant"] is True
    with pytest.raises(UserError, match=r"saved in nf4 with double quant, not nf4 without double quant: drop the "
                                        r"quantization setting"):
        load_model(nf4, quantization={"method": "bnb4", "type": "nf4", "double_quant": False})
    assert len(_linear4bit(load_model(nf4, quantization={"method": "bnb4", "type": "nf4",
                                                          "double_quant": True}))) > 0


def test_dequantizing_for_merge_keeps_each_layer_bias_and_refuses_weights_an_eval_forward_repacked(
        tmp_path: Path) -> None:
    """Qwen2-style q/k/v biases (here Llama's attention_bias and mlp_bias) stay in full precision under
    bitsandbytes: the plain Linear that replaces a 4-bit layer holds the bias as it was and the weight bitsandbytes
    decodes. On AVX512-BF16 CPUs an eval forward repacks the 4-bit weights for its kernel, after which decoding them
    would give other numbers: refused in one line (elsewhere the weights stay as they were and decode the same)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from llmfast.quant.bnb4 import Bnb4, Bnb4Config, bnb_config
    from llmfast.testing import llama_config

    torch.manual_seed(4)
    full = LlamaForCausalLM(llama_config(num_layers=1, vocab_size=64, attention_bias=True, mlp_bias=True))
    biases = {}
    for name, m in full.named_modules():
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            torch.nn.init.normal_(m.bias)  # zeros at init: a lost bias would not show
            biases[name] = m.bias.detach().clone()
    assert len(biases) == 7
    full.save_pretrained(tmp_path / "biased")
    cfg = Bnb4Config(double_quant=False)

    def load() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(tmp_path / "biased", dtype=torch.float32, device_map={"": "cpu"},
                                                    quantization_config=bnb_config(cfg, "float32", "test")).eval()

    model = load()
    decoded = _dequantized(model)
    assert decoded.keys() == biases.keys()
    Bnb4().dequantize_for_merge(model, "float32")
    for name, bias in biases.items():
        layer = model.get_submodule(name)
        assert type(layer) is torch.nn.Linear and layer.weight.dtype == torch.float32, name
        assert torch.equal(layer.bias, bias) and torch.equal(layer.weight, decoded[name]), name
    ran = load()
    with torch.no_grad():
        ran(torch.tensor([[1, 5, 9, 3]]))
    repacked = any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in _linear4bit(ran).values())
    if repacked:
        with pytest.raises(UserError, match="has run in eval mode on this CPU; load it afresh"):
            Bnb4().dequantize_for_merge(ran, "float32")
    else:
        Bnb4().dequantize_for_merge(ran, "float32")
        assert all(torch.equal(ran.get_submodule(n).weight, w) for n, w in decoded.items())


def test_a_checkpoints_4bit_settings_read_with_transformers_defaults_for_what_it_leaves_out(tmp_path: Path) -> None:
    """A quantization_config that leaves out the 4-bit type or double quant means what transformers fills in for it
    (BitsAndBytesConfig's defaults); an 8-bit bitsandbytes checkpoint or another format is not a saved 4-bit one."""
    from transformers import BitsAndBytesConfig

    from llmfast.quant.bnb4 import saved_4bit

    defaults = BitsAndBytesConfig.from_dict({"load_in_4bit": True})
    for qc, want in (({"quant_method": "bitsandbytes", "load_in_4bit": True},
                      (defaults.bnb_4bit_quant_type, defaults.bnb_4bit_use_double_quant)),
                     ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                       "bnb_4bit_use_double_quant": True}, ("nf4", True)),
                     ({"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False}, None),
                     ({"quant_method": "gptq", "bits": 4}, None)):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qc}))
        assert saved_4bit(tmp_path) == want, qc
    assert saved_4bit(tmp_path / "missing") is None


def test_a_bfloat16_base_quantized_while_loading_computes_in_bfloat16(saved: tuple[Path, Path]) -> None:
    """The compute dtype is the run's dtype: a bfloat16 QLoRA base multiplies its decoded 4-bit weights in bfloat16
    (what training does: the weight decoded, then a plain matmul), not in float32 cast back."""
    import bitsandbytes as bnb
    import torch.nn.functional as F

    from llmfast.models import load_model

    base, _ = saved
    model = load_model(base, "bfloat16", quantization="nf4")
    layers = _linear4bit(model)
    assert len(layers) == 2 * 7 and {m.compute_dtype for m in layers.values()} == {torch.bfloat16}
    layer = layers["model.layers.0.mlp.down_proj"]
    weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(0)).bfloat16()
    layer.train()  # eval mode may take a fused kernel on AVX512-BF16 CPUs
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, weight))


# glibc's own counts of its heap (mallinfo2), read in a fresh process's script
_GLIBC = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                            reason="glibc's malloc")
_MALLINFO = ("import ctypes\nclass Info(ctypes.Structure):\n"
             "    _fields_ = [(n, ctypes.c_size_t) for n in 'arena ordblks smblks hblks hblkhd usmblks fsmblks "
             "uordblks fordblks keepcost'.split()]\n"
             "libc = ctypes.CDLL('libc.so.6'); libc.mallinfo2.restype = Info\n")


@_GLIBC
def test_quantizing_while_loading_gives_the_weights_temporaries_back(tmp_path: Path) -> None:
    """bitsandbytes' CPU quantize_4bit makes float32 temporaries of each weight and keeps its small 4-bit codes: with
    glibc's raised mmap threshold the temporaries came from the heap between the kept codes, and the heap grew by
    1.0 to 2.2 bfloat16 copies of the model (BENCHMARKS, "cause not found"). glibc's own count, in a fresh process
    across `llmfast quantize`'s save, then across eval's load with `quantization: nf4`: the free bytes its heap
    holds (mallinfo2's fordblks), which it cannot give back while kept blocks lie above them."""
    model = build_tiny_llama(tmp_path / "m", hidden_size=512, num_heads=4, head_dim=128, intermediate_size=2048,
                             num_layers=4, dtype="bfloat16")
    weights = (model / "model.safetensors").stat().st_size
    script = (
        _MALLINFO + "import sys, torch\nfrom pathlib import Path\n"
        "from llmfast.models import load_tokenizer\n"
        "from llmfast.quant.bnb4 import Bnb4Config, save_4bit\n"
        "tok = load_tokenizer(sys.argv[1])\n"
        "torch.empty(16 << 20, dtype=torch.uint8).fill_(1)  # freed at once: glibc raises its mmap threshold\n"
        "before = libc.mallinfo2().fordblks\n"
        "save_4bit(Path(sys.argv[1]), Bnb4Config(), Path(sys.argv[2]), tokenizer=tok, dtype='bfloat16')\n"
        "print('held free', libc.mallinfo2().fordblks - before)\n"
        "from llmfast.models import load_model\n"
        "before = libc.mallinfo2().fordblks\n"
        "load_model(sys.argv[1], 'bfloat16', quantization='nf4')  # eval's quantizing while loading\n"
        "print('held free', libc.mallinfo2().fordblks - before)\n"
    )
    p = subprocess.run([sys.executable, "-c", script, str(model), str(tmp_path / "out")], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    held = [int(line.split()[-1]) for line in p.stdout.splitlines() if line.startswith("held free")]
    # measured: 0.6 to 2.2 times the bfloat16 weights before, 0.12 after
    assert len(held) == 2 and max(held) < 0.25 * weights, (held, weights)


@_GLIBC
def test_nested_large_blocks_given_back_keeps_the_low_threshold_until_the_outermost_exit():
    """An inner exit reset glibc's threshold to 32 MiB while the outer block was still quantizing (s49's review):
    a 4 MiB block after it came from the heap. glibc's own count of mmapped bytes (mallinfo2's hblkhd) tells."""
    script = (
        _MALLINFO + "from llmfast.quant.bnb4 import large_blocks_given_back\n"
        "libc.malloc.restype = ctypes.c_void_p; libc.malloc.argtypes = [ctypes.c_size_t]\n"
        "libc.free.argtypes = [ctypes.c_void_p]\n"
        "libc.free(libc.malloc(16 << 20))  # glibc raises its threshold to 16 MiB\n"
        "def mapped():\n"
        "    before = libc.mallinfo2().hblkhd; p = libc.malloc(4 << 20); after = libc.mallinfo2().hblkhd\n"
        "    libc.free(p); return after - before >= 4 << 20\n"
        "with large_blocks_given_back():\n"
        "    with large_blocks_given_back():\n"
        "        print('inner', mapped())\n"
        "    print('outer', mapped())\n"
        "print('after', mapped())\n")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    # (a block freed into the heap's top would serve the next request whatever the threshold: no probe before)
    assert p.stdout.split() == ["inner", "True", "outer", "True", "after", "False"], p.stdout


def test_finetune_refuses_a_bitsandbytes_8bit_checkpoint_in_one_line(saved: tuple[Path, Path], tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """An 8-bit (LLM.int8) checkpoint's config also says quant_method bitsandbytes, the name bnb4 takes: finetune
    trained on it as on a 4-bit one (FSDP's refusal said 4-bit), and export refused the adapter after the run. Now
    finetune refuses it before anything is written; so does a config of older transformers without quant_method."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    base, _ = saved
    q8 = tmp_path / "int8"
    AutoModelForCausalLM.from_pretrained(base, quantization_config=BitsAndBytesConfig(load_in_8bit=True)) \
        .save_pretrained(q8)
    AutoTokenizer.from_pretrained(base).save_pretrained(q8)
    assert json.loads((q8 / "config.json").read_text())["quantization_config"]["load_in_8bit"] is True
    _write_chats(tmp_path / "train.jsonl")
    recipe = tmp_path / "lora.yaml"
    recipe.write_text(json.dumps({"model": str(q8), "output": str(tmp_path / "run"),
                                  "data": {"train": str(tmp_path / "train.jsonl"), "max_length": 32},
                                  "lora": {"r": 4, "alpha": 8}, "train": {"steps": 1, "batch_size": 2}}))
    cfg = json.loads((q8 / "config.json").read_text())
    capsys.readouterr()  # transformers' progress bars
    for quant in (cfg["quantization_config"], {"load_in_8bit": True}):  # as transformers writes it; an older config
        (q8 / "config.json").write_text(json.dumps({**cfg, "quantization_config": quant}))
        for fsdp in ("false", "true"):
            assert main(["finetune", str(recipe), "--set", f"train.fsdp={fsdp}"]) == 2
            err = capsys.readouterr().err.strip()
            assert err == (f"llmfast: error: {q8} is already quantized (bitsandbytes 8-bit): LoRA trains on a "
                           "full-precision model or a bitsandbytes 4-bit one: fine-tune the full-precision model it "
                           "came from (with quantization: nf4 for QLoRA)"), err
            assert not (tmp_path / "run").exists()


def test_check_weights_fit_reads_config_json_once(saved: tuple[Path, Path]) -> None:
    """Every load checks the weights against config.json first: it read the file three times (the head check, the
    quantization test, then the bitsandbytes check or transformers' config), now once, for a 4-bit checkpoint and a
    full-precision model alike. Counted with an audit hook on open()."""
    from llmfast.loading import check_weights_fit

    opened: list[str] = []
    counting = [False]
    sys.addaudithook(lambda event, args: opened.append(str(args[0])) if counting[0] and event == "open" else None)
    for model in saved:
        opened.clear()
        counting[0] = True
        try:
            check_weights_fit(model)
        finally:
            counting[0] = False
        assert [f for f in opened if f.endswith("config.json")] == [str(model / "config.json")], opened
