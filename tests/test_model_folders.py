"""Model folders as the hub and other tools ship them, through the verbs that take a model: sharded safetensors,
pickles beside safetensors, a model's own Python code (`auto_map`), a quantization_config over weights that do not
hold it, a hub cache snapshot of links into blobs. Each is compared with what transformers itself loads from the
folder. Found by an audit on 2026-12-07; the cases marked "fixed" failed before (a folder's code ran on a 'y' at
transformers' prompt; merge read other weights than eval measured; a traceback mid-run)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli

from llmfast.errors import UserError

TEXT = REPO / "eval" / "text" / "persuasion.txt"
CODE = "import pathlib\npathlib.Path({mark!r}).write_text('ran')\n"


class _Evil:
    """Unpickling this writes the mark: a pickle llmfast loads would show."""

    def __init__(self, mark: Path) -> None:
        self.mark = str(mark)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.write_text, (Path(self.mark), "ran"))


def _set(folder: Path, **keys: object) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **keys}))


@pytest.fixture(scope="module")
def w(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    from safetensors.torch import load_file, save_file
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    w = tmp_path_factory.mktemp("folders")
    m = w / "m"
    mark = w / "RAN"
    tiny = Path(shutil.copytree(tiny_dir, m / "tiny"))
    tensors = load_file(tiny / "model.safetensors")

    def copy(name: str) -> Path:
        return Path(shutil.copytree(tiny, m / name))

    sharded = copy("sharded")
    (sharded / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(tiny).save_pretrained(sharded, max_shard_size="300KB")
    both = Path(shutil.copytree(sharded, m / "both"))  # a folder re-saved with another shard size keeps both
    save_file({k: v + 1 for k, v in tensors.items()}, both / "model.safetensors", metadata={"format": "pt"})
    missing = Path(shutil.copytree(sharded, m / "shard-missing"))
    max(missing.glob("model-*.safetensors")).unlink()
    Path(shutil.copytree(sharded, m / "index-not-json")).joinpath("model.safetensors.index.json").write_text("{x")
    beside = copy("bin-beside")
    beside.joinpath("pytorch_model.bin").write_bytes(pickle.dumps(_Evil(mark)))
    only = copy("bin-shards")
    (only / "model.safetensors").unlink()
    for i in (1, 2):
        (only / f"pytorch_model-0000{i}-of-00002.bin").write_bytes(pickle.dumps(_Evil(mark)))
    (only / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        k: "pytorch_model-00001-of-00002.bin" for k in tensors}}))
    auto_map = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    for name, model_type in (("code-unknown-type", "xllama"), ("code-known-type", "llama")):
        d = copy(name)
        for f in ("configuration_x.py", "modeling_x.py"):
            (d / f).write_text(CODE.format(mark=str(mark)))
        _set(d, model_type=model_type, architectures=["XForCausalLM"], auto_map=auto_map)
    d = copy("code-tokenizer")
    (d / "tokenization_x.py").write_text(CODE.format(mark=str(mark)))
    tok = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**tok, "tokenizer_class": "XTokenizer",
                                                         "auto_map": {"AutoTokenizer": ["tokenization_x.XTok", None]}}))
    adapter = m / "adapter-code"  # an adapter saved with such a tokenizer (export loads the adapter's own)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny), LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(adapter)
    for f in ("tokenizer.json", "tokenizer_config.json", "tokenization_x.py"):
        shutil.copy(d / f, adapter / f)
    _set(copy("bnb-config-full-weights"), quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True,
                                                               "bnb_4bit_quant_type": "nf4"})
    _set(copy("classifier"), architectures=["LlamaForSequenceClassification"], num_labels=1)
    _set(copy("no-architectures"), architectures=None)
    copy("generation-not-json").joinpath("generation_config.json").write_text("{broken")
    embed = tensors["model.embed_tokens.weight"]
    for name, head in (("tied-head-stored", embed.clone()), ("tied-head-differs", embed * 2)):
        save_file({**tensors, "lm_head.weight": head}, copy(name) / "model.safetensors", metadata={"format": "pt"})
    _set(copy("torch-dtype-key"), torch_dtype="float32", dtype=None)
    save_file({k: v.bfloat16() for k, v in tensors.items()}, copy("bfloat16-weights") / "model.safetensors",
              metadata={"format": "pt"})  # config.json still says float32
    hub = m / "hub" / "models--x--tiny"  # the hub cache: snapshots/<hash>/ files are links into blobs/
    (hub / "blobs").mkdir(parents=True)
    snap = hub / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in tiny.iterdir():
        shutil.copy(f, hub / "blobs" / f"b-{f.name}")
        (snap / f.name).symlink_to(Path("../../blobs") / f"b-{f.name}")
    (m / "hub-link").symlink_to(snap)  # the folder given as a link too
    (w / "out").mkdir()
    return w


@pytest.fixture(autouse=True)
def no_mark(w: Path) -> None:
    """Each test sees only the code its own commands ran."""
    (w / "RAN").unlink(missing_ok=True)


def _one_line(code: int, err: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.startswith("llmfast: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def _out(w: Path, verb: str, model: Path) -> Path:
    return w / "out" / f"{verb}-{model.name}"


def _recipe(w: Path, verb: str, model: Path) -> list[str]:
    out = _out(w, verb, model)
    text = {
        "eval": f"model: {model}\neval: {{perplexity: {{text: {TEXT}, max_tokens: 128, context: 64, stride: 64}}}}\n"
                f"output: {out}.json\n",
        "quantize": f"model: {model}\nquantization: {{method: bitnet}}\noutput: {out}\n",
        "sparsify": f"model: {model}\nsparsify: {{method: teal, config: {{target: 0.5}}}}\ndata: {{text: {TEXT}, "
                    "skip_tokens: 256, calibration_tokens: 256, heldout_tokens: 128, window: 64}\n"
                    f"output: {out}\n",
        "merge": f"merge_method: task_arithmetic\nbase_model: {w}/m/tiny\nmodels:\n  - model: {model}\n"
                 "    parameters: {weight: 1.0}\ndtype: float32\n",
    }[verb]
    path = w / f"{verb}-{model.name}.yaml"
    path.write_text(text)
    return [verb, str(path), *([str(out)] if verb == "merge" else [])]


@pytest.mark.parametrize("folder", ["code-unknown-type", "code-tokenizer"])
@pytest.mark.parametrize("verb", ["eval", "quantize", "sparsify", "merge"])
def test_a_models_own_code_is_refused_by_every_verb(w: Path, folder: str, verb: str) -> None:
    """Fixed: transformers asked on the terminal whether to run the folder's code (and ran it on a 'y')."""
    model = w / "m" / folder
    code, _, err = run_cli(*_recipe(w, verb, model))
    assert not (w / "RAN").exists()
    _one_line(code, err, str(model), "does not run a model's own code")
    out = _out(w, verb, model)
    assert not out.exists() and not out.with_suffix(".json").exists()


@pytest.mark.parametrize("verb", ["export", "eval"])
def test_an_adapters_own_tokenizer_code_is_refused(w: Path, verb: str) -> None:
    """An adapter saved with a tokenizer that names its own code: `echo y | llmfast export AD OUT` ran its .py."""
    adapter, out = w / "m" / "adapter-code", w / "out" / f"adapter-code-{verb}"
    if verb == "export":
        code, _, err = run_cli("export", str(adapter), str(out))
    else:
        recipe = w / "adapter-eval.yaml"
        recipe.write_text(f"model: {w / 'm' / 'tiny'}\nadapter: {adapter}\neval: {{perplexity: {{text: {TEXT}, "
                          f"max_tokens: 128, context: 64, stride: 64}}}}\noutput: {out}.json\n")
        code, _, err = run_cli("eval", str(recipe))
    assert not (w / "RAN").exists()
    _one_line(code, err, str(adapter), "does not run a model's own code")
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_no_architectures_is_served_by_transformers_not_by_vllm(w: Path) -> None:
    """vLLM picks its class from `architectures` alone and without one runs LlamaModel (no head), where transformers
    loads LlamaForCausalLM: serve refused nothing (another model served), bench would run it on vLLM too."""
    from llmfast.bench.engines import ENGINES, Variant
    from llmfast.serve.server import prepare_spec

    folder = w / "m" / "no-architectures"
    with pytest.raises(UserError, match="names no `architectures`, from which vLLM picks the model's class"):
        prepare_spec(str(folder))
    variant = Variant("v", folder)
    assert "names no `architectures`" in ENGINES.get("vllm").can_run(variant)
    assert ENGINES.get("hf").can_run(variant) is None and ENGINES.get("vllm").can_run(Variant("t", w / "m" / "tiny")) \
        is None


def test_a_yes_at_the_terminal_runs_no_code(w: Path) -> None:
    """Fixed: `echo y | llmfast eval` on such a folder imported its configuration_x.py."""
    args = _recipe(w, "eval", w / "m" / "code-unknown-type")
    p = subprocess.run([sys.executable, "-m", "llmfast", *args], input="y\n", capture_output=True, text=True,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert not (w / "RAN").exists(), p.stderr[-500:]
    _one_line(p.returncode, p.stderr, "does not run a model's own code")
    assert "[y/N]" not in p.stdout + p.stderr


def test_code_beside_a_model_type_transformers_has_loads_its_own_class(w: Path) -> None:
    """An auto_map beside model_type llama: transformers (trust_remote_code=False) loads LlamaForCausalLM and imports
    nothing from the folder; so does llmfast, with the same logits."""
    from transformers import AutoModelForCausalLM

    from llmfast.loading import from_pretrained
    from llmfast.models import resolve_model

    folder = resolve_model(str(w / "m" / "code-known-type"))
    ids = torch.tensor([[1, 5, 9, 200]])
    ours = from_pretrained(folder, "float32")
    theirs = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False)
    assert type(ours).__name__ == "LlamaForCausalLM"
    assert torch.equal(ours(ids).logits, theirs(ids).logits)
    assert not (w / "RAN").exists()


def test_model_safetensors_wins_over_an_index_beside_it_as_in_transformers(w: Path) -> None:
    """Fixed: merge (and the fingerprint and the header checks) read the shards the index names while transformers,
    and so eval, loads model.safetensors: the merge was of other weights than those measured."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    code, _, err = run_cli(*_recipe(w, "merge", w / "m" / "both"))
    assert code == 0, err
    merged = load_file(w / "out" / "merge-both" / "model.safetensors")
    loaded = AutoModelForCausalLM.from_pretrained(w / "m" / "both").state_dict()
    assert all(torch.allclose(merged[k], loaded[k]) for k in merged)


def test_a_tied_head_stored_beside_the_embeddings_merges_as_the_tied_model(w: Path) -> None:
    """Fixed: merge refused it beside a model that stores the embeddings only ('has lm_head.weight, which ... lacks'),
    though transformers ties the two; now the stored copy is dropped, one of other values refused."""
    from safetensors.torch import load_file

    code, _, err = run_cli(*_recipe(w, "merge", w / "m" / "tied-head-stored"))
    assert code == 0, err
    merged = load_file(w / "out" / "merge-tied-head-stored" / "model.safetensors")
    assert "lm_head.weight" not in merged and torch.equal(merged["model.norm.weight"],
                                                          load_file(w / "m" / "tiny" / "model.safetensors")["model.norm.weight"])
    code, _, err = run_cli(*_recipe(w, "merge", w / "m" / "tied-head-differs"))
    _one_line(code, err, "tied-head-differs", "store them with different values")


def test_bnb_config_over_full_precision_weights_is_one_line(w: Path) -> None:
    """Fixed: transformers loaded them, and the first forward pass failed inside bitsandbytes (a traceback)."""
    code, _, err = run_cli(*_recipe(w, "eval", w / "m" / "bnb-config-full-weights"))
    _one_line(code, err, "bnb-config-full-weights", "no bitsandbytes quantization state")


@pytest.mark.parametrize(("folder", "needle"), [
    ("generation-not-json", "generation_config.json: the generation config is not valid JSON"),
    ("tied-head-differs", "store them with different values"),
    ("classifier", "LlamaForSequenceClassification, which has no language-model head")])
def test_configs_transformers_would_load_otherwise_are_one_line(w: Path, folder: str, needle: str) -> None:
    """Fixed: a broken generation_config.json was replaced by transformers' defaults after a log line (other end-of-turn
    tokens in eval's generations, and copied broken into merges); a tied head stored with other values than the
    embeddings ran untied in transformers (tied in vLLM); a classifier (or reward model) was measured as a causal
    LM with the embeddings standing in for its head."""
    code, _, err = run_cli(*_recipe(w, "eval", w / "m" / folder))
    _one_line(code, err, folder, needle)


@pytest.mark.parametrize("folder", ["tied-head-stored", "torch-dtype-key", "bfloat16-weights"])
def test_config_variants_load_as_transformers_loads_them(w: Path, folder: str) -> None:
    """A tied head stored beside its embeddings (equal), the torch_dtype key of transformers 4, bfloat16 weights under
    a float32 config: the model transformers loads."""
    from transformers import AutoModelForCausalLM

    from llmfast.loading import from_pretrained

    ids = torch.tensor([[1, 5, 9, 200]])
    ours = from_pretrained(w / "m" / folder, "float32")
    assert torch.equal(ours(ids).logits, AutoModelForCausalLM.from_pretrained(w / "m" / folder)(ids).logits)


@pytest.mark.parametrize(("folder", "needle"), [
    ("shard-missing", "missing file(s) (model-"), ("index-not-json", "not valid JSON"),
    ("bin-shards", "pickle files (pytorch_model.bin)")])
def test_broken_shards_and_pickles_are_one_line(w: Path, folder: str, needle: str) -> None:
    code, _, err = run_cli(*_recipe(w, "eval", w / "m" / folder))
    _one_line(code, err, needle)
    assert not (w / "RAN").exists()


@pytest.mark.parametrize("folder", ["sharded", "bin-beside", "hub-link"])
def test_folders_that_load_load_as_transformers_does(w: Path, folder: str) -> None:
    """Sharded, a pickle beside model.safetensors (never unpickled), a hub snapshot of links given as a link: the
    weights transformers loads; a TEAL artifact of them holds no links and no pickle."""
    from transformers import AutoModelForCausalLM

    from llmfast.loading import from_pretrained

    ids = torch.tensor([[1, 5, 9, 200]])
    ours = from_pretrained(w / "m" / folder, "float32")(ids).logits
    assert torch.equal(ours, AutoModelForCausalLM.from_pretrained(w / "m" / "tiny")(ids).logits)
    code, _, err = run_cli(*_recipe(w, "sparsify", w / "m" / folder))
    out = w / "out" / f"sparsify-{folder}"
    assert code == 0, err
    assert not any(f.is_symlink() or f.suffix == ".bin" for f in out.iterdir())
    assert not (w / "RAN").exists()
