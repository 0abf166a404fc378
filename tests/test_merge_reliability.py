"""`llmfast merge` against bad paths, corrupt inputs, bad flags and SIGKILL: one line, nothing lost or left.

Every refusal here is exit 2 with one stderr line, before any work: no output and no temporary folder
appear, and no input is touched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_cli
from tests.test_merge import _config, _merge, _perturb, _wide_model, adapters, family  # noqa: F401  (fixtures)


def _refused(cfg: Path, out: Path, *extra: str, needles: tuple[str, ...] = ()) -> str:
    existed = out.exists()
    before = sorted(p.name for p in out.iterdir()) if existed else None
    code, _, err = run_cli("merge", str(cfg), str(out), "--no-progress", *extra)
    line = err.strip()
    assert code == 2 and line.startswith("llmfast: error: ") and "\n" not in line, err
    assert "Traceback" not in err
    for n in needles:
        assert n in line, line
    assert out.exists() == existed
    if existed:
        assert sorted(p.name for p in out.iterdir()) == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return line


def _ties(tmp: Path, fam: dict[str, Path], *models: Path) -> Path:
    return _config(tmp, "ties", [(m, {"weight": 1.0, "density": 0.5}) for m in (models or (fam["ft1"], fam["ft2"]))],
                   fam["base"])


def test_existing_output_is_refused_unless_overwrite(family, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    cfg = _ties(tmp_path, family)
    _refused(cfg, out, needles=("already exists", "--overwrite"))
    assert (out / "notes.txt").read_text() == "mine"
    _refused(cfg, out, "--overwrite", needles=("holds files llmfast did not write",))  # not llmfast's: kept (s42)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    _merge(cfg, out, "--overwrite")  # an empty folder
    (out / "model.safetensors").write_bytes(b"")  # a merge's output: --overwrite replaces it
    _merge(cfg, out, "--overwrite")
    assert (out / "model.safetensors").stat().st_size > 0


def test_an_input_is_never_the_output(family, tmp_path):
    cfg = _ties(tmp_path, family)
    weights = (family["ft1"] / "model.safetensors").read_bytes()
    _refused(cfg, family["ft1"], "--overwrite", needles=("is (or holds) the input",))
    _refused(cfg, family["base"], "--overwrite", needles=("is (or holds) the input",))
    _refused(cfg, family["root"], "--overwrite", needles=("is (or holds) the input",))  # a folder holding inputs
    assert (family["ft1"] / "model.safetensors").read_bytes() == weights


def test_adapter_input_is_never_the_output(family, adapters, tmp_path):
    cfg = _config(tmp_path, "task_arithmetic", [(adapters["a1"], {"weight": 1.0})], family["base"])
    _refused(cfg, adapters["a1"], "--overwrite", "--adapter-rank", "concat", needles=("is (or holds) the input",))
    assert (adapters["a1"] / "adapter_model.safetensors").is_file()


def _broken_copy(src: Path, dst: Path, how: str) -> Path:
    import shutil

    shutil.copytree(src, dst)
    if how == "truncated":
        f = dst / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "header":
        f = dst / "model.safetensors"
        f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 64)
    elif how == "config":
        (dst / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    elif how == "adapter":
        f = dst / "adapter_model.safetensors"
        f.write_bytes(f.read_bytes()[:-100])
    elif how == "adapter_config":
        (dst / "adapter_config.json").write_bytes(b"\xff\xfe not utf-8")
    return dst


@pytest.mark.parametrize("how,needle", [("truncated", "truncated"), ("header", "corrupt safetensors header"),
                                        ("config", "config.json")])
def test_corrupt_model_input_is_one_line_before_any_work(family, tmp_path, how, needle):
    bad = _broken_copy(family["ft2"], tmp_path / "bad", how)
    line = _refused(_ties(tmp_path, family, family["ft1"], bad), tmp_path / "out", needles=(needle, "models[1]"))
    assert str(bad) in line


def test_corrupt_base_is_one_line(family, tmp_path):
    bad = _broken_copy(family["base"], tmp_path / "badbase", "truncated")
    cfg = _config(tmp_path, "ties", [(family["ft1"], {"weight": 1.0, "density": 0.5})], bad)
    _refused(cfg, tmp_path / "out", needles=("base_model", "truncated"))


@pytest.mark.parametrize("how,needle", [("adapter", "truncated"), ("adapter_config", "not UTF-8")])
def test_corrupt_adapter_input_is_one_line(family, adapters, tmp_path, how, needle):
    bad = _broken_copy(adapters["a2"], tmp_path / "badad", how)
    cfg = _config(tmp_path, "task_arithmetic", [(adapters["a1"], {"weight": 1.0}), (bad, {"weight": 1.0})],
                  family["base"])
    _refused(cfg, tmp_path / "out", needles=(needle, "models[1]"))


@pytest.mark.parametrize("flags,needle", [(("--threads", "-1"), "--threads -1"), (("--threads", "0"), "--threads 0"),
                                          (("--out-shard-size", "0"), "must be positive"),
                                          (("--out-shard-size", "-5G"), "--out-shard-size"),
                                          (("--out-shard-size", "lots"), "--out-shard-size"),
                                          (("--adapter-rank", "-2"), "positive")])
def test_bad_flags_are_one_line(family, tmp_path, flags, needle):
    _refused(_ties(tmp_path, family), tmp_path / "out", *flags, needles=(needle,))


def test_sigkill_mid_write_leaves_nothing_after_the_next_run(tiny_dir, tmp_path):
    """A merge killed while writing leaves its temporary sibling; the next run to that output removes it."""
    base = _wide_model(tiny_dir, tmp_path / "base")
    ft1, ft2 = _perturb(base, tmp_path / "ft1", 1), _perturb(base, tmp_path / "ft2", 2)
    cfg = _config(tmp_path, "ties", [(ft1, {"weight": 1, "density": 0.5}), (ft2, {"weight": 1, "density": 0.5})],
                  base)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from llmfast.cli import main; sys.exit(main())",
                             "merge", str(cfg), str(out), "--no-progress", "--threads", "1"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    written = None
    while time.monotonic() < deadline and proc.poll() is None:
        temps = list(tmp_path.glob(".out.tmp-*/model.safetensors"))
        if temps and temps[0].stat().st_size > 4 * 2**20:  # a few tensors in: mid-write
            written = temps[0]
            break
        time.sleep(0.01)
    assert written is not None and proc.poll() is None, "the merge ended before it could be killed mid-write"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert [p.name for p in tmp_path.glob(".out.tmp-*")] and not out.exists()
    code, stdout, err = run_cli("merge", str(cfg), str(out), "--no-progress")
    assert code == 0, err
    assert not list(tmp_path.glob(".out.*")), "the dead run's temporary folder is still there"
    manifest = json.loads((out / "llmfast.json").read_text())
    assert manifest["metrics"]["tensors"] > 0 and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("native", [True, False])
def test_error_inside_a_merge_worker_is_one_line_and_leaves_nothing(family, tmp_path, monkeypatch, native):
    """A value only found wrong while merging (weights summing to 0 under normalize) stops every thread, in the C
    kernel's path and in numpy's."""
    from llmfast.merge import merge as merge_module

    if not native:
        monkeypatch.setattr(merge_module, "merge_kernel", lambda: None)
    cfg = _config(tmp_path, "linear", [(family["ft1"], {"weight": 1.0}), (family["ft2"], {"weight": -1.0})], None)
    line = _refused(cfg, tmp_path / "out", "--threads", "2", needles=("sum to 0", "normalize: false"))
    assert "tensor " in line


def test_a_merge_beyond_float16_is_one_line_and_leaves_nothing(family, tmp_path):
    """out_dtype float16 turned a merged value beyond +-65504 into inf with only numpy's overflow warning, exit 0,
    and the model's perplexity was NaN (found by hand, s42)."""
    import shutil

    from safetensors.torch import load_file, save_file

    big = tmp_path / "big"
    shutil.copytree(family["ft1"], big)
    weights = load_file(big / "model.safetensors")
    weights["model.layers.0.mlp.down_proj.weight"][0, 0] = 1e6
    save_file(weights, big / "model.safetensors", metadata={"format": "pt"})
    cfg = _config(tmp_path, "linear", [(big, {"weight": 1.0}), (family["ft2"], {"weight": 1.0})], None,
                  out_dtype="float16")
    code, _, err = run_cli("merge", str(cfg), str(tmp_path / "out"), "--no-progress")
    assert code == 2 and "RuntimeWarning" not in err, err
    assert err.strip().splitlines()[-1] == ("llmfast: error: model.layers.0.mlp.down_proj.weight: holds 500000, beyond "
                                            "float16's range (+-65504): write it in bfloat16 or float32 (out_dtype, "
                                            "--dtype)"), err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_an_adapter_of_a_bfloat16_base_merges_onto_a_copy_of_it(tmp_path):
    """The same-base check hashed the norms through torch's .numpy(), which has no bfloat16: a traceback for the
    usual dtype of real checkpoints (found by hand, s42)."""
    import shutil

    from llmfast.testing import build_tiny_llama
    from tests.test_merge import _make_adapter

    base = build_tiny_llama(tmp_path / "bf16", dtype="bfloat16")
    adapter = _make_adapter(base, tmp_path / "ad", 1)
    shutil.copytree(base, tmp_path / "copy")
    cfg = _config(tmp_path, "task_arithmetic", [(adapter, {"weight": 1.0})], tmp_path / "copy")
    code, _, err = run_cli("merge", str(cfg), str(tmp_path / "out"), "--no-progress")
    assert code == 0 and "Traceback" not in err, err[-3000:]


def test_linear_concat_without_normalize_needs_weights_summing_to_1(family, adapters, tmp_path):
    """Weights 0.5 + 0.7 (the base's 0) without normalize scale the base by 1.2 too: no adapter can express it, so it
    is refused; 0.3 + 0.7 is written."""
    def cfg(w1: float) -> Path:
        return _config(tmp_path, "linear", [(adapters["a1"], {"weight": w1}), (adapters["a2"], {"weight": 0.7})],
                       family["base"], parameters={"normalize": False, "weight": 0.0})

    _refused(cfg(0.5), tmp_path / "out", "--adapter-rank", "concat",
             needles=("linear with normalize: false and weights not summing to 1 scales the base too",
                      "a LoRA adapter cannot express"))
    code, _, err = run_cli("merge", str(cfg(0.3)), str(tmp_path / "ok"), "--no-progress", "--adapter-rank", "concat")
    assert code == 0 and (tmp_path / "ok" / "adapter_model.safetensors").is_file(), err


@pytest.mark.parametrize("case", ["ties-weight", "task-lambda-bf16", "linear-native", "linear-numpy", "concat"])
def test_a_merge_overflowing_float32_is_one_line_and_leaves_nothing(family, adapters, tmp_path, monkeypatch, case):
    """Weights or lambda near float32's max (each accepted alone) overflowed the sum: numpy's RuntimeWarning, then a
    model of inf and NaN written with exit 0 (fuzz pass 10, F2)."""
    from llmfast.merge import merge as merge_module

    big = {"weight": 3e38}
    if case == "ties-weight":
        cfg = _config(tmp_path, "ties", [(family["ft1"], {**big, "density": 0.5}), (family["ft2"], big)],
                      family["base"], parameters={"normalize": False, "lambda": 3e38})
    elif case == "task-lambda-bf16":
        cfg = _config(tmp_path, "task_arithmetic", [(family["ft1"], big), (family["ft2"], big)],
                      family["base"], parameters={"lambda": 3e38}, out_dtype="bfloat16")
    elif case == "concat":
        cfg = _config(tmp_path, "task_arithmetic", [(adapters["a1"], big), (adapters["a2"], big)], family["base"])
    else:
        if case == "linear-numpy":
            monkeypatch.setattr(merge_module, "merge_kernel", lambda: None)
        cfg = _config(tmp_path, "linear", [(family["ft1"], big), (family["ft2"], big)], None,
                      parameters={"normalize": False})
    extra = ("--adapter-rank", "concat") if case == "concat" else ()
    _refused(cfg, tmp_path / "out", *extra, needles=("holds inf or NaN once merged", "lower the parameters"))


def test_an_adapter_output_beyond_float16_names_float16s_range(family, adapters, tmp_path):
    """--adapter-rank with out_dtype float16: torch's cast turned factors beyond +-65504 into inf silently (exit 0,
    fuzz pass 10, F2); the error names float16's range as a full-model merge does, not float32's."""
    cfg = _config(tmp_path, "task_arithmetic", [(adapters["a1"], {"weight": 1e9}), (adapters["a2"], {"weight": 1.0})],
                  family["base"], out_dtype="float16")
    for rank in ("concat", "4"):
        _refused(cfg, tmp_path / "out", "--adapter-rank", rank, needles=("beyond float16's range (+-65504)",))


@pytest.mark.parametrize("adapter_rank", [(), ("--adapter-rank", "concat")], ids=["model", "adapter"])
def test_a_chat_template_with_a_byte_order_mark_is_refused_before_any_output(family, adapters, tmp_path, adapter_rank):
    """The base's chat_template.jinja is copied into the output: one saved with a UTF-8 BOM was copied, and the next
    verb (eval, serve) refused the merge's output. Now the merge refuses it with the inputs, as every verb does."""
    import shutil

    base = Path(shutil.copytree(family["base"], tmp_path / "base"))
    (base / "chat_template.jinja").write_bytes(b"\xef\xbb\xbf" + (base / "chat_template.jinja").read_bytes())
    models = [(adapters["a1"], {"weight": 1.0})] if adapter_rank else [(family["ft1"], {"weight": 1.0})]
    cfg = _config(tmp_path, "task_arithmetic", models, base)
    _refused(cfg, tmp_path / "out", *adapter_rank,
             needles=(f"{base / 'chat_template.jinja'} starts with a UTF-8 byte-order mark",))


def _tiny_gemma(out: Path) -> Path:
    """A tiny Gemma as the hub's configs have it: no tie_word_embeddings key (GemmaConfig ties by default)."""
    import torch
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    GemmaForCausalLM(GemmaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=32)).save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.pop("tie_word_embeddings") is True
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_a_gemma_config_that_ties_by_its_class_default_merges_as_an_explicit_tie(tmp_path):
    """Without the tie_word_embeddings key (Gemma's hub configs), a head the files store beside the embeddings was
    kept: the merge with a model storing the embeddings only was refused ('lacks lm_head.weight'), and a stored head
    of other values was merged beside them (transformers then runs the embeddings as the head). Now both are as
    with `tie_word_embeddings: true`: the equal copy dropped, the other refused. A LoRA on the embedding is refused."""
    from safetensors.torch import load_file, save_file

    from tests.test_foreign_adapters import _make

    base = _tiny_gemma(tmp_path / "gemma")
    ft = _perturb(base, tmp_path / "ft", 1)
    tensors = load_file(base / "model.safetensors")
    embed = tensors["model.embed_tokens.weight"]
    save_file({**tensors, "lm_head.weight": embed.clone()}, base / "model.safetensors", metadata={"format": "pt"})
    merged = _merge(_config(tmp_path, "linear", [(base, {"weight": 0.5}), (ft, {"weight": 0.5})], None),
                    tmp_path / "out")
    assert "lm_head.weight" not in merged
    assert torch.equal(merged["model.embed_tokens.weight"], embed)
    save_file({**tensors, "lm_head.weight": embed * 2}, base / "model.safetensors", metadata={"format": "pt"})
    _refused(_config(tmp_path, "linear", [(base, {"weight": 0.5}), (ft, {"weight": 0.5})], None), tmp_path / "o2",
             needles=("ties lm_head.weight to model.embed_tokens.weight", "store them with different values"))
    ad = _make(ft, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"],
               save_embedding_layers=False)
    _refused(_config(tmp_path, "task_arithmetic", [(ad, {"weight": 1.0})], ft), tmp_path / "o3",
             needles=("LoRA on model.embed_tokens of a base that ties its input embedding",))


def test_a_gemma_without_the_tie_key_merges_with_its_saved_copy_that_has_it(tmp_path):
    """The architecture check compares the tie as transformers reads it: a hub Gemma config without
    tie_word_embeddings (its class ties) and the same model saved by transformers (which writes the key) are one
    architecture. It was refused: 'has tie_word_embeddings=True but ... has tie_word_embeddings=None'."""
    from safetensors.torch import load_file

    a = _tiny_gemma(tmp_path / "a")
    b = _perturb(a, tmp_path / "b", 1)
    cfg = json.loads((b / "config.json").read_text())
    (b / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    merged = _merge(_config(tmp_path, "linear", [(a, {"weight": 0.5}), (b, {"weight": 0.5})], None), tmp_path / "out")
    want = (load_file(a / "model.safetensors")["model.embed_tokens.weight"]
            + load_file(b / "model.safetensors")["model.embed_tokens.weight"]) / 2
    assert torch.allclose(merged["model.embed_tokens.weight"], want, atol=1e-6)
    b_llama = json.loads((b / "config.json").read_text())
    (b / "config.json").write_text(json.dumps({**b_llama, "tie_word_embeddings": False}))  # an untied copy: refused
    _refused(_config(tmp_path, "linear", [(a, {"weight": 0.5}), (b, {"weight": 0.5})], None), tmp_path / "o2",
             needles=("tie_word_embeddings=False", "tie_word_embeddings=True"))
