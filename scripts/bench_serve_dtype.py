#!/usr/bin/env python
"""Decode speed and quality of a W4 (AutoRound int4) artifact served by vLLM on this CPU, by the dtype vLLM
runs it in, against the float32 model it was quantized from, on the same machine in the same run.

    python scripts/bench_serve_dtype.py --fp32 runs/quickstart/merged --w4 runs/quickstart/int4

vLLM runs the int4 format only in bfloat16 or float16 (`llmfast.quant.w4` picks bfloat16); on a CPU without
AVX512-BF16 bfloat16 arithmetic is emulated, so float16 may be the faster of the two there. Each server
(the fp32 model in each --base-dtypes, float32 by default, ratios against the first; the W4 artifact in each
--dtypes) is started --rounds times, in alternating order, and measured
by `llmfast bench serve` (random prompts, ignore_eos) at each --concurrency after one warm-up batch; the
speed is the median over rounds. Quality: perplexity of the book's first --ppl-tokens in windows of --window
tokens from the server's own prompt log-probabilities (vLLM's `prompt_logprobs`), so what is scored is what
is served, in that dtype. Prints a table with the spread of the rounds ((max - min) / median, the largest of the
row's concurrencies), writes JSON (--out; bench_common: provenance, the load average, --force to replace it, checked
before any server starts).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import bench_common

REPO = Path(__file__).resolve().parent.parent
TEXT = REPO / "eval" / "text" / "persuasion.txt"


def served_perplexity(base_url: str, name: str, ids: list[int], window: int) -> float:
    """exp(mean NLL) of `ids` in non-overlapping windows, from the server's prompt log-probabilities (the first
    token of each window has none: it is not scored)."""
    nll, n = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window]
        body = json.dumps({"model": name, "prompt": chunk, "max_tokens": 1, "temperature": 0,
                           "prompt_logprobs": 0}).encode()
        req = urllib.request.Request(f"{base_url}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            scores = json.load(r)["choices"][0]["prompt_logprobs"]
        for tok, entry in zip(chunk[1:], scores[1:]):
            nll -= entry[str(tok)]["logprob"]
            n += 1
    return math.exp(nll / n)


def load(base_url: str, name: str, tokenizer: str, concurrency: int, prompts: int, a: argparse.Namespace,
         tmp: Path) -> dict:
    out = tmp / f"c{concurrency}.json"
    cmd = [sys.executable, "-m", "llmfast.cli", "bench", "serve", "--base-url", base_url, "--model", name,
           "--tokenizer", tokenizer, "--dataset-name", "random", "--num-prompts", str(prompts),
           "--random-input-len", str(a.input_len), "--random-output-len", str(a.output_len),
           "--max-concurrency", str(concurrency), "--request-rate", "inf", "--ignore-eos", "--seed", "0",
           "--temperature", "0", "--num-warmups", str(concurrency), "--save-result", "--result-dir", str(tmp),
           "--result-filename", out.name]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        sys.exit(f"bench serve failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp32", required=True, help="the float32 model (e.g. the merge the W4 artifact came from)")
    ap.add_argument("--w4", required=True, help="a `llmfast quantize` w4 artifact")
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"], help="dtypes the W4 artifact is served in")
    ap.add_argument("--base-dtypes", nargs="+", default=["float32"],
                    help="dtypes the --fp32 model is served in; ratios are against the first (e.g. float32 bfloat16 "
                         "on a CPU with AVX512-BF16, where llmfast serves bfloat16 by default)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompts-per-concurrency", type=int, default=2, help="prompts = this x concurrency, at least 8")
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--ppl-tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=512)
    bench_common.add_output_args(ap, "runs/bench/serve_dtype.json", "--out")
    a = ap.parse_args()
    bench_common.check_output(a.out, a.force, "--out")
    state = bench_common.machine_state()
    if len(set(a.base_dtypes)) < len(a.base_dtypes) or len(set(a.dtypes)) < len(a.dtypes):
        ap.error("--base-dtypes and --dtypes: name each dtype once")

    sys.path.insert(0, str(REPO))
    from llmfast.models import load_tokenizer, resolve_model
    from llmfast.serve.server import VllmServer, prepare_spec

    configs = [(f"fp32 {d}", a.fp32, d) for d in a.base_dtypes] + [(f"w4 {d}", a.w4, d) for d in a.dtypes]
    tok = load_tokenizer(resolve_model(a.fp32))
    ids = tok(TEXT.read_text(encoding="utf-8"))["input_ids"][: a.ppl_tokens]
    rows: dict[str, dict] = {label: {"model": str(m), "dtype": d, "rounds": []} for label, m, d in configs}
    for r in range(a.rounds):
        for label, model, dtype in bench_common.order(configs, r):
            spec = prepare_spec(model, port=0, served_name="model", dtype=dtype)
            tmp = Path(tempfile.mkdtemp(prefix="bench-serve-dtype-"))
            with VllmServer(spec, log_path=tmp / "server.log") as server:
                point = {c: load(server.base_url, "model", str(spec.model), c,
                                 max(8, a.prompts_per_concurrency * c), a, tmp) for c in a.concurrency}
                if r == 0:  # the scores do not change between rounds (greedy, same server build)
                    rows[label]["ppl"] = served_perplexity(server.base_url, "model", ids, a.window)
            shutil.rmtree(tmp)  # its results and server log: kept only where a step failed
            rows[label]["rounds"].append({str(c): {k: p[k] for k in ("output_throughput", "median_tpot_ms",
                                                                     "median_ttft_ms", "completed", "failed")}
                                          for c, p in point.items()})
            print(f"round {r + 1}/{a.rounds}: {label} done", file=sys.stderr, flush=True)
    base = rows[configs[0][0]]
    for row in rows.values():
        stats = {str(c): bench_common.spread(x[str(c)]["output_throughput"] for x in row["rounds"])
                 for c in a.concurrency}
        row["tok_s"] = {c: v["median"] for c, v in stats.items()}
        row["tok_s_spread"] = stats
    print("\n| served | dtype | ppl | vs fp32 | " + " | ".join(f"tok/s c={c} | x fp32" for c in a.concurrency)
          + " | spread |")
    print("|---|---|---|---|" + "---|---|" * len(a.concurrency) + "---|")
    for label, row in rows.items():
        cells = [label.split()[0], row["dtype"], f"{row['ppl']:.2f}",
                 "" if row is base else f"{row['ppl'] / base['ppl'] - 1:+.1%}"]
        for c in a.concurrency:
            v = row["tok_s"][str(c)]
            cells += [f"{v:.1f}", "" if row is base else f"{v / base['tok_s'][str(c)]:.2f}x"]
        cells.append(bench_common.pct(bench_common.largest(x['spread'] for x in row['tok_s_spread'].values())))
        print("| " + " | ".join(cells) + " |")
    print("x fp32: median tok/s over the rounds against the first fp32 row's; spread: (max - min) / median of the "
          "rounds, the largest over the concurrencies (a ratio closer to 1 than the two rows' spreads is noise)")
    result = {"args": {k: str(v) for k, v in vars(a).items()}, "rows": rows}
    print(f"wrote {bench_common.write_json(a.out, result, a.force, state, used=('vllm',))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
