"""Deja Vu predictors (`llmfast sparsify` with method dejavu) on tiny Llama models: calibration recall reaches
the target by construction, the held-out metrics equal a recomputation with our own hooks, the loaded
artifact zeroes exactly the predicted-inactive activation entries, all-active predictors give the dense
model bit for bit, the file round-trips, and bad predictors or sources are one-line errors."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, run_cli

TEXT = REPO / "eval" / "text" / "persuasion.txt"
DATA = "{text: %s, skip_tokens: 4096, calibration_tokens: 2048, heldout_tokens: 2048, window: 256}" % TEXT


@pytest.fixture(scope="module")
def relu_dir(tmp_path_factory):
    from llmfast.testing import build_tiny_llama

    d = build_tiny_llama(tmp_path_factory.mktemp("relu") / "tiny-relu")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu"}))
    return d


@pytest.fixture(scope="module")
def small(tmp_path_factory, relu_dir):
    """One small dejavu artifact over the ReLU model, copied by the tests that change it."""
    tmp = tmp_path_factory.mktemp("small")
    assert run_cli("sparsify", str(recipe(tmp, relu_dir, "{rank: 4, steps: 5}")))[0] == 0
    return tmp / "out"


def recipe(tmp_path, model, config, out="out", name="r"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"model: {model}\nsparsify:\n  method: dejavu\n  config: {config}\n"
                    f"data: {DATA}\noutput: {tmp_path / out}\n")
    return path


def split(tok):
    """Calibration and held-out windows as the recipe defines them (skip 4096, calibrate 2048, hold out 2048)."""
    ids = tok(TEXT.read_text(encoding="utf-8"), add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids[4096:6144].reshape(-1, 256), ids[:2048].reshape(-1, 256)


def capture(model, windows, batch=4):
    """Per layer: MLP input, gate and up outputs, down_proj input, MLP output, concatenated over batches of 4
    windows (the batching sparsify measures with, so the activations are the same bit for bit)."""
    mlps = [l.mlp for l in model.model.layers]
    seen = {k: [[] for _ in mlps] for k in ("x", "gate", "up", "down", "out")}
    hooks = []
    for i, m in enumerate(mlps):
        hooks.append(m.register_forward_pre_hook(lambda mod, a, i=i: seen["x"][i].append(a[0])))
        hooks.append(m.register_forward_hook(lambda mod, a, o, i=i: seen["out"][i].append(o)))
        hooks.append(m.gate_proj.register_forward_hook(lambda mod, a, o, i=i: seen["gate"][i].append(o)))
        hooks.append(m.up_proj.register_forward_hook(lambda mod, a, o, i=i: seen["up"][i].append(o)))
        hooks.append(m.down_proj.register_forward_pre_hook(lambda mod, a, i=i: seen["down"][i].append(a[0])))
    with torch.no_grad():
        for s in range(0, len(windows), batch):
            model(windows[s:s + batch])
    for h in hooks:
        h.remove()
    return {k: [torch.cat(v).reshape(-1, v[0].shape[-1]) for v in per] for k, per in seen.items()}


@pytest.mark.parametrize("source,config", [
    ("relu", "{rank: 16, steps: 150, target_recall: 0.9}"),
    ("relu", "{rank: 16, steps: 150, lookahead: true}"),
    ("silu", "{rank: 16, steps: 150, label_sparsity: 0.7}"),
    ("silu", "{rank: 16, steps: 150}"),  # label_sparsity's default: 0.5
])
def test_recall_by_construction_and_heldout_metrics_match_a_recomputation(tmp_path, relu_dir, tiny_dir, source,
                                                                          config):
    from llmfast.models import load_model, load_tokenizer
    from llmfast.sparse.dejavu import load_predictors

    model_dir = relu_dir if source == "relu" else tiny_dir
    code, _, err = run_cli("sparsify", str(recipe(tmp_path, model_dir, config)))
    assert code == 0, err
    art = tmp_path / "out"
    manifest = json.loads((art / "llmfast.json").read_text())
    cfg, metrics = manifest["sparsity"]["config"], manifest["metrics"]
    preds = load_predictors(art)
    assert [p.rank for p in preds] == [16, 16] and all(p.lookahead == cfg["lookahead"] for p in preds)
    cuts = metrics["label_thresholds"]
    assert (cuts == [0.0, 0.0]) == (source == "relu")
    label = None if source == "relu" else cfg["label_sparsity"] or 0.5
    assert metrics["labels"] == ("nonzero" if label is None else f"|h| above the {label} quantile")
    tok = load_tokenizer(art)
    calib, held = split(tok)

    # Calibration: the dense source's activations, recomputed here; recall >= target on the tokens that set the
    # thresholds (the default threshold_share: the last quarter, 512 of 2048). (A logit equal to its threshold to
    # the last bit could flip if our matmul blocked differently: allow 2 entries of slack.)
    assert cfg["threshold_share"] == 0.25 and metrics["threshold_tokens"] == 512
    dense = load_model(model_dir)
    seen = capture(dense, calib, batch=len(calib))
    for i, p in enumerate(preds):
        fed = seen["x"][i - 1 if p.lookahead and i else i][1536:]
        active = seen["down"][i].abs() > cuts[i]
        hit = (p.active(fed) & active[1536:]).sum().item()
        assert hit >= cfg["target_recall"] * active[1536:].sum().item() - 2
        # the manifest's calibration report: the labels' sparsity over every calibration token (s45's mutation
        # audit: reporting the active fraction in its place passed)
        assert metrics["calibration"]["true_sparsity"]["per_layer"][i] == pytest.approx(
            1 - active.float().mean().item(), abs=1e-4)
        if source == "silu":  # the label quantile over all calibration tokens: `label` of the entries inactive
            assert (~active).float().mean().item() == pytest.approx(label, abs=1e-4)
            # the cut is the k-th smallest |h| (s45's mutation audit: the (k+1)-th passed the line above)
            mag, k = seen["down"][i].abs(), round(label * seen["down"][i].numel())
            assert int((mag < cuts[i]).sum()) < k <= int((mag <= cuts[i]).sum()), i

    # Held-out, on the loaded artifact: down_proj's input is exactly act(gate) * up with the predicted-inactive
    # entries zeroed, the MLP output is down of that, and the reported metrics are these counts.
    sparse = load_model(art)
    assert all(l.mlp.llmfast_predictor is not None for l in sparse.model.layers)
    seen = capture(sparse, held)
    report = metrics["predictors"]
    for i, (p, layer) in enumerate(zip(preds, sparse.model.layers)):
        fed = seen["x"][i - 1 if p.lookahead and i else i]
        predicted = p.active(fed)
        h = layer.mlp.act_fn(seen["gate"][i]) * seen["up"][i]
        assert torch.equal(seen["down"][i], torch.where(predicted, h, torch.zeros(())))
        manual = F.linear(torch.where(predicted, h, torch.zeros(())), layer.mlp.down_proj.weight)
        assert torch.allclose(seen["out"][i], manual, atol=1e-6)
        active = h.abs() > cuts[i]
        expect = {"recall": (predicted & active).sum() / active.sum(),
                  "mass_recall": h.abs().double()[predicted].sum() / h.abs().double().sum(),
                  "precision": (predicted & active).sum() / predicted.sum(),
                  "predicted_active": predicted.float().mean(), "true_sparsity": 1 - active.float().mean()}
        for key, value in expect.items():
            assert report[key]["per_layer"][i] == pytest.approx(value.item(), abs=2e-6), (i, key)
        zero = (seen["down"][i] == 0).float().mean().item()
        assert metrics["heldout_sparsity"]["down_in"]["per_layer"][i] == pytest.approx(zero, abs=2e-6)
        zero = (seen["x"][i] == 0).float().mean().item()
        assert metrics["heldout_sparsity"]["mlp_in"]["per_layer"][i] == pytest.approx(zero, abs=2e-6)
    # counted on the pass with the predictors only (s45's mutation audit: counting the dense pass too passed)
    assert metrics["heldout_sparsity"]["mlp_in"]["tokens"] == metrics["heldout_sparsity"]["down_in"]["tokens"] == 2048
    assert report["recall"]["mean"] == pytest.approx(sum(report["recall"]["per_layer"]) / 2, abs=2e-6)
    assert 0 < metrics["heldout_kl"] < 1
    # The manifest's calibration recall is what the thresholds were set for; on held-out text it stays close.
    assert all(r >= cfg["target_recall"] - 1e-9 for r in metrics["calibration"]["recall"]["per_layer"])
    assert report["recall"]["mean"] > cfg["target_recall"] - 0.1
    assert {"config.json", "model.safetensors", "predictors.safetensors", "tokenizer.json"} <= {
        f.name for f in art.iterdir()}
    from llmfast.bench.lineage import compression  # what bench run's report shows of it

    made = compression(art)
    assert made["method"] == "dejavu" and made["mlp_sparsity"] == metrics["heldout_sparsity"]["down_in"]["mean"]
    assert made["predictors"] == {k: report[k]["mean"] for k in ("recall", "precision", "predicted_active")}


def test_threshold_share_sets_thresholds_on_tokens_kept_out_of_training(tmp_path, relu_dir):
    """With threshold_share the last windows of the calibration text only set the thresholds: recall >= target
    holds on them (recomputed here), the predictor is trained on the rest alone (trained on those first windows
    by hand with the same seed, it is the saved one), and the manifest says how many tokens set the threshold."""
    from llmfast.models import load_model, load_tokenizer
    from llmfast.sparse import predictor_training as pt
    from llmfast.sparse.dejavu import DejavuConfig, load_predictors

    config = "{rank: 8, steps: 40, target_recall: 0.9, threshold_share: 0.25}"
    code, _, err = run_cli("sparsify", str(recipe(tmp_path, relu_dir, config)))
    assert code == 0, err
    art = tmp_path / "out"
    metrics = json.loads((art / "llmfast.json").read_text())["metrics"]
    assert metrics["threshold_tokens"] == 512 and metrics["calibration_tokens"] == 2048
    preds = load_predictors(art)
    calib, _ = split(load_tokenizer(art))
    seen = capture(load_model(relu_dir), calib, batch=len(calib))
    cfg = DejavuConfig(rank=8, steps=40, target_recall=0.9, threshold_share=0.25)
    generator = torch.Generator().manual_seed(cfg.seed)
    for i, p in enumerate(preds):
        active = seen["down"][i] != 0
        hit = (p.active(seen["x"][i][1536:]) & active[1536:]).sum().item()
        assert hit >= 0.9 * active[1536:].sum().item() - 2
        again = pt.train_layer(pt.LayerData(seen["x"][i][:1536], active[:1536], 0.0), cfg, generator)
        assert torch.allclose(again.B, p.B, atol=1e-5) and torch.allclose(again.bias, p.bias, atol=1e-5)


def test_active_budget_shares_one_fraction_over_the_layers(tmp_path, relu_dir):
    """`active_budget` sets every layer's threshold from the curves of all layers: on the threshold tokens the layers
    together predict at most the budget active, the thresholds are those shared_thresholds picks from the saved
    predictors' own logits there, and the manifest records the rule."""
    from llmfast.models import load_model, load_tokenizer
    from llmfast.sparse import predictor_training as pt
    from llmfast.sparse.dejavu import load_predictors

    code, _, err = run_cli("sparsify", str(recipe(tmp_path, relu_dir, "{rank: 8, steps: 40, active_budget: 0.4}")))
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "llmfast.json").read_text())
    config = manifest["sparsity"]["config"]
    assert config["active_budget"] == 0.4 and config["target_recall"] is None and config["active_fraction"] is None
    assert manifest["metrics"]["calibration"]["predicted_active"]["mean"] <= 0.4 + 1e-4
    preds = load_predictors(tmp_path / "out")
    calib, _ = split(load_tokenizer(tmp_path / "out"))
    seen = capture(load_model(relu_dir), calib, batch=len(calib))
    held = slice(1536, None)  # threshold_share 0.25 of the 2048 calibration tokens
    curves = [pt.recall_curve(p.logits(seen["x"][i][held]), seen["down"][i][held] != 0) for i, p in enumerate(preds)]
    for p, want in zip(preds, pt.shared_thresholds(curves, 0.4)):
        assert p.threshold.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-5)


def _layer(generator, n, width, spread):
    """Logits and labels of a synthetic layer: an entry is active with probability sigmoid(spread * (logit - 1))."""
    logits = torch.randn(n, width, generator=generator)
    active = torch.rand(n, width, generator=generator) < torch.sigmoid(spread * (logits - 1))
    return logits, active


def test_recall_curve_matches_counting_the_kept_entries():
    from llmfast.sparse.predictor_training import recall_curve

    g = torch.Generator().manual_seed(0)
    logits, active = _layer(g, 64, 48, 2.0)
    recall, threshold = recall_curve(logits, active, points=40)
    assert recall.shape == threshold.shape == (41,) and threshold.dtype == torch.float32
    for j in range(41):
        kept = logits > threshold[j]
        assert kept.sum().item() == round(j * logits.numel() / 40)
        assert recall[j].item() == pytest.approx((kept & active).sum().item() / active.sum().item(), abs=1e-12)


def test_shared_thresholds_spend_the_budget_where_recall_still_climbs():
    """Two layers, one easy (labels follow the logits closely) and one hard: the shared thresholds keep at most the
    budget on average, give the hard layer more than the easy one, and their split of what they keep is the best one
    (highest product of recalls) among all splits of that much, found by trying every pair of grid points."""
    from llmfast.sparse.predictor_training import recall_curve, shared_thresholds

    g = torch.Generator().manual_seed(1)
    layers = [_layer(g, 200, 64, 8.0), _layer(g, 200, 64, 1.0)]
    points, budget, entries = 50, 0.3, 200 * 64
    curves = [recall_curve(lo, act, points=points) for lo, act in layers]
    thresholds = shared_thresholds(curves, budget)
    kept = [int((lo > t).sum()) for (lo, _), t in zip(layers, thresholds)]  # counted, so no float rounding
    assert all(k * points % entries == 0 for k in kept)  # each a grid point: j * entries / points entries
    ja, jb = (k * points // entries for k in kept)
    assert ja + jb <= round(2 * budget * points) and jb > ja
    recall = [int(((lo > t) & act).sum()) / int(act.sum()) for (lo, act), t in zip(layers, thresholds)]
    assert recall == pytest.approx([float(curves[0][0][ja]), float(curves[1][0][jb])], abs=1e-12)
    logs = [c[0].log() for c in curves]
    best = max(float(logs[0][a] + logs[1][b]) for a in range(points + 1) for b in range(points + 1)
               if a + b <= ja + jb)
    assert float(logs[0][ja] + logs[1][jb]) == pytest.approx(best, abs=1e-12)


def test_shared_thresholds_keep_nothing_of_a_layer_with_no_active_neuron_and_refuse_an_unreachable_budget():
    from llmfast.errors import UserError
    from llmfast.sparse.predictor_training import recall_curve, shared_thresholds

    g = torch.Generator().manual_seed(3)
    logits, active = _layer(g, 100, 32, 4.0)
    quiet = torch.randn(100, 32, generator=g)
    curves = [recall_curve(logits, active, points=100), recall_curve(quiet, torch.zeros_like(active), points=100)]
    easy, none = shared_thresholds(curves, 0.2)
    assert int((quiet > none).sum()) == 0 and 0 < float((logits > easy).float().mean()) <= 0.4 + 1e-6
    with pytest.raises(UserError, match=r"active_budget: 0.001 is less than the layers keep when each predicts just "
                                        r"one active neuron \(0.005 on average here\): give a larger budget"):
        shared_thresholds(curves, 0.001)  # the first layer's first grid point alone is 1% of its entries


def test_shared_thresholds_starve_no_layer():
    """A layer whose active neurons are many and poorly predicted next to easy ones still keeps some at a tight
    budget (a mean of recalls would drop it whole: its recall gains least per unit of fraction)."""
    from llmfast.sparse.predictor_training import recall_curve, shared_thresholds

    g = torch.Generator().manual_seed(2)
    hard = torch.randn(200, 64, generator=g)
    layers = [_layer(g, 200, 64, 8.0), _layer(g, 200, 64, 8.0),
              (hard, torch.rand(200, 64, generator=g) < torch.sigmoid(0.3 * hard + 0.5))]
    curves = [recall_curve(lo, act, points=200) for lo, act in layers]
    for budget in (0.05, 0.15):
        kept = [float((lo > t).float().mean()) for (lo, _), t in zip(layers, shared_thresholds(curves, budget))]
        assert min(kept) > 0 and sum(kept) / 3 <= budget + 1e-6  # float32 fractions


def _rewrite(art, **change):
    from llmfast.sparse.predictors import load_predictors, save_predictors

    preds = load_predictors(art)
    for p in preds:
        for k, v in change.items():
            setattr(p, k, v(p))
    save_predictors(preds, art / "predictors.safetensors")


def test_all_active_predictors_give_the_dense_model_exactly(tmp_path, relu_dir, small):
    from llmfast.models import load_model, load_tokenizer

    art = shutil.copytree(small, tmp_path / "out")
    ids = split(load_tokenizer(art))[1][:2]
    dense = load_model(relu_dir)
    with torch.no_grad():
        reference = dense(ids).logits
        assert not torch.equal(load_model(art)(ids).logits, reference)  # the trained predictors do zero something
        _rewrite(art, threshold=lambda p: torch.tensor(float("-inf")))
        assert torch.equal(load_model(art)(ids).logits, reference)


def test_save_load_round_trip(tmp_path):
    from llmfast.sparse.dejavu import Predictor, load_predictors
    from llmfast.sparse.predictors import save_predictors

    g = torch.Generator().manual_seed(0)
    preds = [Predictor(torch.randn(8, 3, generator=g), torch.randn(3, 16, generator=g), torch.randn(16, generator=g),
                       torch.tensor(0.25 * i), lookahead=True) for i in range(3)]
    save_predictors(preds, tmp_path / "predictors.safetensors")
    back = load_predictors(tmp_path)
    x = torch.randn(5, 8, generator=g)
    for a, b in zip(preds, back):
        assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("A", "B", "bias", "threshold"))
        assert b.lookahead and torch.equal(a.active(x), b.active(x))
        assert torch.equal(b.active(x), (x @ a.A @ a.B + a.bias) > a.threshold)


@pytest.mark.parametrize("change,expected", [
    ({"A": lambda p: p.A[:-1]}, "layer 0's predictor maps 127 -> 256, the model's MLP is 128 -> 256"),
    ({"B": lambda p: torch.zeros(p.rank, 300), "bias": lambda p: torch.zeros(300)}, "maps 128 -> 300"),
    ({"B": lambda p: p.B[:-1]}, "layer 0 has shapes A (128, 4), B (3, 256)"),
    # one bias for every neuron would broadcast (s45's mutation audit: unchecked, it loaded)
    ({"bias": lambda p: p.bias[:1]}, "layer 0 has shapes A (128, 4), B (4, 256), bias (1,), threshold ()"),
    ("one layer", "1 predictors for a model with 2 gated MLPs"),
    ("missing key", "missing 1.bias: rebuild it"),
    ("other format", "not a llmfast-dejavu-1 file (metadata format 'llmfast-dejavu-0')"),  # s45's mutation audit
])
def test_predictors_that_do_not_fit_are_one_line_errors(tmp_path, small, change, expected, monkeypatch):
    from safetensors.torch import load_file, save_file

    import llmfast.models
    from llmfast.errors import UserError
    from llmfast.models import load_model

    def weights_loaded(*args, **kwargs):  # the misfit is found on the meta device, before the weights load
        raise AssertionError("the weights were loaded before the predictors were checked")

    monkeypatch.setattr(llmfast.models, "from_pretrained", weights_loaded)
    from llmfast.sparse.predictors import FORMAT

    art = shutil.copytree(small, tmp_path / "out")
    path = art / "predictors.safetensors"
    if isinstance(change, dict):
        _rewrite(art, **change)
    else:
        tensors = load_file(path)
        drop = {"one layer": "1.", "missing key": "1.bias"}.get(change, "none")
        save_file({k: v for k, v in tensors.items() if not k.startswith(drop)}, path,
                  metadata={"format": FORMAT if change != "other format" else "llmfast-dejavu-0", "lookahead": "false"})
    with pytest.raises(UserError) as e:
        load_model(art)
    assert str(path) in str(e.value) and expected in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("source,config,expected", [
    ("teal", "{}", "is already a teal artifact with thresholds: sparsify the model it was made from"),
    # over attention and MLP thresholds (only attention-only ones stack): its MLP thresholds would be dropped
    ("teal-both", "{}", "is already a teal artifact with thresholds: sparsify the model it was made from"),
    ("dejavu", "{}", "is already a dejavu artifact"),
    ("relu", "{label_sparsity: 0.5}", "has ReLU MLPs, whose active neurons are the nonzero activations"),
    ("relu", "{active_fraction: 0.3, target_recall: 0.9}",
     "set one of target_recall, active_fraction and active_budget, not target_recall and active_fraction"),
    ("relu", "{active_budget: 0}", "sparsify.config.active_budget: Input should be greater than 0"),
    ("relu", "{rank: 4, steps: 5, active_budget: 0.0001}",  # below one grid point (1/2000) in every layer
     "sparsify.config.active_budget: 0.0001 is less than the layers keep when each predicts just one active neuron"),
    ("relu", "{rank: 0}", "sparsify.config.rank: Input should be greater than 0"),
    ("relu", "{target_recall: 1.5}", "sparsify.config.target_recall: Input should be less than or equal to 1"),
    ("relu", "{threshold_share: 1}", "sparsify.config.threshold_share: Input should be less than 1"),
    # s46: a diverged training wrote NaN predictors (recall 0, exit 0) or, near float32's largest rate, a traceback
    ("relu", "{rank: 4, steps: 1, lr: 1.0e+30}", "layer 0's predictor diverged (its loss became nan after its last "
                                                 "step (1)): lower sparsify.config.lr (or pos_weight)"),
    ("relu", "{rank: 4, steps: 2, lr: 1.0e+38}", "layer 0's predictor diverged (its update overflowed float32 at "
                                                 "step 1)"),
    ("relu", "{rank: 4, steps: 2, pos_weight: 1.0e+300}", "layer 0's predictor diverged (its loss became nan at step 1)"),
    # s46: a rank past what the MLP's shapes allow was a traceback from torch's size arithmetic (2^63 - 1)
    ("relu", "{rank: 9223372036854775807, steps: 1}", "sparsify.config.rank: 9223372036854775807 is more than the"),
    # s46: a rate float32 rounds to nothing trained nothing and wrote the untrained predictors with exit 0
    ("relu", "{lr: 1.0e-300}", "sparsify.config.lr: must be at least 1.18e-38 (float32's smallest normal number"),
])
def test_bad_sources_and_settings_are_one_line_exit_2_nothing_written(tmp_path, relu_dir, small, source, config,
                                                                     expected):
    model = small if source == "dejavu" else relu_dir
    if source.startswith("teal"):
        sites = "{target: 0.5, sites: [mlp, attention]}" if source == "teal-both" else "{target: 0.5}"
        src = recipe(tmp_path, relu_dir, sites, out="src", name="src")
        src.write_text(src.read_text().replace("method: dejavu", "method: teal"))
        assert run_cli("sparsify", str(src))[0] == 0
        model = tmp_path / "src"
    code, _, err = run_cli("sparsify", str(recipe(tmp_path, model, config)))
    assert code == 2, err
    errors = [l for l in err.splitlines() if "error" in l]
    assert len(errors) == 1 and errors[0].startswith("llmfast: error: ") and expected in errors[0], err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("out", ".out"))], "nothing written"



def _teal_attention(tmp_path, relu_dir):
    """A TEAL artifact of the attention sites alone over the ReLU model, made through the CLI."""
    src = recipe(tmp_path, relu_dir, "{target: 0.5, sites: [attention]}", out="attn", name="attn")
    src.write_text(src.read_text().replace("method: dejavu", "method: teal"))
    assert run_cli("sparsify", str(src))[0] == 0
    return tmp_path / "attn"


def test_dejavu_over_teal_attention_keeps_its_thresholds(tmp_path, relu_dir):
    """Deja Vu made over a TEAL attention-only artifact: trained on the source with its thresholds on (its held-out
    recall equals a recomputation on the source as load_model gives it), the thresholds file and settings come
    along, and loading the artifact puts the thresholds and the predictors on (the same logits as doing both by
    hand)."""
    from safetensors.torch import load_file

    from llmfast.models import load_model, load_tokenizer
    from llmfast.sparse.dejavu import load_predictors
    from llmfast.sparse.predictors import install_predictors
    from llmfast.sparse.thresholds import THRESHOLDS_FILE

    attn = _teal_attention(tmp_path, relu_dir)
    code, _, err = run_cli("sparsify", str(recipe(tmp_path, attn, "{rank: 8, steps: 40}")))
    assert code == 0, err
    out = tmp_path / "out"
    sparsity = json.loads((out / "llmfast.json").read_text())["sparsity"]
    assert sparsity["method"] == "dejavu"
    assert sparsity["attention"] == {"method": "teal", "config": {"target": 0.5, "sites": ["attention"]}}
    theirs, ours = load_file(attn / THRESHOLDS_FILE), load_file(out / THRESHOLDS_FILE)
    assert set(ours) == {"attn_in", "o_in"} and all(torch.equal(theirs[k], ours[k]) for k in ours)
    from llmfast.bench.lineage import compression  # bench run's report says both

    assert compression(out)["method"] == "dejavu + teal attention 50%"

    tok = load_tokenizer(out)
    ids = tok(TEXT.read_text(encoding="utf-8")[:2000], return_tensors="pt").input_ids[:, :64]
    by_hand = load_model(attn)  # the source with its attention thresholds, then the predictors
    install_predictors(by_hand, load_predictors(out))
    plain = load_model(relu_dir)
    install_predictors(plain, load_predictors(out))  # the predictors without the thresholds
    with torch.no_grad():
        got, want, without = load_model(out)(ids).logits, by_hand(ids).logits, plain(ids).logits
    assert torch.equal(got, want)
    assert (got - without).abs().max() > 1e-4  # the attention thresholds do change the output

    # the held-out recall was measured with the thresholds on: recomputed on the loaded artifact (each layer's
    # active neurons are relu(gate) * up's nonzeros there, under the earlier layers' predictions)
    calib, heldout = split(tok)
    loaded = load_model(out)
    seen = capture(loaded, heldout)
    preds = load_predictors(out)
    active = [(layer.mlp.act_fn(seen["gate"][i]) * seen["up"][i]) != 0 for i, layer in enumerate(loaded.model.layers)]
    recall = [float(p.active(seen["x"][i])[active[i]].float().mean()) for i, p in enumerate(preds)]
    metrics = json.loads((out / "llmfast.json").read_text())["metrics"]
    assert metrics["predictors"]["recall"]["per_layer"] == pytest.approx(recall, abs=2e-6)
    # and so were the zeros entering q/k/v and o_proj, reported beside the MLP's
    zeros = {"attn_in": [], "o_in": []}
    hooks = [getattr(layer.self_attn, proj).register_forward_pre_hook(
        lambda mod, a, site=site: zeros[site].append((a[0] == 0).float().mean().item()))
        for layer in loaded.model.layers for site, proj in (("attn_in", "q_proj"), ("o_in", "o_proj"))]
    with torch.no_grad():
        for s in range(0, len(heldout), 4):
            loaded(heldout[s:s + 4])
    for h in hooks:
        h.remove()
    for site, seen_zeros in zeros.items():  # batches of equal size: the mean of the per-batch fractions
        layers = len(loaded.model.layers)
        want = [sum(seen_zeros[i::layers]) / len(seen_zeros[i::layers]) for i in range(layers)]
        assert metrics["heldout_sparsity"][site]["per_layer"] == pytest.approx(want, abs=2e-6)


ONLY_DEJAVU = "is a teal artifact of the attention sites: only dejavu is made over it (keeping its thresholds); "
DROPS = "is a dejavu artifact: {} over it would drop its predictors; sparsify the model it was made from (Deja Vu goes last"


@pytest.mark.parametrize("source,method,config,expected", [
    ("attention", "cats", "{target: 0.5}", ONLY_DEJAVU + "for cats with them: not available"),
    ("attention", "teal", "{target: 0.5}", ONLY_DEJAVU + "for teal with them: one TEAL artifact with sites: [mlp, "),
    ("attention", "relufy", "{steps: 1}", ONLY_DEJAVU + "for relufy with them: relufy first, then TEAL with sites"),
    ("dejavu", "teal", "{target: 0.5, sites: [attention]}", DROPS.format("teal")),
    ("dejavu", "relufy", "{steps: 1}", DROPS.format("relufy")),
    ("dejavu-over-attention", "cats", "{target: 0.5}", DROPS.format("cats")),
    ("dejavu-over-attention", "dejavu", "{}", "is already a dejavu artifact with thresholds: sparsify the model"),
])
def test_other_methods_over_teal_attention_or_dejavu_are_one_line_errors(tmp_path, relu_dir, small, source, method,
                                                                          config, expected):
    """Only Deja Vu is made over TEAL's attention sites, and nothing over Deja Vu (its predictors would be dropped
    without a word: link_or_copy_model takes their file along, nothing would load it)."""
    attn = small if source == "dejavu" else _teal_attention(tmp_path, relu_dir)
    if source == "dejavu-over-attention":
        assert run_cli("sparsify", str(recipe(tmp_path, attn, "{rank: 4, steps: 5}", out="dv", name="dv")))[0] == 0
        attn = tmp_path / "dv"
    bad = recipe(tmp_path, attn, config)
    bad.write_text(bad.read_text().replace("method: dejavu", f"method: {method}"))
    code, _, err = run_cli("sparsify", str(bad))
    assert code == 2, err
    errors = [l for l in err.splitlines() if "error" in l]
    assert len(errors) == 1 and expected in errors[0] and str(attn) in errors[0], err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("out", ".out"))], "nothing written"


def test_pick_threshold_keeps_the_fraction_asked_for_and_the_recall_asked_for():
    """`active_fraction` 0.5, the only value the tests used, is where keeping the largest and the smallest half
    coincide (s44's mutation audit); and the recall rule keeps at least the share of positives asked for."""
    import torch

    from llmfast.sparse.predictor_training import pick_threshold

    logits = torch.randn(64, 500, generator=torch.Generator().manual_seed(0))
    for fraction in (0.0, 0.1, 0.3, 0.8, 1.0):
        t = pick_threshold(logits, torch.zeros_like(logits, dtype=torch.bool), 0.99, fraction)
        kept = logits > t
        assert kept.sum().item() == round(fraction * logits.numel())
        if 0 < fraction < 1:  # the largest logits: none left out is above one kept
            assert logits[~kept].max() < logits[kept].min()
    active = logits + torch.randn(logits.shape, generator=torch.Generator().manual_seed(1)) > 1.0
    for recall in (0.9, 0.95, 0.99):
        t = pick_threshold(logits, active, recall, None)
        got = (logits[active] > t).float().mean().item()
        assert recall <= got < recall + 2 / active.sum().item()  # the lowest threshold that reaches it


def test_a_target_recall_too_small_to_leave_float_rounding_still_keeps_one_active_neuron():
    """1 - 1e-300 is 1.0 in floats: every positive was allowed below the threshold and kthvalue was asked for one
    past the last (s46: a traceback); the rule keeps at least one, which meets any recall above 0."""
    import torch

    from llmfast.sparse.predictor_training import pick_threshold

    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    active = logits > 0.5
    t = pick_threshold(logits, active, 1e-300, None)
    assert (logits[active] > t).sum().item() == 1
    assert t < logits[active].max()


def test_a_predictor_is_trained_on_normalised_inputs_and_stores_the_scale_folded_in():
    """Training sees x / rms(x); the stored A takes that scale back, so the saved predictor gives the trained logits
    on the raw inputs the runtime feeds it (s44's mutation audit: A stored unscaled passed, since the threshold is
    picked on the stored predictor's own logits). x and 4x (an exact power of two) train the same bits, so their
    predictors agree on their own inputs; and labels a linear rule sets are learned."""
    from types import SimpleNamespace

    import torch

    from llmfast.sparse.predictor_training import LayerData, train_layer

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=g) * 3.0
    rule = torch.randn(32, 4, generator=g) @ torch.randn(4, 48, generator=g)  # within the predictor's rank
    active = x @ rule > 0
    cfg = SimpleNamespace(rank=8, lr=0.01, weight_decay=0.0, steps=200, batch_tokens=256, pos_weight=1.0,
                          lookahead=False)
    one = train_layer(LayerData(x, active, 0.0), cfg, torch.Generator().manual_seed(1))
    four = train_layer(LayerData(4 * x, active, 0.0), cfg, torch.Generator().manual_seed(1))
    torch.testing.assert_close(four.logits(4 * x), one.logits(x), rtol=1e-5, atol=1e-4)
    assert ((one.logits(x) > 0) == active).float().mean() > 0.9


def test_split_tokens_holds_back_the_last_share_of_the_tokens():
    """The threshold tokens are the last round(share x n) of them, at least one and at most n - 1, in order; share 0
    or a single token: both are all of them (s45's mutation audit: truncating the share instead passed every test)."""
    from llmfast.sparse import predictor_training as pt

    n = 10
    data = pt.LayerData(torch.arange(n * 3, dtype=torch.float32).view(n, 3), torch.arange(n * 4).view(n, 4) % 3 == 0, 0.5)
    for share, held in ((0.26, 3), (0.35, 4), (0.5, 5), (0.01, 1), (0.99, 9)):
        fit, thr = pt.split_tokens(data, share)
        assert torch.equal(fit.x, data.x[: n - held]) and torch.equal(thr.x, data.x[n - held:]), share
        assert torch.equal(fit.active, data.active[: n - held]) and torch.equal(thr.active, data.active[n - held:])
        assert fit.label_threshold == thr.label_threshold == 0.5
    for d, share in ((data, 0.0), (pt.LayerData(data.x[:1], data.active[:1], 0.5), 0.5)):
        fit, thr = pt.split_tokens(d, share)
        assert fit is d and thr is d


def test_per_layer_report_gives_the_mean_min_and_max_over_layers():
    """The manifest's predictor and calibration summaries (s45's mutation audit: a `max` that was the minimum passed
    every test)."""
    from llmfast.sparse.predictor_training import per_layer_report

    rows = [{"recall": 0.9, "frac": 0.25}, {"recall": 0.97, "frac": 0.5}, {"recall": 0.8, "frac": 1 / 3}]
    got = per_layer_report(rows)
    assert got == {"recall": {"mean": 0.89, "min": 0.8, "max": 0.97, "per_layer": [0.9, 0.97, 0.8]},
                   "frac": {"mean": round(13 / 36, 6), "min": 0.25, "max": 0.5, "per_layer": [0.25, 0.5, 0.333333]}}


def test_a_predictors_bias_starts_at_each_neurons_log_odds_of_being_active():
    """Before any step the bias is log(r / (1 - r)) of each neuron's own active rate r (clamped to [1e-4, 1 - 1e-4]:
    a neuron never or always active gets a finite bias), so an untrained predictor already calls the often-active
    neurons active (s45's mutation audit: one rate for all neurons passed every test)."""
    from types import SimpleNamespace

    from llmfast.sparse.predictor_training import LayerData, train_layer

    g = torch.Generator().manual_seed(0)
    rates = torch.tensor([0.0, 0.1, 0.5, 0.75, 1.0])
    active = torch.rand(400, 5, generator=g) < rates  # rate 0 and 1 exactly; the others near theirs
    cfg = SimpleNamespace(rank=2, lr=0.01, weight_decay=0.0, steps=0, batch_tokens=64, pos_weight=1.0, lookahead=False)
    p = train_layer(LayerData(torch.randn(400, 8, generator=g), active, 0.0), cfg, g)
    r = active.double().mean(0).clamp(1e-4, 1 - 1e-4)
    # 1 - 1e-4 rounded to float32 is off by up to 2^-24, 6e-4 of 1e-4: that much in the log-odds at the clamp
    torch.testing.assert_close(p.bias.double(), torch.log(r / (1 - r)), rtol=0, atol=1e-3)
    assert p.bias[0] < -9 and p.bias[-1] > 9 and p.threshold == float("inf")


def test_heldout_measures_count_every_window_of_a_short_last_batch(tiny):
    """5 held-out windows in batches of 4: the predictors' report and the attention sparsity each count all 5 (s45's
    mutation audit: loops skipping a last batch of one window passed, the suite's held-out text being 8 windows)."""
    from llmfast.sparse import predictor_training as pt
    from llmfast.sparse.predictors import Predictor
    from llmfast.sparse.stacked import heldout_attention_sparsity

    model, _ = tiny
    g = torch.Generator().manual_seed(0)
    preds = [Predictor(torch.randn(128, 8, generator=g) / 128**0.5, torch.randn(8, 256, generator=g) / 8**0.5,
                       torch.zeros(256), torch.tensor(0.25)) for _ in range(2)]
    windows = torch.arange(5 * 32).view(5, 32) * 7 % 1000 + 3
    metrics = pt.heldout_metrics(model, preds, [0.0, 0.0], windows, batch_size=4)
    assert metrics["heldout_sparsity"]["down_in"]["tokens"] == metrics["heldout_sparsity"]["mlp_in"]["tokens"] == 160
    with torch.no_grad():  # the last window alone moves the mean KL: it is counted, and counted once
        dense = model(windows).logits.double().log_softmax(-1)
        hooked = pt.install_predictors(model, preds)
        try:
            sparse = model(windows).logits.double().log_softmax(-1)
        finally:
            hooked.remove()
    kl = float((dense.exp() * (dense - sparse)).sum(-1).mean())
    assert metrics["heldout_kl"] == pytest.approx(kl, rel=1e-3, abs=1e-6) and kl > 1e-4
    attention = heldout_attention_sparsity(model, preds, windows, batch_size=4)
    assert attention["attn_in"]["tokens"] == attention["o_in"]["tokens"] == 160
