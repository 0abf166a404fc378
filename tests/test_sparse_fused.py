"""Fused gate|up MLPs (Phi-3, GLM-4: llmfast/sparse/fused.py) through every sparsity method: they are found as they
are and only the sparse runtime splits them, into the same function (float64 against the untouched model); a
quantize and a LoRA over a Phi-3 with relufy's cut keep its layout; a relufied Phi-3 is a Phi-3 checkpoint that
plain transformers loads with ReLU and the same logits, a killed relufy resumes to the uninterrupted run's weights,
TEAL's attention sites take Phi-3's fused qkv_proj, the sparse runtime decodes as the hooks do, and a fused MLP of
a class not known to compute gate-then-up is refused."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from test_sparse import _kill_after_a_checkpoint, recipe
from conftest import run_cli


def _tiny(kind: str, out, tokenizer_dir):
    from transformers import Glm4Config, Glm4ForCausalLM, Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, pad_token_id=0)
    model = (Phi3ForCausalLM(Phi3Config(**shape)) if kind == "phi3"
             else Glm4ForCausalLM(Glm4Config(**shape, head_dim=64)))
    model.save_pretrained(out)
    for f in [*tokenizer_dir.glob("tokenizer*"), tokenizer_dir / "chat_template.jinja"]:
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory, tiny_dir):
    return _tiny("phi3", tmp_path_factory.mktemp("phi3") / "phi3", tiny_dir)


@pytest.mark.parametrize("kind", ["phi3", "glm4"])
def test_split_is_the_same_function_and_only_the_runtime_splits(kind, tmp_path, tiny_dir):
    """gated_mlps finds the fused MLPs as they are (nothing that may be saved is changed: a quantize or a LoRA over a
    model with a relufy cut saved gate_proj/up_proj keys the architecture does not load); split, in float64, the MLP
    (gate and up multiplied apart) equals the fused one to ~1e-15 of the logits, where a swapped gate/up or a
    misplaced activation would be off by O(1)."""
    from transformers import AutoModelForCausalLM

    from llmfast.sparse.base import activation, gated_mlps
    from llmfast.sparse.fused import split_fused_mlps

    model = AutoModelForCausalLM.from_pretrained(_tiny(kind, tmp_path / kind, tiny_dir)).double().eval()
    original = set(model.state_dict())
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    mlps = gated_mlps(model)
    assert len(mlps) == 2 and activation(mlps[0]) is mlps[0].activation_fn and set(model.state_dict()) == original
    assert split_fused_mlps(model) == 2 and split_fused_mlps(model) == 0
    mlp = model.model.layers[0].mlp
    assert not hasattr(mlp, "gate_up_proj") and mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (256, 128)
    with torch.no_grad():
        after = model(ids).logits
    assert (after - before).abs().max() <= 1e-12 * before.abs().max()


def test_a_phi3_with_a_relu_cut_quantizes_and_trains_in_its_own_layout(tmp_path, phi3_dir):
    """relufy's shifted cut goes on every model loaded from its artifact: a bitnet quantize and a LoRA over it keep
    Phi-3's fused gate_up_proj (the review of s42 found them saving split gate_proj/up_proj keys)."""
    code, _, err = run_cli("sparsify", str(recipe(tmp_path, phi3_dir, "relufy", "{steps: 0, target: 0.8}", out="cut")))
    assert code == 0, err[-2000:]
    quant = tmp_path / "q.yaml"
    quant.write_text(f"model: {tmp_path / 'cut'}\nquantization: {{method: bitnet, qat_steps: 0}}\n"
                     f"output: {tmp_path / 'ternary'}\n")
    code, _, err = run_cli("quantize", str(quant))
    assert code == 0, err[-2000:]
    keys = set(load_file(tmp_path / "ternary" / "model.safetensors"))
    assert any("mlp.gate_up_proj" in k for k in keys) and not any("gate_proj" in k.replace("gate_up", "") for k in keys)
    rows = [{"prompt": f"Repeat: {w}", "completion": w} for w in ["alpha", "bravo"] * 4]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ft = tmp_path / "ft.yaml"
    ft.write_text(f"model: {tmp_path / 'cut'}\ndata: {{train: {tmp_path / 'train.jsonl'}, max_length: 64}}\n"
                  f"lora: {{r: 4, alpha: 8, target_modules: all-linear}}\ntrain: {{steps: 1, batch_size: 2}}\n"
                  f"output: {tmp_path / 'lora'}\n")
    code, _, err = run_cli("finetune", str(ft))
    assert code == 0, err[-2000:]
    lora = set(load_file(tmp_path / "lora" / "adapter" / "adapter_model.safetensors"))
    assert any("gate_up_proj.lora_A" in k for k in lora) and not any(".gate_proj." in k for k in lora)


def test_every_method_on_phi3(tmp_path, phi3_dir):
    """TEAL, CATS, relufy and Deja Vu over relufy sparsify a Phi-3 (refused before: its MLP is fused); relufy writes
    a Phi-3 checkpoint (gate_up_proj, hidden_act relu) that transformers alone loads with the logits of
    llmfast's own load."""
    from transformers import AutoModelForCausalLM

    from llmfast.models import load_model

    fast = {"teal": "{target: 0.5}", "cats": "{target: 0.5}", "relufy": "{steps: 2, batch_size: 2, lr: 1.0e-4}"}
    for method, cfg in fast.items():
        code, _, err = run_cli("sparsify", str(recipe(tmp_path, phi3_dir, method, cfg, out=method, name=method)))
        assert code == 0, err[-2000:]
        held = json.loads((tmp_path / method / "llmfast.json").read_text())["metrics"]["heldout_sparsity"]
        assert 0.4 < held["down_in"]["mean"] < 0.6, (method, held)
    code, _, err = run_cli("sparsify", str(recipe(tmp_path, tmp_path / "relufy", "dejavu",
                                                  "{rank: 8, steps: 20, active_fraction: 0.5}", out="dv", name="dv")))
    assert code == 0, err[-2000:]
    relufied = tmp_path / "relufy"
    keys = set(load_file(relufied / "model.safetensors"))
    assert "model.layers.0.mlp.gate_up_proj.weight" in keys and not any("gate_proj" in k for k in keys)
    cfg = json.loads((relufied / "config.json").read_text())
    assert cfg["hidden_act"] == "relu" and cfg["architectures"] == ["Phi3ForCausalLM"]
    plain = AutoModelForCausalLM.from_pretrained(relufied).eval()
    assert isinstance(plain.model.layers[0].mlp.activation_fn, torch.nn.ReLU)
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = plain(ids).logits, load_model(relufied).eval()(ids).logits
    # the same float32 function with gate and up multiplied apart: summation order only (K = 128 terms)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()


def test_a_killed_phi3_relufy_resumes_to_the_uninterrupted_weights(tmp_path, phi3_dir):
    """The checkpoints hold Phi-3's own gate_up_proj; --resume continues them to the uninterrupted run's weights."""
    cfg = "{steps: 30, batch_size: 2, lr: 3.0e-4, save_every: 5}"
    assert run_cli("sparsify", str(recipe(tmp_path, phi3_dir, "relufy", cfg, out="ref", name="ref")))[0] == 0
    path = recipe(tmp_path, phi3_dir, "relufy", cfg, out="killed", name="killed")
    ckpts = _kill_after_a_checkpoint(path, tmp_path / "killed.checkpoints" / "checkpoints")
    assert not (tmp_path / "killed").exists()
    held = load_file(sorted(ckpts.glob("step-*"))[-1] / "student.safetensors")
    assert "model.layers.0.mlp.gate_up_proj.weight" in held
    code, _, err = run_cli("sparsify", str(path), "--resume")
    assert code == 0, err[-2000:]
    a, b = load_file(tmp_path / "killed" / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert json.loads((tmp_path / "killed" / "llmfast.json").read_text())["metrics"]["resumed_from"] > 0


def test_the_sparse_runtime_decodes_a_phi3_as_the_hooks_do(tmp_path, phi3_dir):
    """TEAL's thresholds on a Phi-3's MLPs and attention (its fused qkv_proj hooked and gathered as one projection)
    through the sparse runtime (the C kernel, or torch's gathers) give the greedy tokens of the hooked model (the
    same zeros, summed in another order)."""
    from llmfast.models import load_model
    from llmfast.sparse.runtime import load_sparse_model, runtime_calls

    code, _, err = run_cli("sparsify", str(recipe(tmp_path, phi3_dir, "teal", "{target: 0.4, sites: [mlp, attention]}",
                                                  out="teal")))
    assert code == 0, err[-2000:]
    held = json.loads((tmp_path / "teal" / "llmfast.json").read_text())["metrics"]["heldout_sparsity"]
    assert 0.3 < held["attn_in"]["mean"] < 0.5 and 0.3 < held["o_in"]["mean"] < 0.5, held
    hooked, sparse = load_model(tmp_path / "teal").eval(), load_sparse_model(tmp_path / "teal")
    ids = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(hooked.generate(ids, **kw), sparse.generate(ids, **kw))
    assert runtime_calls(sparse, "mlp")["sparse"] > 0 and runtime_calls(sparse, "attention")["sparse"] > 0


def test_a_fused_mlp_of_an_unknown_class_is_refused():
    """A module with gate_up_proj whose class is not known to compute down(up * act(gate)) (its halves could be in
    the other order) is not split: the model has no gated MLP, one line."""
    from llmfast.errors import UserError
    from llmfast.sparse.base import gated_mlps

    class OtherFusedMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj, self.down_proj = torch.nn.Linear(8, 32, bias=False), torch.nn.Linear(16, 8, bias=False)
            self.activation_fn = torch.nn.SiLU()

    model = torch.nn.Sequential(OtherFusedMLP())
    model.config = SimpleNamespace(architectures=["OtherForCausalLM"])
    with pytest.raises(UserError, match="OtherForCausalLM has no gated MLP"):
        gated_mlps(model)
    assert hasattr(model[0], "gate_up_proj")



def test_a_known_fused_mlp_whose_gate_up_proj_is_not_a_plain_linear_is_refused():
    """Phi-3's own MLP class is split only while its gate_up_proj is a plain torch.nn.Linear: a subclass (a quantized
    layer's, whose weight is not the two halves as stored) is neither split nor taken for a gated MLP (s45's mutation
    audit: an isinstance check in place of the exact type passed every test)."""
    from transformers import Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3MLP

    from llmfast.errors import UserError
    from llmfast.sparse.base import gated_mlps
    from llmfast.sparse.fused import split_fused_mlps

    class QuantizedLinear(torch.nn.Linear):
        pass

    config = Phi3Config(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    plain, odd = Phi3MLP(config), Phi3MLP(config)
    odd.gate_up_proj = QuantizedLinear(8, 32, bias=False)
    for mlp, found in ((plain, True), (odd, False)):
        model = torch.nn.Sequential(mlp)
        model.config = SimpleNamespace(architectures=["Phi3ForCausalLM"])
        if found:
            assert gated_mlps(model) == [mlp] and split_fused_mlps(model) == 1 and hasattr(mlp, "gate_proj")
        else:
            with pytest.raises(UserError, match="Phi3ForCausalLM has no gated MLP"):
                gated_mlps(model)
            assert split_fused_mlps(model) == 0 and hasattr(mlp, "gate_up_proj") and not hasattr(mlp, "gate_proj")
