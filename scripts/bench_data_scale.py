"""Fine-tuning data at scale: what reading, encoding, packing and splitting N synthetic rows costs llmfast, and what
HF `datasets.map(batched=True)` tokenizing the same rows costs, in the same run.

    python scripts/bench_data_scale.py --rows 10000 50000 --shape chat text alpaca --json data_scale.json

Rows are short realistic turns (~150-300 tokens with SmolLM2's tokenizer), written to a temporary folder. Phases:
read (JSON Lines to rows), encode (rows to token ids and labels, the chat template rendered per turn), pack
(first-fit-decreasing bins), split (the held-out rows). Bytes a token is what the encoded examples hold once read
(tracemalloc, on the first 2,000 rows). The baseline is `datasets`' JSON loader and a batched map that renders and
tokenizes each row once (TRL's SFT preprocessing; it labels every token, where llmfast labels the answers only);
it runs offline, with its cache in the temporary folder (a fresh one every round, so no round reads another's).
Both sides run once untimed on a small file first (imports, the tokenizer's and the template's first calls), then
`--rounds` rounds in alternating order; the table shows each side's median total and the ratio of the medians with
the larger spread ((max - min) / median) of the two beside it. The JSON (bench_common) carries provenance and the
load average and is replaced only with --force (checked before anything runs).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import bench_common

_WORDS = ("the a model data train token answer question river city number small large quickly explain because "
          "however result value first second example python function list return error file line write read "
          "people world time year work day way thing man woman child life place").split()


def write_rows(path: Path, n: int, shape: str, seed: int = 0) -> None:
    r = random.Random(seed)

    def para(a: int, b: int) -> str:
        return " ".join(" ".join(r.choice(_WORDS) for _ in range(r.randint(6, 14))).capitalize() + "."
                        for _ in range(r.randint(a, b)))

    with path.open("w") as f:
        for _ in range(n):
            if shape == "chat":
                msgs = [{"role": "user", "content": para(2, 4)}, {"role": "assistant", "content": para(5, 11)}]
                if r.random() < 0.3:
                    msgs += [{"role": "user", "content": para(1, 2)}, {"role": "assistant", "content": para(1, 4)}]
                row = {"messages": msgs}
            elif shape == "text":
                row = {"text": para(12, 24)}
            else:
                row = {"instruction": para(1, 2), "input": para(0, 1), "output": para(5, 12)}
            f.write(json.dumps(row) + "\n")


def ours(path: Path, tok, max_length: int, pack_length: int) -> dict:
    from llmfast.data.chat import read_examples
    from llmfast.data.jsonl import read_rows
    from llmfast.data.packing import pack
    from llmfast.finetune.trainer import split_eval

    t0 = time.perf_counter()
    read_rows(path)  # the read alone (read_examples reads it again, so encode = its time less this)
    t1 = time.perf_counter()
    ex = read_examples(path, tok, max_length).examples
    t2 = time.perf_counter()
    bins = pack(ex, pack_length)
    t3 = time.perf_counter()
    split_eval(ex, 0.01, 0)
    t4 = time.perf_counter()
    tokens = sum(len(e) for e in ex)
    return {"read_s": t1 - t0, "encode_s": (t2 - t1) - (t1 - t0), "pack_s": t3 - t2, "split_s": t4 - t3,
            "total_s": (t2 - t1) + (t4 - t2), "tokens": tokens, "bins": len(bins)}


def bytes_per_token(path: Path, tok, max_length: int, rows: int = 2000) -> float:
    from llmfast.data.chat import read_examples

    head = path.with_name(f"head-{path.name}")
    with path.open() as f, head.open("w") as g:
        g.writelines(line for _, line in zip(range(rows), f))
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    ex = read_examples(head, tok, max_length).examples
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return held / sum(len(e) for e in ex)


def baseline(path: Path, tok, shape: str, cache: Path) -> dict:
    """`datasets`: load the JSON Lines, render each row to one string and tokenize it in batched maps."""
    import datasets

    datasets.disable_progress_bars()
    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache))
    t1 = time.perf_counter()

    def render(batch: dict) -> dict:
        if shape == "chat":
            return {"text": tok.apply_chat_template(batch["messages"], tokenize=False)}
        if shape == "alpaca":
            return {"text": [f"### Instruction:\n{i}\n{x}\n### Response:\n{o}"
                             for i, x, o in zip(batch["instruction"], batch["input"], batch["output"])]}
        return {"text": batch["text"]}

    ds = ds.map(render, batched=True, remove_columns=ds.column_names)
    ds = ds.map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
    t2 = time.perf_counter()
    return {"read_s": t1 - t0, "encode_s": t2 - t1, "total_s": t2 - t0,
            "tokens": sum(len(x) for x in ds["input_ids"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000])
    ap.add_argument("--shape", nargs="+", choices=["chat", "text", "alpaca"], default=["chat"])
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--pack-length", type=int, default=2048)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each side, alternating which goes first")
    bench_common.add_output_args(ap, "data_scale.json")
    args = ap.parse_args()
    bench_common.check_output(args.json, args.force)
    state = bench_common.machine_state()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from llmfast.models import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(args.model))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        caches = (Path(tmp) / f"hf-cache-{i}" for i in itertools.count())  # datasets would reuse a cached map
        for shape in args.shape:
            warm = Path(tmp) / f"warm-{shape}.jsonl"
            write_rows(warm, 100, shape, seed=1)
            ours(warm, tok, args.max_length, args.pack_length)  # warm-up: not timed
            if not args.no_baseline:
                baseline(warm, tok, shape, next(caches))
            for n in args.rows:
                path = Path(tmp) / f"{shape}-{n}.jsonl"
                write_rows(path, n, shape)
                sides = {"ours": lambda: ours(path, tok, args.max_length, args.pack_length)}
                if not args.no_baseline:
                    sides["datasets"] = lambda: baseline(path, tok, shape, next(caches))
                runs, order = bench_common.rounds(sides, args.rounds)
                got = {"shape": shape, "rows": n, "order": order, "runs": runs,
                       "ours": {**runs["ours"][0], "total_s": bench_common.spread(r["total_s"] for r in runs["ours"])},
                       "bytes_per_token": bytes_per_token(path, tok, args.max_length)}
                if not args.no_baseline:
                    got["datasets"] = {**runs["datasets"][0],
                                       "total_s": bench_common.spread(r["total_s"] for r in runs["datasets"])}
                    got["compare"] = bench_common.compare([r["total_s"] for r in runs["ours"]],
                                                          [r["total_s"] for r in runs["datasets"]])
                results.append(got)
                print(f"done {shape} {n}", file=sys.stderr, flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    head = (f"{'shape':7} {'rows':>8} {'tokens':>10} {'read s':>7} {'encode s':>8} {'pack s':>7} {'split s':>7} "
            f"{'B/token':>7} {'us/row':>7} {'datasets s':>10} {'ratio':>6} {'spread':>6}")
    print(head)
    for g in results:
        o, b, c = g["ours"], g.get("datasets"), g.get("compare")
        print(f"{g['shape']:7} {g['rows']:>8} {o['tokens']:>10} {o['read_s']:>7.2f} {o['encode_s']:>8.2f} "
              f"{o['pack_s']:>7.2f} {o['split_s']:>7.3f} {g['bytes_per_token']:>7.1f} "
              f"{1e6 * o['total_s']['median'] / g['rows']:>7.0f} "
              f"{b['total_s']['median'] if b else float('nan'):>10.2f} {c['ratio'] if c else float('nan'):>6.2f} "
              f"{bench_common.pct(c['noise'] if c else o['total_s']['spread']):>6}")
    print(f"phases: the first round's; totals and ratio (ours over datasets): medians of {args.rounds} alternating "
          "rounds; spread: the larger (max - min) / median of the two")
    print(f"peak RSS of the whole run: {peak:.0f} MiB")
    bench_common.write_json(args.json, {"results": results, "peak_rss_mib": peak, "rounds": args.rounds}, args.force,
                            state)


if __name__ == "__main__":
    main()
