"""W4 (AutoRound int4) of the base and of a fine-tuned merged model, by group size, rounding and tuning.

    .venv/bin/python scripts/bench_w4.py --merged runs/quickstart/merged                    # RTN table
    .venv/bin/python scripts/bench_w4.py --merged runs/quickstart/merged --reuse \\
        --tuned merged:g64:iters=50,nsamples=32,batch_size=4,lr=0.005 --tasks-for merged

For each model (--base, --merged) and each group size (--groups) and rounding (--sym), `llmfast quantize` runs in
a child process (round to nearest, `iters: 0`), so the artifact's llmfast.json holds that process's wall time and
peak RSS; a group size the shapes cannot take is refused by llmfast (its one-line error is recorded). --tuned
adds AutoRound-tuned variants: MODEL:gGROUP[:asym]:KEY=VALUE,... with any w4 setting, and conv=SHARE to calibrate
on the --conversations files (data.conversations) as that share of the windows. Then every model and
artifact is evaluated in this process: perplexity on the first --ppl-tokens of the book (context 1024, stride
512: what `llmfast eval` computes with those settings) and, for the models named by --tasks-for, the three task
accuracies of eval/tasks (first --task-limit rows each). Calibration text comes from tokens --skip-tokens on;
the script refuses a perplexity span that reaches it and checks, on the decoded text, that no calibration window
occurs in the evaluated span. Prints a table, writes runs/bench/w4.json. Quantize timings depend on the machine's
load: the load average before and after each quantize is recorded beside it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import bench_common

REPO = Path(__file__).resolve().parent.parent
TEXT = REPO / "eval" / "text" / "persuasion.txt"
TASKS = ("dates", "extract", "units")  # the merged model was tuned on the first two
LLMFAST = [sys.executable, "-m", "llmfast.cli"]


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_tuned(spec: str) -> tuple[str, str, dict[str, Any]]:
    """'merged:g64:iters=50,nsamples=32' -> ('merged', 'merged-g64-sym-it50-n32...', {group_size: 64, ...})."""
    model, group, *rest = spec.split(":")
    quant: dict[str, Any] = {"group_size": int(group.removeprefix("g")), "sym": "asym" not in rest}
    for kv in (kv for part in rest if "=" in part for kv in part.split(",")):
        key, _, val = kv.partition("=")
        quant[key] = _value(val)
    short = {"iters": "it", "nsamples": "n", "batch_size": "b", "lr": "lr", "optimized_rtn": "opt", "conv": "conv"}
    tag = "-".join(short.get(k, k) if v is True else f"{short.get(k, k)}{v}"
                   for k, v in quant.items() if k not in ("group_size", "sym"))
    return model, f"{model}-g{quant['group_size']}-{'sym' if quant['sym'] else 'asym'}-{tag or 'rtn'}", quant


def quantize(src: str, name: str, quant: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """`llmfast quantize` in a child process; the artifact's metrics, or the refusal's one line."""
    quant = dict(quant)
    share = quant.pop("conv", None)  # data.conversations_share: the --conversations files mixed into calibration
    if share is not None and not args.conversations:
        raise SystemExit(f"{name}: conv=SHARE needs --conversations FILE...")
    out = args.work / name
    sidecar = args.work / f"{name}.bench.json"
    if args.reuse and (out / "llmfast.json").is_file():
        manifest = json.loads((out / "llmfast.json").read_text())
        same_data = (manifest["recipe"].get("data") or {}).get("conversations", []) == (
            [str(p) for p in args.conversations] if share is not None else [])
        if manifest["quantization"]["config"].items() >= quant.items() and same_data:
            print(f"reusing {out}", file=sys.stderr)
            extra = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
            return {"path": str(out), **manifest["metrics"], **extra, "reused": True}
    recipe = {"model": src, "quantization": {"method": "w4", **quant}, "dtype": "float32", "output": str(out),
              "data": {"text": str(TEXT), "skip_tokens": args.skip_tokens,
                       "calibration_tokens": args.calibration_tokens, "window": args.window}}
    if share is not None:
        recipe["data"].update(conversations=[str(p) for p in args.conversations], conversations_share=share)
    args.work.mkdir(parents=True, exist_ok=True)
    path = args.work / f"{name}.yaml"
    path.write_text(json.dumps(recipe, indent=1))
    while Path("/tmp/quiet").exists():  # someone is timing things on this machine
        time.sleep(30)
    before = _load()
    print(f"+ llmfast quantize {path} (load {before})", file=sys.stderr)
    with open(args.work / f"{name}.log", "w") as log:
        rc = subprocess.run([*LLMFAST, "quantize", str(path), "--overwrite"], stdout=log, stderr=subprocess.STDOUT,
                            cwd=REPO).returncode
    extra = {"load_before": before, "load_after": _load()}
    if rc != 0:
        lines = (args.work / f"{name}.log").read_text().strip().splitlines()
        return {"refused": lines[-1] if lines else f"exit {rc}", **extra}
    sidecar.write_text(json.dumps(extra))
    return {"path": str(out), **json.loads((out / "llmfast.json").read_text())["metrics"], **extra}


def check_no_overlap(tok: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The spans in tokens, and the decoded check that no calibration window text occurs in the evaluated text."""
    from llmfast.calibration import after_eval_span, text_ids, windows

    ids = text_ids(tok, TEXT)
    evaluated = tok.decode(ids[: args.ppl_tokens])
    rows = windows(after_eval_span(ids, args.skip_tokens, args.calibration_tokens, str(TEXT), "calibration"),
                   args.window, "calibration")
    found = [i for i, r in enumerate(rows) if tok.decode(r[8:-8]).strip() in evaluated]
    if found:
        raise SystemExit(f"calibration windows {found} occur in the evaluated text")
    return {"evaluated_tokens": [0, args.ppl_tokens], "calibration_tokens": [args.skip_tokens,
            args.skip_tokens + args.calibration_tokens], "book_tokens": int(ids.numel()),
            "windows_checked": int(rows.shape[0])}


def measure(path: str, tasks: bool, tok: Any, args: argparse.Namespace) -> dict[str, Any]:
    from llmfast.bench.lineage import model_size
    from llmfast.evaluate import perplexity, task_accuracy
    from llmfast.models import load_model, resolve_model

    t0 = time.perf_counter()
    src = Path(resolve_model(path))
    model = load_model(src)
    row: dict[str, Any] = {**model_size(src)}
    ppl = perplexity(model, tok, TEXT.read_text(encoding="utf-8"), 1024, 512, args.ppl_tokens)
    row.update(ppl=ppl["ppl"], ppl_tokens=ppl["tokens"])
    if tasks:
        for name in TASKS:
            summary, _ = task_accuracy(model, tok, name, REPO / "eval" / "tasks" / name / "test.jsonl",
                                       args.task_limit, 48, 16)
            row[name] = summary["accuracy"]
            row[f"{name}_n"] = summary["n"]
    row["measure_seconds"] = round(time.perf_counter() - t0, 1)
    row["measure_load"] = _load()
    return row


def _cell(v: Any, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="builtin:smollm2-135m")
    ap.add_argument("--merged", default="runs/quickstart/merged", help="a fine-tuned merged model directory")
    ap.add_argument("--models", nargs="*", default=["base", "merged"], help="which of base/merged get RTN rows")
    ap.add_argument("--groups", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--sym", nargs="+", default=["sym", "asym"], choices=["sym", "asym"])
    ap.add_argument("--tuned", action="append", default=[], help="MODEL:gGROUP[:asym]:KEY=VALUE,... (repeatable)")
    ap.add_argument("--tasks-for", nargs="*", default=["merged"],
                    help="rows whose three task accuracies are measured: a model (all its rows), or a row name")
    ap.add_argument("--task-limit", type=int, default=100)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--skip-tokens", type=int, default=16384)
    ap.add_argument("--calibration-tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--reuse", action="store_true",
                    help="keep artifacts and measurements of an earlier run with the same settings")
    ap.add_argument("--conversations", type=Path, nargs="*", default=[],
                    help="chat JSONL mixed into calibration by a --tuned variant's conv=SHARE (e.g. the fine-tunes' "
                         "train.jsonl; never eval/tasks, which the script scores)")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench" / "w4")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "w4.json")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = ap.parse_args()
    bench_common.check_output(args.out, args.force, "--out")
    if args.ppl_tokens > args.skip_tokens:
        raise SystemExit(f"--ppl-tokens must be at most --skip-tokens ({args.skip_tokens}): calibration starts there")

    from llmfast.models import load_tokenizer, resolve_model

    t_start = time.perf_counter()
    sources = {"base": args.base, "merged": args.merged}
    tok = load_tokenizer(resolve_model(args.base))
    spans = check_no_overlap(tok, args)
    plan: list[tuple[str, str, dict[str, Any]]] = []
    for model in args.models:
        for g in args.groups:
            for s in args.sym:
                plan.append((model, f"{model}-g{g}-{s}-rtn", {"group_size": g, "sym": s == "sym", "iters": 0}))
    plan += [parse_tuned(spec) for spec in args.tuned]

    rows: dict[str, dict[str, Any]] = {}
    for model in dict.fromkeys([m for m, _, _ in plan]):
        rows[f"{model}-fp32"] = {"model": model, "quantization": None, "path": sources[model]}
    for model, name, quant in plan:
        rows[name] = {"model": model, "quantization": quant, **quantize(sources[model], name, quant, args)}
    for name, row in rows.items():
        if "refused" in row:
            continue
        tasks = row["model"] in args.tasks_for or name in args.tasks_for
        key = {"path": str(row["path"]), "ppl_tokens": args.ppl_tokens, "task_limit": args.task_limit if tasks else 0}
        cached = args.work / f"{name}.measure.json"
        if args.reuse and cached.is_file() and json.loads(cached.read_text())["key"] == key:
            print(f"reusing the measurement of {name}", file=sys.stderr)
            row.update(json.loads(cached.read_text())["row"])
        else:
            print(f"measuring {name}", file=sys.stderr)
            row.update(measure(row["path"], tasks, tok, args))
            args.work.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps({"key": key, "row": {k: v for k, v in row.items() if k not in
                                                              ("model", "quantization", "path")}}))
        print(f"  ppl {row['ppl']:.2f}", file=sys.stderr)

    print(f"\nperplexity on the first {args.ppl_tokens} tokens of the book (context 1024, stride 512); tasks: first "
          f"{args.task_limit} rows; calibration from token {args.skip_tokens} ({args.calibration_tokens} tokens)")
    head = ["variant", "ppl", "vs fp32", *TASKS, "linear MiB", "file MiB", "quantize s", "peak RSS GiB", "load"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, r in rows.items():
        if "refused" in r:
            print(f"| {name} | refused: {r['refused']} |")
            continue
        ref = rows[f"{r['model']}-fp32"]["ppl"]
        cells = [name, f"{r['ppl']:.2f}", "" if r["quantization"] is None else f"{r['ppl'] / ref - 1:+.1%}",
                 *(_cell(r.get(t), ".0%") for t in TASKS), f"{r['linear_weight_bytes'] / 2**20:.1f}",
                 f"{r['file_bytes'] / 2**20:.1f}", _cell(r.get("wall_seconds"), ".0f"),
                 _cell(r.get("peak_rss_gib"), ".2f"), " / ".join(str(x[0]) for x in
                                                                  (r.get("load_before"), r.get("load_after")) if x)]
        print("| " + " | ".join(cells) + " |")
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "spans": spans,
              "args": {k: str(v) for k, v in vars(args).items()},
              "wall_seconds": round(time.perf_counter() - t_start, 1), "variants": rows}
    # Quality figures (the wall time is context only): provenance, no load check.
    print(f"wrote {bench_common.write_json(args.out, result, args.force, None)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
