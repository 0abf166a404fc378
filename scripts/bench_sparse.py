"""MLP activation sparsity and perplexity of the sparsity methods against the dense model, in one run.

    .venv/bin/python scripts/bench_sparse.py                      # builtin:smollm2-135m, writes runs/bench_sparse/
    .venv/bin/python scripts/bench_sparse.py --relufy-steps 50 --ppl-tokens 8192
    .venv/bin/python scripts/bench_sparse.py --model runs/quickstart/merged --tasks --relufy-eval-every 10

Variants: the dense base, TEAL at 40% and 50% on the MLP (`teal40`, `teal50`) and on the MLP and attention
(`teal40-attn`, `teal50-attn`: the inputs of q/k/v and o_proj thresholded too), CATS at 50%, ReLU-fication
after --relufy-steps recovery steps (and, for the curve, after 0 steps: the swap alone), and Deja Vu predictors over the dense SiLU model
(`dejavu`, label sparsity 0.5) and over the ReLU-fied model (`reluN-dejavu`: run `reluN` first or with it);
for these the predictors' held-out recall, precision and fraction predicted active are reported too. Each is made by `llmfast sparsify` (the same code
path, through its Python API) and then measured here: the MLP activation sparsity on held-out text (the
first --heldout-tokens of eval/text/persuasion.txt, inside the evaluated span), the perplexity on the first
--ppl-tokens of the same text (as `llmfast eval` computes it), and the wall time and peak memory of
sparsify. With --tasks, the three task accuracies of eval/tasks (first --task-limit rows each; give a fine-tuned
--model, such as the quickstart chain's merge, for them to mean something). With --relufy-eval-every N, the
ReLU-fication logs held-out KL, perplexity (inside 256-token windows) and MLP sparsity every N recovery steps:
the curve of sparsity and quality against recovery tokens, printed as a second table. With --conversations, every
method calibrates (and relufy distils) on those chats too, as --conversations-share of the windows. Prints a table and writes
results.json. Timings depend on the machine's load.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import bench_common

REPO = Path(__file__).resolve().parent.parent
TEXT = REPO / "eval" / "text" / "persuasion.txt"
TASKS = ("dates", "extract", "units")


def write_recipe(out: Path, name: str, model: str, method: str, config: dict, args: argparse.Namespace) -> Path:
    path = out / f"{name}.yaml"
    data = {"text": str(TEXT), "skip_tokens": args.skip_tokens, "calibration_tokens": args.calibration_tokens,
            "heldout_tokens": args.heldout_tokens, "window": args.window}
    if args.conversations:
        data.update(conversations=args.conversations, conversations_share=args.conversations_share or 0.5)
    path.write_text(json.dumps({"model": model, "sparsify": {"method": method, "config": config}, "data": data,
                                "dtype": "float32", "output": str(out / name)}))  # JSON is YAML
    return path


def measure(model_dir: Path, args: argparse.Namespace, heldout: dict | None) -> dict:
    import torch

    from llmfast.evaluate import perplexity, task_accuracy
    from llmfast.models import load_model, load_tokenizer
    from llmfast.calibration import windows
    from llmfast.sparse.measure import measure_sparsity

    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    text = TEXT.read_text(encoding="utf-8")
    if heldout is None:  # the dense model: measured here the way sparsify measures its artifacts
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
        heldout = measure_sparsity(model, windows(ids[: args.heldout_tokens], args.window, "held-out"))
    t0 = time.perf_counter()
    with torch.inference_mode():
        ppl = perplexity(model, tok, text, args.context, args.stride, args.ppl_tokens)
    ppl_seconds = round(time.perf_counter() - t0, 1)
    tasks = {}
    for name in TASKS if args.tasks else ():
        with torch.inference_mode():
            summary, _ = task_accuracy(model, tok, name, REPO / "eval" / "tasks" / name / "test.jsonl",
                                       args.task_limit, 48, 16)
        tasks[name] = summary["accuracy"]
    return {**tasks, "mlp_sparsity": heldout["down_in"]["mean"], "mlp_sparsity_per_layer": heldout["down_in"]["per_layer"],
            "mlp_input_sparsity": heldout["mlp_in"]["mean"],
            **{f"{site}_sparsity": heldout[site]["mean"] for site in ("attn_in", "o_in") if site in heldout},
            "ppl": ppl["ppl"], "ppl_tokens": ppl["tokens"],
            "ppl_seconds": ppl_seconds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--out", default="runs/bench_sparse")
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--skip-tokens", type=int, default=16384)
    ap.add_argument("--calibration-tokens", type=int, default=4096)
    ap.add_argument("--heldout-tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--relufy-steps", type=int, default=20)
    ap.add_argument("--relufy-batch", type=int, default=2)
    ap.add_argument("--relufy-lr", type=float, default=5e-5)
    ap.add_argument("--dejavu-rank", type=int, default=64)
    ap.add_argument("--dejavu-steps", type=int, default=300)
    ap.add_argument("--relufy-eval-every", type=int, default=None,
                    help="held-out KL, perplexity and sparsity every N recovery steps (the curve)")
    ap.add_argument("--tasks", action="store_true", help="measure the three task accuracies too")
    ap.add_argument("--task-limit", type=int, default=100)
    ap.add_argument("--conversations", nargs="*", default=[],
                    help="chat JSONL (the fine-tunes' train.jsonl) that every method calibrates / relufy distils on "
                         "as --conversations-share of the windows (data.conversations)")
    ap.add_argument("--conversations-share", type=float, default=None, help="default 0.5")
    ap.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    ap.add_argument("--force", action="store_true",
                    help="run into an --out that has a results.json already (its artifacts are remade, it is replaced)")
    args = ap.parse_args()
    # The variants' artifacts are remade with `sparsify --overwrite` and results.json replaced: only when asked.
    bench_common.check_output(Path(args.out) / "results.json", args.force, "--out")
    if args.conversations_share is not None and not args.conversations:
        ap.error("--conversations-share needs --conversations FILE...")

    import torch

    from llmfast.bench.lineage import compression
    from llmfast.models import resolve_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base_dir = resolve_model(args.model)
    relufy = {"batch_size": args.relufy_batch, "lr": args.relufy_lr, "log_every": 1,
              **({"eval_every": args.relufy_eval_every} if args.relufy_eval_every else {})}
    dejavu = {"rank": args.dejavu_rank, "steps": args.dejavu_steps}
    relu = f"relu{args.relufy_steps}"
    attn = {"sites": ["mlp", "attention"]}
    variants = [("base", None, None), ("teal40", "teal", {"target": 0.4}), ("teal50", "teal", {"target": 0.5}),
                ("teal40-attn", "teal", {"target": 0.4, **attn}), ("teal50-attn", "teal", {"target": 0.5, **attn}),
                ("cats50", "cats", {"target": 0.5}), ("relu0", "relufy", {**relufy, "steps": 0}),
                (relu, "relufy", {**relufy, "steps": args.relufy_steps}), ("dejavu", "dejavu", dejavu),
                (f"{relu}-dejavu", "dejavu", dejavu)]
    source = {f"{relu}-dejavu": str(out / relu)}  # made from the ReLU-fied variant, not the base
    rows = []
    for name, method, config in variants:
        if args.only and name not in args.only:
            continue
        print(f"== {name}", file=sys.stderr, flush=True)
        row: dict = {"variant": name, "method": method, "config": config}
        if method is None:
            row.update(measure(base_dir, args, None))
        else:
            # A process of its own, so its peak memory is its own.
            path = write_recipe(out, name, source.get(name, args.model), method, config, args)
            subprocess.run([sys.executable, "-m", "llmfast.cli", "sparsify", str(path), "--overwrite"], check=True)
            metrics = json.loads((out / name / "llmfast.json").read_text())["metrics"]
            row.update({"sparsify_seconds": metrics["wall_seconds"], "peak_memory_gib": metrics["peak_memory_gib"],
                        "heldout_kl": metrics.get("heldout_kl"), "train_tokens": metrics.get("train_tokens")})
            if "predictors" in metrics:  # dejavu: mean, min and max over layers on the held-out text
                row["predictors"] = {k: {s: v[s] for s in ("mean", "min", "max")}
                                     for k, v in metrics["predictors"].items()}
            row.update(measure(out / name, args, metrics["heldout_sparsity"]))
            curve = (compression(out / name) or {}).get("curve")  # what bench run's report shows of it
            if curve:
                row["curve"] = curve
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("mlp_sparsity_per_layer", "curve")}),
              file=sys.stderr)
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "model": args.model,
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "threads": torch.get_num_threads(), "torch": torch.__version__},
              "command": " ".join(sys.argv), "settings": vars(args), "rows": rows}
    bench_common.write_json(out / "results.json", result, args.force, None)  # quality figures: provenance, no load
    base_ppl = next((r["ppl"] for r in rows if r["variant"] == "base"), None)
    print(f"{'variant':<14} {'MLP sparsity':>12} {'MLP-input sp.':>13} {'qkv-in sp.':>10} {'o-in sp.':>8} {'ppl':>8} "
          f"{'vs base':>8} {'sparsify s':>10} {'recall':>7} {'precision':>9} {'active':>7}"
          + "".join(f" {t:>7}" for t in TASKS if args.tasks))
    for r in rows:
        rel = f"{r['ppl'] / base_ppl - 1:+.1%}" if base_ppl else ""
        pred = [f"{r['predictors'][k]['mean']:.1%}" for k in ("recall", "precision", "predicted_active")
                ] if "predictors" in r else ["", "", ""]
        attn = [f"{r[k]:.1%}" if k in r else "" for k in ("attn_in_sparsity", "o_in_sparsity")]
        print(f"{r['variant']:<14} {r['mlp_sparsity']:>12.1%} {r['mlp_input_sparsity']:>13.1%} {attn[0]:>10} "
              f"{attn[1]:>8} {r['ppl']:>8.2f} "
              f"{rel:>8} {r.get('sparsify_seconds', ''):>10} {pred[0]:>7} {pred[1]:>9} {pred[2]:>7}"
              + "".join(f" {r[t]:>7.0%}" for t in TASKS if args.tasks))
    for r in rows:
        if r.get("curve"):
            print(f"\n{r['variant']}: held-out curve (perplexity inside {args.window}-token windows)")
            print(f"{'step':>6} {'tokens':>8} {'MLP sparsity':>12} {'KL':>8} {'ppl':>9} {'source ppl':>10}")
            for e in r["curve"]:
                print(f"{e['step']:>6} {e['tokens']:>8} {e['heldout_sparsity']:>12.1%} {e['heldout_kl']:>8.4f} "
                      f"{e['heldout_ppl']:>9.2f} {e['teacher_heldout_ppl']:>10.2f}")
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
