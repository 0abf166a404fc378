"""1.58-bit QAT of the built-in model at a GPU's token budget: `llmfast quantize` (method bitnet) on a lent H100/H200.

    python3 scripts/gpu_bitnet_qat.py --model SmolLM2-135M-Instruct.Q4_1.gguf --seconds 200 --lrs 3e-3,6e-3
    python3 scripts/gpu_bitnet_qat.py --model ... --smoke        # every step, tiny, on the CPU (minutes)
    python3 scripts/gpu_bitnet_qat.py --rebuild DIR --to OUT    # here: the artifact from what came back (step 4)

On the lent GPU (device tool): a call carries at most 64 MiB, the GGUF is 98 MB, so it goes in two halves, one
per call, while the machine stays warm (30 s idle). Here, once: `echo /.whl/ >> .git/info/exclude`, download
pydantic, pydantic-core, annotated-types, typing-inspection and gguf wheels for Python 3.12 into .whl (see
scripts/gpu_checks.sh), and split the file into ignored folders:
    G=$(python -c "from llmfast.models import BUILTINS, builtin_gguf_path as p; print(p(BUILTINS['smollm2-135m']))")
    mkdir -p .gpu_a .gpu_b; head -c 49181216 $G > .gpu_a/part; tail -c +49181217 $G > .gpu_b/part
Call 1 (carry .whl .gpu_a): install the wheels into /tmp/site, `cp .gpu_a/part /tmp/part-a`, run the kernel checks.
Call 2 at once (carry .whl .gpu_b): `cat /tmp/part-a .gpu_b/part > /tmp/SmolLM2-135M-Instruct.Q4_1.gguf`, check
its sha256 (b179c952...db53), then this script with --model that file. 2026-12-04's runs: BENCHMARKS.md.

What it does, in one run (issue on quantization: "a GPU script runs it longer and the result is recorded with its
token count"):
1. converts the GGUF as `llmfast models` does (the 98 MB file travels to the GPU machine in two halves: see
   BENCHMARKS.md), then times a few distillation steps of the real student and teacher at the chosen batch;
2. from that, picks `qat_steps` so that one `llmfast quantize` per learning rate, all running at once on the GPU,
   fits in --seconds of training, and runs them (each a plain recipe, written beside its output: bitnet,
   the shipped text after the evaluated span plus --teacher-samples rows the model writes itself);
3. scores the base model and each ternary artifact as `llmfast eval` does (perplexity, first 16,384 tokens of the
   book, context 1024, stride 512), loading the artifact both with llmfast's runtime and with transformers alone;
4. writes $OUT/gpu_qat.json, each run's train_log, and the best artifact's ternary weights without the (frozen,
   unchanged) embeddings in shards of at most 15 MiB, so the model can be rebuilt on a CPU machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from gpu_runs import distill_step_seconds, run_at_once  # noqa: E402  (scripts/, beside this file)
TEXT = ROOT / "eval" / "text" / "persuasion.txt"
SKIP = 16384  # the span `llmfast eval` scores; training uses only what follows
SHARD = 15 * 2**20


def probe_step_seconds(model_dir: Path, batch: int, window: int, device: str) -> float:
    """Median seconds of one distillation step (student forward/backward, teacher forward, AdamW) after warm-up."""
    from transformers import AutoModelForCausalLM

    from llmfast.quant.bitnet.qat import prepare_student

    student = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    prepare_student(student)
    seconds = distill_step_seconds(student, teacher, batch, window, device)
    del student, teacher
    if device == "cuda":
        torch.cuda.empty_cache()
    return seconds


def recipe_text(model_dir: Path, out: Path, *, steps: int, lr: float, args: argparse.Namespace, text_tokens: int) -> str:
    train = (text_tokens - SKIP) // args.window * args.window
    q = {"method": "bitnet", "qat_steps": steps, "batch_size": args.batch_size, "lr": lr,
         "lambda_warmup": args.lambda_warmup, "teacher_samples": args.teacher_samples, "save_every": 10**9,
         "eval_every": max(1, steps // args.curve_points), "device": args.device}
    lines = [f"model: {model_dir}", "quantization:"] + [f"  {k}: {v}" for k, v in q.items()]
    lines += ["data:", f"  text: {TEXT}", f"  skip_tokens: {SKIP}", f"  calibration_tokens: {train}",
              f"  window: {args.window}", "dtype: float32", f"output: {out}"]
    return "\n".join(lines) + "\n"


def perplexities(path: Path, tokenizer, device: str, max_tokens: int) -> dict[str, float]:
    """`llmfast eval`'s perplexity of `path` through llmfast's loader and, for a BitNet artifact, transformers'."""
    from transformers import AutoModelForCausalLM

    from llmfast.evaluate import perplexity
    from llmfast.models import load_model

    text = TEXT.read_text()
    out = {}
    loaders = {"llmfast": lambda: load_model(path)}
    if "quantization_config" in json.loads((path / "config.json").read_text()):  # the ternary artifact, not the base
        loaders["transformers"] = lambda: AutoModelForCausalLM.from_pretrained(path).eval()
    for name, load in loaders.items():
        model = load().to(device)
        out[name] = round(perplexity(model, tokenizer, text, 1024, 512, max_tokens)["ppl"], 3)
        del model
    return out


def export_shards(artifact: Path, dest: Path) -> list[str]:
    """The artifact's tensors but the embeddings (frozen in QAT: the base model's) in files of at most SHARD bytes."""
    from safetensors.torch import load_file, save_file

    state = {k: v for k, v in load_file(str(artifact / "model.safetensors")).items() if "embed_tokens" not in k}
    names, shard, size = [], {}, 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shard and size + nbytes > SHARD:
            names.append(f"ternary-{len(names)}.safetensors")
            save_file(shard, str(dest / names[-1]))
            shard, size = {}, 0
        shard[key], size = state[key].contiguous(), size + nbytes
    names.append(f"ternary-{len(names)}.safetensors")
    save_file(shard, str(dest / names[-1]))
    return names


def rebuild(results: Path, to: Path, base_spec: str) -> Path:
    """The exported run's artifact, whole again: its shards, the base model's embeddings (QAT froze them), the base's
    tokenizer, the config it came back with and an llmfast.json recording the recipe and metrics of that run."""
    import yaml
    from safetensors.torch import load_file, save_file

    from llmfast.artifacts import atomic_dir, check_output, write_manifest
    from llmfast.models import load_tokenizer, resolve_model
    from llmfast.quant import parse_quantization

    result = json.loads((results / "gpu_qat.json").read_text())
    run = result["runs"][result["exported"]["run"]]
    base = resolve_model(base_spec)
    state: dict = {}
    for name in result["exported"]["files"]:
        state |= load_file(str(results / name))
    embed = {k: v for k, v in load_file(str(base / "model.safetensors")).items() if "embed_tokens" in k}
    if len(embed) != 1:
        raise SystemExit(f"{base}: expected one embedding tensor, found {sorted(embed)}")
    state |= embed
    recipe = yaml.safe_load(run["recipe"])
    spec = parse_quantization(recipe["quantization"])
    out = check_output(str(to), overwrite=False)
    with atomic_dir(out) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy2(results / "ternary-config.json", tmp / "config.json")
        if (base / "generation_config.json").is_file():
            shutil.copy2(base / "generation_config.json", tmp / "generation_config.json")
        load_tokenizer(base).save_pretrained(tmp)
        write_manifest(tmp, stage="quantize", parents=[base_spec], recipe=recipe,
                       metrics=run["metrics"] | {"rebuilt_from": str(results), "gpu": result["gpu"],
                                                 "gpu_eval_ppl": run["ppl"]}, quantization=spec.manifest())
    return out


def main() -> int:
    if "--rebuild" in sys.argv:
        ap = argparse.ArgumentParser(description="rebuild the exported ternary artifact on this machine")
        ap.add_argument("--rebuild", required=True, type=Path, help="the folder the GPU run's files came back to")
        ap.add_argument("--to", required=True, type=Path)
        ap.add_argument("--base", default="builtin:smollm2-135m", help="the model the GPU run quantized")
        a = ap.parse_args()
        print(rebuild(a.rebuild, a.to, a.base))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", "--gguf", dest="model", required=True,
                    help="the built-in model's GGUF file (any model spec llmfast takes)")
    ap.add_argument("--steps", type=int, default=None, help="QAT steps per run (default: from --seconds and the probe)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmfast-gpu-qat"), help="recipes, logs and artifacts")
    ap.add_argument("--seconds", type=float, default=200, help="training time for all runs together")
    ap.add_argument("--lrs", default="3e-3,6e-3", help="one run per learning rate, all at once (2026-12-04: 3e-3 "
                    "beat 1.5e-3 and 5e-4)")
    ap.add_argument("--lambda-warmup", type=float, default=0.25)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--teacher-samples", type=int, default=512)  # 2,048 rows took ~1.5 min of generation
    ap.add_argument("--curve-points", type=int, default=8)
    ap.add_argument("--eval-tokens", type=int, default=16384, help="`llmfast eval`'s default max_tokens")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_qat"))
    ap.add_argument("--smoke", action="store_true", help="tiny budget on the CPU: every step of the script")
    args = ap.parse_args()
    if args.smoke:
        args.device, args.batch_size, args.window, args.teacher_samples = "cpu", 2, 64, 4
        args.steps, args.curve_points, args.eval_tokens = args.steps or 4, 2, 1024
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA device: run with --smoke on a CPU", file=sys.stderr)
            return 2
        torch.backends.cuda.matmul.allow_tf32 = True  # this process's float32 passes (the perplexities below)
    from llmfast.models import load_tokenizer, resolve_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    result: dict = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu (smoke)",
                    "torch": torch.__version__, "command": " ".join(sys.argv),
                    "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}

    def save() -> None:
        (out / "gpu_qat.json").write_text(json.dumps(result, indent=2) + "\n")

    t0 = time.time()
    model_dir = resolve_model(args.model)
    tokenizer = load_tokenizer(model_dir)
    text_tokens = len(tokenizer(TEXT.read_text(), add_special_tokens=False).input_ids)
    result["convert_s"] = round(time.time() - t0, 1)
    step_s = probe_step_seconds(model_dir, args.batch_size, args.window, args.device)
    lrs = [float(x) for x in args.lrs.split(",")]
    steps = args.steps or max(4, int(args.seconds / (step_s * len(lrs))))  # the runs share the GPU
    tokens = steps * args.batch_size * args.window
    result |= {"probe_step_s": round(step_s, 4), "probe_tokens_per_s": round(args.batch_size * args.window / step_s),
               "qat_steps": steps, "train_tokens_per_run": tokens}
    print(f"one step alone {step_s * 1000:.0f} ms ({args.batch_size}x{args.window} tokens): {steps} steps "
          f"= {tokens:,} tokens per run, {len(lrs)} runs at once", flush=True)
    save()
    jobs = []
    for i, lr in enumerate(lrs):
        recipe = work / f"qat-{i}.yaml"
        recipe.write_text(recipe_text(model_dir, work / f"ternary-{i}", steps=steps, lr=lr, args=args,
                                      text_tokens=text_tokens))
        jobs.append((lr, recipe, work / f"qat-{i}.log"))
    runs = run_at_once("quantize", jobs)
    for i, run in enumerate(runs):
        if run["rc"] == 0:
            artifact = work / f"ternary-{i}"
            run["metrics"] = json.loads((artifact / "llmfast.json").read_text()).get("metrics", {})
            shutil.copy2(artifact / "train_log.jsonl", out / f"train_log-{i}.jsonl")
    result["runs"] = runs
    save()
    base = perplexities(model_dir, tokenizer, args.device, args.eval_tokens)["llmfast"]
    result["base_ppl"] = base
    best = None
    for i, run in enumerate(runs):
        if run["rc"] == 0:
            run["ppl"] = perplexities(work / f"ternary-{i}", tokenizer, args.device, args.eval_tokens)
            run["x_base"] = round(run["ppl"]["llmfast"] / base, 3)
            if best is None or run["ppl"]["llmfast"] < runs[best]["ppl"]["llmfast"]:
                best = i
    save()
    if best is not None:
        result["exported"] = {"run": best, "files": export_shards(work / f"ternary-{best}", out)}
        shutil.copy2(work / f"ternary-{best}" / "config.json", out / "ternary-config.json")
    save()
    print(f"\n{result['gpu']}: base perplexity {base} (first {args.eval_tokens} tokens, context 1024)")
    print("| lr | steps | tokens | wall s | held-out KL | ppl (llmfast) | ppl (transformers) | x base | peak GPU GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        m = run.get("metrics", {})
        p = run.get("ppl", {})
        print(f"| {run['lr']:g} | {steps} | {tokens:,} | {run['wall_s']} | {m.get('heldout_kl')} | "
              f"{p.get('llmfast')} | {p.get('transformers')} | {run.get('x_base')} | {m.get('peak_gpu_gib')} |")
    print(f"results: {out / 'gpu_qat.json'}")
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
