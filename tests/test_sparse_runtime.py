"""The sparse runtime (llmfast/sparse/runtime.py, kernels.py) against the hook model `load_model` gives for the same
artifact: logits on prefill and on token-by-token decode with the KV cache, greedy generations, the dense fallback
above the crossover, and the hf-sparse bench engine's choice and refusals. TEAL runs with its MLP sites (`teal`),
with MLP and attention sites (`teal-attention`: q/k/v and o_proj gathered too) and with attention only.

Logits are compared in float64: the runtime and the hook model differ only in the order of float sums (a gather
of the kept rows against a dense product over zeros), about n * eps * sum|terms| per product (n <= 512 terms
here, eps 1.1e-16), so 1e-9 of the row norm is far above that and far below what one entry kept on one side and
zeroed on the other would change. In float64 a value within that distance of a threshold, which could flip a
decision, is improbable; in float32 it would happen now and then on some CPU.
"""

from __future__ import annotations

import torch

import pytest

from llmfast.artifacts import write_manifest
from llmfast.errors import UserError

METHODS = ("teal", "teal-attention", "teal-attention-only", "cats", "relufy", "relufy-shift", "dejavu",
           "dejavu-lookahead", "cats-over-shift", "dejavu-over-shift", "teal-attention-only-over-shift",
           "teal-attention-only-over-relu", "dejavu-over-attention")
# made over relufy-shift: its cut stays on under the method
OVER_SHIFT = ("cats-over-shift", "dejavu-over-shift", "teal-attention-only-over-shift")
# made over another artifact here (the fixture builds them in METHODS' order)
SOURCES = {**{m: "relufy-shift" for m in OVER_SHIFT}, "teal-attention-only-over-relu": "relufy",
           "dejavu-over-attention": "teal-attention-only-over-relu"}
TEAL_SITES = {"teal": ["mlp"], "teal-attention": ["mlp", "attention"], "teal-attention-only": ["attention"]}
TEXT = "The quick brown fox jumps over the lazy dog while the committee argues about the budget."


def make_artifact(src, out, method):
    """A sparse artifact of the tiny model, built in-process as `llmfast sparsify` would write it."""
    from safetensors.torch import save_file

    from llmfast.models import load_model, load_tokenizer
    from llmfast.sparse.cats import Cats
    from llmfast.sparse.relufy import relu_swap
    from llmfast.sparse.teal import Teal
    from llmfast.sparse.thresholds import THRESHOLDS_FILE, link_or_copy_model

    out.mkdir()
    if method.startswith("dejavu"):  # random low-rank predictors, threshold at ~40% predicted active
        from llmfast.sparse.predictors import PREDICTORS_FILE, Predictor, save_predictors

        g = torch.Generator().manual_seed(0)
        h, i, r = 128, 256, 16  # the tiny model's widths, a rank
        preds = [Predictor(torch.randn(h, r, generator=g) / h**0.5, torch.randn(r, i, generator=g) / r**0.5,
                           torch.zeros(i), torch.tensor(0.25), lookahead=method.endswith("lookahead"))
                 for _ in range(2)]
        link_or_copy_model(src, out)
        save_predictors(preds, out / PREDICTORS_FILE)
        from llmfast.sparse.stacked import source_attention

        attention = source_attention(src, str(src), "dejavu")  # over TEAL's attention sites: kept (stacked.py)
        write_manifest(out, stage="sparsify", parents=[str(src)],
                       sparsity={"method": "dejavu", "config": {}, **({"attention": attention} if attention else {})})
        return out
    elif method.startswith("relufy"):
        model = load_model(src)
        relu_swap(model)
        if method == "relufy-shift":  # relufy's `target`: relu(gate) cut at a calibrated threshold per layer
            from llmfast.sparse.relu_cut import THRESHOLDS_KEY, calibrated_cut

            ids = load_tokenizer(src)(TEXT * 8, return_tensors="pt").input_ids[:, :128]
            setattr(model.config, THRESHOLDS_KEY, calibrated_cut(model, ids, 0.7))
        model.save_pretrained(out, safe_serialization=True)
        load_tokenizer(src).save_pretrained(out)
        method = "relufy"
    else:
        model, tok = load_model(src), load_tokenizer(src)
        ids = tok(TEXT * 8, return_tensors="pt").input_ids[:, :128]
        sparsifier = Teal() if method.startswith("teal") else Cats()  # calibrated over the source's cut, if any
        # plain teal as artifacts made before `sites` existed record it: no sites, read as MLP-only
        config = {"sites": TEAL_SITES[method]} if method.startswith("teal-") else {}
        thresholds = sparsifier.calibrate(model, ids, 0.5, sparsifier.sites_for(sparsifier.Config(**config)))
        link_or_copy_model(src, out)
        save_file({s: v.contiguous() for s, v in thresholds.items()}, out / THRESHOLDS_FILE)
        method = sparsifier.name
        write_manifest(out, stage="sparsify", parents=[str(src)], sparsity={"method": method, "config": config})
        return out
    write_manifest(out, stage="sparsify", parents=[str(src)], sparsity={"method": method, "config": {}})
    return out


@pytest.fixture(scope="module")
def artifacts(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse-rt")
    made = {}
    for m in METHODS:  # in order: each source exists before the artifacts made over it
        made[m] = make_artifact(root / SOURCES[m] if m in SOURCES else tiny_dir, root / m, m.split("-over-")[0])
    return made


def pair(art, dtype=torch.float64, dense_above=None):
    """The hook model (load_model) and the runtime model of one artifact, both in `dtype`."""
    from llmfast.loading import from_pretrained
    from llmfast.models import load_model
    from llmfast.sparse.runtime import install_sparse_runtime

    hooked = load_model(art).to(dtype)
    sparse = from_pretrained(art, "float32").to(dtype).eval()
    install_sparse_runtime(sparse, art, dense_above=dense_above)
    return hooked, sparse


def prompt_ids(art):
    from llmfast.models import load_tokenizer

    return load_tokenizer(art)(TEXT, return_tensors="pt").input_ids[:, :12]


def close(a, b):
    tol = 1e-9 * b.norm(dim=-1, keepdim=True)
    return bool(((a - b).abs() <= tol).all())


def prefill_and_decode(model, ids, steps=6):
    """Logits of the prompt (one forward), then of `steps` greedy tokens fed one at a time with the KV cache."""
    with torch.no_grad():
        out = model(ids, use_cache=True)
        logits, past = [out.logits[0]], out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = model(tok, past_key_values=past, use_cache=True)
            logits.append(out.logits[0])
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return logits


@pytest.mark.parametrize("method", METHODS)
def test_runtime_matches_the_hook_model_on_prefill_and_cached_decode(artifacts, method):
    from llmfast.sparse.runtime import runtime_calls

    art = artifacts[method]
    hooked, sparse = pair(art)
    ids = prompt_ids(art)
    want, got = prefill_and_decode(hooked, ids), prefill_and_decode(sparse, ids)
    for step, (a, b) in enumerate(zip(got, want)):
        assert close(a, b), (method, step, (a - b).abs().max().item())
    mlp, attention = runtime_calls(sparse, "mlp"), runtime_calls(sparse, "attention")
    if method != "teal-attention-only":  # over a ReLU model, attention-only TEAL's MLPs skip their exact zeros
        assert mlp["prefill"] == 2  # the prompt, in both layers, ran the dense path with the same zeros
        assert mlp["sparse"] > 0  # decode steps gathered (at ~50% kept, below the crossover)
    else:
        assert mlp == {}  # MLP sites not chosen: the SiLU MLPs keep their own forward
    if method.startswith("teal-attention") or method == "dejavu-over-attention":  # attention thresholded too
        assert attention["prefill"] == 4  # q/k/v (one product) and o_proj, in both layers
        assert attention["sparse"] > 0
        assert sum(attention.values()) == 2 * 2 * 7  # one product per site, layer and forward: q, k, v share it
    else:
        assert attention == {}


@pytest.mark.parametrize("method", METHODS)
def test_greedy_generation_is_identical_in_float32(artifacts, method):
    art = artifacts[method]
    hooked, sparse = pair(art, dtype=torch.float32)
    ids = prompt_ids(art)
    kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)
    with torch.no_grad():
        assert sparse.generate(ids, **kw).tolist() == hooked.generate(ids, **kw).tolist()


# cats, relufy and dejavu since s45's mutation audit: their one-token dense products without the zeros passed
@pytest.mark.parametrize("method", ["teal", "teal-attention", "cats", "relufy", "dejavu"])
def test_dense_fallback_above_the_crossover_gives_the_same_numbers(artifacts, method):
    from llmfast.sparse.runtime import runtime_calls

    art = artifacts[method]
    ids = prompt_ids(art)
    hooked, always_dense = pair(art, dense_above=0.0)  # any kept fraction is above 0: the dense product
    _, never_dense = pair(art, dense_above=1.0)
    want = prefill_and_decode(hooked, ids)
    for model in (always_dense, never_dense):
        for a, b in zip(prefill_and_decode(model, ids), want):
            assert close(a, b)
    assert runtime_calls(always_dense)["sparse"] == 0 and runtime_calls(always_dense)["dense"] > 0
    assert runtime_calls(never_dense)["dense"] == 0 and runtime_calls(never_dense)["sparse"] > 0


def test_install_refuses_plain_models_and_hooked_ones(artifacts, tiny_dir):
    from llmfast.loading import from_pretrained
    from llmfast.models import load_model
    from llmfast.sparse.runtime import install_sparse_runtime

    with pytest.raises(UserError, match="not a llmfast sparsify artifact"):
        install_sparse_runtime(from_pretrained(tiny_dir, "float32"), tiny_dir)
    with pytest.raises(ValueError, match="carry hooks"):  # thresholds applied twice would be a silent mistake
        install_sparse_runtime(load_model(artifacts["teal"]), artifacts["teal"])
    with pytest.raises(ValueError, match="attention projections carry hooks"):
        install_sparse_runtime(load_model(artifacts["teal-attention-only"]), artifacts["teal-attention-only"])


def test_attention_thresholds_change_the_output_and_the_projections_share_one_buffer(artifacts, tiny_dir):
    """The attention sites really zero something (the runtime equals the hook model, not merely the dense one), and
    q/k/v's weights are views of one stacked W^T: no second copy of the weights."""
    from llmfast.loading import from_pretrained
    from llmfast.sparse.kernels import SparseProjections
    from llmfast.sparse.runtime import sparse_forwards

    art = artifacts["teal-attention-only"]
    _, sparse = pair(art)
    dense = from_pretrained(tiny_dir, "float32").to(torch.float64).eval()
    ids = prompt_ids(art)
    with torch.no_grad():
        assert not torch.allclose(sparse(ids).logits, dense(ids).logits)
    found = sparse_forwards(sparse, "attention")
    assert len(found) == 4 and all(isinstance(f, SparseProjections) for f in found)
    attn = sparse.model.layers[0].self_attn
    base = attn.q_proj.weight.untyped_storage().data_ptr()
    assert all(getattr(attn, p).weight.untyped_storage().data_ptr() == base for p in ("k_proj", "v_proj"))
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):  # the weights are the dense model's, only laid out anew
        assert torch.equal(getattr(attn, p).weight, getattr(dense.model.layers[0].self_attn, p).weight)


def test_sparse_projections_answer_in_any_order_and_for_other_inputs():
    """The stacked product is shared only by calls on the same tensor: other orders or inputs are computed anew."""
    from llmfast.sparse.kernels import SparseProjections

    g = torch.Generator().manual_seed(0)
    lins = [torch.nn.Linear(32, w, bias=b, dtype=torch.float64) for w, b in ((16, False), (8, True), (8, False))]
    ref = [(l.weight.detach().clone(), None if l.bias is None else l.bias.detach().clone()) for l in lins]
    rt = SparseProjections(lins, t=0.5, dense_above=1.0)
    x, y = torch.randn(1, 1, 32, generator=g, dtype=torch.float64), torch.randn(1, 1, 32, generator=g, dtype=torch.float64)

    def want(j, inp):
        w, b = ref[j]
        return torch.nn.functional.linear(torch.where(inp.abs() > 0.5, inp, 0.0), w, b)

    with torch.no_grad():
        for j, inp in ((2, x), (0, x), (1, y), (1, x), (0, y), (2, y), (2, y)):
            assert close(lins[j](inp), want(j, inp)), (j,)
        assert close(lins[0](x.expand(1, 3, 32)), want(0, x.expand(1, 3, 32)))  # several tokens: dense
    assert rt.calls["sparse"] > 0 and rt.calls["prefill"] == 1


def test_hf_sparse_engine_is_chosen_for_sparse_variants_and_says_why_not(artifacts, tiny_dir):
    from llmfast.bench.engines import ENGINES, Variant, engine_families
    from llmfast.bench.runner import choose_engine

    engine = ENGINES.get("hf-sparse")
    teal = Variant("t", artifacts["teal"], sparsity="teal")
    assert engine_families(None, "teal") == ("hf-sparse", "hf")
    assert engine_families(None, None) == ("vllm", "hf")
    assert engine.can_run(teal) is None and choose_engine(teal, "auto") is engine
    assert ENGINES.get("hf").can_run(teal) is None  # the dense-with-zeros comparison stays available
    assert "not a sparse artifact" in engine.can_run(Variant("d", tiny_dir))
    assert "LoRA" in engine.can_run(Variant("l", artifacts["teal"], lora=object(), sparsity="teal"))
    assert "quantized" in engine.can_run(Variant("q", artifacts["teal"], quantization="nf4", sparsity="teal"))
    assert "gptq artifacts" in engine.can_run(Variant("p", artifacts["teal"], sparsity="gptq"))
    assert engine.can_run(Variant("p", artifacts["dejavu"], sparsity="dejavu")) is None


def test_bench_offline_names_the_engine_that_runs_a_sparse_artifact(artifacts, capsys):
    """`bench offline ARTIFACT --engine vllm` suggested `--engine hf` whatever the variant; a sparse artifact's own
    engine is hf-sparse, the first its refusal lists (s46's docs review)."""
    from llmfast.cli import main

    assert main(["bench", "offline", str(artifacts["teal"]), "--engine", "vllm", "--num-prompts", "1"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "(it runs on: hf-sparse, hf): use --engine hf-sparse" in line, line


def test_hf_sparse_engine_refuses_a_sparse_artifact_over_quantized_weights(artifacts, tmp_path):
    """Found by hand (2026-12-05): earlier versions of sparsify made TEAL artifacts over w4, NF4 and ternary models
    whose manifests did not record it; the sparse MLP then failed on their layers (AttributeError, shape or dtype
    errors). Their config.json says so: refused as for a quantized variant."""
    import json
    import shutil
    from pathlib import Path

    from llmfast.bench.engines import ENGINES, Variant

    old = Path(shutil.copytree(artifacts["teal"], tmp_path / "teal-over-w4"))
    cfg = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "auto-round"}}))
    assert "quantized" in ENGINES.get("hf-sparse").can_run(Variant("o", old, sparsity="teal"))


def test_hf_sparse_engine_generates_what_hf_generates(artifacts):
    from llmfast.bench.engines import ENGINES, Variant
    from llmfast.bench.workload import Request
    from llmfast.models import load_tokenizer

    art = artifacts["cats"]
    ids = load_tokenizer(art)(TEXT).input_ids[:10]
    requests = [Request(prompt="", prompt_len=len(ids), output_len=8, prompt_ids=ids)]
    v = Variant("c", art, sparsity="cats")
    texts = {}
    for name in ("hf", "hf-sparse"):
        results, _ = ENGINES.get(name).generate(v, requests, dtype="float32", batch_size=1, ignore_eos=True)
        assert results[0].success and results[0].output_tokens == 8
        texts[name] = results[0].generated_text
    assert texts["hf-sparse"] == texts["hf"]


def test_bag_sum_is_the_weighted_sum_of_the_kept_rows_in_any_number_of_bags():
    from llmfast.sparse.kernels import bag_sum

    g = torch.Generator().manual_seed(0)
    wt, v = torch.randn(300, 40, generator=g, dtype=torch.float64), torch.randn(300, generator=g, dtype=torch.float64)
    for idx in (torch.tensor([], dtype=torch.long), torch.tensor([7]), torch.arange(0, 300, 3), torch.arange(300)):
        want = v[idx] @ wt[idx] if idx.numel() else torch.zeros(40, dtype=torch.float64)
        for bags in (1, 2, 3, 8):
            got = bag_sum(idx, v.index_select(0, idx), wt, bags=bags)
            assert got.shape == (40,) and close(got, want), (idx.numel(), bags)


@pytest.mark.parametrize("method", ["cats", "relufy", "dejavu", "relufy-shift", *OVER_SHIFT])
def test_gathered_rows_of_gate_and_up_give_the_same_numbers(artifacts, method, monkeypatch):
    """Above ROWS_DENSE_ABOVE the rows of up (and gate) are computed dense, below it gathered: both paths agree."""
    import llmfast.sparse.kernels as kernels

    monkeypatch.setattr(kernels, "ROWS_DENSE_ABOVE", 1.0)  # every kept fraction gathers its rows
    hooked, sparse = pair(artifacts[method])
    ids = prompt_ids(artifacts[method])
    for step, (a, b) in enumerate(zip(prefill_and_decode(sparse, ids), prefill_and_decode(hooked, ids))):
        assert close(a, b), (method, step)


@pytest.mark.parametrize("method", ["relufy-shift", *OVER_SHIFT])
def test_a_shifted_relu_cut_is_applied_by_both_loaders(artifacts, method, tmp_path):
    """relufy's `target` cut (config.json) is on in the hook model and in the runtime, for the relufy artifact and
    for those made over it: the same artifact without the cut gives other logits, and the runtime cuts each
    layer at the source's threshold."""
    import json
    import shutil

    from llmfast.sparse.kernels import SparseMLP
    from llmfast.sparse.relu_cut import THRESHOLDS_KEY
    from llmfast.sparse.runtime import sparse_forwards

    cut = json.loads((artifacts["relufy-shift"] / "config.json").read_text())[THRESHOLDS_KEY]
    assert len(cut) == 2 and all(t > 0 for t in cut)
    assert json.loads((artifacts[method] / "config.json").read_text())[THRESHOLDS_KEY] == cut
    shifted, runtime = pair(artifacts[method])
    plain = tmp_path / "unshifted"  # the same artifact, its config.json without the cut
    shutil.copytree(artifacts[method], plain)
    config = json.loads((plain / "config.json").read_text())
    del config[THRESHOLDS_KEY]
    (plain / "config.json").write_text(json.dumps(config))
    unshifted, _ = pair(plain)
    ids = prompt_ids(artifacts[method])
    with torch.no_grad():
        gap = (shifted(ids).logits - unshifted(ids).logits).abs().max().item()
    assert gap > 1e-3, gap
    mlps = [rt for rt in sparse_forwards(runtime, "mlp") if isinstance(rt, SparseMLP)]
    assert [rt.relu_cut for rt in mlps] == pytest.approx(cut)


def test_attention_thresholds_under_another_method_than_dejavu_are_refused_by_both_loaders(artifacts, tmp_path):
    """`sparsity.attention` belongs to Deja Vu artifacts (the one method made over TEAL's attention sites): on another
    method's artifact neither loader would apply it alike, so both refuse it in one line naming the file."""
    import json
    import shutil

    from llmfast.loading import from_pretrained
    from llmfast.models import load_model
    from llmfast.sparse.runtime import install_sparse_runtime

    art = tmp_path / "cats-with-attention"
    shutil.copytree(artifacts["cats"], art)
    manifest = json.loads((art / "llmfast.json").read_text())
    manifest["sparsity"]["attention"] = {"method": "teal", "config": {"sites": ["attention"]}}
    (art / "llmfast.json").write_text(json.dumps(manifest))
    for load in (lambda: load_model(art), lambda: install_sparse_runtime(from_pretrained(art, "float32"), art)):
        with pytest.raises(UserError, match="sparsity.attention is for dejavu artifacts") as e:
            load()
        assert str(art / "llmfast.json") in str(e.value) and "\n" not in str(e.value)


SHAPE = "{site} thresholds have shape (3,), the model has 2 gated MLPs: the thresholds belong to another model"
LAYERS = "{site} thresholds for 3 layers, the model has 2 gated MLPs: the thresholds belong to another model"


@pytest.mark.parametrize("case,site,hooks,runtime", [
    ("file-missing", None, "a teal artifact without sparsity.safetensors", None),
    ("not-safetensors", None, "sparsity.safetensors: not a readable safetensors file", None),
    ("site-missing", "down_in", "sparsity.safetensors: no thresholds for down_in", None),
    ("two-dimensional", "mlp_in", "mlp_in thresholds are a torch.float32 tensor of shape (2, 1), not one float", None),
    ("integers", "o_in", "o_in thresholds are a torch.int64 tensor of shape (2,), not one float per layer", None),
    ("a-deeper-model", "mlp_in", SHAPE, LAYERS),
    ("a-deeper-model", "attn_in", SHAPE, LAYERS),
], ids=["file-missing", "not-safetensors", "site-missing", "two-dimensional", "integers", "deeper-mlp", "deeper-attn"])
def test_a_damaged_thresholds_file_is_one_line_from_both_loaders(artifacts, tmp_path, case, site, hooks, runtime):
    """sparsity.safetensors missing, unreadable, without a site, of the wrong shape or type, or of a model with more
    layers: load_model and the sparse runtime each refuse it in one line naming the artifact (s45's mutation audit:
    none of these refusals had a test; thresholds of a deeper model were taken for the first layers unnoticed)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from llmfast.loading import from_pretrained
    from llmfast.models import load_model
    from llmfast.sparse.runtime import install_sparse_runtime
    from llmfast.sparse.thresholds import THRESHOLDS_FILE

    art = tmp_path / "teal-attention"
    shutil.copytree(artifacts["teal-attention"], art)
    path = art / THRESHOLDS_FILE
    tensors = load_file(path)
    assert set(tensors) == {"mlp_in", "down_in", "attn_in", "o_in"}
    if case == "file-missing":
        path.unlink()
    elif case == "not-safetensors":
        path.write_bytes(b"not a safetensors file")
    else:
        if case == "site-missing":
            del tensors[site]
        else:
            tensors[site] = {"two-dimensional": tensors[site][:, None], "integers": torch.zeros(2, dtype=torch.int64),
                             "a-deeper-model": torch.cat([tensors[site], tensors[site][:1]])}[case]
        path.unlink()  # the artifact's file is a copy, but never write through a link
        save_file(tensors, path)
    for load, expected in ((lambda: load_model(art), hooks),
                           (lambda: install_sparse_runtime(from_pretrained(art, "float32"), art), runtime or hooks)):
        with pytest.raises(UserError) as e:
            load()
        message = str(e.value)
        assert expected.format(site=site) in message and str(art) in message and "\n" not in message, message


def test_lookahead_predictors_of_a_deeper_model_read_the_previous_layers_input(tmp_path, tiny_dir):
    """With look-ahead, layer i's predictor reads layer i-1's MLP input (layer 0 its own), in both loaders. Three
    layers: the third must read the second's input, not what the second was fed (the first's); two layers cannot
    tell these apart (s45's mutation audit: passing on what was fed, in the hooks or in the runtime, passed the
    suite, whose models have two layers)."""
    from llmfast.artifacts import write_manifest
    from llmfast.models import load_model
    from llmfast.sparse.predictors import PREDICTORS_FILE, Predictor, save_predictors
    from llmfast.sparse.runtime import runtime_calls
    from llmfast.sparse.thresholds import link_or_copy_model
    from llmfast.testing import build_tiny_llama

    src = build_tiny_llama(tmp_path / "deep", num_layers=3)
    art = tmp_path / "dejavu"
    art.mkdir()
    link_or_copy_model(src, art)
    g = torch.Generator().manual_seed(1)
    h, i, r = 128, 256, 16
    save_predictors([Predictor(torch.randn(h, r, generator=g) / h**0.5, torch.randn(r, i, generator=g) / r**0.5,
                               torch.zeros(i), torch.tensor(0.25), lookahead=True) for _ in range(3)],
                    art / PREDICTORS_FILE)
    write_manifest(art, stage="sparsify", parents=[str(src)], sparsity={"method": "dejavu", "config": {}})

    hooked = load_model(art)
    mlps = [l.mlp for l in hooked.model.layers]
    seen: dict = {}
    taps = [m.register_forward_pre_hook(lambda mod, a, i=i: seen.__setitem__(("x", i), a[0])) for i, m in
            enumerate(mlps)]
    taps += [m.down_proj.register_forward_pre_hook(lambda mod, a, i=i: seen.__setitem__(("down", i), a[0])) for i, m
             in enumerate(mlps)]  # after the predictors' zeroing
    ids = prompt_ids(art)
    with torch.no_grad():
        hooked(ids)
        for i, mlp in enumerate(mlps):
            x = seen[("x", i)]
            h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
            active = mlp.llmfast_predictor.active(seen[("x", max(i - 1, 0))])
            assert 0.05 < active.float().mean() < 0.95, i  # the predictors keep some and drop some
            assert torch.equal(seen[("down", i)], torch.where(active, h, torch.zeros(()))), i
    for t in taps:
        t.remove()
    ref, sparse = pair(art)
    for a, b in zip(prefill_and_decode(sparse, ids), prefill_and_decode(ref, ids)):
        assert close(a, b)
    assert runtime_calls(sparse, "mlp")["sparse"] > 0


@pytest.mark.parametrize("biased", [("gate_proj", "up_proj", "down_proj"), ("down_proj",)])
def test_the_sparse_mlp_refuses_biased_projections(biased):
    """The sparse MLP's gathers have no bias term: an MLP with one (Llama's mlp_bias) is refused in every mode rather
    than run without it (s45's mutation audit: dropping the check, or down_proj from it, passed every test; the
    hf-sparse engine refuses such a model from its config before this)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from llmfast.sparse.kernels import MODES, SparseMLP

    for mode in MODES:
        mlp = LlamaMLP(LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, mlp_bias=True))
        for p in {"gate_proj", "up_proj", "down_proj"} - set(biased):
            getattr(mlp, p).bias = None
        with pytest.raises(ValueError, match="the sparse MLP supports bias-free projections only"):
            SparseMLP(mlp, mode)
    plain = LlamaMLP(LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2))
    assert SparseMLP(plain, "relu").inter == 16


def _peft_adapter(model_dir, out):
    """A plain PEFT adapter on `model_dir` with random B on every projection, so the merge changes the MLPs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False,
        target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]))
    peft.save_pretrained(out)
    return out


def _derived_relufy(art, source):
    """`art`, made from the relufy artifact `source` by export, merge or quantize, records relufy's sparsity (the
    source's settings, its own weights' fingerprint) and keeps the ReLU and its cut in config.json."""
    import json

    from llmfast.modelfiles import weights_fingerprint
    from llmfast.sparse.relu_cut import THRESHOLDS_KEY

    spec = json.loads((art / "llmfast.json").read_text()).get("sparsity")
    assert spec == {"method": "relufy", "config": {}, "weights": weights_fingerprint(art)}, spec
    cfg, src = (json.loads((d / "config.json").read_text()) for d in (art, source))
    assert cfg["hidden_act"] == "relu" and cfg[THRESHOLDS_KEY] == src[THRESHOLDS_KEY]


def test_an_export_of_a_lora_on_a_relufy_model_runs_on_the_sparse_runtime(artifacts, tmp_path):
    """Found by hand (s48): `bench offline EXPORT --engine hf-sparse` said "not a sparse artifact" for the export of
    an adapter on a relufy model with a cut, which every loader runs with the cut: its llmfast.json lacked the
    sparsity. The runtime on the export equals the hook model (the cut on both)."""
    from llmfast.bench.engines import ENGINES, resolve_variant
    from llmfast.finetune.export import export_merged

    src = artifacts["relufy-shift"]
    out = export_merged(_peft_adapter(src, tmp_path / "adapter"), tmp_path / "export")
    _derived_relufy(out, src)
    assert ENGINES.get("hf-sparse").can_run(resolve_variant("e", str(out), None, None)) is None
    hooked, sparse = pair(out)
    ids = prompt_ids(out)
    for a, b in zip(prefill_and_decode(sparse, ids, steps=2), prefill_and_decode(hooked, ids, steps=2)):
        assert close(a, b)


def test_export_refuses_a_base_whose_sparsity_lives_in_files(artifacts, tiny_dir, tmp_path):
    """Found by hand (s48): `export ADAPTER OUT --base TEAL_ARTIFACT` (its weights are hard links to the model the
    adapter was trained on, so --base took it) wrote the merge without the thresholds or predictors, exit 0."""
    from llmfast.finetune.export import export_merged

    adapter = _peft_adapter(tiny_dir, tmp_path / "adapter")
    for method in ("teal", "cats", "dejavu"):
        with pytest.raises(UserError, match=rf"{method} is a {method} artifact: .* which export does not carry over; "
                                            r"export onto the model it was made from \(--base\), then sparsify"):
            export_merged(adapter, tmp_path / "out", base=str(artifacts[method]))
        assert not (tmp_path / "out").exists()


def test_a_merge_of_relufy_models_is_one_and_runs_as_its_source(artifacts, tmp_path):
    """Found by hand (s48): a merge of relufy models with the same cut lacked the sparsity in its llmfast.json
    (hf-sparse refused it). A linear merge of the model with itself is the model: the sparse runtime's numbers are
    the source's."""
    from llmfast.bench.engines import ENGINES, resolve_variant
    from llmfast.cli import main

    src = artifacts["relufy-shift"]
    (tmp_path / "m.yaml").write_text(f"merge_method: linear\nmodels:\n  - model: {src}\n    parameters: {{weight: 0.5}}\n"
                                     f"  - model: {src}\n    parameters: {{weight: 0.5}}\n")
    assert main(["merge", str(tmp_path / "m.yaml"), str(tmp_path / "merged")]) == 0
    merged = tmp_path / "merged"
    _derived_relufy(merged, src)
    assert ENGINES.get("hf-sparse").can_run(resolve_variant("m", str(merged), None, None)) is None
    ids = prompt_ids(src)
    for a, b in zip(prefill_and_decode(pair(merged)[1], ids, steps=2), prefill_and_decode(pair(src)[1], ids, steps=2)):
        assert close(a, b)


def test_a_quantized_relufy_model_stays_one_and_hf_sparse_says_it_is_quantized(artifacts, tmp_path):
    """Found by hand (s48): bnb4, w4 and bitnet of a relufy model lacked the sparsity, and hf-sparse refused them as
    "not a sparse artifact". The sparse MLP reads float weights: the refusal says so now; the report's "made by" is
    still the quantization."""
    import json

    pytest.importorskip("bitsandbytes")
    from llmfast.bench.engines import ENGINES, resolve_variant
    from llmfast.bench.lineage import compression
    from llmfast.cli import main

    src = artifacts["relufy-shift"]
    (tmp_path / "q.yaml").write_text(json.dumps({"model": str(src), "output": str(tmp_path / "q"),
                                                 "quantization": {"method": "bnb4"}}))
    assert main(["quantize", str(tmp_path / "q.yaml")]) == 0
    _derived_relufy(tmp_path / "q", src)
    v = resolve_variant("q", str(tmp_path / "q"), None, None)
    assert v.sparsity == "relufy" and "hf-sparse" not in v.families
    why = ENGINES.get("hf-sparse").can_run(v)
    assert why.startswith("the sparse MLP reads float weights, not quantized ones"), why
    assert compression(tmp_path / "q")["method"] == "bnb4"
