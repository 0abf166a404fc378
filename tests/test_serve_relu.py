"""ReLU-fied Llamas through vLLM: `llmfast sparsify` (relufy) names our architecture, transformers still loads
the artifact without llmfast, our `vllm.general_plugins` entry point registers the ReLU Llama in vLLM (and
nothing else), `llmfast serve` greedy-decodes it as transformers does, and `bench run` puts it on vLLM."""

import json
import subprocess
import sys
import urllib.request

import pytest

from conftest import REPO, run_cli

TEXT = REPO / "eval" / "text" / "persuasion.txt"
# float32 everywhere: one rounding per operation of O(0.1) values, in sums of at most 256 terms over 2 layers, puts
# two implementations' log-probabilities about 1e-5 apart at most (7e-7 measured on an AVX512 CPU); 1e-3 leaves a
# hundredfold margin on any x86-64 CPU. Reading the same weights with SiLU moves them by 0.09 (measured).
TOL = 1e-3


def _relufied(tmp_path_factory, tiny_dir, name, config):
    """The tiny Llama ReLU-fied by `llmfast sparsify` with relufy settings `config` (a YAML mapping)."""
    d = tmp_path_factory.mktemp(name)
    (d / "r.yaml").write_text(f"""
model: {tiny_dir}
sparsify: {{method: relufy, config: {config}}}
data: {{text: {TEXT}, skip_tokens: 4096, calibration_tokens: 2048, heldout_tokens: 2048, window: 256}}
dtype: float32
output: {d / name}
""")
    code, _, err = run_cli("sparsify", str(d / "r.yaml"))
    assert code == 0, err
    return d / name


@pytest.fixture(scope="module")
def relu_dir(tmp_path_factory, tiny_dir):
    """The swap alone: ReLU is what is tested, not training."""
    return _relufied(tmp_path_factory, tiny_dir, "relu", "{steps: 0}")


@pytest.fixture(scope="module")
def shifted_dir(tmp_path_factory, tiny_dir):
    """The same swap with relufy's `target`: relu(gate) cut at a calibrated threshold per layer (config.json)."""
    return _relufied(tmp_path_factory, tiny_dir, "shift", "{steps: 0, target: 0.8}")


def test_relufy_names_our_architecture_and_transformers_loads_it_alone(relu_dir):
    from llmfast.serve.vllm_plugin import ARCHITECTURE

    cfg = json.loads((relu_dir / "config.json").read_text())
    assert cfg["architectures"] == [ARCHITECTURE] and cfg["model_type"] == "llama" and cfg["hidden_act"] == "relu"
    code = ("import sys, torch; from transformers import AutoModelForCausalLM; "
            f"m = AutoModelForCausalLM.from_pretrained({str(relu_dir)!r}); "
            "assert type(m).__name__ == 'LlamaForCausalLM', type(m); "
            "assert all(isinstance(l.mlp.act_fn, torch.nn.ReLU) for l in m.model.layers); "
            "assert not [k for k in sys.modules if k.startswith(('llmfast', 'vllm'))]")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_bench_runs_relufy_on_vllm_and_thresholds_on_transformers(relu_dir):
    from llmfast.bench.engines import ENGINES, engine_families, resolve_variant
    from llmfast.bench.runner import choose_engine

    v = resolve_variant("relu", str(relu_dir), None, None)
    assert v.sparsity == "relufy" and v.families[0] == "vllm" and "hf" in v.families
    assert choose_engine(v, "auto").name == "vllm" and ENGINES.get("vllm-offline").can_run(v) is None
    assert choose_engine(v, "hf").family == "hf"  # the transformers baseline still runs it
    assert "vllm" not in engine_families(None, "teal") + engine_families(None, "cats")


def test_the_entry_point_is_installed():
    """pip writes it from pyproject.toml at install time: missing means `make install` (or
    `pip install -e .`) has not run since the entry point was added, or that an older `llmfast.egg-info` in the
    working directory (ignored by git) comes first on sys.path and hides the installed metadata."""
    from importlib.metadata import entry_points

    ours = [e for e in entry_points(group="vllm.general_plugins") if e.name == "llmfast_relu_llama"]
    assert [e.value for e in ours] == ["llmfast.serve.vllm_plugin:register"], "reinstall llmfast (make install), remove a stale ./llmfast.egg-info"


@pytest.mark.slow
def test_vllm_registers_our_architecture_only_and_vllm_plugins_filters_it():
    """As vLLM loads plugins in each of its processes: ours adds one architecture and leaves vLLM's Llama (every
    SiLU Llama) on vLLM's own class; VLLM_PLUGINS naming other plugins leaves it out."""
    code = """
import os
from vllm import ModelRegistry
from vllm.plugins import DEFAULT_PLUGINS_GROUP, load_general_plugins, load_plugins_by_group
os.environ["VLLM_PLUGINS"] = "someone_else"
assert "llmfast_relu_llama" not in load_plugins_by_group(DEFAULT_PLUGINS_GROUP)
del os.environ["VLLM_PLUGINS"]
assert "LlmfastReluLlamaForCausalLM" not in ModelRegistry.get_supported_archs()
load_general_plugins()
ours, llama = ModelRegistry.models["LlmfastReluLlamaForCausalLM"], ModelRegistry.models["LlamaForCausalLM"]
assert (ours.module_name, ours.class_name) == ("llmfast.serve.vllm_relu_llama", "LlmfastReluLlamaForCausalLM")
assert (llama.module_name, llama.class_name) == ("vllm.model_executor.models.llama", "LlamaForCausalLM")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _hf_greedy(model, prompt, n):
    """Greedy tokens, their log-probabilities, and the gap between the two best log-probabilities at each step."""
    import torch

    ids, tokens, logprobs, gaps = list(prompt), [], [], []
    with torch.inference_mode():
        for _ in range(n):
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
            top = lp.topk(2)
            tokens.append(int(top.indices[0]))
            logprobs.append(float(top.values[0]))
            gaps.append(float(top.values[0] - top.values[1]))
            ids.append(tokens[-1])
    return tokens, logprobs, gaps


def _logprobs_of(model, prompt, tokens):
    """Log-probabilities `model` gives `tokens` after `prompt`, teacher-forced."""
    import torch

    with torch.inference_mode():
        lp = torch.log_softmax(model(torch.tensor([list(prompt) + tokens])).logits[0].double(), -1)
    return [float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens)]


def _served_matches(model_dir, reference, other, tmp_path):
    """Serve `model_dir` with `llmfast serve`'s vLLM server; greedy tokens and their log-probabilities must equal
    `reference`'s (a transformers model) up to the first near-tie, and differ from `other`'s reading of them."""
    from transformers import AutoTokenizer

    from llmfast.serve.server import VllmServer, prepare_spec

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(TEXT.read_text(encoding="utf-8")[:4000], add_special_tokens=False).input_ids
    prompts = [ids[i : i + 12] for i in range(0, 600, 150)]
    log = tmp_path / "server.log"
    spec = prepare_spec(str(model_dir), port=0, served_name="relu", dtype="float32")
    with VllmServer(spec, log_path=log) as server:
        served = []
        for p in prompts:
            body = json.dumps({"model": "relu", "prompt": p, "max_tokens": 8, "temperature": 0, "logprobs": 1,
                               "return_tokens_as_token_ids": True}).encode()
            req = urllib.request.Request(server.base_url + "/v1/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                lp = json.loads(r.read())["choices"][0]["logprobs"]
            served.append(([int(t.removeprefix("token_id:")) for t in lp["tokens"]], lp["token_logprobs"]))
    assert "Resolved architecture: LlmfastReluLlamaForCausalLM" in log.read_text()
    compared, other_gap = 0, 0.0
    for p, (tokens, logprobs) in zip(prompts, served):
        want, want_lp, gaps = _hf_greedy(reference, p, len(tokens))
        # Equal up to the first near-tie (two best within TOL), where rounding may pick either and the rest follows
        # that pick; the best log-probability itself is the same up to TOL at the tie too.
        n = next((i for i, g in enumerate(gaps) if g < TOL), len(gaps))
        assert tokens[:n] == want[:n], (p, tokens, want, gaps)
        assert logprobs[: n + 1] == pytest.approx(want_lp[: n + 1], abs=TOL)
        compared += n
        other_gap = max([other_gap, *(abs(a - b) for a, b in zip(_logprobs_of(other, p, tokens[:n]), logprobs))])
    assert compared >= 16  # the check is not vacuous
    assert other_gap > 20 * TOL, other_gap  # the other reading of the same weights would have been caught


@pytest.mark.slow
def test_llmfast_serve_decodes_a_relu_llama_as_transformers_does(relu_dir, tiny_dir, tmp_path):
    """The real vLLM server (plugin loaded in its API process and in the engine core it spawns) on the ReLU
    artifact: greedy tokens and their log-probabilities equal transformers' ReLU model's, and differ from the
    same weights read with SiLU (so the ReLU is really applied)."""
    import torch
    from transformers import AutoModelForCausalLM

    relu = AutoModelForCausalLM.from_pretrained(relu_dir, dtype=torch.float32).eval()
    silu = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    _served_matches(relu_dir, relu, silu, tmp_path)


@pytest.mark.slow
def test_llmfast_serve_applies_a_shifted_relu_cut(shifted_dir, tmp_path):
    """relufy's `target` cut (llmfast_relu_thresholds in config.json) through vLLM: our plugin's FATReLU at each
    layer's threshold gives what llmfast's own loader gives, and not what the unshifted ReLU (transformers alone)
    gives."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmfast.models import load_model

    assert json.loads((shifted_dir / "config.json").read_text())["llmfast_relu_thresholds"]
    cut = load_model(str(shifted_dir), dtype="float32").eval()
    unshifted = AutoModelForCausalLM.from_pretrained(shifted_dir, dtype=torch.float32).eval()
    _served_matches(shifted_dir, cut, unshifted, tmp_path)
