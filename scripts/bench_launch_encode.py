"""The encode step of a fine-tuning run launched over several processes: each rank's time and memory for
finetune.data_setup.run_data (a first start: the data read, encoded, split and packed), and whether every rank
ended with the same rows.

    python scripts/bench_launch_encode.py --rows 30000 --nproc 2 --json launch_encode.json

Rows are bench_data_scale's synthetic chat rows (~150-300 tokens each), the model the tiny Llama (SmolLM2's
tokenizer), the launch torchrun with gloo on the CPU. Per rank: seconds in run_data, the CPU seconds it used,
the RSS it added (psutil, before and after), the peak RSS of the process (ru_maxrss), and the rows digest base.json
would record. One launch: a measure of the ranks against each other (no baseline to alternate with); the JSON
(--json; bench_common) carries provenance and the load average, and needs --force to replace a file.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench_common  # noqa: E402


def worker(recipe_path: str, report: str) -> None:
    import psutil
    from accelerate import Accelerator

    from llmfast.finetune.data_setup import run_data
    from llmfast.models import load_tokenizer
    from llmfast.modelfiles import describe_model_dir
    from llmfast.recipe import FinetuneRecipe, load_recipe

    acc = Accelerator(cpu=True)
    recipe = load_recipe(recipe_path, FinetuneRecipe)
    model_path = Path(recipe.model)
    tokenizer = load_tokenizer(model_path)
    vocab = describe_model_dir(model_path)["vocab"]
    acc.wait_for_everyone()
    me = psutil.Process()
    rss0, t0, cpu0 = me.memory_info().rss, time.perf_counter(), sum(me.cpu_times()[:2])
    data = run_data(recipe, tokenizer, acc, vocab, model_path, Path(recipe.output), False)
    seconds, cpu = time.perf_counter() - t0, sum(me.cpu_times()[:2]) - cpu0
    rss1 = me.memory_info().rss
    line = {"rank": acc.process_index, "seconds": round(seconds, 2), "cpu_s": round(cpu, 2),
            "rss_added_mib": round((rss1 - rss0) / 2**20, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rows": len(data.rows), "eval_rows": len(data.eval_rows), "digest": data.digest}
    Path(f"{report}.{acc.process_index}").write_text(json.dumps(line))
    acc.wait_for_everyone()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=30000)
    ap.add_argument("--nproc", type=int, default=2)
    bench_common.add_output_args(ap, None)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker)
    bench_common.check_output(args.json, args.force)
    state = bench_common.machine_state()
    from bench_data_scale import write_rows

    from llmfast.testing import build_tiny_llama

    with tempfile.TemporaryDirectory(prefix="bench_launch_encode_") as tmp:
        t = Path(tmp)
        model = build_tiny_llama(t / "tiny")
        write_rows(t / "train.jsonl", args.rows, "chat")
        recipe = t / "recipe.yaml"
        recipe.write_text(f"model: {model}\ndata: {{train: {t / 'train.jsonl'}, max_length: 512, eval_fraction: 0.05}}"
                          f"\nlora: {{r: 8}}\ntrain: {{steps: 1, seed: 1}}\noutput: {t / 'run'}\n")
        torchrun = Path(sys.executable).parent / "torchrun"
        cmd = [str(torchrun), "--nproc_per_node", str(args.nproc), __file__, "--worker", str(recipe), str(t / "r")]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        ranks = [json.loads(Path(f"{t / 'r'}.{i}").read_text()) for i in range(args.nproc)]
    print(f"{args.rows} rows, {args.nproc} processes (torchrun, gloo, CPU); launch wall {wall:.1f} s")
    print(f"{'rank':>4} {'run_data s':>10} {'CPU s':>6} {'RSS added MiB':>13} {'peak RSS MiB':>12} {'rows':>6}")
    for r in ranks:
        print(f"{r['rank']:>4} {r['seconds']:>10} {r['cpu_s']:>6} {r['rss_added_mib']:>13} "
              f"{r['peak_rss_mib']:>12} {r['rows']:>6}")
    same = len({r["digest"] for r in ranks}) == 1
    print(f"same rows on every rank: {same}")
    result = {"rows": args.rows, "nproc": args.nproc, "launch_wall_s": round(wall, 1), "ranks": ranks,
              "same_rows": same}
    print(json.dumps(result))
    if args.json:
        bench_common.write_json(args.json, result, args.force, state, threads=1)


if __name__ == "__main__":
    main()
