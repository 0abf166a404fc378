"""`llmfast bench offline`: throughput and latency of an engine in this process, no server in between."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from llmfast.bench.engine_names import offline_engine, offline_words
from llmfast.errors import UserError
from llmfast.process_exit import flush


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="builtin:NAME, a model directory, a .gguf or a hub id")
    p.add_argument("--engine", default="vllm", metavar="ENGINE",
                   help=f"one of {', '.join(offline_words())}: vLLM's engine, transformers, transformers with llmfast's "
                   "sparse MLP (sparse artifacts), or an engine registered in llmfast/bench/engines (default: vllm)")
    p.add_argument("--lora", help="a LoRA adapter directory to apply")
    p.add_argument("--quantization", help="e.g. nf4 or fp4 (bitsandbytes 4-bit: transformers engine only)")
    p.add_argument("--dataset-name", default="random", choices=["random", "custom", "sharegpt"])
    p.add_argument("--dataset-path", help="the prompt file for custom (JSONL of {\"prompt\": ...}) and sharegpt")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--random-prefix-len", type=int, default=0)
    p.add_argument("--custom-output-len", type=int, default=64)
    p.add_argument("--ignore-eos", action="store_true", help="always generate the full output length")
    p.add_argument("--batch-size", type=int, default=None, help="transformers batch size (default: all prompts, "
                   "up to 64)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="override the machine's choice")  # an empty one ran with the default
    p.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el")
    p.add_argument("--metric-percentiles", default="50,90,99")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="write the result JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--verbose", action="store_true", help="show the engine's own log on stderr (default: a log file, "
                   "named on failure)")


def bench_offline(args: argparse.Namespace) -> dict[str, Any]:
    from llmfast.bench.engines import resolve_variant
    from llmfast.bench.engines.base import quantization_ran
    from llmfast.bench.logs import engine_output
    from llmfast.bench.metrics import compute_metrics, format_summary, parse_metric_names, parse_percentiles
    from llmfast.bench.workload import build_requests
    from llmfast.models import load_tokenizer
    from llmfast.serve.machine import default_dtype
    from llmfast.memory import PeakRss

    word, engine = offline_engine(args.engine)
    percentiles = parse_percentiles(args.metric_percentiles)
    metric_names = parse_metric_names(args.percentile_metrics)
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1 (or left out: all prompts, up to 64)")
    if args.output and (Path(args.output).is_dir() or Path(args.output).parent.is_file()):
        raise UserError(f"--output {args.output}: needs a file path in a folder")
    if args.output and Path(args.output).exists() and not args.overwrite:
        raise UserError(f"--output {args.output} already exists: choose another path, or pass --overwrite to replace it")
    variant = resolve_variant("lora", args.model, args.lora, args.quantization)
    reason = engine.can_run(variant)
    if reason:  # the families' words name engines here too: suggest the preferred one that runs it
        other = next((f for f in variant.families if f != engine.family), "hf")
        raise UserError(f"--engine {args.engine}: {reason}: use --engine {other}")
    tokenizer = load_tokenizer(variant.model_dir)
    requests = build_requests(tokenizer, dataset_name=args.dataset_name, dataset_path=args.dataset_path,
                              num_prompts=args.num_prompts, input_len=args.random_input_len,
                              output_len=args.random_output_len, range_ratio=args.random_range_ratio,
                              prefix_len=args.random_prefix_len, custom_output_len=args.custom_output_len,
                              seed=args.seed)
    dtype = args.dtype or default_dtype()
    batch = args.batch_size or min(64, len(requests))
    log = None
    if not args.verbose and engine.family == "vllm":
        fd, name = tempfile.mkstemp(prefix="vllm-offline-", suffix=".log")
        os.close(fd)
        log = Path(name)
    environ = dict(os.environ)
    try:
        with PeakRss() as mem, engine_output(log) if engine.family == "vllm" else contextlib.nullcontext():
            results, duration = engine.generate(variant, requests, dtype=dtype, batch_size=batch,
                                                ignore_eos=args.ignore_eos)
    except KeyboardInterrupt:  # Ctrl-C: the log of a run the user stopped tells nothing; it is not left in $TMPDIR
        if log is not None:
            log.unlink(missing_ok=True)
        raise
    except Exception as e:
        if log is not None:
            raise UserError(f"vLLM's engine failed ({type(e).__name__}: {e}); its log: {log}") from e
        raise
    finally:
        _restore_environ(environ)
    if log is not None:
        log.unlink(missing_ok=True)
    summary = compute_metrics(results, duration, percentiles, metric_names)
    from llmfast.provenance import provenance, utc_now

    result: dict[str, Any] = {
        "date": utc_now(),  # ISO 8601 in UTC (no file is named after it)
        "engine": word,
        "model_id": args.model,
        "model_path": str(variant.model_dir),
        "lora": args.lora,
        "quantization": quantization_ran(variant, engine.family),
        "dtype": dtype,
        "num_prompts": len(requests),
        "batch_size": batch if engine.family != "vllm" else None,  # vLLM schedules its own batches
        **summary,
        # vLLM's `bench throughput` names for the same quantities
        "elapsed_time": duration,
        "requests_per_second": summary["request_throughput"],
        "tokens_per_second": summary["total_token_throughput"],
        "peak_rss_gib": round(mem.peak_gib, 3),
        "status": "ok" if summary["failed"] == 0 else "failed",
        # what ran it: the engine ran here, so vLLM's version is known from its import (an hf run never imports it)
        "provenance": provenance(),
    }
    print(format_summary(result, f"Offline ({word}) Benchmark Result"))
    print(f"{'Peak RSS (GiB):':<44} {result['peak_rss_gib']:.2f}")
    if args.output:  # a file another run wrote there meanwhile is kept: this one goes beside it (OUTPUT-2.json)
        from llmfast.bench.online import save_result

        print(f"result: {save_result(Path(args.output), result, replace=args.overwrite)}")
    flush(sys.stdout)  # None where stdout was closed (`>&-`): the results file is written, the run succeeded
    return result


def _restore_environ(saved: dict[str, str]) -> None:
    """os.environ as it was before the engine ran: vLLM and its machine defaults set variables for the engine's
    processes (LD_PRELOAD of torch's libgomp, VLLM_CPU_KVCACHE_SPACE...), which a caller's own process (a script's
    main([...]), a notebook) kept, and passed on to everything it started later."""
    for key in set(os.environ) - set(saved):
        del os.environ[key]
    for key, value in saved.items():
        if os.environ.get(key) != value:
            os.environ[key] = value
