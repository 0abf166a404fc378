"""BitNet b1.58: packing and scales pinned against transformers, the layers' arithmetic, QAT, the quantize verb."""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import relu_cut_copy
from llmfast.cli import main
from llmfast.quant.bitnet.layers import BitLinear, TernaryLinear, quantize_activations, ternarize
from llmfast.quant.bitnet.pack import pack_ternary, unpack_ternary
from llmfast.testing import build_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "eval" / "text" / "persuasion.txt"


def _transformers_unpack():
    from transformers.integrations import bitnet

    fn = bitnet.unpack_weights  # torch.compile'd: call the function it wraps (eager, same arithmetic)
    return getattr(fn, "_torchdynamo_orig_callable", None) or getattr(fn, "__wrapped__", fn)


@pytest.mark.parametrize("shape", [(4, 3), (12, 5), (192, 64)])
def test_packing_matches_transformers(shape: tuple[int, int]) -> None:
    from transformers.integrations.bitnet import pack_weights

    g = torch.Generator().manual_seed(shape[0])
    w = torch.randint(-1, 2, shape, generator=g)
    packed = pack_ternary(w)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0] // 4, shape[1])
    assert torch.equal(packed, pack_weights(w.clone()))
    assert torch.equal(_transformers_unpack()(packed, torch.float32), w.float())
    assert torch.equal(unpack_ternary(packed).long(), w)


def test_packing_refuses_rows_not_divisible_by_four() -> None:
    with pytest.raises(ValueError, match="divide by 4"):
        pack_ternary(torch.zeros(6, 2, dtype=torch.int8))


def test_ternarize_is_absmean_rounding() -> None:
    w = torch.tensor([[0.3, -0.05, 0.1], [-0.6, 0.0, 0.25]])
    values, scale = ternarize(w)
    step = w.abs().mean()  # 0.2166...
    assert torch.allclose(scale, 1 / step.reshape(1))
    assert values.tolist() == [[1, 0, 0], [-1, 0, 1]]  # round(w / step), clamped to [-1, 1]


def test_bitlinear_strength_zero_is_the_dense_layer_and_one_is_ternary() -> None:
    torch.manual_seed(0)
    layer = BitLinear(32, 8, bias=True)
    x = torch.randn(3, 5, 32)
    layer.lam = 0.0
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    layer.lam = 1.0
    values, w_scale = ternarize(layer.weight)
    codes, a_scale = quantize_activations(x)
    expected = F.linear(codes / a_scale, values.float() / w_scale, layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


def test_strength_ramps_linearly_from_zero_at_the_first_step_to_one_at_the_end_of_the_warmup() -> None:
    from llmfast.quant.bitnet import BitNetConfig
    from llmfast.quant.bitnet.qat import strength_at

    ramp = BitNetConfig(qat_steps=8, lambda_warmup=0.5)  # 4 warm-up steps
    assert [strength_at(ramp, s) for s in range(8)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]
    assert [strength_at(BitNetConfig(qat_steps=10, lambda_warmup=0.35), s) for s in (0, 2, 3)] == [0.0, 2 / 3, 1.0]
    assert [strength_at(BitNetConfig(qat_steps=5, lambda_warmup=0.0), s) for s in range(5)] == [1.0] * 5


def test_qat_student_trains_its_linears_and_never_the_embeddings_or_an_untied_head() -> None:
    from transformers import LlamaForCausalLM

    from llmfast.quant.bitnet.qat import prepare_student
    from llmfast.testing import llama_config

    model = LlamaForCausalLM(llama_config(num_layers=1, vocab_size=64, tie_word_embeddings=False))
    names = prepare_student(model)
    assert len(names) == 7 and all(isinstance(model.get_submodule(n), BitLinear) for n in names)
    assert not model.lm_head.weight.requires_grad and not model.get_input_embeddings().weight.requires_grad
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {f"{n}.weight" for n in names} <= trained
    assert not any(n.startswith(("lm_head", "model.embed_tokens")) for n in trained)


def test_bitlinear_gradient_is_straight_through() -> None:
    torch.manual_seed(1)
    layer = BitLinear(16, 8, bias=False)
    x = torch.randn(4, 16, requires_grad=True)
    layer(x).pow(2).sum().backward()
    # The reference: the same forward with the quantized tensors as leaves; STE passes their gradients on.
    values, w_scale = ternarize(layer.weight)
    codes, a_scale = quantize_activations(x.detach())
    wq = (values.float() / w_scale).requires_grad_()
    xq = (codes / a_scale).requires_grad_()
    F.linear(xq, wq).pow(2).sum().backward()
    torch.testing.assert_close(layer.weight.grad, wq.grad)
    torch.testing.assert_close(x.grad, xq.grad)


def test_ternary_linear_equals_bitlinear_up_to_rounding_order() -> None:
    torch.manual_seed(2)
    dense = BitLinear(64, 12, bias=False)
    ternary = TernaryLinear(64, 12)
    values, scale = ternarize(dense.weight)
    ternary.weight.copy_(values)
    ternary.weight_scale.copy_(scale)
    x = torch.randn(2, 7, 64)
    y1, y2 = dense(x), ternary(x)
    # Same integer products, scaled before (BitLinear) or after (TernaryLinear) the sum of 64 terms: float32
    # rounding differs by a few ulps of the largest partial sums.
    bound = 64 * torch.finfo(torch.float32).eps * (x.abs().max() * dense.weight.abs().mean() * 64).item()
    assert (y1 - y2).abs().max().item() <= bound


@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 5, 64), (64,)])
def test_ternary_fast_cpu_path_is_bit_identical(shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    layer = TernaryLinear(64, 20, bias=True)
    values, scale = ternarize(torch.randn(20, 64))
    layer.weight.copy_(values)
    layer.weight_scale.copy_(scale)
    layer.bias.normal_()
    x = torch.randn(*shape) * 4
    fast = layer(x)
    monkeypatch.setattr(TernaryLinear, "fast", False)
    layer._dense = None
    # int8 x ternary sums are exact in int32 and in float32 (|sum| <= 128 * 64 < 2^24): equal bit for bit.
    assert torch.equal(fast, layer(x))


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> Path:
    """The session's tiny model (build_tiny_llama's defaults): read here, never written."""
    return tiny_dir


def _recipe(tmp: Path, model: Path, out: Path, qat_steps: int = 0, **extra: object) -> Path:
    q = {"method": "bitnet", "qat_steps": qat_steps, "batch_size": 2, "save_every": 3, **extra}
    text = {"text": str(TEXT), "skip_tokens": 16384, "calibration_tokens": 2048, "heldout_tokens": 512,
            "window": 128}
    path = tmp / f"quantize-{out.name}.yaml"
    path.write_text(json.dumps({"model": str(model), "quantization": q, "data": text, "output": str(out)}))
    return path


@pytest.fixture(scope="module")
def ptq(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The post-training ternary artifact of `tiny` (qat_steps 0), quantized once for the tests that read it."""
    tmp = tmp_path_factory.mktemp("ptq")
    out = tmp / "ternary"
    assert main(["quantize", str(_recipe(tmp, tiny, out))]) == 0
    return out


def _logits(model: object, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits  # type: ignore[operator]


def test_quantize_writes_an_artifact_llmfast_and_transformers_load_alike(tiny: Path, ptq: Path,
                                                                        tmp_path: Path) -> None:
    from llmfast.models import load_model

    out = ptq  # `llmfast quantize` exited 0 (the fixture asserts it)
    manifest = json.loads((out / "llmfast.json").read_text())
    assert manifest["quantization"]["method"] == "bitnet" and manifest["stage"] == "quantize"
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitnet"
    assert (out / "model.safetensors").stat().st_size < 0.5 * (tiny / "model.safetensors").stat().st_size
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:  # packed 2-bit weights and their scales
        ternary_bytes = sum(f.get_tensor(k).nbytes + f.get_tensor(k.removesuffix("_scale")).nbytes
                            for k in f.keys() if k.endswith(".weight_scale"))
    assert manifest["metrics"]["ternary_linear_bytes"] == ternary_bytes > 0
    assert manifest["metrics"]["weights_file_bytes"] == (out / "model.safetensors").stat().st_size
    ours = load_model(out)
    assert any(isinstance(m, TernaryLinear) for m in ours.modules())
    ids = torch.tensor([[1, 17, 42, 99, 7, 300, 12, 5]])
    expected = _logits(ours, ids)
    # transformers alone, no llmfast import, in a fresh interpreter.
    code = ("import sys, torch; from transformers import AutoModelForCausalLM; from safetensors.torch import save_file;"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]);"
            "assert 'llmfast' not in sys.modules;"
            f"ids = torch.tensor({ids.tolist()});"
            "save_file({'logits': m(ids).logits.detach()}, sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "hf.safetensors")], check=True,
                   capture_output=True, timeout=600)
    from safetensors.torch import load_file

    theirs = load_file(str(tmp_path / "hf.safetensors"))["logits"]
    # The same integer matmul and the same scaling in the same order: equal up to float32 rounding.
    torch.testing.assert_close(theirs, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def _student_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def test_qat_beats_post_training_ternary_and_resumes_after_sigkill(tiny: Path, ptq: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from llmfast.distill import heldout_kl
    from llmfast.models import load_model

    qat = tmp_path / "qat"
    assert main(["quantize", str(_recipe(tmp_path, tiny, qat, qat_steps=12, lr=1e-3, lambda_warmup=0.25,
                                         eval_every=4))]) == 0
    teacher = load_model(tiny)
    held = torch.randint(3, 900, (4, 64), generator=torch.Generator().manual_seed(0))
    assert heldout_kl(load_model(qat), teacher, held) < 0.8 * heldout_kl(load_model(ptq), teacher, held)
    # held-out KL: on the first 512 tokens of the text (never trained on), of the saved model as llmfast loads it
    from llmfast.models import load_tokenizer

    ids = load_tokenizer(tiny)(TEXT.read_text(encoding="utf-8"), add_special_tokens=False,
                               return_tensors="pt").input_ids[0]
    held = ids[:512].reshape(4, 128)
    metrics = json.loads((qat / "llmfast.json").read_text())["metrics"]
    assert metrics["heldout_kl"] == pytest.approx(heldout_kl(load_model(qat), teacher, held), rel=1e-4)
    # the curve: the fully ternary model at each point, from post-training rounding (step 0) to the artifact
    curve = [e for e in map(json.loads, (qat / "train_log.jsonl").read_text().splitlines()) if "heldout_kl" in e]
    assert [(e["step"], e["tokens"]) for e in curve] == [(s, s * 2 * 128) for s in (0, 4, 8, 12)]
    assert curve[0]["heldout_kl"] == pytest.approx(heldout_kl(load_model(ptq), teacher, held), rel=1e-3)
    assert curve[-1]["heldout_kl"] == pytest.approx(metrics["heldout_kl"], rel=1e-3)
    assert not (tmp_path / "qat.checkpoints").exists()  # removed once the artifact is complete

    killed = tmp_path / "killed"
    recipe = _recipe(tmp_path, tiny, killed, qat_steps=12, lr=1e-3, lambda_warmup=0.25, eval_every=4)
    cmd = [sys.executable, "-m", "llmfast.cli", "quantize", str(recipe)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt = tmp_path / "killed.checkpoints" / "checkpoints"
    deadline = time.time() + 300
    while not list(ckpt.glob("step-*/state.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not killed.exists()
    capsys.readouterr()
    assert main(["quantize", str(recipe)]) == 2  # the same command again, in this process
    assert "--resume" in capsys.readouterr().err  # checkpoints are not silently discarded
    state = sorted(ckpt.glob("step-*/state.json"))[-1]
    kept = state.read_text()
    state.write_text(json.dumps({**json.loads(kept), "step": -3}))  # edited by hand: one line, before the models load
    capsys.readouterr()
    assert main(["quantize", str(recipe), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "step -3 is not a step of this run (0 to 12)" in err, err
    state.write_text(kept)
    assert main(["quantize", str(recipe), "--resume"]) == 0
    a, b = _student_weights(qat), _student_weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (killed / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "heldout_kl" in e] == [0, 4, 8, 12]  # each point of the curve once
    assert not list(tmp_path.glob(".killed.tmp-*"))


def test_heldout_tokens_of_exactly_one_window_are_measured_on(tiny: Path, tmp_path: Path) -> None:
    """data.heldout_tokens equal to the window makes one held-out window, not none: QAT measures the KL on it."""
    from llmfast.distill import heldout_kl
    from llmfast.models import load_model, load_tokenizer

    out = tmp_path / "qat"
    recipe = _recipe(tmp_path, tiny, out, qat_steps=1)
    data = json.loads(recipe.read_text())
    data["data"]["heldout_tokens"] = data["data"]["window"]
    recipe.write_text(json.dumps(data))
    assert main(["quantize", str(recipe)]) == 0
    metrics = json.loads((out / "llmfast.json").read_text())["metrics"]
    ids = load_tokenizer(tiny)(TEXT.read_text(encoding="utf-8"), add_special_tokens=False,
                               return_tensors="pt").input_ids[0]
    held = ids[:128].reshape(1, 128)
    kl = heldout_kl(load_model(out), load_model(tiny), held)
    assert metrics["heldout_kl"] == pytest.approx(kl, rel=1e-4, abs=1e-6)  # kept to 6 decimals


def test_qat_trains_on_the_teacher_samples_beside_the_text(tiny: Path, tmp_path: Path) -> None:
    """teacher_samples: rows the teacher writes are added to the text's windows (2048 calibration tokens in
    windows of 128: 16), and QAT trains on all of them."""
    out = tmp_path / "qat"
    assert main(["quantize", str(_recipe(tmp_path, tiny, out, qat_steps=1, teacher_samples=3))]) == 0
    metrics = json.loads((out / "llmfast.json").read_text())["metrics"]
    assert metrics["teacher_samples"] == 3 and metrics["train_windows"] == 2048 // 128 + 3


def test_overwrite_starts_afresh_over_an_earlier_runs_checkpoints(tiny: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """An earlier run's checkpoints beside the output: refused without a flag (they are not silently dropped), and
    `--overwrite` is the flag that starts again; the run completes and their folder is gone."""
    from llmfast.work_dir import mark_work_dir

    out = tmp_path / "ternary"
    work = mark_work_dir(tmp_path / "ternary.checkpoints", {"verb": "quantize"})
    (work / "checkpoints" / "step-000003").mkdir(parents=True)
    (work / "checkpoints" / "step-000003" / "state.json").write_text('{"step": 3}')
    recipe = _recipe(tmp_path, tiny, out)
    capsys.readouterr()
    assert main(["quantize", str(recipe)]) == 2
    assert "pass --resume to continue it, or --overwrite" in capsys.readouterr().err
    assert not out.exists() and (work / "checkpoints").is_dir()
    assert main(["quantize", str(recipe), "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file() and not work.exists()


def test_teacher_samples_in_chunks_continue_one_seeded_stream(tiny: Path) -> None:
    """Data-free QAT's rows, generated a chunk at a time (the KV cache of thousands of rows would not fit a GPU at
    once): the first chunk is what a call for those rows alone gives, the whole is reproducible, and the caller's
    random state is left as it was."""
    from transformers import AutoModelForCausalLM

    from llmfast.distill import teacher_samples
    from llmfast.models import load_tokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(tiny).eval(), load_tokenizer(tiny)
    state = torch.random.get_rng_state()
    rows = teacher_samples(model, tok, 5, 7, seed=3, chunk=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert rows.shape == (5, 7) and rows.dtype == torch.long and rows.device.type == "cpu"
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    assert (rows[:, 0] == start).all()
    assert torch.equal(rows, teacher_samples(model, tok, 5, 7, seed=3, chunk=2))
    assert torch.equal(rows[:2], teacher_samples(model, tok, 2, 7, seed=3))
    assert not torch.equal(rows[2:4], rows[:2])  # later chunks go on with the stream, not from the seed again


@pytest.mark.parametrize("case", ["already quantized", "unknown method", "output exists", "qat without text",
                                  "rows not divisible by 4", "cuda without a GPU", "batch beyond the windows",
                                  "samples of one token", "a curve with no held-out window"])
def test_quantize_bad_input_is_one_line(case: str, tiny: Path, ptq: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    model = tiny
    if case == "already quantized":
        model = ptq
    if case == "rows not divisible by 4":
        model = build_tiny_llama(tmp_path / "odd", intermediate_size=250)
    recipe = _recipe(tmp_path, model, out)
    data = json.loads(recipe.read_text())
    if case == "unknown method":
        data["quantization"]["method"] = "bitnett"
    if case == "output exists":
        out.mkdir()
        (out / "mine.txt").write_text("keep me")
    if case == "qat without text":
        data["quantization"]["qat_steps"] = 2
        del data["data"]
    if case == "cuda without a GPU":
        if torch.cuda.is_available():
            pytest.skip("this machine has a CUDA GPU")
        data["quantization"] |= {"qat_steps": 2, "device": "cuda"}
    if case == "batch beyond the windows":  # s46: torch's index arithmetic overflowed (a traceback)
        data["quantization"] |= {"qat_steps": 2, "batch_size": 2**63 - 1}
    if case == "samples of one token":  # s46: generate refused max_new_tokens 0 (a traceback)
        data["quantization"] |= {"qat_steps": 1, "teacher_samples": 1}
        data["data"]["window"] = 1
    if case == "a curve with no held-out window":  # s46: the curve asked for was silently not measured
        data["quantization"] |= {"qat_steps": 2, "eval_every": 1}
        data["data"]["heldout_tokens"] = 127
    recipe.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["quantize", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llmfast: error:")
    expected = {"already quantized": "already quantized (bitnet)", "unknown method": "did you mean 'bitnet'",
                "output exists": "already exists", "qat without text": "data:",
                "rows not divisible by 4": "multiple of 4", "cuda without a GPU": "device is cuda",
                "batch beyond the windows": "quantization.batch_size is 9223372036854775807, more than the 16",
                "samples of one token": "quantization.teacher_samples: a sample is a window the model writes",
                "a curve with no held-out window": "quantization.eval_every: data.heldout_tokens make no full window "
                                                   "of data.window (128) tokens"}[case]
    assert expected in err[0]
    if case == "output exists":
        assert (out / "mine.txt").read_text() == "keep me"
    else:
        assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_gpu_qat_script_smoke_and_its_rebuilt_artifact_is_the_artifact(tiny: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """scripts/gpu_bitnet_qat.py is for a lent GPU's minutes: its --smoke mode runs every step on the CPU (probe,
    one `llmfast quantize` per rate, scoring through both loaders, the export without embeddings), and --rebuild
    puts the exported shards and the base's embeddings back together into the very model the run wrote."""
    from llmfast.models import load_model

    out, work = tmp_path / "out", tmp_path / "work"
    run = subprocess.run([sys.executable, "scripts/gpu_bitnet_qat.py", "--model", str(tiny), "--smoke", "--lrs", "1e-3",
                          "--out", str(out), "--work", str(work)], capture_output=True, text=True, cwd=ROOT,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((out / "gpu_qat.json").read_text())
    (only,) = result["runs"]
    assert only["rc"] == 0 and only["metrics"]["train_tokens"] == 4 * 2 * 64 and only["metrics"]["device"] == "cpu"
    ppl = only["ppl"]
    assert abs(ppl["llmfast"] - ppl["transformers"]) <= 1e-3 * ppl["llmfast"]  # two loaders, one model
    assert only["x_base"] == round(ppl["llmfast"] / result["base_ppl"], 3)
    assert (out / "train_log-0.jsonl").is_file()
    # --rebuild as its command line runs it (`python scripts/gpu_bitnet_qat.py --rebuild ...`), in this process
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))  # as python puts a script's folder first
    monkeypatch.setattr(sys, "argv", ["scripts/gpu_bitnet_qat.py", "--rebuild", str(out), "--to",
                                      str(tmp_path / "rebuilt"), "--base", str(tiny)])
    with pytest.raises(SystemExit) as rebuilt:
        runpy.run_path(str(ROOT / "scripts" / "gpu_bitnet_qat.py"), run_name="__main__")
    assert rebuilt.value.code == 0
    ids = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        want = load_model(work / "ternary-0")(ids).logits
        got = load_model(tmp_path / "rebuilt")(ids).logits
    assert torch.equal(got, want)


def test_an_adapter_on_a_ternary_model_is_refused_for_what_it_is(tiny: Path, ptq: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Found by hand (2026-12-05): eval of a ternary artifact with a LoRA adapter said the adapter 'does not fit the
    model ... use it with the base model it was trained on' (PEFT has no LoRA layer for ternary linears); LoRA on it
    in finetune was a PEFT traceback."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ternary = ptq
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny), LoraConfig(r=2, target_modules=["q_proj"]))
    peft.save_pretrained(tmp_path / "adapter")
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(json.dumps({"model": str(ternary), "adapter": str(tmp_path / "adapter"), "output": str(
        tmp_path / "r.json"), "eval": {"perplexity": {"text": str(TEXT), "max_tokens": 128, "context": 64, "stride": 64}}}))
    capsys.readouterr()
    assert main(["eval", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"LoRA does not apply to {ternary}'s bitnet layers: apply the adapter to the "
                            "full-precision model, or export it (`llmfast export`) and quantize the merge"), err
    (tmp_path / "chats.jsonl").write_text('{"messages": [{"role": "user", "content": "a"}, '
                                          '{"role": "assistant", "content": "b"}]}\n')
    ft = tmp_path / "ft.yaml"
    ft.write_text(json.dumps({"model": str(ternary), "data": {"train": str(tmp_path / "chats.jsonl")},
                              "lora": {"r": 2}, "train": {"steps": 1}, "output": str(tmp_path / "run")}))
    assert main(["finetune", str(ft)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is already quantized (bitnet): LoRA trains on a full-precision model" in err[0], err
    assert not (tmp_path / "run").exists() and not (tmp_path / "r.json").exists()


def test_qat_of_a_relufied_source_distils_from_it_with_its_cut(tiny: Path, tmp_path: Path) -> None:
    """Found by hand (2026-12-05): QAT loaded a relufy source without the shifted ReLU cut its config.json holds,
    so the student learnt a teacher other than the model eval runs (and the artifact, which keeps the cut). The
    teacher perplexity QAT records is the cut model's, as `load_model` runs it, and not the plain ReLU one's."""
    from llmfast.distill import heldout_scores
    from llmfast.loading import from_pretrained
    from llmfast.models import load_model
    from llmfast.sparse.relu_cut import THRESHOLDS_KEY

    source = tmp_path / "relu-cut"
    ids, cut = relu_cut_copy(tiny, source, TEXT)
    out = tmp_path / "ternary"
    assert main(["quantize", str(_recipe(tmp_path, source, out, qat_steps=2))]) == 0
    metrics = json.loads((out / "llmfast.json").read_text())["metrics"]
    recorded = metrics["teacher_heldout_ppl"]
    held = ids[:512].reshape(4, 128)
    with torch.no_grad():
        as_run = heldout_scores(load_model(source), load_model(source), held)["teacher_heldout_ppl"]
        plain = heldout_scores(from_pretrained(source, "float32"), from_pretrained(source, "float32"), held)
        artifact = heldout_scores(load_model(out), load_model(source), held)
    assert recorded == pytest.approx(as_run, rel=1e-4)
    # the student ran with the cut too: the KL recorded is the artifact's, as load_model runs it
    assert metrics["heldout_kl"] == pytest.approx(artifact["heldout_kl"], rel=1e-4, abs=1e-6)  # 6 decimals kept
    assert abs(plain["teacher_heldout_ppl"] - as_run) > 1e-3 * as_run  # the cut changes the model: not vacuous
    assert json.loads((out / "config.json").read_text())[THRESHOLDS_KEY] == cut


def test_biased_layers_keep_their_bias_through_ternarizing_saving_and_loading(tmp_path: Path) -> None:
    """Qwen2-style q/k/v biases (here Llama's attention_bias and mlp_bias): post-training ternarization keeps each
    bias as it was, the artifact stores it, and llmfast and transformers load it back (the tiny models have none)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from llmfast.quant.bitnet.convert import load_ternary, replace_linears, save_ternary, to_ternary
    from llmfast.testing import llama_config

    torch.manual_seed(5)
    full = LlamaForCausalLM(llama_config(num_layers=1, vocab_size=64, attention_bias=True, mlp_bias=True)).eval()
    for name, m in full.named_modules():
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            torch.nn.init.normal_(m.bias, std=0.5)  # zeros at init: a dropped bias would not show
    biases = {n: m.bias.detach().clone() for n, m in full.named_modules()
              if isinstance(m, torch.nn.Linear) and m.bias is not None}
    weights = {n: full.get_submodule(n).weight.detach().clone() for n in biases}
    assert len(biases) == 7  # q, k, v, o, gate, up, down
    ternary = LlamaForCausalLM(full.config).eval()
    ternary.load_state_dict(full.state_dict())
    replace_linears(ternary, to_ternary)
    for name, bias in biases.items():
        layer = ternary.get_submodule(name)
        assert isinstance(layer, TernaryLinear)
        assert torch.equal(layer.bias, bias), name
        values, scale = ternarize(weights[name])
        assert torch.equal(layer.weight, values) and torch.equal(layer.weight_scale, scale)
    out = tmp_path / "biased"
    save_ternary(ternary, None, out)
    loaded = load_ternary(out)
    for name, bias in biases.items():
        assert torch.equal(loaded.get_submodule(name).bias, bias), name
    ids = torch.tensor([[1, 17, 42, 9, 7, 30, 12, 5]])
    expected = _logits(ternary, ids)
    assert torch.equal(_logits(loaded, ids), expected)
    # transformers' own BitLinear (its unpacking, its bias add) on the same files
    theirs = _logits(AutoModelForCausalLM.from_pretrained(out).eval(), ids)
    torch.testing.assert_close(theirs, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_a_diverging_qat_names_its_learning_rate_key(tiny: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A rate near float32's largest value overflows Adam's first update: one line that names the recipe key to
    lower (it said "the learning rate", which of a recipe's several it did not say), and nothing written."""
    out = tmp_path / "ternary"
    assert main(["quantize", str(_recipe(tmp_path, tiny, out, qat_steps=2, lr=1e38))]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith("BitNet QAT: the update overflowed float32 at step 1: lower quantization.lr (1e+38); "
                         "nothing was written"), last
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ternary")) == []


def test_loading_never_holds_the_full_precision_linears(tmp_path: Path) -> None:
    """A ternary artifact loads into int8 layers: the loader never holds the model in full precision on the way
    (it built a randomly initialized full-precision model, then swapped its Linears for int8 ones: twice the
    loaded model's bytes in bfloat16), and gives the same model."""
    from test_memory_scale import model_bytes, torch_peak_bytes
    from transformers import LlamaForCausalLM

    from llmfast.quant.bitnet.convert import load_ternary, replace_linears, save_ternary, to_ternary
    from llmfast.testing import llama_config

    torch.manual_seed(3)
    model = LlamaForCausalLM(llama_config(num_layers=4, vocab_size=64)).eval()
    replace_linears(model, to_ternary)
    save_ternary(model, None, tmp_path / "ternary")
    loaded, peak = torch_peak_bytes(lambda: load_ternary(tmp_path / "ternary", "bfloat16"))
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert all(isinstance(loaded.get_submodule(n), TernaryLinear) for n, m in model.named_modules()
               if isinstance(m, TernaryLinear))
    ids = torch.tensor([[1, 17, 42, 9, 7, 30, 12, 5]])
    torch.testing.assert_close(_logits(loaded, ids), _logits(model.to(torch.bfloat16), ids), rtol=0, atol=0)
    assert peak < 1.5 * model_bytes(loaded)
