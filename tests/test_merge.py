"""`llmfast merge`: every method against a plain-torch reference written here, adapters, checks, streaming.

The references below are written independently of llmfast.merge.methods (full state dicts, a sort-based
top-k, explicit sign election), so a shared bug would have to be made twice.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from llmfast.errors import UserError
from tests.conftest import REPO, run_cli


# ---------------------------------------------------------------- fixtures
def _perturb(src: Path, dst: Path, seed: int, scale: float = 0.02, only: str = "layers") -> Path:
    shutil.copytree(src, dst)
    sd = load_file(src / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    sd = {k: (v + scale * torch.randn(v.shape, generator=g) if only in k else v) for k, v in sd.items()}
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def family(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge-family")
    return {"base": tiny_dir, "ft1": _perturb(tiny_dir, root / "ft1", 1), "ft2": _perturb(tiny_dir, root / "ft2", 2),
            "root": root}


def _make_adapter(base_dir: Path, out: Path, seed: int, r: int = 4, targets=("q_proj", "v_proj", "up_proj"),
                  alpha: float = 8.0, **lora) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), **lora))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero; a trained adapter has not
                p.normal_(0, 0.05)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_dir: Path, family: dict[str, Path]) -> dict[str, Path]:
    root = family["root"]
    return {"a1": _make_adapter(tiny_dir, root / "ad1", 1),
            "a2": _make_adapter(tiny_dir, root / "ad2", 2, r=8, targets=("q_proj", "down_proj"), alpha=4.0)}


def _config(tmp: Path, method: str, models: list[tuple[Path, dict]], base: Path | None, **top) -> Path:
    cfg: dict = {"merge_method": method}
    if base is not None:
        cfg["base_model"] = str(base)
    cfg["models"] = [{"model": str(p), "parameters": params} if params else {"model": str(p)} for p, params in models]
    cfg.update(top)
    path = tmp / f"{method}-{len(list(tmp.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _merge(cfg: Path, out: Path, *extra: str) -> dict[str, torch.Tensor]:
    code, stdout, stderr = run_cli("merge", str(cfg), str(out), "--no-progress", *extra)
    assert code == 0, stderr
    assert "merged" in stdout
    return _load(out)


def _load(out: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def _sd(d: Path) -> dict[str, torch.Tensor]:
    return load_file(d / "model.safetensors")


# ---------------------------------------------------------------- references (plain torch)
def _ref_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return delta
    k = max(1, int(density * delta.numel()))
    order = torch.sort(delta.abs().flatten(), descending=True).indices[:k]
    keep = torch.zeros(delta.numel(), dtype=torch.bool)
    keep[order] = True
    return delta * keep.reshape(delta.shape)


def _ref_ties(base, fts, weights, densities, normalize=True, lam=1.0):
    out = {}
    for k, b in base.items():
        ds = [_ref_trim(ft[k] - b, dens) * w for ft, w, dens in zip(fts, weights, densities)]
        stacked = torch.stack(ds)
        elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
        agree = torch.sign(stacked) == elected
        mixed = (stacked * agree).sum(0)
        wt = torch.tensor(weights).reshape(-1, *([1] * b.dim()))
        div = (wt * agree).sum(0)
        div[div == 0] = 1
        out[k] = b + (mixed / div if normalize else mixed) * lam
    return out


# ---------------------------------------------------------------- methods
def test_linear_matches_reference(family, tmp_path):
    cfg = _config(tmp_path, "linear", [(family["ft1"], {"weight": 0.7}), (family["ft2"], {"weight": 0.3})], None)
    got = _merge(cfg, tmp_path / "out")
    a, b = _sd(family["ft1"]), _sd(family["ft2"])
    assert set(got) == set(a)
    for k in a:
        torch.testing.assert_close(got[k], (0.7 * a[k] + 0.3 * b[k]) / 1.0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_elementwise_methods_merge_block_by_block_like_whole_tensors(method, family, tmp_path, monkeypatch):
    """Block by block (an odd block size, so blocks end mid-row) and in bfloat16: the whole-tensor result."""
    from llmfast.merge import steps
    from llmfast.merge.plan import plan_merge

    monkeypatch.setattr(steps, "BLOCK", 777)
    models = [(family["ft1"], {"weight": 0.7}), (family["ft2"], {"weight": -0.3})]
    cfg = _config(tmp_path, method, models, None if method == "linear" else family["base"], dtype="bfloat16")
    assert steps.merges_by_blocks(plan_merge(cfg))
    got = _merge(cfg, tmp_path / "out")
    a, b, base = _sd(family["ft1"]), _sd(family["ft2"]), _sd(family["base"])
    assert any(v.numel() > 3 * 777 for v in got.values())
    for k in a:
        x, y, z = (t[k].bfloat16().float() for t in (a, b, base))  # each input read in bfloat16
        if method == "linear":
            ref = ((x * 0.7 + y * -0.3) / 0.4)
        else:
            ref = z + ((x - z) * 0.7 + (y - z) * -0.3)
        assert got[k].dtype == torch.bfloat16
        assert torch.equal(got[k], ref.bfloat16()), k


def test_linear_includes_base_model_like_mergekit(family, tmp_path):
    # mergekit adds a base_model that is not among the models as one more averaged input.
    cfg = _config(tmp_path, "linear", [(family["ft1"], {"weight": 1.0})], family["base"],
                  parameters={"weight": 3.0})
    got = _merge(cfg, tmp_path / "out")
    a, base = _sd(family["ft1"]), _sd(family["base"])
    for k in a:
        torch.testing.assert_close(got[k], (1.0 * a[k] + 3.0 * base[k]) / 4.0, rtol=0, atol=1e-6)


def test_a_base_listed_among_the_models_is_one_input_or_none(family, tmp_path):
    """The base_model named under `models:` too: linear averages it once, with its own weight (not added again);
    a task-vector method drops it (its task vector is zero), so normalize divides by the other weights only."""
    cfg = _config(tmp_path, "linear", [(family["ft1"], {"weight": 1.0}), (family["base"], {"weight": 3.0})],
                  family["base"])
    got = _merge(cfg, tmp_path / "lin")
    a, base = _sd(family["ft1"]), _sd(family["base"])
    for k in a:
        torch.testing.assert_close(got[k], (1.0 * a[k] + 3.0 * base[k]) / 4.0, rtol=0, atol=1e-6)
    cfg = _config(tmp_path, "task_arithmetic", [(family["ft1"], {"weight": 0.5}), (family["base"], {"weight": 1.0})],
                  family["base"], parameters={"normalize": True})
    got = _merge(cfg, tmp_path / "ta")
    for k in a:
        torch.testing.assert_close(got[k], base[k] + 0.5 * (a[k] - base[k]) / 0.5, rtol=0, atol=1e-6)


def test_task_arithmetic_scaling_and_negation(family, tmp_path):
    cfg = _config(tmp_path, "task_arithmetic", [(family["ft1"], {"weight": 1.0}), (family["ft2"], {"weight": -0.5})],
                  family["base"], parameters={"lambda": 0.8})
    got = _merge(cfg, tmp_path / "out")
    base, a, b = _sd(family["base"]), _sd(family["ft1"]), _sd(family["ft2"])
    for k in base:
        ref = base[k] + 0.8 * (1.0 * (a[k] - base[k]) - 0.5 * (b[k] - base[k]))
        torch.testing.assert_close(got[k], ref, rtol=0, atol=1e-6)
    # Negation alone subtracts the task: base - (ft1 - base).
    cfg = _config(tmp_path, "task_arithmetic", [(family["ft1"], {"weight": -1.0})], family["base"])
    neg = _merge(cfg, tmp_path / "neg")
    k = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(neg[k], 2 * base[k] - a[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("normalize", [True, False, None])
def test_ties_matches_reference(family, tmp_path, normalize):
    """None: normalize left out, which is true for ties (mergekit's default)."""
    shared = {"int8_mask": True} if normalize is None else {"normalize": normalize, "int8_mask": True}
    cfg = _config(tmp_path, "ties", [(family["ft1"], {"weight": 1.0, "density": 0.3}),
                                     (family["ft2"], {"weight": 0.6, "density": 0.7})],
                  family["base"], parameters=shared)
    got = _merge(cfg, tmp_path / "out")
    ref = _ref_ties(_sd(family["base"]), [_sd(family["ft1"]), _sd(family["ft2"])], [1.0, 0.6], [0.3, 0.7],
                    normalize=normalize is not False)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6)


def test_magnitude_prune_matches_reference(family, tmp_path):
    # weights summing to 0.8: normalize is false by default, so nothing divides by them
    cfg = _config(tmp_path, "magnitude_prune", [(family["ft1"], {"weight": 0.5, "density": 0.2}),
                                                (family["ft2"], {"weight": 0.3, "density": 0.2})], family["base"])
    got = _merge(cfg, tmp_path / "out")
    base, a, b = _sd(family["base"]), _sd(family["ft1"]), _sd(family["ft2"])
    for k in base:
        ref = base[k] + 0.5 * _ref_trim(a[k] - base[k], 0.2) + 0.3 * _ref_trim(b[k] - base[k], 0.2)
        torch.testing.assert_close(got[k], ref, rtol=0, atol=1e-6)


def test_dare_seeded_kept_fraction_and_rescale(family, tmp_path):
    cfg = _config(tmp_path, "dare_linear", [(family["ft1"], {"weight": 1.0, "density": 0.3})], family["base"])
    one = _merge(cfg, tmp_path / "s0a", "--seed", "7")
    again = _merge(cfg, tmp_path / "s0b", "--seed", "7")
    code, stdout, stderr = run_cli("merge", str(cfg), str(tmp_path / "s1"), "--no-progress", "--seed", "8")
    assert code == 0, stderr
    other = _load(tmp_path / "s1")
    k = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(one[k], again[k])
    assert not torch.equal(one[k], other[k])
    base, a = _sd(family["base"]), _sd(family["ft1"])
    delta, merged = a[k] - base[k], one[k] - base[k]
    kept = merged != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.02  # Bernoulli(0.3) over 32k entries
    ratio = merged[kept] / delta[kept]
    # One rescale factor per tensor: the L1 norm is kept (mergekit), close to 1/density.
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio.mean().item()), rtol=2e-3, atol=0)
    torch.testing.assert_close(merged.abs().sum(), delta.abs().sum(), rtol=1e-4, atol=0)
    assert abs(ratio.mean().item() - 1 / 0.3) < 0.15
    manifest = json.loads((tmp_path / "s0a" / "llmfast.json").read_text())
    assert abs(manifest["metrics"]["kept_fraction"] - 0.3) < 0.01
    kept = json.loads((tmp_path / "s1" / "llmfast.json").read_text())["metrics"]["kept_fraction"]
    assert f"kept fraction: {kept:.4f}" in stdout  # the summary line says it too


def test_dare_drops_each_model_at_independent_positions(family, tmp_path):
    """Each input's drop has its own stream: two models at density 0.5 both keep an entry ~1/4 of the time (one
    stream for every input would keep the same positions: 1/2). The masks are read back from the output, each entry
    being the nearest of base, base + d1, base + d2 and base + d1 + d2."""
    cfg = _config(tmp_path, "dare_linear", [(family["ft1"], {"weight": 1.0, "density": 0.5}),
                                            (family["ft2"], {"weight": 1.0, "density": 0.5})], family["base"],
                  parameters={"rescale": False})
    got = _merge(cfg, tmp_path / "out", "--seed", "3")
    base, a, b = _sd(family["base"]), _sd(family["ft1"]), _sd(family["ft2"])
    m1, m2 = [], []
    for k in (k for k in base if "layers" in k and base[k].dim() == 2):
        d1, d2 = a[k] - base[k], b[k] - base[k]
        candidates = torch.stack([base[k], d1 + base[k], d2 + base[k], (d1 + d2) + base[k]])
        gap, which = (candidates - got[k]).abs().min(0)
        assert float(gap.max()) < 1e-6, k
        m1.append((which % 2 == 1).flatten())
        m2.append((which >= 2).flatten())
    k1, k2 = torch.cat(m1), torch.cat(m2)
    n = k1.numel()
    sigma = (0.25 * 0.75 / n) ** 0.5  # binomial spread of the "both kept" fraction around 1/4
    assert n > 100_000 and abs(k1.float().mean() - 0.5) < 10 * (0.25 / n) ** 0.5
    assert abs(k2.float().mean() - 0.5) < 10 * (0.25 / n) ** 0.5
    assert abs((k1 & k2).float().mean() - 0.25) < 6 * sigma, (k1 & k2).float().mean()



@pytest.mark.parametrize("native", [True, False])
def test_normalize_divides_by_every_models_weight_where_one_left_a_tensor_alone(family, tmp_path, monkeypatch,
                                                                                native):
    """task_arithmetic with normalize: a model that did not change a tensor still counts in its divisor, as
    mergekit divides by every model's weight (s44: its weight was left out there, so attention took 0.7/0.7 of
    ft1's change where mergekit takes 0.7/1.9), on the C kernel's path and on numpy's."""
    from llmfast.merge import merge as merge_module

    if not native:
        monkeypatch.setattr(merge_module, "merge_kernel", lambda: None)
    mlp_only = _perturb(family["base"], tmp_path / "mlp-only", 3, only="mlp")
    cfg = _config(tmp_path, "task_arithmetic", [(family["ft1"], {"weight": 0.7}), (mlp_only, {"weight": 1.2})],
                  family["base"], parameters={"normalize": True})
    got, base, a, b = _merge(cfg, tmp_path / "out"), _sd(family["base"]), _sd(family["ft1"]), _sd(mlp_only)
    assert any("mlp" not in k and not torch.equal(a[k], base[k]) for k in base)  # tensors only ft1 changed
    for k in base:
        want = base[k] + (0.7 * (a[k] - base[k]) + 1.2 * (b[k] - base[k])) / 1.9
        torch.testing.assert_close(got[k], want, rtol=0, atol=1e-6)

@pytest.mark.parametrize("native", [True, False])
def test_normalize_divides_by_a_negative_weight_sum_and_by_1_for_a_zero_one(family, tmp_path, monkeypatch, native):
    """mergekit's divisor is the sum of the weights, 1 where it is ~0: weights 1 and -1 give base + d1 - d2 (not a
    division by 0); a lone -0.5 divides by -0.5 (its sign kept), giving the model itself."""
    from llmfast.merge import merge as merge_module

    if not native:
        monkeypatch.setattr(merge_module, "merge_kernel", lambda: None)
    base, a, b = _sd(family["base"]), _sd(family["ft1"]), _sd(family["ft2"])
    cfg = _config(tmp_path, "task_arithmetic", [(family["ft1"], {"weight": 1.0}), (family["ft2"], {"weight": -1.0})],
                  family["base"], parameters={"normalize": True})
    got = _merge(cfg, tmp_path / "zero")
    for k in base:
        torch.testing.assert_close(got[k], base[k] + ((a[k] - base[k]) - (b[k] - base[k])), rtol=0, atol=1e-6)
    cfg = _config(tmp_path, "task_arithmetic", [(family["ft1"], {"weight": -0.5})], family["base"],
                  parameters={"normalize": True})
    got = _merge(cfg, tmp_path / "negative")
    for k in base:
        torch.testing.assert_close(got[k], a[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("method,native", [("ties", False), ("dare_ties", True), ("dare_ties", False)])
def test_sign_election_of_task_vectors_that_cancel_keeps_the_positive_one(family, tmp_path, monkeypatch, method,
                                                                          native):
    """Task vectors +base and -base (models 2 * base and 0, exact in float32) sum to exactly 0 everywhere: mergekit's
    election counts a 0 sum as +, so the positive one is kept and the merge is base + |base| (without an election it
    would be the base; electing - would give base - |base|). dare_ties at density 1 runs in the C kernel too."""
    from llmfast.merge import merge as merge_module

    if not native:
        monkeypatch.setattr(merge_module, "merge_kernel", lambda: None)
    base = _sd(family["base"])
    models = []
    for tag, scale in (("up", 2.0), ("zero", 0.0)):
        d = shutil.copytree(family["base"], tmp_path / tag)
        save_file({k: v * scale for k, v in base.items()}, d / "model.safetensors", metadata={"format": "pt"})
        models.append((d, {"weight": 1.0, "density": 1.0}))
    got = _merge(_config(tmp_path, method, models, family["base"]), tmp_path / "out")
    for k, v in base.items():
        assert torch.equal(got[k], v + v.abs()), k


@pytest.mark.parametrize("native", [True, False])
def test_dare_tensor_that_loses_every_entry_stays_the_base(family, tmp_path, monkeypatch, native):
    """A tensor whose task vector DARE drops entirely has L1 norm 0 after the drop: it is not rescaled (0 / 0) and
    merges to the base, finite, on the C kernel's path and on numpy's."""
    import numpy as np

    from llmfast.merge import merge as merge_module
    from llmfast.merge.methods.sparsify import drop_at_random

    if not native:
        monkeypatch.setattr(merge_module, "merge_kernel", lambda: None)
    base, a = _sd(family["base"]), _sd(family["ft1"])
    norms = [k for k in base if "layernorm" in k and not torch.equal(a[k], base[k])]  # 128 entries each

    def emptied(seed: int, k: str) -> bool:
        ones = np.ones(base[k].numel(), dtype=np.float32)
        drop_at_random(ones, 0.02, seed, k, 0)
        return not ones.any()

    seed, k = next((s, k) for s in range(2000) for k in norms if emptied(s, k))
    cfg = _config(tmp_path, "dare_linear", [(family["ft1"], {"weight": 1.0, "density": 0.02})], family["base"])
    got = _merge(cfg, tmp_path / "out", "--seed", str(seed))
    assert all(bool(torch.isfinite(v).all()) for v in got.values())
    assert torch.equal(got[k], base[k]), k
    other = "model.layers.0.mlp.up_proj.weight"  # the rest is still dropped and rescaled (~1/density)
    ratio = (got[other] - base[other])[got[other] != base[other]] / (a[other] - base[other])[got[other] != base[other]]
    assert 30 < float(ratio.mean()) < 70


def test_dare_ties_runs_and_elects_signs(family, tmp_path):
    cfg = _config(tmp_path, "dare_ties", [(family["ft1"], {"weight": 1.0, "density": 0.5}),
                                          (family["ft2"], {"weight": 1.0, "density": 0.5})], family["base"],
                  parameters={"rescale": False})
    got = _merge(cfg, tmp_path / "out")
    base, a, b = _sd(family["base"]), _sd(family["ft1"]), _sd(family["ft2"])
    k = "model.layers.0.self_attn.q_proj.weight"
    d = got[k] - base[k]
    da, db = a[k] - base[k], b[k] - base[k]
    # Without rescale and normalize every merged entry is a sum of kept original entries of one sign.
    nz = d != 0
    ok = torch.isclose(d, da, atol=1e-6) | torch.isclose(d, db, atol=1e-6) | torch.isclose(d, da + db, atol=1e-6)
    assert bool(ok[nz].all())


def test_filters_and_gradients(family, tmp_path):
    params = {"weight": [{"filter": "mlp", "value": 0.0}, {"filter": "self_attn", "value": [0.0, 1.0]},
                         {"value": 1.0}]}
    cfg = _config(tmp_path, "task_arithmetic", [(family["ft1"], params)], family["base"])
    got = _merge(cfg, tmp_path / "out")
    base, a = _sd(family["base"]), _sd(family["ft1"])
    mlp, attn0, attn1 = ("model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight",
                         "model.layers.1.self_attn.q_proj.weight")
    torch.testing.assert_close(got[mlp], base[mlp])  # filter 'mlp' -> weight 0
    torch.testing.assert_close(got[attn0], base[attn0])  # gradient [0, 1]: layer 0 of 2 -> 0
    torch.testing.assert_close(got[attn1], a[attn1], rtol=0, atol=1e-6)  # layer 1 of 2 -> 1
    norm = "model.layers.1.input_layernorm.weight"
    torch.testing.assert_close(got[norm], a[norm], rtol=0, atol=1e-6)  # no filter matches -> the catch-all


def test_mergekit_yaml_accepted_as_is_and_loads(family, tmp_path):
    text = f"""\
# a config as mergekit's README writes it
models:
  - model: {family['ft1']}
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: {family['ft2']}
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
merge_method: ties
base_model: {family['base']}
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
"""
    cfg = tmp_path / "mergekit.yml"
    cfg.write_text(text)
    got = _merge(cfg, tmp_path / "out")
    assert all(v.dtype == torch.bfloat16 for v in got.values())
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits.float()).all()
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_sharded_output_has_index_and_loads(family, tmp_path):
    cfg = _config(tmp_path, "linear", [(family["ft1"], {"weight": 1.0}), (family["ft2"], {"weight": 1.0})], None)
    got = _merge(cfg, tmp_path / "out", "--out-shard-size", "300K")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(got)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    a = _sd(family["ft1"])
    torch.testing.assert_close(model.state_dict()["model.norm.weight"], a["model.norm.weight"])


# ---------------------------------------------------------------- adapters
def _adapter_delta(adapter_dir: Path, name: str) -> torch.Tensor | None:
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    sd = load_file(adapter_dir / "adapter_model.safetensors")
    key = "base_model.model." + name.removesuffix(".weight")
    if f"{key}.lora_A.weight" not in sd:
        return None
    a, b = sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"]
    return cfg["lora_alpha"] / a.shape[0] * (b @ a)


def _weighted_delta(weighted: list[tuple[Path, float]], name: str, like: torch.Tensor) -> torch.Tensor:
    """sum of weight * (B @ A scaled) over the adapters that touch `name`; zeros where none does."""
    return sum((w * d for ad, w in weighted if (d := _adapter_delta(ad, name)) is not None), torch.zeros_like(like))


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's own merge_and_unload of `adapter` into `base`: the reference for our adapter handling."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload().state_dict()


def test_adapters_merge_into_full_model(family, adapters, tmp_path):
    cfg = _config(tmp_path, "task_arithmetic", [(adapters["a1"], {"weight": 0.7}), (adapters["a2"], {"weight": 1.2})],
                  family["base"])
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # (the tests run on 1) the merge runs torch on one thread, then gives the caller's back
    try:
        got = _merge(cfg, tmp_path / "out")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    base = _sd(family["base"])
    weighted = [(adapters["a1"], 0.7), (adapters["a2"], 1.2)]
    for k in base:
        torch.testing.assert_close(got[k], base[k] + _weighted_delta(weighted, k, base[k]), rtol=0, atol=1e-6)
    # The same as PEFT's own merge_and_unload for a single adapter.
    cfg = _config(tmp_path, "task_arithmetic", [(adapters["a1"], {"weight": 1.0})], family["base"])
    one = _merge(cfg, tmp_path / "one")
    peft_merged = _peft_merged(family["base"], adapters["a1"])
    for k in one:
        torch.testing.assert_close(one[k], peft_merged[k], rtol=0, atol=1e-6)


def test_adapter_concat_is_exact_and_loads_in_peft(family, adapters, tmp_path):
    cfg = _config(tmp_path, "task_arithmetic", [(adapters["a1"], {"weight": 0.7}), (adapters["a2"], {"weight": 1.2})],
                  family["base"])
    code, out, err = run_cli("merge", str(cfg), str(tmp_path / "ad"), "--no-progress", "--adapter-rank", "concat")
    assert code == 0, err
    assert "rank: 12 (concatenated, exact)" in out
    acfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert acfg["r"] == 12 and set(acfg["target_modules"]) == {"q_proj", "v_proj", "up_proj", "down_proj"}
    full = _merge(cfg, tmp_path / "full")
    base = _sd(family["base"])
    weighted = [(adapters["a1"], 0.7), (adapters["a2"], 1.2)]
    for k in base:
        ref = _weighted_delta(weighted, k, base[k])
        got = _adapter_delta(tmp_path / "ad", k)
        torch.testing.assert_close(got if got is not None else torch.zeros_like(ref), ref, rtol=0, atol=1e-6)
    merged = _peft_merged(family["base"], tmp_path / "ad")
    for k in full:
        torch.testing.assert_close(merged[k], full[k], rtol=0, atol=1e-5)


def test_adapter_concat_pads_a_smaller_rank_of_rank_pattern(family, adapters, tmp_path):
    """An adapter whose q_proj has rank 2 (rank_pattern) and its other modules rank 4: concatenated beside a rank-8
    adapter, its q_proj factors are padded with zeros to 4, and the written adapter is the full merge's delta."""
    pattern = _make_adapter(family["base"], tmp_path / "pattern", 5, rank_pattern={"q_proj": 2})
    cfg = _config(tmp_path, "task_arithmetic", [(pattern, {"weight": 0.7}), (adapters["a2"], {"weight": 1.2})],
                  family["base"])
    code, out, err = run_cli("merge", str(cfg), str(tmp_path / "ad"), "--no-progress", "--adapter-rank", "concat")
    assert code == 0, err
    assert "rank: 12 (concatenated, exact)" in out
    full, base = _merge(cfg, tmp_path / "full"), _sd(family["base"])
    q = "model.layers.0.self_attn.q_proj.weight"
    assert _adapter_delta(pattern, q) is not None and torch.linalg.matrix_rank(_adapter_delta(pattern, q)) == 2
    for k in base:
        got = _adapter_delta(tmp_path / "ad", k)
        torch.testing.assert_close(torch.zeros_like(base[k]) if got is None else got, full[k] - base[k],
                                   rtol=0, atol=1e-6)


def test_adapter_output_refuses_a_full_model_among_the_adapters(family, adapters, tmp_path):
    """--adapter-rank writes adapters' task vectors only: a full model beside them would be left out of the adapter,
    so the config is refused in one line and nothing is written."""
    cfg = _config(tmp_path, "task_arithmetic", [(adapters["a1"], {"weight": 1.0}), (family["ft1"], {"weight": 1.0})],
                  family["base"])
    for rank in ("concat", "4"):
        code, _, err = run_cli("merge", str(cfg), str(tmp_path / "x"), "--no-progress", "--adapter-rank", rank)
        line = err.strip()
        assert code == 2 and "--adapter-rank needs every model in the config to be a LoRA adapter" in line, err
        assert "\n" not in line and not (tmp_path / "x").exists()


def test_a_merged_adapter_names_exactly_the_modules_it_holds(family, tmp_path):
    """An input trained on some layers only (PEFT's layers_to_transform): the merged adapter's config lists the
    modules its weights hold, not the first input's layer filter, which had PEFT drop the other inputs' layers from
    the merge without a word; nor every layer's module of those names, which llmfast's loader refuses (missing)."""
    from llmfast.models import load_model

    first = _make_adapter(family["base"], tmp_path / "layer0", 3, layers_to_transform=[0])
    second = _make_adapter(family["base"], tmp_path / "layer1", 4, layers_to_transform=[1])
    cfg = _config(tmp_path, "task_arithmetic", [(first, {"weight": 1.0}), (second, {"weight": 1.0})],
                  family["base"])
    code, _, err = run_cli("merge", str(cfg), str(tmp_path / "ad"), "--no-progress", "--adapter-rank", "concat")
    assert code == 0, err
    full = _merge(cfg, tmp_path / "full")
    merged = _peft_merged(family["base"], tmp_path / "ad")
    assert any(not torch.equal(full[k], v) for k, v in _sd(family["base"]).items() if ".layers.1." in k)
    for k in full:
        torch.testing.assert_close(merged[k], full[k], rtol=0, atol=1e-5)
    cfg = _config(tmp_path, "task_arithmetic", [(first, {"weight": 1.0})], family["base"])
    code, _, err = run_cli("merge", str(cfg), str(tmp_path / "one"), "--no-progress", "--adapter-rank", "concat")
    assert code == 0, err
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    with torch.no_grad():
        got = load_model(family["base"], adapter=tmp_path / "one")(ids).logits
        want = load_model(family["base"], adapter=first)(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_adapter_svd_rerank_reports_error(family, adapters, tmp_path):
    cfg = _config(tmp_path, "task_arithmetic", [(adapters["a1"], {"weight": 1.0}), (adapters["a2"], {"weight": 1.0})],
                  family["base"])
    code, out, err = run_cli("merge", str(cfg), str(tmp_path / "r12"), "--no-progress", "--adapter-rank", "12")
    assert code == 0, err
    m = json.loads((tmp_path / "r12" / "llmfast.json").read_text())["metrics"]
    assert m["svd_relative_frobenius_error"] < 1e-5  # rank 12 holds rank 4 + 8 exactly
    code, out, err = run_cli("merge", str(cfg), str(tmp_path / "r2"), "--no-progress", "--adapter-rank", "2")
    assert code == 0, err
    m = json.loads((tmp_path / "r2" / "llmfast.json").read_text())["metrics"]
    assert 0.05 < m["svd_relative_frobenius_error"] < 1 and "SVD relative Frobenius error" in out
    # above every layer's full rank only zeros are added (--adapter-rank 100000 wrote 1.6 GB for a 1.7 MB model, s42)
    code, out, err = run_cli("merge", str(cfg), str(tmp_path / "huge"), "--no-progress", "--adapter-rank", "1000")
    assert code == 2 and "--adapter-rank 1000: the adapters' largest layer has full rank 128" in err, err
    assert not (tmp_path / "huge").exists()
    code, out, err = run_cli("merge", str(cfg), str(tmp_path / "full"), "--no-progress", "--adapter-rank", "128")
    assert code == 0, err  # the full rank itself is accepted
    m = json.loads((tmp_path / "full" / "llmfast.json").read_text())["metrics"]
    assert m["rank"] == 128 and m["svd_relative_frobenius_error"] < 1e-5
    # TIES cannot be concatenated, but can be re-ranked.
    cfg = _config(tmp_path, "ties", [(adapters["a1"], {"weight": 1.0, "density": 0.5}),
                                     (adapters["a2"], {"weight": 1.0, "density": 0.5})], family["base"])
    code, _, err = run_cli("merge", str(cfg), str(tmp_path / "tc"), "--no-progress", "--adapter-rank", "concat")
    assert code == 2 and "--adapter-rank R" in err and not (tmp_path / "tc").exists()
    code, out, err = run_cli("merge", str(cfg), str(tmp_path / "t16"), "--no-progress", "--adapter-rank", "16")
    assert code == 0, err
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(family["base"]), tmp_path / "t16")


def test_adapter_svd_rerank_writes_the_merged_delta_and_its_true_error(family, adapters, tmp_path):
    """The written B @ A (scaled by the written alpha / r) is the merged delta at rank 4 + 8, and at rank 2 the
    reported errors are ||B @ A - delta||_F / ||delta||_F measured on the written tensors (overall and worst)."""
    weighted = [(adapters["a1"], 0.7), (adapters["a2"], -1.2)]
    cfg = _config(tmp_path, "task_arithmetic", [(ad, {"weight": w}) for ad, w in weighted], family["base"])
    base = _sd(family["base"])
    touched = {k for k in base for ad, _ in weighted if _adapter_delta(ad, k) is not None}
    for rank in (12, 2):
        out = tmp_path / f"r{rank}"
        code, _, err = run_cli("merge", str(cfg), str(out), "--no-progress", "--adapter-rank", str(rank))
        assert code == 0, err
        assert {k for k in base if _adapter_delta(out, k) is not None} == touched
        tail = total = worst = 0.0
        for k in sorted(touched):
            ref = _weighted_delta(weighted, k, base[k]).double()
            got = _adapter_delta(out, k).double()
            if rank == 12:
                torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
            e, t = float((got - ref).pow(2).sum()), float(ref.pow(2).sum())
            tail, total, worst = tail + e, total + t, max(worst, (e / t) ** 0.5)
        m = json.loads((out / "llmfast.json").read_text())["metrics"]
        assert m["svd_relative_frobenius_error"] == pytest.approx((tail / total) ** 0.5, abs=1e-5)
        assert m["svd_worst_module_error"] == pytest.approx(worst, abs=1e-5)
        assert rank == 12 or 0.05 < worst < 1


@pytest.mark.parametrize("lora", [{"use_rslora": True},
                                  {"alpha_pattern": {"v_proj": 32.0}, "rank_pattern": {"q_proj": 2}},
                                  {"alpha_pattern": {"q_proj|up_proj": 32.0}}],  # PEFT reads a key as a regex
                         ids=["rslora", "patterns", "alternation"])
def test_rslora_and_pattern_adapters_merge_like_peft(family, tmp_path, lora):
    """rsLoRA scales by alpha / sqrt(r); alpha_pattern and rank_pattern give some modules their own alpha and rank."""
    ad = _make_adapter(family["base"], tmp_path / "ad", 5, **lora)
    written = json.loads((ad / "adapter_config.json").read_text())
    assert all(written[key] == value for key, value in lora.items())
    cfg = _config(tmp_path, "task_arithmetic", [(ad, {"weight": 1.0})], family["base"])
    got = _merge(cfg, tmp_path / "out")
    ref, base = _peft_merged(family["base"], ad), _sd(family["base"])
    for k in got:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6)
    for module in ("q_proj", "v_proj", "up_proj"):
        k = f"model.layers.0.{'mlp' if module == 'up_proj' else 'self_attn'}.{module}.weight"
        assert (got[k] - base[k]).abs().max() > 1e-3, k  # each module really changed


def test_an_adapter_config_without_lora_alpha_scales_by_peft_default(family, adapters, tmp_path):
    """A config that leaves lora_alpha out is read by PEFT with its default (LoraConfig's 8), not with alpha = r:
    the merge applies the delta PEFT applies."""
    bare = Path(shutil.copytree(adapters["a1"], tmp_path / "bare"))
    acfg = json.loads((bare / "adapter_config.json").read_text())
    assert acfg["r"] == 4
    del acfg["lora_alpha"]
    (bare / "adapter_config.json").write_text(json.dumps(acfg))
    got = _merge(_config(tmp_path, "task_arithmetic", [(bare, {"weight": 1.0})], family["base"]), tmp_path / "out")
    want = _peft_merged(family["base"], bare)
    assert any(not torch.equal(want[k], v) for k, v in _sd(family["base"]).items())
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)


def test_adapter_svd_rerank_of_a_linear_merge_averaging_the_base_in(family, adapters, tmp_path):
    """linear with a base_model averages the base in as one more input (weight 1 here): re-ranked to 4 + 8 the written
    adapter is the full merge's delta, (0.3 d1 + 0.7 d2) / 2. (The SVD path read that input from no file: a
    traceback, AttributeError 'NoneType' object has no attribute 'stored_array'.)"""
    cfg = _config(tmp_path, "linear", [(adapters["a1"], {"weight": 0.3}), (adapters["a2"], {"weight": 0.7})],
                  family["base"], parameters={"weight": 1.0})
    code, _, err = run_cli("merge", str(cfg), str(tmp_path / "ad"), "--no-progress", "--adapter-rank", "12")
    assert code == 0, err
    full, base = _merge(cfg, tmp_path / "full"), _sd(family["base"])
    weighted = [(adapters["a1"], 0.15), (adapters["a2"], 0.35)]
    for k in base:
        got = _adapter_delta(tmp_path / "ad", k)
        got = torch.zeros_like(base[k]) if got is None else got
        torch.testing.assert_close(got, full[k] - base[k], rtol=0, atol=1e-5)
        torch.testing.assert_close(got, _weighted_delta(weighted, k, base[k]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_adapter_concat_applies_lambda_and_normalize(family, adapters, tmp_path, normalize):
    """The concatenated adapter's B @ A is lambda * sum(w_i * delta_i) (/ sum(w_i) under normalize, as mergekit
    divides): the same config merged into the full model, minus the base, in every module, those only one adapter
    touches included (s44: the full-model merge left an untouched adapter's weight out of its divisor)."""
    weighted = [(adapters["a1"], 0.7), (adapters["a2"], 1.2)]
    cfg = _config(tmp_path, "task_arithmetic", [(ad, {"weight": w}) for ad, w in weighted], family["base"],
                  parameters={"lambda": 0.5, "normalize": normalize})
    code, _, err = run_cli("merge", str(cfg), str(tmp_path / "ad"), "--no-progress", "--adapter-rank", "concat")
    assert code == 0, err
    full, base = _merge(cfg, tmp_path / "full"), _sd(family["base"])
    scale = 0.5 / (1.9 if normalize else 1.0)
    for k in base:
        got = _adapter_delta(tmp_path / "ad", k)
        got = torch.zeros_like(base[k]) if got is None else got
        torch.testing.assert_close(got, full[k] - base[k], rtol=0, atol=1e-6)
        torch.testing.assert_close(got, scale * _weighted_delta(weighted, k, base[k]), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- checks before any work
def _assert_refused(cfg: Path, out: Path, *needles: str) -> None:
    code, stdout, stderr = run_cli("merge", str(cfg), str(out), "--no-progress")
    assert code == 2, stderr
    line = stderr.strip()
    assert line.startswith("llmfast: error: ") and "\n" not in line, stderr
    for n in needles:
        assert n in line, line
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}.tmp") for p in out.parent.iterdir())


def test_refuses_architecture_mismatch(family, tmp_path):
    other = tmp_path / "deeper"
    shutil.copytree(family["ft1"], other)
    c = json.loads((other / "config.json").read_text())
    c["num_hidden_layers"] = 3
    (other / "config.json").write_text(json.dumps(c))
    cfg = _config(tmp_path, "ties", [(family["ft1"], {"weight": 1}), (other, {"weight": 1})], family["base"])
    _assert_refused(cfg, tmp_path / "out", "num_hidden_layers=3", "models[1]")


def test_refuses_models_of_another_activation_or_relu_cut(family, tmp_path):
    """A relufy model's cut (config.json, calibrated on its weights) was taken from the reference model alone: two
    relufy models of other cuts, or one without a cut, merged under one of them without a word."""
    def variant(src: Path, name: str, **keys) -> Path:
        shutil.copytree(src, tmp_path / name)
        c = json.loads((tmp_path / name / "config.json").read_text())
        (tmp_path / name / "config.json").write_text(json.dumps({**c, **keys}))
        return tmp_path / name

    relu = {"architectures": ["LlmfastReluLlamaForCausalLM"], "hidden_act": "relu"}
    cut = variant(family["ft1"], "cut", **relu, llmfast_relu_thresholds=[0.1, 0.2])
    models = {"silu-relu": [family["ft1"], variant(family["ft2"], "act", hidden_act="relu")],
              "other cut": [cut, variant(family["ft2"], "cut2", **relu, llmfast_relu_thresholds=[0.1, 0.3])],
              "no cut": [variant(family["ft2"], "nocut", **relu), cut]}
    for what, pair in models.items():
        cfg = _config(tmp_path, "linear", [(m, {"weight": 1}) for m in pair], None)
        _assert_refused(cfg, tmp_path / "out", "models[1]", "hidden_act=relu" if what == "silu-relu" else "ReLU cut")
    same = variant(family["ft2"], "same", **relu, llmfast_relu_thresholds=[0.1, 0.2])
    _merge(_config(tmp_path, "linear", [(cut, {"weight": 1}), (same, {"weight": 1})], None), tmp_path / "ok")
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["llmfast_relu_thresholds"] == [0.1, 0.2]


def test_refuses_shape_mismatch(family, tmp_path):
    other = tmp_path / "odd"
    shutil.copytree(family["ft1"], other)
    sd = _sd(other)
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"][:-1]
    save_file(sd, other / "model.safetensors", metadata={"format": "pt"})
    cfg = _config(tmp_path, "linear", [(family["ft1"], {"weight": 1}), (other, {"weight": 1})], None)
    _assert_refused(cfg, tmp_path / "out", "model.layers.0.mlp.up_proj.weight", "shape")


def test_refuses_vocabulary_mismatch_unless_base_policy(family, tmp_path):
    other = tmp_path / "swapped"
    shutil.copytree(family["ft1"], other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    (x, ix), (y, iy) = list(vocab.items())[100:102]
    vocab[x], vocab[y] = iy, ix
    (other / "tokenizer.json").write_text(json.dumps(tok))
    cfg = _config(tmp_path, "task_arithmetic", [(other, {"weight": 1})], family["base"])
    _assert_refused(cfg, tmp_path / "out", "vocabulary", "tokenizer_source: base")
    cfg = _config(tmp_path, "task_arithmetic", [(other, {"weight": 1})], family["base"], tokenizer_source="base")
    _merge(cfg, tmp_path / "ok")


def test_an_output_that_is_a_dangling_link_is_named_so(family, tmp_path):
    """It was "is a file, not a directory" (s42's review); the link is kept."""
    cfg = _config(tmp_path, "linear", [(family["ft1"], {"weight": 1})], None)
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    code, _, err = run_cli("merge", str(cfg), str(tmp_path / "out"), "--overwrite")
    assert code == 2 and f"is a symbolic link to {tmp_path / 'nowhere'}, which does not exist" in err, err
    assert (tmp_path / "out").is_symlink() and not (tmp_path / "nowhere").exists()


def test_null_and_empty_parameters_and_a_base_tokenizer_without_base_are_refused(family, tmp_path):
    """`weight: null` was "weight.bool: Input should be a valid boolean", `density: []` fell through to density 1,
    and `tokenizer_source: base` without a base_model merged with some other tokenizer (s42's review)."""
    cfg = _config(tmp_path, "ties", [(family["ft1"], {"weight": None, "density": 0.5})], family["base"])
    _assert_refused(cfg, tmp_path / "out", "models.0.parameters: 'weight' is null: give it a value")
    cfg = _config(tmp_path, "ties", [(family["ft1"], {"weight": 1.0})], family["base"], parameters={"density": []})
    _assert_refused(cfg, tmp_path / "out", "parameters: 'density' is an empty list")
    cfg = _config(tmp_path, "linear", [(family["ft1"], {"weight": 1}), (family["ft2"], {"weight": 1})], None,
                  tokenizer_source="base")
    _assert_refused(cfg, tmp_path / "out", "tokenizer_source: base takes the base model's tokenizer", "no base_model")


def test_same_vocabulary_written_differently_is_accepted(family, tmp_path):
    # The files differ byte for byte (indented, keys reordered) but name the same tokens: the check parses them.
    other = tmp_path / "reformatted"
    shutil.copytree(family["ft1"], other)
    tok = json.loads((other / "tokenizer.json").read_text())
    (other / "tokenizer.json").write_text(json.dumps(tok, indent=1, sort_keys=True))
    assert (other / "tokenizer.json").read_bytes() != (family["base"] / "tokenizer.json").read_bytes()
    cfg = _config(tmp_path, "task_arithmetic", [(other, {"weight": 1})], family["base"])
    _merge(cfg, tmp_path / "ok")


@pytest.mark.parametrize("changed", ["norm", "proj"])
def test_refuses_adapter_on_another_base(family, tmp_path, changed):
    """`proj`: a base whose norms and shapes are its base's, as a LoRA export's are, was taken for the base, and its
    adapter's delta merged onto weights it was not trained on."""
    other_base = _perturb(family["base"], tmp_path / "other-base", 5, only=changed)
    ad = _make_adapter(other_base, tmp_path / "foreign", 3)
    cfg = _config(tmp_path, "task_arithmetic", [(ad, {"weight": 1})], family["base"])
    _assert_refused(cfg, tmp_path / "out", "trained on", "must share the base")


def test_refuses_unknown_method_missing_path_and_bad_parameters(family, tmp_path):
    cfg = _config(tmp_path, "tiess", [(family["ft1"], {"weight": 1})], family["base"])
    _assert_refused(cfg, tmp_path / "out", "unknown merge_method 'tiess'", "did you mean 'ties'")
    cfg = _config(tmp_path, "ties", [(tmp_path / "nope", {"weight": 1})], family["base"])
    _assert_refused(cfg, tmp_path / "out", "models[0]", "nope")
    cfg = _config(tmp_path, "ties", [(family["ft1"], {"weight": 1, "densty": 0.5})], family["base"])
    _assert_refused(cfg, tmp_path / "out", "no parameter 'densty'", "did you mean 'density'")
    cfg = _config(tmp_path, "ties", [(family["ft1"], {"density": 0.5})], family["base"])
    _assert_refused(cfg, tmp_path / "out", "no 'weight'")
    cfg = _config(tmp_path, "ties", [(family["ft1"], {"weight": 1})], None)
    _assert_refused(cfg, tmp_path / "out", "needs a base_model")
    cfg = tmp_path / "slices.yaml"
    cfg.write_text(f"merge_method: linear\nslices: [{{sources: []}}]\nmodels: [{{model: {family['ft1']}}}]\n")
    _assert_refused(cfg, tmp_path / "out", "slices", "not supported")
    cfg = tmp_path / "typo.yaml"
    cfg.write_text(f"merge_method: linear\nbase_modle: {family['base']}\nmodels: [{{model: {family['ft1']}}}]\n")
    _assert_refused(cfg, tmp_path / "out", "typo.yaml:2", "did you mean 'base_model'")


def test_failed_merge_keeps_previous_output(family, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    cfg = _config(tmp_path, "tiess", [(family["ft1"], {"weight": 1})], family["base"])
    code, _, _ = run_cli("merge", str(cfg), str(out), "--no-progress")
    assert code == 2 and (out / "keep.txt").read_text() == "old"


# ---------------------------------------------------------------- streaming
def test_streaming_holds_a_few_tensors(family, tmp_path, monkeypatch):
    """At most base + one per input + the result are alive (each a mapping of the file that lives as long as its
    array): loading whole models would fail this."""
    import weakref

    from llmfast.merge import io as mio

    alive: list[weakref.ref] = []
    peak = {"alive": 0, "reads": 0}
    original = mio.TensorReader.stored_array

    def counting_read(self, name):
        t, tag = original(self, name)
        alive[:] = [r for r in alive if r() is not None]
        alive.append(weakref.ref(t))
        peak["alive"] = max(peak["alive"], len(alive))
        peak["reads"] += 1
        return t, tag

    monkeypatch.setattr(mio.TensorReader, "stored_array", counting_read)
    cfg = _config(tmp_path, "ties", [(family["ft1"], {"weight": 1, "density": 0.5}),
                                     (family["ft2"], {"weight": 1, "density": 0.5})], family["base"])
    _merge(cfg, tmp_path / "out", "--threads", "1")
    n_tensors = len(_sd(family["base"]))
    assert peak["reads"] == 3 * n_tensors  # every tensor read once from each model, lazily
    # One tensor per model for each tensor in flight (read ahead, merging, being written), not whole models.
    from llmfast.merge.pipeline import in_flight_limit

    assert peak["alive"] <= 3 * (in_flight_limit(1) + 1) < 3 * n_tensors


def _wide_model(tiny_dir: Path, out: Path) -> Path:
    """The tiny model's tokenizer with many random layers: 28M parameters (112 MB), no tensor over 1 MB."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_dir)
    config.update({"hidden_size": 256, "num_attention_heads": 4, "num_hidden_layers": 32, "intermediate_size": 1024})
    with torch.device("meta"):  # names and shapes only; random values below are much faster than init
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    out.mkdir()
    config.save_pretrained(out)
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items() if k != "lm_head.weight"}  # tied
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    for f in tiny_dir.glob("tokenizer*"):
        shutil.copy(f, out / f.name)
    return out


def test_streaming_peak_rss_stays_near_a_few_tensors(tiny_dir, tmp_path):
    """A subprocess merges three 112 MB models; its peak RSS grows far less than loading one of them would need."""
    base = _wide_model(tiny_dir, tmp_path / "base")
    ft1, ft2 = _perturb(base, tmp_path / "ft1", 1), _perturb(base, tmp_path / "ft2", 2)
    model_bytes = (base / "model.safetensors").stat().st_size
    cfg = _config(tmp_path, "ties", [(ft1, {"weight": 1, "density": 0.5}), (ft2, {"weight": 1, "density": 0.5})],
                  base)
    # One process: its resident set after the imports, then its peak during the merge (VmHWM, reset just
    # before; ru_maxrss would carry the forking pytest process's peak over the exec).
    script = (
        "import re, torch, safetensors, tqdm, pydantic, yaml, numpy\n"
        "import llmfast.merge.merge, llmfast.merge.methods, llmfast.merge.io, llmfast.merge.adapters\n"
        "from llmfast.cli import main\n"
        "def kb(key): return int(re.search(key + r':\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = kb('VmRSS')\n"
        f"rc = main(['merge', {str(cfg)!r}, {str(tmp_path / 'out')!r}, '--no-progress'])\n"
        "print('growth', rc, (kb('VmHWM') - before) * 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO).stdout
    _, rc, growth = out.strip().splitlines()[-1].split()
    assert rc == "0" and (tmp_path / "out" / "model.safetensors").is_file()
    # Loading the three models would add 3 x model_bytes; streaming adds the temporaries of one 1 MB tensor
    # (about 30 MB were measured, allocator slack included).
    assert int(growth) < 0.5 * model_bytes, (int(growth), model_bytes)


def test_merge_wide_parameter_with_filter(family, tmp_path):
    # lambda is merge-wide, but like in mergekit it may still differ per tensor through a filter.
    cfg = _config(tmp_path, "task_arithmetic", [(family["ft1"], {"weight": 1.0})], family["base"],
                  parameters={"lambda": [{"filter": "mlp", "value": 0.0}, {"value": 1.0}]})
    got = _merge(cfg, tmp_path / "out")
    base, a = _sd(family["base"]), _sd(family["ft1"])
    torch.testing.assert_close(got["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    k = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(got[k], a[k], rtol=0, atol=1e-6)


def test_a_models_own_parameter_beats_the_top_level_one(family, tmp_path):
    """mergekit's scopes: a model's own `weight` wins over the top-level `weight`, which fills in for a model
    without one (and for tensors its own filters leave out)."""
    own = {"weight": [{"filter": "mlp", "value": 0.25}]}  # no catch-all: other tensors fall through to the top level
    cfg = _config(tmp_path, "task_arithmetic", [(family["ft1"], own), (family["ft2"], None)], family["base"],
                  parameters={"weight": 0.5})
    got = _merge(cfg, tmp_path / "out")
    base, a, b = _sd(family["base"]), _sd(family["ft1"]), _sd(family["ft2"])
    for k, wa in (("model.layers.0.mlp.up_proj.weight", 0.25), ("model.layers.1.self_attn.q_proj.weight", 0.5)):
        want = base[k] + wa * (a[k] - base[k]) + 0.5 * (b[k] - base[k])
        torch.testing.assert_close(got[k], want, rtol=0, atol=1e-6)
    # the lineage names every model, and the base it subtracted (a task-vector method leaves it out of its inputs)
    parents = json.loads((tmp_path / "out" / "llmfast.json").read_text())["parents"]
    assert parents == [str(family["ft1"]), str(family["ft2"]), str(family["base"])]


def test_out_dtype_beats_dtype_which_only_rounds_the_inputs(family, tmp_path):
    """`dtype` is what every input is read in, `out_dtype` what is written: bfloat16 reads, float32 output."""
    models = [(family["ft1"], {"weight": 0.7}), (family["ft2"], {"weight": -0.3})]
    cfg = _config(tmp_path, "task_arithmetic", models, family["base"], dtype="bfloat16", out_dtype="float32")
    got = _merge(cfg, tmp_path / "out")
    a, b, base = _sd(family["ft1"]), _sd(family["ft2"]), _sd(family["base"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"
    for k in a:
        x, y, z = (t[k].bfloat16().float() for t in (a, b, base))
        assert got[k].dtype == torch.float32, k
        torch.testing.assert_close(got[k], z + ((x - z) * 0.7 + (y - z) * -0.3), rtol=0, atol=1e-6)


def test_float16_inputs_are_written_in_out_dtype(family, tmp_path):
    """A float16 model's tensors take `out_dtype` like float32 and bfloat16 ones do (they are floating point)."""
    half = shutil.copytree(family["ft1"], tmp_path / "half")
    a = _sd(family["ft1"])
    save_file({k: v.half() for k, v in a.items()}, half / "model.safetensors", metadata={"format": "pt"})
    got = _merge(_config(tmp_path, "linear", [(half, {"weight": 1.0})], None, out_dtype="float32"), tmp_path / "out")
    for k, v in a.items():
        assert got[k].dtype == torch.float32, k
        assert torch.equal(got[k], v.half().float()), k


def test_a_different_head_count_of_the_same_shapes_is_refused(family, tmp_path):
    """2 heads of 64 or 4 of 64 over the same tensors (head_dim is set): the safetensors shapes agree, the models
    do not; only config.json tells."""
    other = tmp_path / "heads"
    shutil.copytree(family["ft1"], other)
    c = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**c, "num_attention_heads": 4}))
    cfg = _config(tmp_path, "task_arithmetic", [(family["ft1"], {"weight": 1}), (other, {"weight": 1})],
                  family["base"])
    _assert_refused(cfg, tmp_path / "out", "num_attention_heads=4", "models[1]")


def test_an_embedding_adapter_merges_as_the_transposed_product(tiny_dir, tmp_path):
    """PEFT's embedding LoRA stores A (r x vocab) and B (dim x r): its delta on the (vocab x dim) table is
    scale * (B @ A).T, which is not the linear layers' (out, in) = (B rows, A columns) shape. (On a base that ties
    its head to the embedding it is refused: tests/test_foreign_adapters.py.)"""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    untied = Path(shutil.copytree(tiny_dir, tmp_path / "untied"))  # its own head, a copy of the embedding
    weights = load_file(untied / "model.safetensors")
    save_file({**weights, "lm_head.weight": weights["model.embed_tokens.weight"].clone()}, untied / "model.safetensors",
              metadata={"format": "pt"})
    (untied / "config.json").write_text(json.dumps({**json.loads((untied / "config.json").read_text()),
                                                    "tie_word_embeddings": False}))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(untied, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8.0, target_modules=["embed_tokens"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_embedding" in name:  # PEFT starts A at zero; a trained adapter has not
                p.normal_(0, 0.05)
    peft_model.save_pretrained(tmp_path / "emb", save_embedding_layers=False)  # A and B only
    cfg = _config(tmp_path, "task_arithmetic", [(tmp_path / "emb", {"weight": 0.5})], untied)
    got = _merge(cfg, tmp_path / "out")
    sd = load_file(tmp_path / "emb" / "adapter_model.safetensors")
    a = next(v for k, v in sd.items() if "lora_embedding_A" in k)
    b = next(v for k, v in sd.items() if "lora_embedding_B" in k)
    base = _sd(untied)
    key = "model.embed_tokens.weight"
    assert a.shape == (4, base[key].shape[0]) and b.shape == (base[key].shape[1], 4)
    torch.testing.assert_close(got[key], base[key] + 0.5 * (8.0 / 4) * (b @ a).T, rtol=0, atol=1e-6)
    for k in base:
        if k != key:
            assert torch.equal(got[k], base[k]), k
    # as a merged adapter it would need lora_embedding_A/B in PEFT's layout: refused, not written as a linear's
    code, _, err = run_cli("merge", str(cfg), str(tmp_path / "ad"), "--no-progress", "--adapter-rank", "concat")
    assert code == 2 and "adapters on embeddings cannot be written as a merged adapter" in err, err
    assert not (tmp_path / "ad").exists()


def test_sharded_writer_fills_each_shard_up_to_its_size(tmp_path):
    """A shard takes tensors while they fit in max_bytes (exactly full is full, not over); each file's data starts
    8-byte aligned, and the index names each tensor's file and the tensor bytes in all, like save_pretrained."""
    import numpy as np
    from safetensors.numpy import load_file as load_np

    from llmfast.merge.io import ShardedWriter

    tensors = {"a": np.arange(25, dtype=np.float32).reshape(5, 5), "b": np.ones(25, np.float32) * 2,
               "c": np.full((3, 4), 3.0, np.float32), "d": np.arange(7, dtype=np.float32)}
    layout = [(k, v.shape, "float32") for k, v in tensors.items()]
    writer = ShardedWriter(tmp_path, layout, max_bytes=200, prefix="model")  # a+b = 200 bytes, c+d = 76
    for k, v in tensors.items():
        writer.write(k, v)
    writer.close()
    files = writer.finish()
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"a": files[0], "b": files[0], "c": files[1], "d": files[1]}
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    loaded: dict = {}
    for f in files:
        raw = (tmp_path / f).read_bytes()
        assert (8 + int.from_bytes(raw[:8], "little")) % 8 == 0, f
        loaded.update(load_np(tmp_path / f))
    assert set(loaded) == set(tensors) and all(np.array_equal(loaded[k], v) for k, v in tensors.items())


def test_the_output_dtype_follows_most_of_the_weights_not_most_of_the_tensors(tmp_path):
    """Many small float32 norms beside a few large bfloat16 matrices: a bfloat16 model (its elements' dtype)."""
    from llmfast.merge.io import model_dtype

    index = {f"model.layers.{i}.input_layernorm.weight": ((64,), "F32", tmp_path) for i in range(5)}
    index["model.embed_tokens.weight"] = ((1024, 64), "BF16", tmp_path)
    assert model_dtype(tmp_path, index) == "bfloat16"
    index["model.embed_tokens.weight"] = ((4, 64), "BF16", tmp_path)
    assert model_dtype(tmp_path, index) == "float32"


def test_the_output_config_names_the_written_dtype_under_both_keys(tiny_dir, tmp_path):
    """A config.json of an older transformers names its dtype `torch_dtype`: both keys say the output's dtype."""
    from llmfast.merge.io import copy_model_files

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(), dst.mkdir()
    c = json.loads((tiny_dir / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**c, "torch_dtype": "float32"}))
    copy_model_files(src, dst, "bfloat16")
    out = json.loads((dst / "config.json").read_text())
    assert out["dtype"] == out["torch_dtype"] == "bfloat16"
    assert {k: v for k, v in out.items() if "dtype" not in k} == {k: v for k, v in c.items() if "dtype" not in k}


def test_linear_of_adapters_averages_the_base_plus_each_delta(family, adapters, tmp_path):
    """linear works on whole weights: an adapter input is base + its delta, and the base joins as one more input."""
    cfg = _config(tmp_path, "linear", [(adapters["a1"], {"weight": 2.0}), (adapters["a2"], {"weight": 1.0})],
                  family["base"], parameters={"weight": 1.0})
    got = _merge(cfg, tmp_path / "out")
    base = _sd(family["base"])
    for k in base:
        want = base[k] + _weighted_delta([(adapters["a1"], 2.0), (adapters["a2"], 1.0)], k, base[k]) / 4.0
        torch.testing.assert_close(got[k], want, rtol=0, atol=1e-6)


def test_tensors_in_flight_are_bounded_by_elements_as_well_as_count(monkeypatch):
    """Two tensors that together pass MAX_ELEMENTS_IN_FLIGHT are never read at once (the largest merge one at a
    time), and smaller ones are read ahead while they fit. Each merge waits a while for the next tensor's read: for
    a it must not come (a and b do not fit together), for b it must (b and c do); d fits only once b is handed out."""
    import threading

    from llmfast.merge import pipeline

    monkeypatch.setattr(pipeline, "MAX_ELEMENTS_IN_FLIGHT", 100)
    items = [("a", 60), ("b", 60), ("c", 30), ("d", 30)]
    reads: list[str] = []
    read_done = {name: threading.Event() for name, _ in items}

    def read(name: str) -> str:
        reads.append(name)
        read_done[name].set()
        return name

    def merge(name: str, value: str) -> str:
        if name == "a":
            read_done["b"].wait(2.0)  # runs out: b is not read while a is in flight
        elif name == "b":
            read_done["c"].wait(60.0)  # ends at c's read, at once
        return value.upper()

    seen = [(name, out, list(reads)) for name, out in pipeline.ordered_map(items, read, merge, workers=3)]
    assert [s[:2] for s in seen] == [("a", "A"), ("b", "B"), ("c", "C"), ("d", "D")]
    assert seen[0][2] == ["a"] and seen[1][2] == ["a", "b", "c"]


def test_a_tensor_larger_than_the_element_bound_is_merged_alone():
    """A tensor past MAX_ELEMENTS_IN_FLIGHT on its own (a large model's embedding) still goes, alone, in its place."""
    from llmfast.merge import pipeline

    items = [("a", 10), ("big", 3 * pipeline.MAX_ELEMENTS_IN_FLIGHT), ("c", 10)]
    got = list(pipeline.ordered_map(items, lambda n: n, lambda n, v: v.upper(), workers=2))
    assert got == [("a", "A"), ("big", "BIG"), ("c", "C")]


def test_default_threads_are_the_cores_available_at_most_4():
    """docs/merge.md: --threads defaults to the cores this process may use, at most 4."""
    import os

    from llmfast.merge.steps import default_threads

    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("the cores a process may use are Linux's sched_getaffinity")
    assert default_threads() == min(4, len(os.sched_getaffinity(0)))


def test_a_gradient_interpolates_between_its_entries_over_the_layers():
    """mergekit's gradient: layer i of L sits at t = i / (L - 1) along the list, read by linear interpolation
    (numpy.interp here); a tensor outside the layers takes the first entry."""
    import numpy as np

    from llmfast.merge.config import evaluate_setting, layer_position

    for grad in ([0.0, 1.0], [0.2, 1.0, -0.4], [1.0, 0.0, 0.5, 2.0]):
        for layers in (2, 3, 5, 8):
            for i in range(layers):
                name = f"model.layers.{i}.mlp.up_proj.weight"
                t = layer_position(name, layers)
                assert t == i / (layers - 1)
                want = np.interp(t * (len(grad) - 1), np.arange(len(grad)), grad)
                assert abs(evaluate_setting(grad, name, t) - want) < 1e-12, (grad, layers, i)
        assert evaluate_setting(grad, "model.norm.weight", layer_position("model.norm.weight", 8)) == grad[0]
    # filters: the first whose filter is in the name wins; `*` (and no filter) match every tensor
    from llmfast.merge.config import ConditionalParameter

    conds = [ConditionalParameter(filter="mlp", value=0.1), ConditionalParameter(filter="*", value=[0.0, 1.0])]
    assert evaluate_setting(conds, "model.layers.1.mlp.up_proj.weight", 1.0) == 0.1
    assert evaluate_setting(conds, "model.layers.1.self_attn.q_proj.weight", 0.5) == 0.5
    assert evaluate_setting(conds[:1], "model.norm.weight", 0.0) is None  # falls through to the next scope


def test_a_merge_wide_parameter_under_a_model_is_refused(family, tmp_path):
    """normalize applies to the whole merge: under one model it would be read nowhere (mergekit ignores it)."""
    cfg = _config(tmp_path, "ties", [(family["ft1"], {"weight": 1, "density": 0.5, "normalize": False}),
                                     (family["ft2"], {"weight": 1, "density": 0.5})], family["base"])
    _assert_refused(cfg, tmp_path / "out", "'normalize' applies to the whole merge", "top-level 'parameters'")


def test_added_tokens_of_another_meaning_are_another_vocabulary(family, tmp_path):
    """Two tokenizers whose added tokens differ (the same id, another text) give one embedding row two meanings."""
    other = tmp_path / "added"
    shutil.copytree(family["ft1"], other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["added_tokens"][-1]["content"] = "<|tool|>"
    (other / "tokenizer.json").write_text(json.dumps(tok))
    cfg = _config(tmp_path, "task_arithmetic", [(other, {"weight": 1})], family["base"])
    _assert_refused(cfg, tmp_path / "out", "different tokenizer vocabulary")


def test_the_merged_model_keeps_the_chat_template_and_tokenizer(family, adapters, tmp_path):
    """The merge's output is a model the verbs take as is: eval's tasks need its chat template (in
    chat_template.jinja since transformers 4.43), so a merged model and a merged adapter keep the reference's."""
    from llmfast.models import load_tokenizer

    want = load_tokenizer(family["base"])
    assert want.chat_template and (family["base"] / "chat_template.jinja").is_file()
    cfg = _config(tmp_path, "task_arithmetic", [(family["ft1"], {"weight": 1.0})], family["base"])
    _merge(cfg, tmp_path / "out")
    cfg = _config(tmp_path, "task_arithmetic", [(adapters["a1"], {"weight": 1.0})], family["base"])
    code, _, err = run_cli("merge", str(cfg), str(tmp_path / "ad"), "--no-progress", "--adapter-rank", "concat")
    assert code == 0, err
    assert (tmp_path / "out" / "generation_config.json").read_bytes() == (
        family["base"] / "generation_config.json").read_bytes()  # its eos and pad ids: generation stops where it did
    for out in (tmp_path / "out", tmp_path / "ad"):
        got = load_tokenizer(out)
        assert got.chat_template == want.chat_template, out
        assert got.get_vocab() == want.get_vocab() and got.eos_token == want.eos_token, out


def test_a_header_whose_shape_does_not_fit_its_bytes_is_named(family, tmp_path):
    """A safetensors header whose shape and byte range disagree (129 floats in 512 bytes): named in the file that
    has it, not blamed on the other models as a shape mismatch."""
    import struct

    bad = tmp_path / "bad-base"
    shutil.copytree(family["base"], bad)
    raw = (bad / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert header["model.norm.weight"]["shape"] == [128]
    header["model.norm.weight"]["shape"] = [129]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    cfg = _config(tmp_path, "task_arithmetic", [(family["ft1"], {"weight": 1})], bad)
    _assert_refused(cfg, tmp_path / "out", "bad-base/model.safetensors", "model.norm.weight",
                    "does not fit its 512 bytes")


def test_an_adapter_of_a_moved_project_matches_its_base_by_the_recipes_name(family, adapters, tmp_path,
                                                                              monkeypatch):
    """An adapter records its base absolute; the project moved since, that path is gone, and the base is found by the
    name the adapter's recipe gave it (its lineage). Without that record the base cannot be checked: refused."""
    from llmfast.artifacts import write_manifest
    from llmfast.merge.plan import plan_merge

    (tmp_path / "models").mkdir()
    shutil.copytree(family["base"], tmp_path / "models" / "base")
    moved = Path(shutil.copytree(adapters["a1"], tmp_path / "moved"))
    gone = "/gone/project/models/base"
    acfg = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**acfg, "base_model_name_or_path": gone}))
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "m.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": "models/base",
                                   "models": [{"model": str(moved), "parameters": {"weight": 1.0}}]}))
    with pytest.raises(UserError, match="which is not base_model models/base \\(and is not here to compare\\)"):
        plan_merge(cfg)
    write_manifest(moved, stage="finetune", parents=[gone], recipe={"model": "models/base"}, base_model_path=gone)
    assert [s.kind for s in plan_merge(cfg).inputs] == ["adapter"]


def test_a_relufy_model_merges_and_a_teal_artifact_is_refused(family, tmp_path):
    """relufy keeps its sparsity (the ReLU and its cut) in config.json, which the merge carries; TEAL keeps its
    thresholds in files beside the weights, which a merge would drop: refused, naming the way round."""
    from llmfast.artifacts import write_manifest
    from llmfast.merge.plan import plan_merge

    for method in ("relufy", "teal"):
        art = Path(shutil.copytree(family["ft1"], tmp_path / method))
        write_manifest(art, stage="sparsify", parents=[str(family["base"])], sparsity={"method": method})
        cfg = _config(tmp_path, "task_arithmetic", [(art, {"weight": 1.0})], family["base"])
        if method == "relufy":
            assert [s.path for s in plan_merge(cfg).inputs] == [art]
        else:
            with pytest.raises(UserError, match="is a teal artifact: its sparsity lives in files beside the weights "
                                                "that merge does not carry over; merge the models they were made"):
                plan_merge(cfg)


def test_a_model_folder_with_a_plus_in_its_name_is_a_model_not_model_plus_lora(family, adapters, tmp_path):
    """mergekit's MODEL+LORA is read only where no such path exists; and its model must be base_model."""
    from llmfast.merge.plan import plan_merge

    plus = Path(shutil.copytree(family["ft1"], tmp_path / "ft+1"))
    plan = plan_merge(_config(tmp_path, "task_arithmetic", [(plus, {"weight": 1.0})], family["base"]))
    assert [(s.kind, s.path) for s in plan.inputs] == [("model", plus)]
    cfg = _config(tmp_path, "task_arithmetic", [(f"{family['ft1']}+{adapters['a1']}", {"weight": 1.0})],
                  family["base"])
    with pytest.raises(UserError, match=r"applies the adapter to .*ft1, which is not base_model"):
        plan_merge(cfg)


def test_mergekit_plus_syntax_for_adapters(family, adapters, tmp_path):
    plain = _config(tmp_path, "task_arithmetic", [(adapters["a1"], {"weight": 1.0})], family["base"])
    plus = _config(tmp_path, "task_arithmetic", [(f"{family['base']}+{adapters['a1']}", {"weight": 1.0})],
                   family["base"])
    a, b = _merge(plain, tmp_path / "plain"), _merge(plus, tmp_path / "plus")
    assert all(torch.equal(a[k], b[k]) for k in a)
    code, _, err = run_cli("merge", str(plain), str(tmp_path / "x"), "--no-progress", "--adapter-rank", "0")
    assert code == 2 and "positive" in err and not (tmp_path / "x").exists()
    full = _config(tmp_path, "task_arithmetic", [(family["ft1"], {"weight": 1.0})], family["base"])
    code, _, err = run_cli("merge", str(full), str(tmp_path / "y"), "--no-progress", "--adapter-rank", "concat")
    assert code == 2 and "LoRA adapter" in err and not (tmp_path / "y").exists()


@pytest.mark.parametrize("shape", [(5, 7), (300, 40), (512, 1024)])
@pytest.mark.parametrize("grid", [2, 6, 1000, 0])
@pytest.mark.parametrize("unchanged", [0.0, 0.5, 0.9])
def test_magnitude_mask_breaks_ties_like_a_full_sort(shape, grid, unchanged):
    """The kept set is the first k of torch.argsort (an unstable sort: mergekit's), ties included."""
    from llmfast.merge.methods.sparsify import magnitude_mask

    # Values on a coarse grid tie a lot at any threshold, like fine-tuned deltas on the weights' ulp grid
    # (grid 0: continuous values, no ties). `unchanged`: the share of entries a bfloat16 fine-tune left
    # as they were (zero deltas), which the selection sets aside first.
    g = torch.Generator().manual_seed(grid)
    delta = (torch.randint(-grid, grid + 1, shape, generator=g).float() * 1e-4 if grid
             else torch.randn(shape, generator=g))
    delta[torch.rand(shape, generator=g) < unchanged] = 0
    for density in (0.1, 0.35, 0.5, 0.9):
        k = max(1, int(density * delta.numel()))
        ref = torch.zeros(delta.numel(), dtype=torch.bool)
        ref[torch.argsort(delta.abs().flatten(), descending=True)[:k]] = True
        got = magnitude_mask(delta, density).flatten()
        # Where the k-th largest magnitude is 0, which zeros are "kept" changes nothing: compare the nonzeros.
        nonzero = delta.flatten() != 0
        assert torch.equal(got & nonzero, ref & nonzero)
        if not bool((ref & ~nonzero).any()):
            assert int(got.sum()) == k


def test_tie_replay_in_parts_breaks_ties_like_a_full_sort(monkeypatch):
    """The replay's partition of large ranges, which scans and swaps its pairs a part at a time (made small here:
    every range over 3000 entries, 700 pairs a part, 512-entry chunks), against torch.argsort on tie-heavy values."""
    from llmfast.merge.methods import sparsify

    monkeypatch.setattr(sparsify, "_SCAN_WHOLE", 3000)
    monkeypatch.setattr(sparsify, "_PART", 700)
    monkeypatch.setattr(sparsify, "_CHUNK", 512)
    g = torch.Generator().manual_seed(7)
    for grid, unchanged in ((1, 0.0), (2, 0.3), (6, 0.0)):
        delta = torch.randint(-grid, grid + 1, (300, 400), generator=g).float() * 1e-4
        delta[torch.rand(delta.shape, generator=g) < unchanged] = 0
        for density in (0.2, 0.5, 0.8):
            k = max(1, int(density * delta.numel()))
            ref = torch.zeros(delta.numel(), dtype=torch.bool)
            ref[torch.argsort(delta.abs().flatten(), descending=True)[:k]] = True
            got = sparsify.magnitude_mask(delta, density).flatten()
            nonzero = delta.flatten() != 0
            assert torch.equal(got & nonzero, ref & nonzero), (grid, unchanged, density)


def test_trim_by_position_keeps_exactly_k_with_the_first_ties():
    """Where mergekit computes in bfloat16 (its tie sets differ from ours anyway) ties go by position."""
    import numpy as np

    from llmfast.merge.methods.sparsify import trim

    rng = np.random.default_rng(3)
    values = rng.integers(-3, 4, 10_000).astype(np.float32)
    values[rng.random(values.size) < 0.3] = 0  # unchanged entries
    for density in (0.1, 0.3, 0.5):
        k = max(1, int(density * values.size))
        mag = np.abs(values)
        threshold = np.sort(mag)[::-1][k - 1]
        got = values.copy()
        trim(got, density, exact_ties=False)
        kept = got != 0
        assert np.count_nonzero(kept) == k
        assert kept[mag > threshold].all() and not kept[mag < threshold].any()
        tied = np.flatnonzero(mag == threshold)
        assert np.array_equal(np.flatnonzero(kept[tied]), np.arange(k - np.count_nonzero(mag > threshold)))
        assert np.array_equal(got[kept], values[kept])  # kept entries unchanged


def test_only_float32_merges_replay_mergekits_tie_order(family, tmp_path):
    from llmfast.merge.plan import plan_merge

    models = [(family["ft1"], {"weight": 1, "density": 0.5})]
    f32 = plan_merge(_config(tmp_path, "ties", models, family["base"]))
    bf16 = plan_merge(_config(tmp_path, "ties", models, family["base"], dtype="bfloat16"))
    name = next(n for n, shape, _tag in f32.tensors if len(shape) == 2)
    assert f32.computes_like_mergekit(name) and not bf16.computes_like_mergekit(name)


def test_a_bfloat16_ties_merge_keeps_the_first_tied_entries_by_position(family, tmp_path):
    """With dtype bfloat16 (where mergekit's tied sets differ from ours anyway) the trim keeps, of the entries tied at
    its threshold, the first ones by position (docs/merge.md), not the ones mergekit's sort would keep in float32."""
    base = _sd(family["base"])
    k = "model.layers.0.self_attn.q_proj.weight"
    g = torch.Generator().manual_seed(0)
    delta = torch.randint(-1, 2, base[k].shape, generator=g).float()  # magnitudes 0 and 1: ties everywhere
    zero_base, ft = shutil.copytree(family["base"], tmp_path / "base"), shutil.copytree(family["base"], tmp_path / "ft")
    save_file({**base, k: torch.zeros_like(base[k])}, zero_base / "model.safetensors", metadata={"format": "pt"})
    save_file({**base, k: delta}, ft / "model.safetensors", metadata={"format": "pt"})
    got = _merge(_config(tmp_path, "ties", [(ft, {"weight": 1.0, "density": 0.3})], zero_base, dtype="bfloat16"),
                 tmp_path / "out")
    keep = max(1, int(0.3 * delta.numel()))
    first = torch.zeros(delta.numel(), dtype=torch.bool)
    first[delta.flatten().nonzero().flatten()[:keep]] = True
    assert int((delta != 0).sum()) > 2 * keep
    assert torch.equal(got[k].float(), delta * first.reshape(delta.shape))


def test_bfloat16_conversions_match_torch_bit_for_bit():
    """Merges read and write bfloat16 without torch: widening is exact, narrowing rounds to nearest even."""
    import numpy as np

    from llmfast.merge.io import bf16_bits_to_float32, float32_to_bf16_bits

    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 2**32, 200_003, dtype=np.uint64).astype(np.uint32).view(np.float32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, 3.4028235e38, -1e-45, 1.0039062, 1.0117188], np.float32)
    values = np.concatenate([patterns, special]).reshape(-1, 1)  # 2-D: the shape is kept
    ours = float32_to_bf16_bits(values)
    theirs = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(values)
    assert ours.shape == values.shape and nan.any()
    assert np.array_equal(ours[~nan], theirs[~nan])
    assert np.isnan(bf16_bits_to_float32(ours[nan])).all()  # a NaN stays a NaN
    widened = bf16_bits_to_float32(theirs)
    assert np.array_equal(widened[~nan], torch.from_numpy(theirs.view(np.int16)).view(torch.bfloat16).float().numpy()[~nan])


def test_malloc_keeps_freed_blocks_in_a_merge_process():
    """The large-merge setting applies on this (glibc) machine; in its own process, as it lasts the process."""
    import subprocess
    import sys

    code = "from llmfast.memory import keep_freed_memory_for_reuse as k; import sys; sys.exit(0 if k() else 1)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_shard_sizes_read_as_written_and_mergekits_5b_as_five_billion_bytes():
    """K/M/G/T are powers of 1024; a bare B is mergekit's billion (its default out_shard_size is '5B'): read as
    5 bytes it wrote one shard per tensor."""
    from llmfast.merge.io import parse_size

    assert parse_size("5B") == parse_size("5 b") == 5 * 10**9 and parse_size("1.5B") == 1_500_000_000
    assert parse_size("5G") == parse_size("5GB") == parse_size("5GiB") == 5 * 2**30
    assert parse_size("300K") == 300 * 2**10 and parse_size("500M") == 500 * 2**20 and parse_size("123") == 123
    for bad in ("5IB", "B", "lots"):
        with pytest.raises(UserError, match=f"--out-shard-size '{bad}' not understood"):
            parse_size(bad)


# ---------------------------------------------------------------- trimming block by block
def _grid_family(tiny_dir: Path, root: Path, dtype: torch.dtype) -> dict[str, Path]:
    """A base and three fine-tunes whose task vectors are multiples of 2^-10 (magnitudes tie in bulk at any trim
    threshold), with a share of unchanged entries, a -0.0 over the base's +0.0, and the third fine-tune leaving the
    embedding as it was (a zero task vector there). An embedding entry is -0.0 in the base and a tiny negative in the
    first two fine-tunes (trimmed to -0.0): the merged entry stays -0.0 only if the zero task vector is left out."""
    sd = {k: v.to(dtype) for k, v in load_file(tiny_dir / "model.safetensors").items()}
    emb = next(k for k in sd if "embed" in k)
    up = next(k for k in sd if "layers.0.mlp.up_proj" in k)
    sd[up].view(-1)[3] = 0.0
    sd[emb].view(-1)[5] = -0.0
    out = {"base": shutil.copytree(tiny_dir, root / "base")}
    save_file(sd, out["base"] / "model.safetensors", metadata={"format": "pt"})
    for i in (1, 2, 3):
        g = torch.Generator().manual_seed(40 + i)
        ft = {}
        for k, v in sd.items():
            step = torch.randint(-3, 4, v.shape, generator=g).float() * 2.0**-10
            step[torch.rand(v.shape, generator=g) < 0.3] = 0
            ft[k] = v if (k == emb and i == 3) or "norm" in k else (v.float() + step).to(dtype)
        ft[up].view(-1)[3] = -0.0
        if i != 3:
            ft[emb].view(-1)[5] = -(2.0**-30)
        out[f"ft{i}"] = shutil.copytree(tiny_dir, root / f"ft{i}")
        save_file(ft, out[f"ft{i}"] / "model.safetensors", metadata={"format": "pt"})
    return out


def _ref_trim_ties(delta: torch.Tensor, density: float, by_position: bool) -> torch.Tensor:
    """The trim by a plain sort: mergekit's first k of argsort (float32), or ties kept by position (bfloat16)."""
    if density <= 0:
        return delta * 0
    flat = delta.flatten()
    k = max(1, int(density * flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    if by_position:  # the k largest with ties at the k-th broken by index: a stable sort of the magnitudes
        keep[torch.sort(flat.abs(), descending=True, stable=True).indices[:k]] = True
    else:
        keep[torch.argsort(flat.abs(), descending=True)[:k]] = True
    return delta * keep.reshape(delta.shape)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["ties", "magnitude_prune"])
def test_trimming_merges_block_by_block_give_the_whole_tensor_paths_bits(tiny_dir, tmp_path, monkeypatch, dtype,
                                                                        method):
    """The blockwise trim (radix-selected threshold, ties kept as before) against the whole-tensor path, bit for bit,
    on tie-heavy task vectors split over many blocks, with densities 0.3, 0.5 and 0 and a zero task vector; and
    against a plain sort-based reference (mergekit's argsort order in float32, by position in bfloat16)."""
    from llmfast.merge import trim_blocks

    fam = _grid_family(tiny_dir, tmp_path, getattr(torch, dtype))
    models = [(fam["ft1"], {"weight": 1.0, "density": 0.3}), (fam["ft2"], {"weight": 0.6, "density": 0.5}),
              (fam["ft3"], {"weight": 0.8, "density": 0.0 if method == "magnitude_prune" else 0.5})]
    cfg = _config(tmp_path, method, models, fam["base"], parameters={"lambda": 1.25}, out_dtype="float32")
    ran = []
    original = trim_blocks.merge_trimmed
    monkeypatch.setattr(trim_blocks, "merge_trimmed", lambda *a: ran.append(original(*a)) or ran[-1])
    monkeypatch.setattr(trim_blocks, "BLOCK", 4000)  # the embedding is 33 blocks, a layer's weight 9: each ends short
    monkeypatch.setattr(trim_blocks, "WHOLE_BELOW", 1)  # these tensors are small: blockwise all the same
    got = _merge(cfg, tmp_path / "blocks")
    assert len(ran) == len(got) and all(r is not None for r in ran)
    monkeypatch.setattr(trim_blocks, "takes", lambda plan: False)
    whole = _merge(cfg, tmp_path / "whole")
    base, fts = _sd(fam["base"]), [_sd(fam[f"ft{i}"]) for i in (1, 2, 3)]
    kept = [json.loads((tmp_path / out / "llmfast.json").read_text())["metrics"]["kept_fraction"]
            for out in ("blocks", "whole")]
    assert kept[0] == kept[1], kept
    for k in whole:
        assert torch.equal(got[k].view(torch.int32), whole[k].view(torch.int32)), k
        b = base[k].float()
        ds = [_ref_trim_ties(ft[k].float() - b, p["density"], dtype == "bfloat16") * p["weight"]
              for ft, (_m, p) in zip(fts, models) if not torch.equal(ft[k], base[k])]
        if not ds:
            continue
        weights = torch.tensor([p["weight"] for ft, (_m, p) in zip(fts, models) if not torch.equal(ft[k], base[k])])
        stacked = torch.stack(ds)
        if method == "ties":  # the election by total mass; a zero never agrees
            agree = torch.sign(stacked) == torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
            mass = (weights.reshape(-1, *[1] * b.dim()) * agree).sum(0)
            ref = b + 1.25 * (stacked * agree).sum(0) / torch.where(mass == 0, 1.0, mass)
        else:
            ref = b + 1.25 * stacked.sum(0)
        torch.testing.assert_close(got[k], ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "ties", "magnitude_prune"])
def test_dare_and_rescaling_merges_block_by_block_give_the_whole_tensor_paths_bits(tiny_dir, tmp_path, monkeypatch,
                                                                                  dtype, method):
    """DARE's drop (numpy's path: the C kernel off) and `rescale: true` block by block against the whole-tensor path,
    bit for bit: the drop's stream drawn a block at a time, each input's own (a zero task vector draws nothing), L1
    norms summed over blocks that cut numpy's 8192-entry sum buffers, densities 0.3, 0.5 and 1 (or 0)."""
    from llmfast.merge import merge as merge_mod
    from llmfast.merge import trim_blocks

    fam = _grid_family(tiny_dir, tmp_path, getattr(torch, dtype))
    last = {"dare_linear": 1.0, "magnitude_prune": 0.0}.get(method, 0.5)
    # ft3 first: its zero task vector on the embedding is skipped, and the others' streams keep their own index
    models = [(fam["ft3"], {"weight": 0.8, "density": last}), (fam["ft1"], {"weight": 1.0, "density": 0.3}),
              (fam["ft2"], {"weight": 0.6, "density": 0.5})]
    rescale = method != "dare_linear"  # dare_linear's default (true) off: the drop alone
    cfg = _config(tmp_path, method, models, fam["base"], parameters={"lambda": 1.25, "rescale": rescale},
                  out_dtype="float32")
    monkeypatch.setattr(merge_mod, "merge_kernel", lambda: None)  # as without a C compiler
    ran = []
    original = trim_blocks.merge_trimmed
    monkeypatch.setattr(trim_blocks, "merge_trimmed", lambda *a: ran.append(original(*a)) or ran[-1])
    monkeypatch.setattr(trim_blocks, "BLOCK", 4000)
    monkeypatch.setattr(trim_blocks, "WHOLE_BELOW", 1)
    got = _merge(cfg, tmp_path / "blocks")
    assert len(ran) == len(got) and all(r is not None for r in ran)
    monkeypatch.setattr(trim_blocks, "takes", lambda plan: False)
    whole = _merge(cfg, tmp_path / "whole")
    kept = [json.loads((tmp_path / out / "llmfast.json").read_text())["metrics"]["kept_fraction"]
            for out in ("blocks", "whole")]
    assert kept[0] == kept[1], kept
    for k in whole:
        assert torch.equal(got[k].view(torch.int32), whole[k].view(torch.int32)), k
