"""The small CUDA-only checks of fine-tuning, chains and loading, in one run on a lent H100/H200 (about a minute).

    python3 scripts/gpu_small_checks.py                   # on the GPU: table on stdout, $OUT/gpu_small_checks.json
    python3 scripts/gpu_small_checks.py --device cpu      # here: every check that runs on a CPU, the rest say
                                                          # 'skipped: no CUDA' (tests/test_gpu_scripts.py runs it)

Each check runs on tiny random-weight models built from a config (llmfast.testing.build_tiny_llama) and is a
pass/fail against a reference computed another way; one check's exception is its own 'fail', not the run's end.
1. provenance_gpus: provenance's gpus() before CUDA is set up (from the driver's files) and after, against torch's
   own device names.
2. load_no_kernels: llmfast's loader on CUDA keeps transformers' torch layers (use_kernels=False: no norm, activation
   or rotary layer swapped for a hub kernel, before and after train()/eval()), and its logits match a CPU float32
   load of the same folder.
3. chunked_kl_bf16: distill.kl_to_teacher (the chunked KL of QAT and ReLU-fication) on logits from bfloat16 autocast
   forward passes, several chunks: value and gradient against F.kl_div in float64 on the CPU.
4. chunked_ce_bf16: finetune/loss.py's chunked cross-entropy with the frozen head under bfloat16 autocast: value and
   gradient against F.cross_entropy in float64 on the CPU.
5. peak_memory_stages: two chain stages run in this process through chain/run.py's run_stage; the second's
   peak_memory_gib is its own, not the first's larger peak; peak_reserved_gib >= peak_memory_gib on CUDA.
6. lora_dropout_resume: `llmfast finetune` with lora.dropout 0.1, SIGKILLed after its first checkpoint and resumed,
   against the same run uninterrupted: the same loss curve and adapter (dropout masks come from the device's
   generator, which a checkpoint must restore); its metrics carry peak_memory_reserved_gib on CUDA.
7. qlora_export: QLoRA (NF4, double quant) with export_merged: the export merges layer by layer on CUDA when there
   is one; the merged model's logits against the 4-bit base + adapter through peft, in float32 on the same device.
bitsandbytes must import for 7 (carried as a wheel to the GPU machine: scripts/gpu_session.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SKIP = "skipped: no CUDA"
ROWS = [{"messages": [{"role": "user", "content": f"Repeat: {w}"}, {"role": "assistant", "content": w}]}
        for w in ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"] * 4]


def verdict(ok: bool, **details: Any) -> dict[str, Any]:
    return {"status": "pass" if ok else "fail", **details}


def check_provenance(dev: str, work: Path) -> dict[str, Any]:
    from llmfast.provenance import gpus

    if dev != "cuda":
        return {"status": SKIP, "gpus": gpus()}
    before = gpus()  # torch.cuda.is_available() does not set CUDA up: these come from the driver's files
    torch.zeros(1, device="cuda")
    after = gpus()
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return verdict(before == names and after == names, before_cuda_init=before, after_cuda_init=after, torch=names)


def _swapped(model: Any) -> list[str]:
    """Modules that are not transformers' own torch layers, after loading, train() and eval()."""
    swapped = set()
    for stage in ("loaded", "train", "eval"):
        if stage != "loaded":
            getattr(model, stage)()  # transformers' kernelize would act again at each train()/eval()
        for name, m in model.named_modules():
            mod = type(m).__module__
            # a hub kernel comes as another class or as a forward set on the instance (accelerate's hooks are not one)
            own = getattr(getattr(vars(m).get("forward"), "__func__", vars(m).get("forward")), "__module__", None)
            if not mod.startswith(("transformers.", "torch.", "peft.")) or (own and not own.startswith("accelerate")):
                swapped.add(f"{stage}:{name}:{mod}.{type(m).__name__}:{own}")
    return sorted(swapped)


def check_load(dev: str, work: Path) -> dict[str, Any]:
    from llmfast.models import load_model

    model_dir = work / "tiny"
    ref = load_model(model_dir, "float32")
    ids = torch.tensor([[5, 17, 42, 99, 7, 300, 11]])
    with torch.no_grad():
        want = ref(ids).logits.double()
    if dev != "cuda":  # nothing is swapped on a CPU: the scan itself runs
        return {"status": SKIP, "swapped_on_cpu": _swapped(ref)}
    got_model = load_model(model_dir, "float32", device_map={"": "cuda"})
    swapped = _swapped(got_model)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 against float32, not TF32's 10-bit mantissa
    try:
        with torch.no_grad():
            got = got_model(ids.cuda()).logits.double().cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    diff = (got - want).abs().max().item()
    scale = want.abs().max().item()
    return verdict(not swapped and diff <= 1e-4 * max(1.0, scale), max_abs_diff=diff, logit_scale=scale,
                   swapped_modules=swapped[:5])


def _bf16_logits(dev: str, work: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Student (with grad) and teacher logits of two tiny models, bfloat16 autocast on CUDA, float32 on a CPU."""
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(work / "tiny", dtype=torch.float32).to(dev)
    teacher = AutoModelForCausalLM.from_pretrained(work / "tiny2", dtype=torch.float32).to(dev)
    ids = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(0)).to(dev)
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
        s = student(ids).logits
        with torch.no_grad():
            t = teacher(ids).logits
    return s, t


def _compare(value: torch.Tensor, grad: torch.Tensor, ref_value: torch.Tensor, ref_grad: torch.Tensor,
             dev: str, cuda_tol: tuple[float, float]) -> dict[str, Any]:
    value_err = abs(value.item() - ref_value.item()) / max(abs(ref_value.item()), 1e-12)
    grad_err = ((grad.double().cpu() - ref_grad).abs().max() / ref_grad.abs().max().clamp_min(1e-30)).item()
    tol_value, tol_grad = cuda_tol if dev == "cuda" else (1e-6, 1e-5)
    return verdict(value_err <= tol_value and grad_err <= tol_grad, value=round(value.item(), 6),
                   value_rel_err=value_err, grad_rel_err=grad_err, logits_dtype=str(grad.dtype))


def check_kl(dev: str, work: Path) -> dict[str, Any]:
    from llmfast.distill import kl_to_teacher

    s, t = _bf16_logits(dev, work)
    s = s.detach().requires_grad_(True)
    loss = kl_to_teacher(s, t, temperature=2.0, chunk=17)  # 96 positions: 6 chunks, the last a short one
    loss.backward()
    s64 = s.detach().double().cpu().requires_grad_(True)
    flat_s, flat_t = s64.flatten(0, -2), t.double().cpu().flatten(0, -2)
    ref = F.kl_div(F.log_softmax(flat_s / 2.0, -1), F.log_softmax(flat_t / 2.0, -1), log_target=True,
                   reduction="sum") / flat_s.shape[0] * 4.0
    ref.backward()
    # the same bfloat16 logits on both sides, summed in float32/64: the value to float32; the gradient, kept in the
    # logits' dtype (8 bits of mantissa), within a few of its roundings of the largest
    return _compare(loss, s.grad, ref, s64.grad, dev, (1e-4, 1e-2))  # CPU bf16 autocast: 1.4e-6, 1.5e-3


def check_ce(dev: str, work: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from llmfast.finetune.loss import chunked_lm_loss

    model = AutoModelForCausalLM.from_pretrained(work / "tiny", dtype=torch.float32).to(dev)
    model.requires_grad_(False)
    ids = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(1)).to(dev)
    labels = ids.clone()
    labels[:, :10] = -100  # a masked prompt
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
        hidden = model.model(input_ids=ids).last_hidden_state.detach().requires_grad_(True)
        total, count = chunked_lm_loss(hidden, labels, model.lm_head, chunk_size=13)
    total.backward()
    h64 = hidden.detach().double().cpu().requires_grad_(True)
    logits = h64[:, :-1] @ model.lm_head.weight.detach().double().cpu().T
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).cpu(), reduction="sum")
    ref.backward()
    # autocast runs the head (and the gradient's product with it) in bfloat16, the reference in float64: logits
    # off by ~2^-8 of their size, the summed loss by less (errors of both signs), the gradient by a few roundings
    out = _compare(total, hidden.grad, ref, h64.grad, dev, (5e-4, 5e-3))  # CPU bf16 autocast: 1.3e-5, 5.3e-5
    if count != int((labels[:, 1:] != -100).sum()):
        out.update(status="fail", count=count)
    return out


def check_peaks(dev: str, work: Path) -> dict[str, Any]:
    from llmfast.chain.plan import Stage
    from llmfast.chain.run import run_stage
    from llmfast.memory import peak_memory_gib, peak_reserved_gib

    seen: dict[str, tuple[float, float | None]] = {}

    def verb(name: str, mib: int) -> Callable[[list[str]], int]:
        def run(argv: list[str]) -> int:
            x = torch.ones(mib * 2**18, device=dev)  # float32: 4 bytes each
            x.add_(1)
            del x
            seen[name] = (peak_memory_gib(dev), peak_reserved_gib(dev))
            return 0
        return run

    out = work / "chain"
    for name, mib in (("big", 512), ("small", 32)):
        stage = Stage(name=name, type="finetune", section={"model": str(work / "tiny")}, flags=(), launch=(),
                      parents=(), key=name)
        run_stage(out, stage, False, verb(name, mib))
    (big, big_r), (small, small_r) = seen["big"], seen["small"]
    ok = big >= small + 0.4 and (dev != "cuda" or (big_r is not None and small_r is not None
                                                    and big_r >= big and small_r >= small))
    if dev == "cuda":  # a stage that allocates 32 MiB on an otherwise idle GPU: its own peak is tens of MiB
        ok = ok and small < 0.2
    return verdict(ok, big_stage_peak_gib=round(big, 3), small_stage_peak_gib=round(small, 3),
                   big_stage_reserved_gib=big_r, small_stage_reserved_gib=small_r)


def _recipe(work: Path, name: str, extra: str = "") -> Path:
    data = work / "train.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    path = work / f"{name}.yaml"
    path.write_text(f"model: {work / 'tiny'}\ndata: {{train: {data}, max_length: 64, eval_fraction: 0.1}}\n"
                    f"lora: {{r: 8, alpha: 16, dropout: 0.1}}\n"
                    f"train: {{steps: 8, batch_size: 2, lr: 0.003, warmup_ratio: 0.0, seed: 1}}\n"
                    f"output: {work / name}\n{extra}\n")
    return path


def _cli(dev: str, *args: str) -> None:
    """`llmfast ARGS` in this process (its start-up is most of a tiny run's time); on the device the script runs on."""
    from llmfast.cli import main

    code = main(list(args))
    if code:
        raise RuntimeError(f"llmfast {args[0]} exited {code}")


def _cli_process(dev: str, *args: str) -> subprocess.Popen:
    """`llmfast ARGS` in a process of its own, to be killed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", "llmfast.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def check_dropout_resume(dev: str, work: Path, steps: int) -> dict[str, Any]:
    from safetensors.torch import load_file

    args = ["--set", f"train.steps={steps}", "--set", "train.save_every=10", "--set", "train.keep_checkpoints=1",
            "--set", "train.log_every=5"]
    _cli(dev, "finetune", str(_recipe(work, "ref")), *args)
    proc = _cli_process(dev, "finetune", str(_recipe(work, "killed")), *args)
    ckpts = work / "killed" / "checkpoints"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not list(ckpts.glob("step-*/state.json")):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (work / "killed" / "adapter").exists():
        return verdict(False, error=f"the run finished before the kill: give more --ft-steps than {steps}")
    _cli(dev, "finetune", str(work / "killed.yaml"), "--resume", *args)
    logs = [[json.loads(line) for line in (work / d / "train_log.jsonl").read_text().splitlines()]
            for d in ("killed", "ref")]
    loss_diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(*logs))
    a, b = (load_file(work / d / "adapter" / "adapter_model.safetensors") for d in ("killed", "ref"))
    adapter_diff = max((a[k].float() - b[k].float()).abs().max().item() for k in b)
    metrics = json.loads((work / "killed" / "metrics.json").read_text())
    ref_metrics = json.loads((work / "ref" / "metrics.json").read_text())
    reserved, peak = ref_metrics.get("peak_memory_reserved_gib"), ref_metrics.get("peak_memory_gib")
    # a CPU resumes to the same bits; on CUDA a kernel may sum in another order. Dropout masks drawn afresh after
    # the resume (the CPU generator not restored, 20 steps on a CPU) put the losses 1e-3 and the adapters 4e-3 apart.
    tol_loss, tol_adapter = (5e-4, 1e-4) if dev == "cuda" else (1e-4, 1e-5)
    ok = (len(logs[0]) == len(logs[1]) == steps // 5 and loss_diff <= tol_loss and adapter_diff <= tol_adapter
          and (metrics.get("resumed_from_step") or 0) > 0)
    if dev == "cuda":  # on a GPU the allocator's figure is there and at least what torch allocated
        ok = ok and reserved is not None and peak is not None and reserved >= peak
    return verdict(ok, resumed_from_step=metrics.get("resumed_from_step"), loss_max_diff=loss_diff,
                   adapter_max_diff=adapter_diff, device=ref_metrics.get("device"),
                   peak_memory_gib=peak, peak_memory_reserved_gib=reserved)


def check_qlora_export(dev: str, work: Path) -> dict[str, Any]:
    import bitsandbytes as bnb
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = _recipe(work, "qlora", "quantization: {type: nf4, double_quant: true}\nexport_merged: true")
    _cli(dev, "finetune", str(path), "--set", "train.steps=6", "--set", "lora.dropout=0.0")
    run = work / "qlora"
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
    # on the device it trained on: bitsandbytes' CPU and CUDA quantizers need not give the same double-quant codes
    base4 = AutoModelForCausalLM.from_pretrained(work / "tiny", quantization_config=q, dtype=torch.float32,
                                                 device_map={"": dev})
    for m in base4.modules():  # the trained model's float32 math, not bitsandbytes' bfloat16 CPU kernel
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    trained = PeftModel.from_pretrained(base4, run / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32).to(dev).eval()
    still4 = any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    ids = torch.tensor([[5, 17, 42, 99, 7]], device=dev)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # both sides in float32
    try:
        with torch.no_grad():
            ref, got = trained(ids).logits.double().cpu(), merged(ids).logits.double().cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    diff, scale = (got - ref).abs().max().item(), ref.abs().max().item()
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    adapter_moved = any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # trained, not a no-op
    # x(W + sBA) against xW + s(xA)B over the same dequantized weights: float32 rounding of short dot products
    return verdict(not still4 and adapter_moved and diff <= 1e-4 * max(1.0, scale), max_abs_diff=diff,
                   logit_scale=scale, exported_on="cuda" if dev == "cuda" else "cpu")


def build_models(work: Path) -> None:
    from llmfast.testing import build_tiny_llama

    from transformers import AutoConfig, AutoModelForCausalLM

    build_tiny_llama(work / "tiny", seed=0)
    torch.manual_seed(1)  # the teacher: other random weights of the same config (no tokenizer of its own needed)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(work / "tiny")).save_pretrained(work / "tiny2")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda where torch sees a GPU")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_small"))
    ap.add_argument("--ft-steps", type=int, default=120, help="steps of the dropout kill+resume runs (a multiple "
                                                                "of 10; enough that the kill lands before the end)")
    ap.add_argument("--only", nargs="*", default=None, help="names of the checks to run (default: all)")
    args = ap.parse_args()
    if args.device == "cpu":  # before CUDA is looked at: the trainer, here and in the killed run, takes a GPU it sees
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA GPU here; pass --device cpu", file=sys.stderr)
        return 2
    dev = args.device
    checks: list[tuple[str, Callable[[str, Path], dict[str, Any]]]] = [
        ("provenance_gpus", check_provenance),  # first: before anything here sets CUDA up
        ("load_no_kernels", check_load), ("chunked_kl_bf16", check_kl), ("chunked_ce_bf16", check_ce),
        ("peak_memory_stages", check_peaks),
        ("lora_dropout_resume", lambda d, w: check_dropout_resume(d, w, args.ft_steps)),
        ("qlora_export", check_qlora_export),
    ]
    if args.only:
        checks = [c for c in checks if c[0] in args.only]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"device": dev, "torch": torch.__version__, "command": " ".join(sys.argv), "checks": {}}
    t_all = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llmfast-small-") as tmp:
        work = Path(tmp)
        build_models(work)
        for name, check in checks:
            t0 = time.monotonic()
            try:
                r = check(dev, work)
            except Exception as e:  # noqa: BLE001 - one failure must not hide the other checks
                traceback.print_exc()
                r = {"status": "fail", "error": f"{type(e).__name__}: {e}"[:500]}
            r["seconds"] = round(time.monotonic() - t0, 1)
            result["checks"][name] = r
            (out / "gpu_small_checks.json").write_text(json.dumps(result, indent=2) + "\n")  # kept if time runs out
    result["seconds"] = round(time.monotonic() - t_all, 1)
    (out / "gpu_small_checks.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'check':<22}{'result':<20}{'s':>6}  details")
    for name, r in result["checks"].items():
        details = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                            if k not in ("status", "seconds"))
        print(f"{name:<22}{r['status']:<20}{r['seconds']:>6}  {details[:160]}")
    failed = [n for n, r in result["checks"].items() if r["status"] == "fail"]
    print(f"{len(failed)} failed of {len(result['checks'])}; results: {out / 'gpu_small_checks.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
