"""`llmfast sparsify` on tiny Llama models: TEAL/CATS reach their target on held-out text, zero thresholds change
nothing, ReLU-fication zeroes exactly the non-positive gates and distillation brings it closer to the original,
SIGKILL + --resume equals an uninterrupted run, every registered method passes the same checks, bad input."""

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, run_cli

TEXT = REPO / "eval" / "text" / "persuasion.txt"
DATA = "{text: %s, skip_tokens: 4096, calibration_tokens: 2048, heldout_tokens: 2048, window: 256}"
FAST = {"teal": "{target: 0.5}", "cats": "{target: 0.5}",
        "relufy": "{steps: 4, batch_size: 2, lr: 1.0e-4, samples: 2}", "dejavu": "{rank: 8, steps: 20, active_fraction: 0.5}"}


def recipe(tmp_path, model, method, config, out="out", text=TEXT, name="r"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"model: {model}\nsparsify:\n  method: {method}\n  config: {config}\n"
                    f"data: {DATA % text}\noutput: {tmp_path / out}\n")
    return path


def heldout_windows(tokenizer, n_tokens=2048, window=256):
    ids = tokenizer(TEXT.read_text(encoding="utf-8"), add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids[:n_tokens].reshape(-1, window)


def down_inputs(model, windows):
    """Each MLP's down_proj input and gate_proj output on `windows`, captured with our own hooks."""
    mlps = [l.mlp for l in model.model.layers]
    seen = {"down": [[] for _ in mlps], "gate": [[] for _ in mlps]}
    hooks = [m.down_proj.register_forward_pre_hook(lambda mod, a, i=i: seen["down"][i].append(a[0]))
             for i, m in enumerate(mlps)]
    hooks += [m.gate_proj.register_forward_hook(lambda mod, a, o, i=i: seen["gate"][i].append(o))
              for i, m in enumerate(mlps)]
    with torch.no_grad():
        for row in windows:
            model(row[None])
    for h in hooks:
        h.remove()
    return {k: [torch.cat(v) for v in per] for k, per in seen.items()}


def test_sparsify_leaves_the_modes_of_the_model_it_links_alone(tmp_path, tiny_dir):
    """teal/cats/dejavu hard-link the source model's files into the artifact; the artifact's files were then given
    the umask's modes, which changed the SOURCE's (one inode): a private model (0600) became readable by all."""
    import stat

    model = shutil.copytree(tiny_dir, tmp_path / "private")
    for f in model.iterdir():
        f.chmod(0o600)
    assert run_cli("sparsify", str(recipe(tmp_path, model, "teal", "{target: 0.5}")))[0] == 0
    linked = [f for f in (tmp_path / "out").iterdir() if f.stat().st_nlink > 1]
    assert linked, "the weights are hard-linked (else this test checks nothing)"
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in model.iterdir()} == {f.name: 0o600 for f in model.iterdir()}


@pytest.fixture(scope="module")
def sparsified(tmp_path_factory, tiny_dir):
    """`llmfast sparsify` of the tiny model, each (method, config) run once for the module: its artifact's folder
    (a test that changes the artifact changes a copy)."""
    made = {}

    def make(method, config):
        if (method, config) not in made:
            d = tmp_path_factory.mktemp(method)
            code, _, err = run_cli("sparsify", str(recipe(d, tiny_dir, method, config)))
            assert code == 0, err
            made[method, config] = d / "out"
        return made[method, config]

    return make


@pytest.mark.parametrize("method,target", [("teal", 0.4), ("teal", 0.5), ("cats", 0.5), ("cats", 0.7)])
def test_thresholds_reach_the_target_on_heldout_text(sparsified, tiny_dir, method, target):
    art = sparsified(method, f"{{target: {target}}}")
    manifest = json.loads((art / "llmfast.json").read_text())
    want = {"target": target, **({"sites": ["mlp"]} if method == "teal" else {})}  # teal's default: MLP sites only
    from llmfast.modelfiles import weights_fingerprint

    assert manifest["sparsity"] == {"method": method, "config": want, "weights": weights_fingerprint(art)}
    assert manifest["stage"] == "sparsify" and manifest["parents"] == [str(tiny_dir)]
    assert not (art.parent / "out.checkpoints").exists()

    from llmfast.models import load_model, load_tokenizer

    model, tok = load_model(art), load_tokenizer(art)  # load_model puts the thresholds back
    windows = heldout_windows(tok)
    acts = down_inputs(model, windows)
    held = manifest["metrics"]["heldout_sparsity"]["down_in"]
    for layer, h in enumerate(acts["down"]):
        per_window = (h == 0).float().mean(dim=-1).reshape(len(windows), -1).mean(dim=1)
        # Our count on the loaded artifact equals what sparsify measured...
        assert per_window.mean().item() == pytest.approx(held["per_layer"][layer], abs=1e-6)
        # ...and the target holds within 4 standard errors of the difference of two samples of text (held-out
        # and calibration, 8 windows each; calibration hits the target exactly on its own sample). Tokens of
        # one window are correlated, so the error is estimated from the spread of the window means.
        se = per_window.std().item() / math.sqrt(len(per_window))
        tol = 4 * math.sqrt(2) * se
        assert abs(per_window.mean().item() - target) < tol, (layer, per_window.mean(), tol)
    if method == "teal":  # the MLP's input is thresholded to the target too; attention is left alone
        assert abs(manifest["metrics"]["heldout_sparsity"]["mlp_in"]["mean"] - target) < 0.05
        assert not {"attn_in", "o_in"} & set(manifest["metrics"]["heldout_sparsity"])
        assert not any(getattr(l.self_attn, p)._forward_pre_hooks for l in model.model.layers
                       for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    weights = {f.name for f in art.iterdir()}
    assert {"config.json", "model.safetensors", "sparsity.safetensors", "tokenizer.json"} <= weights


@pytest.mark.parametrize("sites", ["[mlp, attention]", "[attention]"])
def test_teal_attention_sites_reach_the_target_on_heldout_text(sparsified, sites):
    """The inputs of q/k/v (one threshold per layer) and of o_proj are zeroed to the target on held-out text; what
    sparsify measured is what our own hooks count on the loaded artifact."""
    target = 0.5
    art = sparsified("teal", f"{{target: {target}, sites: {sites}}}")
    manifest = json.loads((art / "llmfast.json").read_text())
    chosen = ["mlp", "attention"] if "mlp" in sites else ["attention"]
    assert {k: v for k, v in manifest["sparsity"].items() if k != "weights"} == {
        "method": "teal", "config": {"target": target, "sites": chosen}}
    held = manifest["metrics"]["heldout_sparsity"]
    expected_sites = {"attn_in", "o_in"} | ({"mlp_in", "down_in"} if "mlp" in chosen else set())
    assert set(load_file(art / "sparsity.safetensors")) == expected_sites

    from llmfast.models import load_model, load_tokenizer

    model, tok = load_model(art), load_tokenizer(art)
    attns = [l.self_attn for l in model.model.layers]
    seen = {p: [[] for _ in attns] for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    hooks = [getattr(a, p).register_forward_pre_hook(lambda mod, args, p=p, i=i: seen[p][i].append(args[0]))
             for p in seen for i, a in enumerate(attns)]
    with torch.no_grad():
        for row in heldout_windows(tok):
            model(row[None])
    for h in hooks:
        h.remove()
    for i in range(len(attns)):
        q, k, v, o = (torch.cat(seen[p][i]) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
        assert torch.equal(q, k) and torch.equal(q, v)  # one threshold, the same zeros for q, k and v
        for site, x in (("attn_in", q), ("o_in", o)):
            frac = (x == 0).float().mean().item()
            assert frac == pytest.approx(held[site]["per_layer"][i], abs=1e-6)
            assert abs(frac - target) < 0.05, (site, i, frac)
    if "mlp" not in chosen:  # the MLP keeps its dense input
        assert held["mlp_in"]["mean"] < 0.01


@pytest.mark.parametrize("method,config", [("teal", "{target: 0.5}"), ("cats", "{target: 0.5}"),
                                           ("teal", "{target: 0.5, sites: [mlp, attention]}")])
def test_zero_thresholds_give_the_dense_model_exactly(sparsified, tmp_path, tiny, method, config):
    shutil.copytree(sparsified(method, config), tmp_path / "out")  # the thresholds are changed here: a copy
    path = tmp_path / "out" / "sparsity.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in load_file(path).items()}, path)
    from llmfast.models import load_model

    sparse = load_model(tmp_path / "out")
    dense, tok = tiny
    ids = heldout_windows(tok)[:2]
    with torch.no_grad():
        assert torch.equal(sparse(ids).logits, dense(ids).logits)
        # and with the calibrated thresholds restored the outputs differ (the hooks are really there)
        save_file({k: torch.full_like(v, 0.05) for k, v in load_file(path).items()}, path)
        assert not torch.equal(load_model(tmp_path / "out")(ids).logits, dense(ids).logits)


def _kl(model, ref, windows):
    import torch.nn.functional as F

    with torch.no_grad():
        a, b = model(windows).logits.float(), ref(windows).logits.float()
    p = F.log_softmax(b, -1)
    return (p.exp() * (p - F.log_softmax(a, -1))).sum(-1).mean().item()


def test_relufied_model_is_zero_where_the_gate_is_not_positive_and_distillation_helps(tmp_path, tiny_dir, tiny):
    code, _, err = run_cli("sparsify", str(recipe(tmp_path, tiny_dir, "relufy",
                                                  "{steps: 30, batch_size: 2, lr: 3.0e-4, log_every: 1, eval_every: 10}")))
    assert code == 0, err
    art = tmp_path / "out"
    assert json.loads((art / "config.json").read_text())["hidden_act"] == "relu"
    from transformers import AutoModelForCausalLM

    relu = AutoModelForCausalLM.from_pretrained(art).eval()  # plain transformers, nothing of ours
    dense, tok = tiny
    windows = heldout_windows(tok)
    acts = down_inputs(relu, windows[:2])
    for down, gate in zip(acts["down"], acts["gate"]):
        assert torch.all(down[gate <= 0] == 0)
        assert (down[gate > 0] != 0).float().mean() > 0.99  # zero only where up(x) happens to be 0
        assert 0.3 < (down == 0).float().mean() < 0.7  # random gates: about half
    # the swap alone, made here by hand, is further from the original than the distilled model
    swapped = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    for layer in swapped.model.layers:
        layer.mlp.act_fn = torch.nn.ReLU()
    before, after = _kl(swapped, dense, windows), _kl(relu, dense, windows)
    assert after < 0.8 * before, (before, after)
    kl = json.loads((art / "llmfast.json").read_text())["metrics"]["heldout_kl"]
    assert kl["relu_untrained"] == pytest.approx(before, rel=1e-3)
    assert kl["relu_trained"] == pytest.approx(after, rel=1e-3)
    log = [json.loads(l) for l in (art / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(0, 31))
    assert all(len(e["sparsity_per_layer"]) == 2 and 0.3 < e["sparsity_mean"] < 0.7 for e in log[1:])
    # the curve: held-out points at 0, every 10 steps and the end, each against a number computed another way
    curve = [e for e in log if "heldout_ppl" in e]
    assert [(e["step"], e["tokens"]) for e in curve] == [(s, s * 2 * 256) for s in (0, 10, 20, 30)]
    assert curve[0]["heldout_kl"] == pytest.approx(before, rel=1e-3)
    assert curve[-1]["heldout_kl"] == pytest.approx(after, rel=1e-3)
    with torch.no_grad():  # exp(mean next-token loss) inside each held-out window, by transformers' own loss
        ppl = {name: math.exp(sum(m(w[None], labels=w[None]).loss.item() for w in windows) / len(windows))
               for name, m in (("student", relu), ("teacher", dense))}
    assert curve[-1]["heldout_ppl"] == pytest.approx(ppl["student"], rel=1e-4)
    assert all(e["teacher_heldout_ppl"] == pytest.approx(ppl["teacher"], rel=1e-4) for e in curve)
    assert curve[0]["heldout_ppl"] > curve[-1]["heldout_ppl"]
    sparsity = json.loads((art / "llmfast.json").read_text())["metrics"]["heldout_sparsity"]["down_in"]["mean"]
    assert curve[-1]["heldout_sparsity"] == pytest.approx(sparsity, abs=1e-6)
    # bench run's report shows the same: how the variant was made, and its curve
    from llmfast.bench.lineage import compression

    made = compression(art)
    assert (made["stage"], made["method"], made["train_tokens"], made["mlp_sparsity"]) == (
        "sparsify", "relufy", 30 * 2 * 256, sparsity)
    assert [e["step"] for e in made["curve"]] == [0, 10, 20, 30]
    text = _report(made)
    last = curve[-1]
    assert f"| relu | sparsify relufy | {sparsity * 100:.1f}% | - | - | - | 15,360 |" in text
    assert re.search(r"\| relu \| sparsify relufy \|.* \| text \|\n", text)
    assert (f"| 30 | 15,360 | {last['heldout_sparsity'] * 100:.1f}% | {last['heldout_kl']:.4f} | "
            f"{last['heldout_ppl']:.2f} | {last['teacher_heldout_ppl']:.2f} |") in text


CHATS = [{"messages": [{"role": "user", "content": f"Convert the date 'March {d}, 1990' to ISO 8601."},
                       {"role": "assistant", "content": f"1990-03-{d:02d}"}]} for d in range(1, 29)]


def test_relufy_distils_on_conversations_in_the_share_asked_for(tmp_path, tiny_dir):
    chats = tmp_path / "train.jsonl"
    chats.write_text("".join(json.dumps(r) + "\n" for r in CHATS))
    path = recipe(tmp_path, tiny_dir, "relufy", "{steps: 2, batch_size: 2, lr: 1.0e-4}")
    code, _, err = run_cli("sparsify", str(path), "--set", f"data.conversations={chats}",
                           "--set", "data.conversations_share=0.25")
    assert code == 0, err
    metrics = json.loads((tmp_path / "out" / "llmfast.json").read_text())["metrics"]
    text_windows = (metrics["text"]["tokens"] - 4096) // 256  # all the text after the evaluated span
    mixed = metrics["conversations"]
    chat_windows = mixed["training"]["windows"]  # a quarter of the rows: a third as many as the text's
    assert abs(chat_windows - text_windows / 3) <= 0.5 and mixed["training"]["share_used"] == pytest.approx(
        0.25, abs=0.5 / text_windows)
    assert metrics["train_windows"] == text_windows + chat_windows  # what relufy trained on
    assert mixed["calibration"]["windows"] == 2  # a quarter of the 8 calibration windows, in place of text
    assert mixed["training"]["available_windows"] == mixed["calibration"]["available_windows"] >= 2
    assert mixed["training"]["paths"] == [str(chats)]
    from llmfast.bench.lineage import compression

    made = compression(tmp_path / "out")
    assert (made["data"], made["conversations_share"]) == (True, 0.25)
    assert re.search(r"\| relu \| sparsify relufy \|.* \| text \+ 25% chats \|\n", _report(made))


def _report(made):
    """bench run's report of one variant made as `made` says (bench.lineage.compression)."""
    from llmfast.bench.report import markdown

    return markdown({"name": "t", "date": "d", "machine": "m", "comparisons": [], "variants": [
        {"name": "relu", "engine": "vllm", "points": [], "quality": None, "compression": made}],
        "workload": {"num_prompts": 1, "input_len": 8, "output_len": 8, "ignore_eos": True, "request_rate": "inf",
                     "max_concurrency": [1], "percentiles": [50]}})


def test_l1_pressure_raises_sparsity(tmp_path, tiny_dir):
    cfg = "{steps: 20, batch_size: 2, lr: 1.0e-3, l1: %s}"
    for l1, out in [(0.0, "plain"), (3.0, "l1")]:
        assert run_cli("sparsify", str(recipe(tmp_path, tiny_dir, "relufy", cfg % l1, out=out, name=out)))[0] == 0
    plain, l1 = (json.loads((tmp_path / o / "llmfast.json").read_text())["metrics"]["heldout_sparsity"]["down_in"]
                 for o in ("plain", "l1"))
    assert l1["mean"] > plain["mean"] + 0.05, (plain["mean"], l1["mean"])


def test_cats_over_a_relufied_model_shifts_the_relu_threshold(tmp_path, tiny_dir):
    """ProSparse's threshold shift (FATReLU) is CATS over a relufy artifact: the activation is relu(gate) kept only
    above a calibrated per-layer threshold, so down_proj's input is zero exactly where gate <= t, and the
    held-out sparsity rises from the ReLU model's ~50% (random gates) to the target."""
    from safetensors.torch import load_file

    from llmfast.models import load_model, load_tokenizer

    assert run_cli("sparsify", str(recipe(tmp_path, tiny_dir, "relufy", "{steps: 0}", out="relu", name="relu")))[0] == 0
    # a target below the ReLU model's own ~50% zeros: thresholds of 0, an artifact that zeroed nothing more (s42)
    code, _, err = run_cli("sparsify", str(recipe(tmp_path, tmp_path / "relu", "cats", "{target: 0.3}", out="low",
                                                  name="low")))
    lines = err.strip().splitlines()
    assert code == 2 and "gate_act is already at least 30% zeros in every layer" in lines[-1], err[-1500:]
    assert "choose a higher target" in lines[-1] and not (tmp_path / "low").exists()
    # TEAL's MLP sites there: down_in idle, mlp_in (the MLP's input) thresholded all the same, so it is made
    code, _, err = run_cli("sparsify", str(recipe(tmp_path, tmp_path / "relu", "teal", "{target: 0.3}", out="teal",
                                                  name="teal")))
    assert code == 0, err[-1500:]
    t = load_file(str(tmp_path / "teal" / "sparsity.safetensors"))
    assert (t["down_in"] == 0).all() and (t["mlp_in"] > 0).all()
    code, _, err = run_cli("sparsify", str(recipe(tmp_path, tmp_path / "relu", "cats", "{target: 0.8}", out="shift",
                                                  name="shift")))
    assert code == 0, err
    art = tmp_path / "shift"
    assert json.loads((art / "config.json").read_text())["hidden_act"] == "relu"
    held = json.loads((art / "llmfast.json").read_text())["metrics"]["heldout_sparsity"]["down_in"]["mean"]
    relu = json.loads((tmp_path / "relu" / "llmfast.json").read_text())["metrics"]["heldout_sparsity"]["down_in"]
    assert relu["mean"] < 0.7 and 0.75 < held < 0.85, (relu["mean"], held)
    t = load_file(str(art / "sparsity.safetensors"))["gate_act"]
    assert (t > 0).all()  # a positive shift: every layer zeroes some positive gates too
    acts = down_inputs(load_model(art), heldout_windows(load_tokenizer(art))[:2])
    for i, (down, gate) in enumerate(zip(acts["down"], acts["gate"])):
        assert torch.all(down[gate <= t[i]] == 0)
        assert (down[gate > t[i]] != 0).float().mean() > 0.99


KILLED = "{steps: 40, batch_size: 2, lr: 3.0e-4, save_every: 5}"  # killed_relufy's run


def _kill_after_a_checkpoint(path, ckpts):
    """`llmfast sparsify path` in a process of its own, SIGKILLed once a checkpoint is in `ckpts`; returns `ckpts`."""
    proc = subprocess.Popen([sys.executable, "-m", "llmfast.cli", "sparsify", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not list(ckpts.glob("step-*/state.json")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return ckpts


def test_sigkill_then_resume_matches_an_uninterrupted_run(killed_relufy, tmp_path, tiny_dir):
    """The module's run SIGKILLed after a checkpoint (killed_relufy, a copy of it here), resumed: the uninterrupted
    run's weights."""
    assert run_cli("sparsify", str(recipe(tmp_path, tiny_dir, "relufy", KILLED, out="ref", name="ref")))[0] == 0
    d = Path(shutil.copytree(killed_relufy, tmp_path / "killed"))
    path = d / "r.yaml"
    path.write_text(path.read_text().replace(str(killed_relufy), str(d)))
    ckpts = d / "out.checkpoints" / "checkpoints"
    assert not (d / "out").exists(), "killed before the end: no artifact"
    code, _, err = run_cli("sparsify", str(path))
    assert code == 2 and "pass --resume to continue it" in err
    chats = tmp_path / "train.jsonl"
    chats.write_text("".join(json.dumps(r) + "\n" for r in CHATS))
    code, _, err = run_cli("sparsify", str(path), "--resume", "--set", f"data.conversations={chats}")
    assert code == 2 and "holds a run with data.conversations [], this one has [" in err, err  # other rows than the checkpoint's
    assert not (d / "out").exists() and list(ckpts.glob("step-*/state.json"))
    code, _, err = run_cli("sparsify", str(path), "--resume")
    assert code == 0, err
    a, b = load_file(d / "out" / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    metrics = json.loads((d / "out" / "llmfast.json").read_text())["metrics"]
    assert metrics["resumed_from"] > 0 and metrics["resumed_from"] % 5 == 0
    steps = [json.loads(l)["step"] for l in (d / "out" / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41)), "each step logged once"
    assert not (d / "out.checkpoints").exists(), "checkpoints go once the artifact is complete"


def test_every_registered_method_conforms(sparsified):
    import llmfast.sparse
    from llmfast.models import load_model
    from llmfast.sparse.base import SPARSIFIERS, SparseConfigBase

    assert SPARSIFIERS.names() == sorted(FAST), "a new method needs a fast setting here"
    help_text = subprocess.run([sys.executable, "-m", "llmfast.cli", "sparsify", "--help"], capture_output=True,
                               text=True, check=True).stdout
    for name in SPARSIFIERS.names():
        cls = SPARSIFIERS.get(name)
        module = sys.modules[cls.__module__]
        year = re.search(r"\b(19|20)\d\d\b", cls.paper)
        assert cls.name == name and year and year.group() in module.__doc__, "the paper, with its year, in the docstring"

        assert issubclass(cls.Config, SparseConfigBase) and cls.Config.model_config["extra"] == "forbid"
        assert module.__file__ == str(Path(llmfast.sparse.__file__).parent / f"{name}.py")
        assert name in help_text
        art = sparsified(name, FAST[name])  # `llmfast sparsify` exited 0
        manifest = json.loads((art / "llmfast.json").read_text())
        assert manifest["sparsity"]["method"] == name
        assert manifest["metrics"]["heldout_sparsity"]["down_in"]["mean"] > 0.2
        load_model(art)


def test_a_relufied_gemma_loads_with_relu(tmp_path, tiny_dir, tiny):
    """Gemma's MLPs take their activation from `hidden_activation`, not `hidden_act`: the artifact sets both, so
    plain transformers (and relufy's consumers: Deja Vu, the sparse runtime) load the ReLU model that was trained,
    not a GELU one with ReLU's weights (which Deja Vu then measured at 6% sparsity instead of 51%)."""
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM

    from llmfast.models import load_model

    gemma = tmp_path / "gemma2"
    Gemma2ForCausalLM(Gemma2Config(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=64)).save_pretrained(gemma)
    for f in tiny_dir.glob("tokenizer*"):
        (gemma / f.name).write_bytes(f.read_bytes())
    code, _, err = run_cli("sparsify", str(recipe(tmp_path, gemma, "relufy", "{steps: 0}")))
    assert code == 0, err[-2000:]
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["hidden_act"] == cfg["hidden_activation"] == "relu"
    for model in (AutoModelForCausalLM.from_pretrained(tmp_path / "out"), load_model(tmp_path / "out")):
        assert all(isinstance(layer.mlp.act_fn, torch.nn.ReLU) for layer in model.model.layers)
    acts = down_inputs(AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval(), heldout_windows(tiny[1])[:1])
    assert all(0.3 < (d == 0).float().mean() < 0.7 for d in acts["down"])  # exact zeros where the gate is <= 0
    # vLLM's Gemma2 has no ReLU MLP (our plugin serves ReLU Llamas): serve refuses it, bench runs it on transformers
    from llmfast.bench.engines.base import Variant

    code, _, err = run_cli("serve", str(tmp_path / "out"))
    assert code == 2 and "is a ReLU-fied gemma2: vLLM's gemma2 has no ReLU MLP" in err.strip().splitlines()[-1], err
    assert "vllm" not in Variant(name="g", model_dir=tmp_path / "out", sparsity="relufy").families


def test_relu_is_read_from_the_built_mlps_whatever_key_the_architecture_reads(tmp_path):
    """A multimodal Gemma3 builds its MLPs from text_config.hidden_activation: relufy's swap sets that too, so the
    saved model reloads with ReLU; and a Gemma (v1), whose MLPs read hidden_act, is ReLU with hidden_act: relu
    whatever its unused hidden_activation says. `relu_mlps` answers from the modules, not from one config key."""
    from transformers import AutoModelForCausalLM, Gemma3Config, Gemma3ForConditionalGeneration, GemmaConfig
    from transformers import GemmaForCausalLM

    from llmfast.sparse.base import gated_mlps, relu_mlps
    from llmfast.sparse.relufy import relu_swap

    cfg = Gemma3Config(text_config=dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=32),
                       vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=28, patch_size=14), mm_tokens_per_image=4)
    gemma3 = Gemma3ForConditionalGeneration(cfg)
    assert len(gated_mlps(gemma3)) == 2 and not relu_mlps(gemma3)
    relu_swap(gemma3)
    gemma3.save_pretrained(tmp_path / "g3")
    assert relu_mlps(AutoModelForCausalLM.from_pretrained(tmp_path / "g3"))
    gemma1 = GemmaForCausalLM(GemmaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                          hidden_act="relu", hidden_activation="gelu_pytorch_tanh"))
    assert relu_mlps(gemma1)


def _gpt2_dir(tmp_path, tiny_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=1024)).save_pretrained(d)
    for f in tiny_dir.glob("tokenizer*"):
        (d / f.name).write_bytes(f.read_bytes())
    return d


@pytest.mark.parametrize("what,method,config,extra,expected", [
    ("target above 1", "teal", "{target: 1.5}", [], "sparsify.config.target: Input should be less than 1"),
    ("target 0", "cats", "{target: 0}", [], "sparsify.config.target: Input should be greater than 0"),
    ("relufy cut target 1", "relufy", "{steps: 0, target: 1}", [], "sparsify.config.target: Input should be less than 1"),
    ("shift warm-up above 1", "relufy", "{target: 0.8, shift_warmup: 2}", [],
     "sparsify.config.shift_warmup: Input should be less than or equal to 1"),
    ("unknown key", "teal", "{targett: 0.5}", [], "unknown key 'sparsify.config.targett' (did you mean 'target'?)"),
    ("unknown site", "teal", "{sites: [mlp, attn]}", [], "sparsify.config.sites.1: Input should be 'mlp' or 'attention'"),
    ("no sites", "teal", "{sites: []}", [], "sparsify.config.sites: an empty list: give at least 1 entry"),
    ("unknown method", "teel", "{}", [], "sparsify.method: unknown sparsification method 'teel' (did you mean 'teal'?)"),
    ("missing text", "teal", "{}", ["--set", "data.text=nowhere.txt"], "data.text: file not found: nowhere.txt"),
    ("held-out overlaps", "teal", "{}", ["--set", "data.heldout_tokens=5000"], "must not exceed skip_tokens"),
    ("text too short", "teal", "{}", ["--set", "data.skip_tokens=900000"], "data.skip_tokens + data.calibration_tokens"),
    ("resume a training-free method", "cats", "{}", ["--resume"], "cats does not train, there is nothing to resume"),
    ("resume without checkpoint", "relufy", "{}", ["--resume"], "has no complete checkpoint"),
    ("no gated MLP", "teal", "{}", ["gpt2"], "GPT2LMHeadModel has no gated MLP"),
    ("existing output", "teal", "{}", ["exists"], "already exists: choose another path, or pass --overwrite"),
    ("conversations missing", "teal", "{}", ["--set", "data.conversations=[nowhere.jsonl]"],
     "data.conversations.0: not found: nowhere.jsonl"),
    ("conversations share 1", "relufy", "{}", ["--set", "data.conversations_share=1"],
     "data.conversations_share: Input should be less than 1"),
    ("conversation without content", "dejavu", "{}", ["badchat"], "bad.jsonl:2: messages[0] lacks field 'content'"),
    # s46: both were tracebacks (torch's index arithmetic overflowed; generate refused max_new_tokens 0)
    ("batch beyond the windows", "relufy", "{steps: 2, batch_size: 9223372036854775807}", [],
     "relufy: sparsify.config.batch_size is 9223372036854775807, more than the"),
    # s46: a rate float32 rounds to nothing wrote the untrained ReLU model with exit 0
    ("rate below float32", "relufy", "{steps: 2, lr: 1.0e-40}", [], "sparsify.config.lr: must be at least 1.18e-38"),
    ("clip norm below float32", "relufy", "{steps: 2, max_grad_norm: 1.0e-300}", [],  # every gradient clipped to 0
     "sparsify.config.max_grad_norm: must be at least 1.18e-38 (float32's smallest normal number: clipping to a"),
    ("samples of one token", "relufy", "{steps: 1, samples: 1}", ["--set", "data.window=1"],
     "sparsify.config.samples: a sample is a window the model writes after its start token, and data.window is 1"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, tiny_dir, what, method, config, extra, expected):
    model = _gpt2_dir(tmp_path, tiny_dir) if extra == ["gpt2"] else tiny_dir
    if extra == ["exists"]:
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("mine")
    args = [a for a in extra if a not in ("gpt2", "exists", "badchat")]
    if extra == ["badchat"]:
        (tmp_path / "bad.jsonl").write_text(json.dumps(CHATS[0]) + '\n{"messages": [{"role": "user"}]}\n')
        args = ["--set", f"data.conversations={tmp_path / 'bad.jsonl'}"]
    code, out, err = run_cli("sparsify", str(recipe(tmp_path, model, method, config)), *args)
    assert code == 2, (what, err)
    errors = [l for l in err.splitlines() if "error" in l]
    assert len(errors) == 1 and errors[0].startswith("llmfast: error: ") and expected in errors[0], err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(("out", ".out"))] == (
        ["out"] if extra == ["exists"] else []), "nothing written"
    if extra == ["exists"]:
        assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_relufy_learns_a_shifted_cut(tmp_path, tiny_dir, tiny):
    """relufy's `target`: training through a cut of relu(gate) that ramps up to the target, then a cut calibrated
    on the calibration windows saved in config.json. Each training batch is cut at its own quantile, the held-out
    curve sees the cut of the moment, the artifact's held-out sparsity lands on the target, down_proj's input is
    zero exactly where gate <= t, and plain transformers ignores the key (plain ReLU). Whether training through
    the cut beats cutting afterwards is a question for a real model (BENCHMARKS.md): the tiny random model's
    outputs are too flat to tell (KL to the original 0.006 either way)."""
    from llmfast.models import load_model
    from llmfast.sparse.relu_cut import THRESHOLDS_KEY

    config = "{steps: 30, batch_size: 2, lr: 3.0e-4, eval_every: 10, target: 0.8, shift_warmup: 0.5}"
    assert run_cli("sparsify", str(recipe(tmp_path, tiny_dir, "relufy", config)))[0] == 0
    art = tmp_path / "out"
    metrics = json.loads((art / "llmfast.json").read_text())["metrics"]
    cut = json.loads((art / "config.json").read_text())[THRESHOLDS_KEY]
    assert metrics["thresholds"]["gate_act"] == pytest.approx(cut, rel=1e-6) and len(cut) == 2 and min(cut) > 0
    held = metrics["heldout_sparsity"]["down_in"]["mean"]
    assert 0.75 < held < 0.85, held
    log = [json.loads(l) for l in (art / "train_log.jsonl").read_text().splitlines()]
    # the cut's share ramps linearly over the first 15 steps, then stays; each batch is cut to its share
    assert [e["shift_target"] for e in log[1:]] == pytest.approx([0.8 * min(1, s / 15) for s in range(1, 31)], abs=1e-5)
    assert all(e["sparsity_mean"] >= e["shift_target"] - 0.01 for e in log[1:])
    assert all(abs(e["sparsity_mean"] - 0.8) < 0.01 for e in log[16:])  # above the ReLU sparsity: the quantile itself
    curve = {e["step"]: e["heldout_sparsity"] for e in log if "heldout_sparsity" in e}
    assert curve.keys() == {0, 10, 20, 30} and 0.3 < curve[0] < 0.6  # no cut before the first step
    assert curve[10] < curve[20] - 0.1 and abs(curve[30] - held) < 0.03  # the cut of step 10 is 0.8 x 10/15
    dense, tok = tiny
    windows = heldout_windows(tok)
    model = load_model(art)  # llmfast's loader puts the cut on
    assert _kl(model, dense, windows) == pytest.approx(metrics["heldout_kl"]["relu_trained"], rel=1e-3)
    acts = down_inputs(model, windows[:2])
    for i, (down, gate) in enumerate(zip(acts["down"], acts["gate"])):
        assert torch.all(down[gate <= cut[i]] == 0)
        assert (down[gate > cut[i]] != 0).float().mean() > 0.99
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(art).eval()  # transformers alone: the key does nothing
    zeros = torch.cat([d.reshape(-1) for d in down_inputs(plain, windows[:2])["down"]]).eq(0).float().mean()
    assert 0.3 < zeros < 0.7, zeros
    # what is made over it keeps the cut: Deja Vu learns the neurons active above it; relufy again starts plain
    assert run_cli("sparsify", str(recipe(tmp_path, art, "dejavu", FAST["dejavu"], out="dv", name="dv")))[0] == 0
    true = json.loads((tmp_path / "dv" / "llmfast.json").read_text())["metrics"]["predictors"]["true_sparsity"]
    assert abs(true["mean"] - held) < 0.03, (true, held)
    assert json.loads((tmp_path / "dv" / "config.json").read_text())[THRESHOLDS_KEY] == cut
    assert run_cli("sparsify", str(recipe(tmp_path, art, "relufy", "{steps: 0}", out="again", name="again")))[0] == 0
    assert THRESHOLDS_KEY not in json.loads((tmp_path / "again" / "config.json").read_text())


def test_a_wrong_relu_cut_in_config_is_one_line(tmp_path, tiny_dir):
    import shutil

    from llmfast.errors import UserError
    from llmfast.models import load_model

    assert run_cli("sparsify", str(recipe(tmp_path, tiny_dir, "relufy", "{steps: 0, target: 0.7}")))[0] == 0
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "out", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["llmfast_relu_thresholds"] = [0.1, 0.2, 0.3]  # three layers' worth for a two-layer model
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"bad: its weights are not those it was made with"):  # config.json counts
        load_model(bad)
    from llmfast.modelfiles import weights_fingerprint

    manifest = json.loads((bad / "llmfast.json").read_text())  # as if written so: the cut's own check
    manifest["sparsity"]["weights"] = weights_fingerprint(bad)
    (bad / "llmfast.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"bad/config.json: llmfast_relu_thresholds must be 2 non-negative numbers"):
        load_model(bad)


def test_the_cut_quantile_by_topk_is_kthvalue():
    """On CUDA magnitude_quantile selects through topk (kthvalue there is one thread block per row, slow on a training
    batch's 10^7 activations): the same value as kthvalue, ties and both ends included (checked here on the CPU)."""
    from llmfast.sparse.thresholds import kth_smallest_by_topk

    torch.manual_seed(0)
    for n in (1, 2, 3, 10, 1001):
        for x in (torch.rand(n), torch.relu(torch.randn(n)), torch.randint(0, 3, (n,)).float()):
            for k in sorted({1, max(1, n // 2), max(1, round(0.85 * n)), n}):
                assert torch.equal(kth_smallest_by_topk(x, k), x.kthvalue(k).values), (n, k)


def test_gpu_relufy_script_smoke(tmp_path):
    """scripts/gpu_relufy.py is for a lent GPU's minutes: its --smoke mode runs every step on the CPU (the text after
    the evaluated span, the probe of a step through the cut, one `llmfast sparsify` per rate at once, `llmfast eval`'s
    perplexity of the base and each artifact) and reports what a GPU run would."""
    from transformers import AutoTokenizer

    from llmfast.testing import build_tiny_llama

    tiny = build_tiny_llama(tmp_path / "tiny")
    out, work = tmp_path / "out", tmp_path / "work"
    run = subprocess.run([sys.executable, "scripts/gpu_relufy.py", "--model", str(tiny), "--smoke", "--lrs", "1e-3",
                          "--out", str(out), "--work", str(work)], capture_output=True, text=True, cwd=REPO,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((out / "gpu_relufy.json").read_text())
    (only,) = result["runs"]
    assert only["rc"] == 0 and only["train_tokens"] == 4 * 2 * 64 and only["device"] == "cpu"
    assert only["autocast"] is None and only["gpu"] is None  # a CPU run: no autocast
    assert 0.75 < only["heldout_sparsity"] < 0.95, only["heldout_sparsity"]  # the cut's target, 0.85
    assert only["x_base"] == round(only["ppl"] / result["base_ppl"], 3) and result["base_ppl"] > 1
    assert [p["step"] for p in only["curve"]] == [0, 2, 4]
    assert only["heldout_kl"]["relu_trained"] > 0 and len(only["thresholds"]) == 2
    manifest = json.loads((out / "run-0" / "llmfast.json").read_text())
    assert manifest["sparsity"]["config"]["target"] == 0.85 and manifest["sparsity"]["config"]["samples"] == 4
    steps = [json.loads(l)["step"] for l in (out / "run-0" / "train_log.jsonl").read_text().splitlines()]
    assert steps[0] == 0 and steps[-1] == 4
    # nothing of the evaluated span is read: the text trained, calibrated and held out on starts at token 16,384
    book = TEXT.read_text(encoding="utf-8")
    start = result["data"]["start_char"]
    assert (work / "book-after-eval-span.txt").read_text(encoding="utf-8") == book[start:]
    tok = AutoTokenizer.from_pretrained(tiny)
    assert abs(len(tok(book[:start], add_special_tokens=False).input_ids) - 16384) <= 1
    assert f"text: {work / 'book-after-eval-span.txt'}" in only["recipe"] and "skip_tokens: 256" in only["recipe"]
    assert "| 0.001 | 4 | 512 |" in run.stdout


@pytest.fixture(scope="module")
def killed_relufy(tmp_path_factory, tiny_dir):
    """A relufy run SIGKILLed after a checkpoint: its folder (recipe r.yaml, output out, OUTPUT.checkpoints)."""
    d = tmp_path_factory.mktemp("killed-relufy")
    path = recipe(d, tiny_dir, "relufy", KILLED)
    ckpts = _kill_after_a_checkpoint(path, d / "out.checkpoints" / "checkpoints")
    assert not (d / "out").exists() and list(ckpts.glob("step-*/state.json"))
    return d


def _tamper_distill(work, case, tmp_path):
    import torch
    from safetensors.torch import save_file

    ckpt = sorted(work.glob("checkpoints/step-*"))[-1]
    if case == "a-tensor-that-would-broadcast":
        weights = load_file(ckpt / "student.safetensors")
        weights["model.layers.0.mlp.gate_proj.weight"] = torch.tensor(0.5)
        save_file(weights, ckpt / "student.safetensors")
    elif case in ("step-negative", "step-beyond-the-run", "state-not-json"):
        state = json.loads((ckpt / "state.json").read_text())
        text = {"step-negative": json.dumps({**state, "step": -20}), "state-not-json": "{not json",
                "step-beyond-the-run": json.dumps({**state, "step": 999})}[case]
        (ckpt / "state.json").write_text(text)
    elif case == "student-deleted":
        (ckpt / "student.safetensors").unlink()
    elif case == "optimizer-empty":
        torch.save({}, ckpt / "optimizer.pt")
    elif case == "log-line-without-step":
        with open(work / "train_log.jsonl", "a") as f:
            f.write('{"nostep": 1}\n')
    elif case == "another-model":
        from llmfast.testing import build_tiny_llama

        return ["--set", f"model={build_tiny_llama(tmp_path / 'tiny2', seed=1)}"]
    elif case == "other-settings-without-relufy-json":
        (work / "relufy.json").unlink()
        return ["--set", "sparsify.config.l1=0.5"]
    elif case == "no-steps":
        return ["--set", "sparsify.config.steps=0"]
    elif case == "other-weights-at-the-path":  # the run's model re-saved with other weights in the same folder
        from llmfast.testing import build_tiny_llama

        model = build_tiny_llama(tmp_path / "resaved", seed=1)
        mark = json.loads((work / ".llmfast-work").read_text())
        mark["run"]["model"] = str(model.resolve())
        (work / ".llmfast-work").write_text(json.dumps(mark))
        return ["--set", f"model={model}"]
    return []


@pytest.mark.parametrize("case,expected", [
    ("a-tensor-that-would-broadcast", "model.layers.0.mlp.gate_proj.weight has shape [], the model's is [256, 128]"),
    ("step-negative", "step -20 is not a step of this run (0 to 40)"),
    ("step-beyond-the-run", "step 999 is not a step of this run"),
    ("state-not-json", "state.json"),
    ("student-deleted", "student.safetensors: cannot be read"),
    ("optimizer-empty", "optimizer.pt: does not fit this run's optimizer"),
    ("log-line-without-step", "is not a log line llmfast wrote"),
    ("another-model", "holds a run with model "),
    ("other-settings-without-relufy-json", "holds a run with settings.l1 0.0, this one has 0.5"),
    ("no-steps", "holds a run with settings.steps 40, this one has 0"),
    ("other-weights-at-the-path", "holds a run on other weights than those of "),
])
def test_resume_of_a_tampered_or_other_run_is_one_line_and_changes_nothing(case, expected, killed_relufy, tmp_path):
    """Found by hand (2026-12-05): these resumed a broadcast tensor, ran steps -20..200 with a negative learning
    rate, wrote a barely trained model with NaN, continued another model's or other settings' checkpoints, or
    discarded the run (steps: 0); others were tracebacks after the log was rewritten."""
    import shutil

    d = Path(shutil.copytree(killed_relufy, tmp_path / "w"))
    path = d / "r.yaml"
    path.write_text(path.read_text().replace(str(killed_relufy), str(d)))
    extra = _tamper_distill(d / "out.checkpoints", case, tmp_path)
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    code, _, err = run_cli("sparsify", str(path), "--resume", *extra)
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("llmfast: error: ") and expected in lines[-1], err[-2000:]
    assert "Traceback" not in err
    assert len(lines) == 1, err  # checked before the models load: their progress bars do not come first
    assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before


def test_resume_takes_the_same_weights_moved_to_another_folder(killed_relufy, tmp_path):
    """`--resume` named the source by its path: a project moved since could not resume (s42's review). The run
    records its source's weights (modelfiles.weights_fingerprint), which a copy keeps."""
    from llmfast.modelfiles import weights_fingerprint

    d = Path(shutil.copytree(killed_relufy, tmp_path / "w"))
    path = d / "r.yaml"
    recorded = json.loads((d / "out.checkpoints" / ".llmfast-work").read_text())["run"]
    source = Path(recorded["model"])
    moved = Path(shutil.copytree(source, tmp_path / "moved-model"))
    assert weights_fingerprint(moved) == recorded["weights"] == weights_fingerprint(source)
    path.write_text(path.read_text().replace(str(killed_relufy), str(d)).replace(str(source), str(moved)))
    done = max(int(p.name.split("-")[1]) for p in (d / "out.checkpoints" / "checkpoints").glob("step-*"))
    code, _, err = run_cli("sparsify", str(path), "--resume")
    assert code == 0, err[-2000:]
    steps = [json.loads(line)["step"] for line in (d / "out" / "train_log.jsonl").read_text().splitlines()]
    assert steps[-1] == 40 and steps.count(done) == 1  # continued after the checkpoint, not started again


def test_an_artifact_whose_linked_weights_were_rewritten_in_place_is_refused(tmp_path, tiny_dir):
    """TEAL hard-links its source's weight files: new weights copied over the source's (`cp`, which writes into
    the existing file) changed the artifact's weights under its thresholds, silently (s42's review). The
    artifact records its weights' fingerprint; a load that finds others is one line."""
    from llmfast.models import load_model

    source = Path(shutil.copytree(tiny_dir, tmp_path / "source"))
    assert run_cli("sparsify", str(recipe(tmp_path, source, "teal", "{target: 0.5}", out="teal")))[0] == 0
    art = tmp_path / "teal"
    linked = (art / "model.safetensors").stat().st_ino == (source / "model.safetensors").stat().st_ino
    load_model(art)  # made and loaded as it was
    weights = load_file(source / "model.safetensors")
    weights = {k: v * 1.5 if k.endswith("down_proj.weight") else v for k, v in weights.items()}
    save_file(weights, tmp_path / "new.safetensors", metadata={"format": "pt"})
    shutil.copyfile(tmp_path / "new.safetensors", source / "model.safetensors")  # as cp does: into the same inode
    if not linked:  # a file system without hard links copied the files: nothing changed under the artifact
        load_model(art)
        return
    code, _, err = run_cli("eval", str(REPO / "recipes" / "eval_smollm2.yaml"), "--model", str(art), "--output",
                           str(tmp_path / "e.json"))
    lines = err.strip().splitlines()
    assert code == 2 and "its weights are not those it was made with" in lines[-1] and len(lines) == 1, err[-1500:]
    assert not (tmp_path / "e.json").exists()


def test_a_threshold_artifact_takes_the_models_files_not_other_formats_or_logs(tmp_path, tiny_dir):
    """TEAL took every file of its source (s42's review): a pickle beside the safetensors, a GGUF of the same
    model (gigabytes on another file system), the source's training log and hidden files."""
    source = Path(shutil.copytree(tiny_dir, tmp_path / "source"))
    for name in ("pytorch_model.bin", "model.gguf", "train_log.jsonl", ".gitattributes", "README.md"):
        (source / name).write_text("x")
    assert run_cli("sparsify", str(recipe(tmp_path, source, "teal", "{target: 0.5}", out="teal")))[0] == 0
    taken = {f.name for f in (tmp_path / "teal").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "sparsity.safetensors",
            "llmfast.json"} <= taken
    assert not taken & {"pytorch_model.bin", "model.gguf", "train_log.jsonl", ".gitattributes"}, taken


def test_a_model_folder_of_links_sparsifies_into_real_files(tmp_path, tiny_dir):
    """A hub snapshot's files are links into its blobs: TEAL's artifact hard-linked the links themselves (link(2)
    does not follow them), relative ones dangling in the artifact (found by hand, s42)."""
    from llmfast.models import load_model

    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for f in tiny_dir.iterdir():
        shutil.copy(f, blobs / f"blob-{f.name}")
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / f"blob-{f.name}")
    code, _, err = run_cli("sparsify", str(recipe(tmp_path, snapshot, "teal", "{target: 0.5}", out="teal")))
    assert code == 0, err[-2000:]
    files = list((tmp_path / "teal").iterdir())
    assert files and not any(f.is_symlink() for f in files)
    load_model(tmp_path / "teal")


def test_a_diverging_distillation_writes_nothing(tmp_path, tiny_dir):
    """relufy and bitnet QAT in float16 on a CPU went NaN from the second step and wrote all-NaN models with exit 0
    (found by hand, s42): the shared distillation loop stops at the first non-finite loss."""
    code, _, err = run_cli("sparsify", str(recipe(tmp_path, tiny_dir, "relufy", "{steps: 4, batch_size: 2}")),
                           "--set", "dtype=float16")
    last = err.strip().splitlines()[-1]
    assert code == 2 and "relufy: the distillation loss became nan at step" in last, err[-2000:]
    assert "use dtype bfloat16 or float32" in last and not (tmp_path / "out").exists()
    quant = tmp_path / "q.yaml"
    quant.write_text(f"model: {tiny_dir}\nquantization: {{method: bitnet, qat_steps: 4, batch_size: 2}}\n"
                     f"data: {{text: {TEXT}, skip_tokens: 4096, calibration_tokens: 2048, heldout_tokens: 2048, "
                     f"window: 256}}\ndtype: float16\noutput: {tmp_path / 'ternary'}\n")
    code, _, err = run_cli("quantize", str(quant))
    assert code == 2 and "the distillation loss became nan" in err.strip().splitlines()[-1], err[-2000:]
    assert not (tmp_path / "ternary").exists()


def test_a_rate_that_breaks_the_last_update_or_overflows_it_writes_nothing(tmp_path, tiny_dir):
    """Each step's loss was checked before its update, so a rate that sent the weights to NaN on the last step wrote
    an all-NaN relufy model with exit 0 (s46); a rate near float32's largest value overflowed Adam's first update
    (ten times the rate), a traceback. (A huge first update leaves the tiny model finite, its norms rescaling what it
    scaled; the second makes it NaN, for any rate from 1e20 to 1e36.)"""
    for lr, said in (("1.0e+30", "relufy: the distillation loss became nan after the last step (2): lower "
                                 "sparsify.config.lr (1e+30); nothing was written"),
                     ("1.0e+38", "relufy: the update overflowed float32 at step 1: lower sparsify.config.lr (1e+38)")):
        code, _, err = run_cli("sparsify", str(recipe(tmp_path, tiny_dir, "relufy", f"{{steps: 2, lr: {lr}}}")))
        assert code == 2 and "Traceback" not in err and said in err.strip().splitlines()[-1], err[-2000:]
        assert not (tmp_path / "out").exists()


def test_zero_tally_counts_sparsity_and_its_spread_over_tokens():
    """The manifest's per-layer `token_std` had no test (s44's mutation audit): checked against numpy's population
    standard deviation of each token's zero fraction, over two calls of different shapes."""
    import numpy as np
    import torch

    from llmfast.sparse.measure import ZeroTally

    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 5, 64, generator=g) * (torch.rand(2, 5, 1, generator=g) > 0.5)  # whole tokens zero, or none
    b = torch.randn(7, 64, generator=g).clamp(min=0)  # about half of each token zero
    tally = ZeroTally()
    tally.add(a, 0.0)
    tally.add(b, 0.0)
    fractions = np.concatenate([(a == 0).float().mean(-1).flatten().numpy(), (b == 0).float().mean(-1).numpy()])
    got = tally.summary()
    assert got["tokens"] == 17 and got["sparsity"] == pytest.approx(fractions.mean(), abs=1e-12)
    assert got["token_std"] == pytest.approx(fractions.std(), rel=1e-9) and got["token_std"] > 0.3


def test_resume_after_the_text_was_edited_in_place_is_refused(tmp_path, tiny_dir):
    """The same recipe and path, other words in the text: the checkpoint was trained on other windows, and
    continuing would mix the two silently (s44's mutation audit: the windows' digest check had no test)."""
    text = tmp_path / "t.txt"
    words = TEXT.read_text(encoding="utf-8")
    text.write_text(words, encoding="utf-8")
    path = recipe(tmp_path, tiny_dir, "relufy", "{steps: 200, batch_size: 2, lr: 3.0e-4, save_every: 5}", text=text)
    ckpts = _kill_after_a_checkpoint(path, tmp_path / "out.checkpoints" / "checkpoints")
    text.write_text(words[len(words) // 2:] + words[: len(words) // 2], encoding="utf-8")
    before = {p: p.read_bytes() for p in ckpts.parent.rglob("*") if p.is_file()}
    code, _, err = run_cli("sparsify", str(path), "--resume")
    assert code == 2 and "was trained on other windows (data.text, data.conversations or their token settings " \
                          "changed)" in err.strip().splitlines()[-1], err[-1500:]
    assert {p: p.read_bytes() for p in ckpts.parent.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "out").exists()


def test_distillation_batches_walk_the_rows_once_per_pass():
    """Step s takes rows s*b .. s*b+b-1 (wrapping): every row once per pass, none twice (s44's mutation audit:
    `step` for `step * batch_size` overlapped consecutive batches and no test noticed)."""
    from types import SimpleNamespace

    from llmfast.distill import batch_at

    rows = torch.arange(40)[:, None]
    settings = SimpleNamespace(batch_size=4)
    seen = torch.cat([batch_at(rows, settings, s) for s in range(10)]).flatten().tolist()
    assert seen == list(range(40))
    assert batch_at(rows, settings, 10).flatten().tolist() == [0, 1, 2, 3]
    assert batch_at(rows, SimpleNamespace(batch_size=3), 13).flatten().tolist() == [39, 0, 1]


def test_heldout_windows_of_one_token_report_no_perplexity(tiny):
    """s46: windows of one token hold no next token, and their perplexity read 1.0 (exp of 0 over 0 tokens) in QAT's
    and relufy's metrics and curves; it is left out now, the KL (every position) kept. Two tokens score one each."""
    from llmfast.distill import heldout_scores

    model, _ = tiny
    ids = torch.arange(6)[:, None] + 10
    one = heldout_scores(model, model, ids)
    assert set(one) == {"heldout_kl"} and abs(one["heldout_kl"]) < 1e-6
    two = heldout_scores(model, model, ids.reshape(3, 2))
    assert set(two) == {"heldout_kl", "heldout_ppl", "teacher_heldout_ppl"}
    assert two["heldout_ppl"] == pytest.approx(two["teacher_heldout_ppl"]) and two["heldout_ppl"] > 1


def test_distillation_loss_is_the_teachers_kl_to_the_student_per_token():
    """KL(teacher || student) averaged over tokens, times T^2, against a float64 recomputation (s45's mutation audit:
    the reversed KL(student || teacher) passed every test: the teacher's distribution must weight the log ratio)."""
    from llmfast.distill import kl_to_teacher

    g = torch.Generator().manual_seed(0)
    # a peaked teacher and a flat student: the two directions of the KL differ by far
    student, teacher = torch.randn(2, 3, 11, generator=g) * 0.5, torch.randn(2, 3, 11, generator=g) * 4
    for t in (1.0, 2.0):
        log_p = torch.log_softmax(teacher.double() / t, -1)
        log_q = torch.log_softmax(student.double() / t, -1)
        want = float((log_p.exp() * (log_p - log_q)).sum(-1).mean()) * t * t  # mean over the 6 tokens
        reverse = float((log_q.exp() * (log_q - log_p)).sum(-1).mean()) * t * t
        got = float(kl_to_teacher(student, teacher, t))
        assert got == pytest.approx(want, rel=1e-5) and abs(want - reverse) > 0.2 * want
        # its gradient (computed in the forward pass, chunk by chunk) against autograd's of the float64 loss
        ref = student.double().requires_grad_()
        log_q = torch.log_softmax(ref / t, -1)
        ((log_p.exp() * (log_p - log_q)).sum(-1).mean() * t * t * 3.0).backward()
        for chunk in (None, 1, 4):  # in chunks of positions (4 + 2 here): the same mean, and the same gradient
            mine = student.clone().requires_grad_()
            loss = kl_to_teacher(mine, teacher, t, chunk=chunk)
            (loss * 3.0).backward()  # the upstream gradient scales it
            assert loss.item() == pytest.approx(want, rel=1e-5)
            torch.testing.assert_close(mine.grad, ref.grad.float(), rtol=1e-4, atol=1e-6)
    assert float(kl_to_teacher(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)


def test_measured_sparsity_counts_every_window_token_and_layer(tiny):
    """The manifest's held-out sparsity against counts of our own on the very tensors measured (hooks registered
    first see what the measuring hooks see), over 5 windows in batches of 4: the last batch holds one window (s45's
    mutation audit: a loop that skipped it, or a halved token count, passed every test)."""
    from llmfast.sparse.measure import measure_sparsity

    model, tok = tiny
    windows, eps = heldout_windows(tok, n_tokens=5 * 64, window=64), 0.02
    mlps = [l.mlp for l in model.model.layers]
    seen = {"down_in": [[] for _ in mlps], "mlp_in": [[] for _ in mlps]}
    hooks = [m.down_proj.register_forward_pre_hook(lambda mod, a, i=i: seen["down_in"][i].append(a[0].clone()))
             for i, m in enumerate(mlps)]
    hooks += [m.register_forward_pre_hook(lambda mod, a, i=i: seen["mlp_in"][i].append(a[0].clone()))
              for i, m in enumerate(mlps)]
    try:
        got = measure_sparsity(model, windows, eps=eps, batch_size=4)
    finally:
        for h in hooks:
            h.remove()
    for site, per_layer in seen.items():
        small = [(torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).abs() <= eps).double() for xs in per_layer]
        assert got[site]["tokens"] == 5 * 64 and all(s.shape[0] == 5 * 64 for s in small), site
        fractions = [float(s.mean()) for s in small]
        assert 0.01 < min(fractions) and max(fractions) < 0.99, (site, fractions)  # eps makes both sites count
        assert got[site]["per_layer"] == pytest.approx(fractions, abs=1e-6), site
        assert got[site]["token_std"] == pytest.approx([float(s.mean(-1).std(unbiased=False)) for s in small],
                                                      abs=1e-6), site
        assert got[site]["mean"] == pytest.approx(sum(fractions) / len(fractions), abs=1e-6), site


@pytest.mark.parametrize("method,target", [("teal", 0.4), ("cats", 0.6)])
def test_calibrated_thresholds_zero_the_target_share_of_the_calibration_entries(tiny, method, target):
    """Each site's threshold is the k-th smallest |entry| it saw in calibration (k = target x entries), and the hooks
    zero exactly the entries at or below it: on the calibration windows again (the same tensors, each layer after
    the earlier layers' thresholds) every site is k of n zeros, ties aside (s45's mutation audit: keeping entries
    equal to the threshold, which zeroes k - 1 and differs from the sparse runtime's `>`, passed every test)."""
    from llmfast.sparse.cats import Cats
    from llmfast.sparse.teal import Teal
    from llmfast.sparse.thresholds import install_thresholds

    model, tok = tiny
    calib = heldout_windows(tok, n_tokens=4 * 64, window=64)
    thresholds = (Teal() if method == "teal" else Cats()).calibrate(model, calib, target)
    mlps = [l.mlp for l in model.model.layers]
    seen: dict = {}

    def tap(site, i, when):
        store = lambda x: seen.__setitem__((site, i, when), x.detach().clone())  # noqa: E731
        if site == "gate_act":
            return mlps[i].act_fn.register_forward_hook(lambda mod, a, out: store(out))
        module = mlps[i] if site == "mlp_in" else mlps[i].down_proj
        return module.register_forward_pre_hook(lambda mod, a: store(a[0]))

    hooks = [tap(s, i, "before") for s in thresholds for i in range(len(mlps))]
    hooks += install_thresholds(model, thresholds)
    hooks += [tap(s, i, "after") for s in thresholds for i in range(len(mlps))]
    try:
        with torch.inference_mode():
            model(calib)
    finally:
        for h in hooks:
            h.remove()
    assert set(thresholds) == ({"mlp_in", "down_in"} if method == "teal" else {"gate_act"})
    for site, vec in thresholds.items():
        for i, t in enumerate(vec):
            before, after = seen[(site, i, "before")], seen[(site, i, "after")]
            k = round(target * before.numel())
            assert int((before.abs() < t).sum()) < k <= int((before.abs() <= t).sum()), (site, i)  # the k-th
            assert torch.equal(after, torch.where(before.abs() > t, before, torch.zeros(()))), (site, i)


def test_a_relu_cut_of_zero_is_plain_relu_and_a_cut_on_a_silu_model_is_refused(tmp_path, tiny_dir):
    """A layer whose own ReLU zeros already reach relufy's target gets a cut of 0 (the k-th smallest of relu(gate) is
    0): load_model accepts it and keeps relu(gate) there, the other layer cut at its threshold. The cut on a SiLU
    model, or a negative one, is one line naming config.json (s45's mutation audit: refusing a 0, or letting a SiLU
    model carry a cut, passed every test)."""
    from llmfast.errors import UserError
    from llmfast.models import load_model

    def variant(name, **keys):
        d = Path(shutil.copytree(tiny_dir, tmp_path / name))
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, **keys}))
        return d

    cut = [0.0, 0.05]
    model = load_model(variant("relu", hidden_act="relu", llmfast_relu_thresholds=cut))
    mlps = [l.mlp for l in model.model.layers]
    seen = {}
    hooks = [m.gate_proj.register_forward_hook(lambda mod, a, o, i=i: seen.__setitem__(("g", i), o)) for i, m in
             enumerate(mlps)]
    hooks += [m.act_fn.register_forward_hook(lambda mod, a, o, i=i: seen.__setitem__(("a", i), o)) for i, m in
              enumerate(mlps)]  # after the cut's hook: what down_proj's product is made of
    with torch.no_grad():
        model(torch.arange(5, 69)[None])
    for h in hooks:
        h.remove()
    for i, t in enumerate(cut):
        g = seen[("g", i)]
        assert torch.equal(seen[("a", i)], torch.where(g > t, g, torch.zeros(())))
        assert bool(((g > 0) & (g <= t)).any()) == (t > 0)  # the 0.05 cut drops some of relu's positive entries
    for name, keys, expected in [
            ("silu", {"llmfast_relu_thresholds": [0.1, 0.1]}, "llmfast_relu_thresholds on a model whose MLPs compute "),
            ("negative", {"hidden_act": "relu", "llmfast_relu_thresholds": [-0.1, 0.05]},
             "llmfast_relu_thresholds must be 2 non-negative numbers")]:
        with pytest.raises(UserError) as e:
            load_model(variant(name, **keys))
        assert expected in str(e.value) and f"{name}/config.json" in str(e.value) and "\n" not in str(e.value)


def test_the_shifted_cut_follows_each_training_batch_and_stays_fixed_in_eval_mode(tiny_dir):
    """relufy's `target` during training: in train mode each forward sets each layer's threshold to the quantile of
    that forward's relu(gate) zeroing the fraction asked for, and keeps relu(gate) above it; in eval mode (held-out
    evaluations between steps) the last thresholds stay as they are (s45's mutation audit: re-calibrating on the
    evaluated text passed every test)."""
    from llmfast.loading import from_pretrained
    from llmfast.sparse.relufy import ShiftedCut, relu_swap

    model = from_pretrained(tiny_dir, "float32")
    relu_swap(model)
    mlps = [l.mlp for l in model.model.layers]
    cut = ShiftedCut(model)
    seen = {}
    hooks = [m.gate_proj.register_forward_hook(lambda mod, a, o, i=i: seen.__setitem__(("g", i), o)) for i, m in
             enumerate(mlps)]
    hooks += [m.act_fn.register_forward_hook(lambda mod, a, o, i=i: seen.__setitem__(("a", i), o)) for i, m in
              enumerate(mlps)]  # registered after the cut's: its output
    try:
        cut.fraction = 0.8
        model.train()
        with torch.no_grad():
            model(torch.arange(3, 67).view(2, 32))
        trained = cut.thresholds.clone()
        for i in range(len(mlps)):
            g = seen[("g", i)]
            relu = g.clamp(min=0)
            k = round(0.8 * relu.numel())
            assert int((relu < trained[i]).sum()) < k <= int((relu <= trained[i]).sum()) and trained[i] > 0
            assert torch.equal(seen[("a", i)], torch.where(relu > trained[i], relu, torch.zeros(())))
        model.eval()
        with torch.no_grad():
            model(torch.arange(100, 148).view(1, 48))
        assert torch.equal(cut.thresholds, trained)
        for i in range(len(mlps)):
            relu = seen[("g", i)].clamp(min=0)
            assert torch.equal(seen[("a", i)], torch.where(relu > trained[i], relu, torch.zeros(())))
    finally:
        cut.remove()
        for h in hooks:
            h.remove()


def test_relufy_trains_on_its_windows_shuffled_in_an_order_fixed_by_the_seed(tiny_dir, tiny):
    """Consecutive windows of one book are alike: relufy takes every training window once, in a shuffled order that
    the seed alone decides (s45's mutation audit: training on them in book order passed every test)."""
    from llmfast.sparse.base import SparsifyJob
    from llmfast.sparse.relufy import RelufyConfig, _training_rows

    model, tok = tiny
    rows = torch.arange(40 * 8).view(40, 8)
    job = SparsifyJob(model_spec=str(tiny_dir), model_path=tiny_dir, model=model, tokenizer=tok, dtype="float32",
                      train_rows=rows, calibration=rows[:1], heldout=rows[:1], window=8, work_dir=tiny_dir / "unused")
    order = {seed: _training_rows(job, RelufyConfig(seed=seed)) for seed in (0, 1)}
    for got in order.values():
        assert sorted(got[:, 0].tolist()) == rows[:, 0].tolist()  # each window once, whole
        assert torch.equal(got, rows[got[:, 0] // 8])
    assert not torch.equal(order[0], rows) and not torch.equal(order[0], order[1])
    assert torch.equal(_training_rows(job, RelufyConfig(seed=1)), order[1])


def test_the_training_log_ends_with_the_last_step_whatever_log_every(tmp_path, tiny_dir):
    """3 steps logged every 2: lines for steps 2 and 3, the last one's KL the manifest's final_kl (s45's mutation
    audit: a log without its last step when the steps are not a multiple of log_every passed every test)."""
    path = recipe(tmp_path, tiny_dir, "relufy", "{steps: 3, batch_size: 1, lr: 1.0e-4, log_every: 2}")
    code, _, err = run_cli("sparsify", str(path))
    assert code == 0, err[-1500:]
    lines = [json.loads(l) for l in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [(l["step"], l["tokens"]) for l in lines] == [(2, 2 * 256), (3, 3 * 256)]
    metrics = json.loads((tmp_path / "out" / "llmfast.json").read_text())["metrics"]
    assert metrics["steps"] == 3 and lines[-1]["kl"] == metrics["final_kl"]


def test_cats_over_a_relu_model_is_made_when_only_some_layers_already_reach_the_target(tmp_path, tiny_dir):
    """A target between the ReLU layers' own zero fractions: the sparser layer's threshold is 0, the other's positive,
    and the artifact is made; only a site at 0 in every layer is refused (s45's mutation audit: refusing a site at 0
    in any layer passed every test)."""
    from safetensors.torch import load_file

    from llmfast.loading import from_pretrained
    from llmfast.models import load_tokenizer

    relu = Path(shutil.copytree(tiny_dir, tmp_path / "relu"))
    cfg = json.loads((relu / "config.json").read_text())
    (relu / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu"}))
    ids = load_tokenizer(relu)(TEXT.read_text(encoding="utf-8"), add_special_tokens=False,
                               return_tensors="pt").input_ids[0]
    calibration = ids[4096:6144].reshape(-1, 256)  # the recipe's calibration windows, in one batch as calibrate runs
    model = from_pretrained(relu, "float32").eval()
    zeros = []
    hooks = [l.mlp.act_fn.register_forward_hook(lambda mod, a, o: zeros.append(float((o == 0).double().mean())))
             for l in model.model.layers]
    with torch.inference_mode():
        model(calibration)
    for h in hooks:
        h.remove()
    assert abs(zeros[0] - zeros[1]) * calibration.numel() * 256 >= 4, zeros  # resolvable: k differs by entries
    code, _, err = run_cli("sparsify", str(recipe(tmp_path, relu, "cats", "{target: %r}" % (sum(zeros) / 2))))
    assert code == 0, err[-1500:]
    t = load_file(str(tmp_path / "out" / "sparsity.safetensors"))["gate_act"]
    sparser = 0 if zeros[0] > zeros[1] else 1
    assert t[sparser] == 0 and t[1 - sparser] > 0, (zeros, t)


def test_a_target_below_one_entry_still_zeroes_the_smallest():
    """A target so small that target x n rounds to 0 entries (TEAL's 1e-7 of a calibration batch, relufy's shifted
    cut on its first steps) zeroes the one smallest |entry| rather than fail: k is at least 1 (s45's mutation audit:
    without the floor kthvalue(0) raised, and no test had such a target)."""
    from llmfast.sparse.thresholds import magnitude_quantile, zero_small

    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    t = magnitude_quantile(x, 1e-7)
    assert t == x.abs().min() and int((zero_small(x, t) == 0).sum()) == 1
    assert magnitude_quantile(x, 0.5) == x.abs().kthvalue(500).values


def test_the_documented_settings_table_is_every_methods_settings_and_defaults():
    """docs/sparsify.md's table of sparsify.config keys names every setting of every registered method with the
    default its schema fills in (s45's mutation audit: CATS's target defaulting to 0.6 passed every test)."""
    import yaml

    import llmfast.sparse  # noqa: F401  (registers the methods)
    from llmfast.sparse.base import SPARSIFIERS

    doc = (REPO / "docs" / "sparsify.md").read_text(encoding="utf-8")
    lines = doc.splitlines()
    start = lines.index("| method | key | default | meaning |")
    table = lines[start + 2: start + 2 + next(i for i, l in enumerate(lines[start + 2:]) if not l.startswith("|"))]
    documented: dict = {}
    for line in table:
        methods, keys, defaults, _ = (c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|")))
        names = [k.strip("` ") for k in keys.split(",")]
        values = [v.strip() for v in defaults.split(",")] if len(names) > 1 else [defaults]
        for method in methods.split(", "):
            for name, value in zip(names, values, strict=True):
                text = value.strip("`").split(" (")[0]  # "null (0.5)": null, filled in by the method
                documented.setdefault(method, {})[name] = json.loads(text) if text[:1].isdigit() else yaml.safe_load(text)
    assert set(documented) == set(SPARSIFIERS.names())
    for name in SPARSIFIERS.names():
        config = SPARSIFIERS.get(name).Config()
        assert documented[name] == config.model_dump(mode="json"), name


def test_a_model_without_a_gated_mlp_is_refused_before_its_weights_load(tmp_path, tiny_dir, monkeypatch):
    """The architecture is checked on the meta device, from config.json alone: no weights are read (a large model's
    load would come first) and nothing is written (s45's mutation audit: the same refusal after the load passed)."""
    import llmfast.loading
    from llmfast.errors import UserError
    from llmfast.sparse.run import load_sparsify_recipe, run_sparsify

    def weights_loaded(*args, **kwargs):
        raise AssertionError("the weights were loaded before the architecture was checked")

    path = recipe(tmp_path, _gpt2_dir(tmp_path, tiny_dir), "teal", "{target: 0.5}")
    monkeypatch.setattr(llmfast.loading, "from_pretrained", weights_loaded)
    loaded, method = load_sparsify_recipe(path)
    with pytest.raises(UserError, match="GPT2LMHeadModel has no gated MLP"):
        run_sparsify(loaded, method)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2", "r.yaml"]


def test_teacher_samples_are_count_windows_from_the_start_token_in_chunks(tiny):
    """relufy's `samples`: exactly `count` windows of `length` tokens, each from the start token, in chunks of at
    most `chunk` rows (the last one short), the same for the same seed (s45's mutation audit: a last chunk of a whole
    `chunk` rows, 1024 by default for 2 samples asked, passed every test)."""
    from llmfast.distill import teacher_samples

    model, tok = tiny
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    got = teacher_samples(model, tok, 3, 8, seed=5, chunk=2)
    assert got.shape == (3, 8) and got.dtype == torch.long and bool((got[:, 0] == start).all())
    assert torch.equal(teacher_samples(model, tok, 3, 8, seed=5, chunk=2), got)
    assert not torch.equal(teacher_samples(model, tok, 3, 8, seed=6, chunk=2), got)
    assert teacher_samples(model, tok, 2, 8, seed=5).shape == (2, 8)  # fewer than one chunk of 1024
    assert teacher_samples(model, tok, 0, 8, seed=5).shape == (0, 8)
