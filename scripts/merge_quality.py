#!/usr/bin/env python
"""Quality of merged task adapters: accuracy on both tasks and perplexity, per method and per single adapter.

Merges two task adapters (default: dates and units, on the built-in model) with each method into
runs/merge-quality/<method>, then runs `llmfast eval` on both tasks (limit N) with perplexity, one
evaluation at a time under `nice`. Each single adapter's exported model is evaluated the same way.
Finished steps are skipped, so an interrupted run continues. Prints a table and writes
runs/merge-quality/summary.json.

    python scripts/merge_quality.py                    # all methods, 100 examples per task
    python scripts/merge_quality.py --methods ties,task_arithmetic --limit 50
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import bench_common

REPO = Path(__file__).resolve().parent.parent

# Parameters per method: weight 1 for each task vector; density 0.5 where the method trims or drops.
METHODS: dict[str, tuple[dict, dict | None]] = {
    "ties": ({"weight": 1.0, "density": 0.5}, {"normalize": True}),
    "task_arithmetic": ({"weight": 1.0}, None),
    "linear": ({"weight": 1.0}, {"weight": 0.0}),  # the base (added by mergekit semantics) gets weight 0
    "dare_ties": ({"weight": 1.0, "density": 0.5}, None),
    "dare_linear": ({"weight": 1.0, "density": 0.5}, None),
    "magnitude_prune": ({"weight": 1.0, "density": 0.5}, None),
}


def run(cmd: list[str], log: Path) -> None:
    print("$", " ".join(cmd), flush=True)
    with open(log, "w") as f:
        rc = subprocess.run(["nice", "-n", "10"] + cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if rc != 0:
        raise SystemExit(f"failed ({rc}); see {log}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs=2, default=["dates", "units"])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--out", default="runs/merge-quality")
    ap.add_argument("--skip-singles", action="store_true")
    args = ap.parse_args()

    import yaml

    out = REPO / args.out
    (out / "eval").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    exe = str(Path(sys.executable).parent / "llmfast")
    tasks_set = "[" + ", ".join(f"{{name: {t}, path: eval/tasks/{t}/test.jsonl, limit: {args.limit}}}"
                                for t in args.tasks) + "]"
    candidates: list[tuple[str, Path]] = []
    if not args.skip_singles:
        candidates += [(f"single:{t}", REPO / f"runs/lora-{t}/merged") for t in args.tasks]
    for method in [m for m in args.methods.split(",") if m]:
        params, shared = METHODS[method]
        cfg = {"merge_method": method, "base_model": "builtin:smollm2-135m",
               "models": [{"model": f"runs/lora-{t}/adapter", "parameters": dict(params)} for t in args.tasks],
               "dtype": "float32"}
        if shared:
            cfg["parameters"] = shared
        cfg_path = out / f"{method}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        model_dir = out / method
        if not (model_dir / "llmfast.json").is_file():
            run([exe, "merge", str(cfg_path), str(model_dir), "--no-progress"], out / "logs" / f"merge-{method}.log")
        candidates.append((method, model_dir))
    summary = {}
    for name, model_dir in candidates:
        result = out / "eval" / f"{name.replace(':', '-')}.json"
        if not result.is_file():
            run([exe, "eval", "recipes/eval_smollm2.yaml", "--model", str(model_dir), "--output", str(result),
                 "--set", f"eval.tasks={tasks_set}", "--set", f"eval.perplexity.max_tokens={args.ppl_tokens}"],
                out / "logs" / f"eval-{name.replace(':', '-')}.log")
        r = json.loads(result.read_text())
        summary[name] = {"accuracy": {t: r["tasks"][t]["accuracy"] for t in args.tasks},
                         "perplexity": r["perplexity"]["ppl"] if r.get("perplexity") else None,
                         "seconds": r.get("seconds")}
    singles = {t: summary.get(f"single:{t}", {}).get("accuracy", {}).get(t) for t in args.tasks}
    print(f"\n{'model':<22} " + " ".join(f"{t + ' acc':>10} {'% single':>9}" for t in args.tasks) + f" {'ppl':>8}")
    for name, s in summary.items():
        cells = []
        for t in args.tasks:
            acc = s["accuracy"][t]
            rel = f"{100 * acc / singles[t]:.0f}%" if singles.get(t) else "-"
            cells.append(f"{100 * acc:>9.1f}% {rel:>9}")
        ppl = f"{s['perplexity']:.3f}" if s["perplexity"] else "-"
        print(f"{name:<22} " + " ".join(cells) + f" {ppl:>8}")
    # The summary is this script's own, remade from its resumable steps in its own folder: replacing it is the
    # point of a rerun (force=True). Quality, not timings: provenance, no load record.
    bench_common.write_json(out / "summary.json", {"tasks": args.tasks, "limit": args.limit, "results": summary},
                            True, None)
    print(f"\nsummary: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
