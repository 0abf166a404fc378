"""Encoding many-turn chat rows: a row's texts are its prefixes (one pair a turn), read off one encoding of the last
text and a window a turn (llmfast/data/prefixes.py), against every prefix tokenized in full (what chat.py did before,
and still does where a tokenizer's encoding is not its backend's own), in the same run, on the same rows.

    python scripts/bench_chat_turns.py --turns 10 50 200 --rows 20 --json chat_turns.json

Rows are short realistic turns (a user question of 1-3 sentences, an answer of 1-6), a system prompt in a third of
them. Per-row time is the median over `--rows` rows, each encoded once by each path (the paths' order swapped every
other row, after one unrecorded warm-up row), both including the chat template's rendering of every prefix
(`render`, itself quadratic in the turns), with each path's spread over the rows; the ids and labels of the two
paths are compared row by row (the script stops if one differs). Each row's renders and the messages they render are
counted: two renders a reply, each of the conversation up to it (a template reads the whole list it is given, as
Qwen3's finds the last user turn in it, so a prefix's rendering is known only by rendering it). The JSON
(bench_common: provenance, load average, never replaced without --force) is checked before anything runs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import bench_common

_WORDS = ("the a model data train token answer question river city number small large quickly explain because "
          "however result value first second example python function list return error file line write read "
          "people world time year 3 42 1,000 work day way thing").split()


def conversation(turns: int, r: random.Random) -> list[dict[str, str]]:
    def para(a: int, b: int) -> str:
        return " ".join(" ".join(r.choice(_WORDS) for _ in range(r.randint(6, 14))).capitalize() + "."
                        for _ in range(r.randint(a, b)))

    msgs = [{"role": "system", "content": para(1, 2)}] if r.random() < 0.33 else []
    for _ in range(turns):
        msgs += [{"role": "user", "content": para(1, 3)}, {"role": "assistant", "content": para(1, 6)}]
    return msgs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, nargs="+", default=[10, 50, 200])
    ap.add_argument("--rows", type=int, default=20, help="rows of each length (their median time is reported)")
    ap.add_argument("--model", default="builtin:smollm2-135m")
    bench_common.add_output_args(ap, "chat_turns.json")
    args = ap.parse_args()
    bench_common.check_output(args.json, args.force)
    state = bench_common.machine_state()
    from llmfast.data import chat
    from llmfast.data.chat import _assemble, _chat_texts, _encode_all, encode_messages
    from llmfast.models import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(args.model))
    rendered = [0, 0]  # the template's renders so far, and the messages they rendered
    real_render = chat.render_chat

    def counted(tokenizer: object, msgs: list[dict], gen: bool, where: str) -> str:
        rendered[0] += 1
        rendered[1] += len(msgs)
        return real_render(tokenizer, msgs, gen, where)

    chat.render_chat = counted  # both paths render through it: two renders a reply, each of the turns before it
    results = []
    for turns in args.turns:
        r = random.Random(turns)
        render, tokens, chars, renders = [], 0, 0, []

        def every_prefix(msgs: list[dict], row: int) -> tuple:
            t0, before = time.perf_counter(), list(rendered)
            plan = _chat_texts(tok, msgs, row, "", 0)
            t1 = time.perf_counter()
            renders.append((rendered[0] - before[0], rendered[1] - before[1]))
            full = _assemble(tok, plan, _encode_all(tok, [t for t, _ in plan]), row)
            render.append(t1 - t0)
            return time.perf_counter() - t0, full, plan

        def read_off(msgs: list[dict], row: int) -> tuple:
            t0 = time.perf_counter()
            got = encode_messages(tok, msgs, row)
            return time.perf_counter() - t0, got, None

        paths = {"every_prefix": every_prefix, "read_off": read_off}
        warm = conversation(turns, r)
        for f in paths.values():  # warm-up: the tokenizer's and the template's first calls are not timed
            f(warm, -1)
        render.clear()
        renders.clear()
        times: dict[str, list[float]] = {k: [] for k in paths}
        taken: list[str] = []
        for row in range(args.rows):
            msgs, out = conversation(turns, r), {}
            for k in bench_common.order(list(paths), row):
                seconds, out[k], plan = paths[k](msgs, row)
                times[k].append(seconds)
                taken.append(k)
                chars += len(plan[-1][0]) if plan else 0
            got, full = out["read_off"], out["every_prefix"]
            if (got.input_ids, got.labels) != (full.input_ids, full.labels):
                raise SystemExit(f"{turns} turns, row {row}: the two paths give other ids or labels")
            tokens += len(got)
        cmp = bench_common.compare(times["read_off"], times["every_prefix"])
        results.append({"turns": turns, "rows": args.rows, "tokens_per_row": tokens / args.rows,
                        "chars_per_row": chars / args.rows, "render_s": statistics.median(render),
                        "renders_per_row": statistics.median(n for n, _ in renders),
                        "messages_rendered_per_row": statistics.median(m for _, m in renders),
                        "every_prefix_s": cmp["baseline"]["median"], "read_off_s": cmp["ours"]["median"],
                        "speedup": 1 / cmp["ratio"], "ratio": cmp["ratio"], "noise": cmp["noise"],
                        "every_prefix": cmp["baseline"], "read_off": cmp["ours"], "order": taken})
        print(f"done {turns} turns", flush=True)
    print(f"{'turns':>5} {'tokens/row':>10} {'renders/row':>11} {'messages rendered':>17} {'render s/row':>12} "
          f"{'every prefix s/row':>18} {'read off s/row':>14} {'speedup':>7} {'spread':>6}")
    for g in results:
        print(f"{g['turns']:>5} {g['tokens_per_row']:>10.0f} {g['renders_per_row']:>11.0f} "
              f"{g['messages_rendered_per_row']:>17.0f} {g['render_s']:>12.4f} {g['every_prefix_s']:>18.4f} "
              f"{g['read_off_s']:>14.4f} {g['speedup']:>7.1f} {bench_common.pct(g['noise']):>6}")
    print("speedup: median every-prefix time over median read-off time; spread: the larger (max - min) / median of "
          "the two paths over the rows (rows differ in content, so this is an upper bound on the noise)")
    out = bench_common.write_json(args.json, {"model": args.model, "results": results}, args.force, state)
    print(f"json: {out}")


if __name__ == "__main__":
    main()
