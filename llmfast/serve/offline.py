"""`llmfast bench offline`: throughput and latency of an engine in this process, no server in between."""

from __future__ import annotations

import argparse
import datetime as _dt
from pathlib import Path
from typing import Any

from llmfast.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="builtin:NAME, a model directory, a .gguf or a hub id")
    p.add_argument("--engine", choices=["vllm", "hf"], default="vllm", help="vLLM's engine or transformers")
    p.add_argument("--lora", help="a LoRA adapter directory to apply")
    p.add_argument("--quantization", choices=["nf4", "fp4"], help="bitsandbytes 4-bit (transformers engine only)")
    p.add_argument("--dataset-name", default="random", choices=["random", "custom"])
    p.add_argument("--dataset-path", help="JSONL of {\"prompt\": ...} rows for --dataset-name custom")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--custom-output-len", type=int, default=64)
    p.add_argument("--ignore-eos", action="store_true", help="always generate the full output length")
    p.add_argument("--batch-size", type=int, default=None, help="transformers batch size (default: all prompts, "
                   "up to 64)")
    p.add_argument("--dtype", help="override the machine's choice")
    p.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el")
    p.add_argument("--metric-percentiles", default="50,90,99")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="write the result JSON here")


def bench_offline(args: argparse.Namespace) -> dict[str, Any]:
    from llmfast.artifacts import atomic_write_json
    from llmfast.models import load_tokenizer, resolve_model
    from llmfast.serve.machine import detect, vllm_defaults
    from llmfast.serve.memory import PeakRss
    from llmfast.serve.metrics import compute_metrics, format_summary, parse_metric_names, parse_percentiles
    from llmfast.serve.online import build_requests

    percentiles = parse_percentiles(args.metric_percentiles)
    metric_names = parse_metric_names(args.percentile_metrics)
    if args.quantization and args.engine == "vllm":
        raise UserError("--quantization (bitsandbytes 4-bit) runs with --engine hf: vLLM's CPU backend cannot load it")
    model_dir = resolve_model(args.model)
    tokenizer = load_tokenizer(model_dir)
    requests = build_requests(args, tokenizer)
    dtype = args.dtype or vllm_defaults(detect())[1][1]
    if dtype == "auto":
        dtype = "bfloat16"
    batch = args.batch_size or min(64, len(requests))
    with PeakRss() as mem:
        if args.engine == "vllm":
            from llmfast.serve.engines import run_vllm_offline

            results, duration = run_vllm_offline(model_dir, requests, args.ignore_eos,
                                                 Path(args.lora) if args.lora else None, dtype)
        else:
            from llmfast.models import load_model
            from llmfast.serve.engines import run_hf

            model = load_model(model_dir, dtype, adapter=args.lora, quantization=args.quantization)
            results, duration = run_hf(model, tokenizer, requests, batch, args.ignore_eos)
    summary = compute_metrics(results, duration, percentiles, metric_names)
    result: dict[str, Any] = {
        "date": _dt.datetime.now().strftime("%Y%m%d-%H%M%S"),
        "engine": args.engine,
        "model_id": args.model,
        "model_path": str(model_dir),
        "lora": args.lora,
        "quantization": args.quantization,
        "dtype": dtype,
        "num_prompts": len(requests),
        "batch_size": batch if args.engine == "hf" else None,  # vLLM schedules its own batches
        **summary,
        # vLLM's `bench throughput` names for the same quantities
        "elapsed_time": duration,
        "requests_per_second": summary["request_throughput"],
        "tokens_per_second": summary["total_token_throughput"],
        "peak_rss_gib": round(mem.peak_gib, 3),
        "status": "ok" if summary["failed"] == 0 else "failed",
    }
    print(format_summary(result, f"Offline ({args.engine}) Benchmark Result"))
    print(f"{'Peak RSS (GiB):':<44} {result['peak_rss_gib']:.2f}")
    if args.output:
        atomic_write_json(args.output, result)
        print(f"result: {args.output}")
    return result
