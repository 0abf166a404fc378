"""`llmfast bench serve`: the online benchmark, with the core flags and result keys of `vllm bench serve`.

One run is a sweep: every --request-rate times every --max-concurrency (each may be a comma list), one
result JSON per point. A run whose requests failed is marked `"status": "failed"` with the cause, and a
server that stopped answering during the run is named as the cause.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmfast.errors import UserError

# The load generator and metrics (numpy, asyncio, aiohttp) are imported inside the functions: the CLI builds
# this verb's parser on every start, and `add_arguments` must stay light.
if TYPE_CHECKING:
    from llmfast.serve.loadgen import Request


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `vllm bench serve` we support, under the same names (plus --api-key, --request-timeout)."""
    p.add_argument("--base-url", help="server URL, e.g. http://127.0.0.1:8000 (default: http://HOST:PORT)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", default="/v1/completions", help="completions endpoint (default /v1/completions)")
    p.add_argument("--model", help="served model or LoRA name (default: the server's first model)")
    p.add_argument("--tokenizer", help="tokenizer directory for building prompts (default: the served model's)")
    p.add_argument("--dataset-name", default="random", choices=["random", "custom"],
                   help="random token prompts, or custom: a JSONL of {\"prompt\": ...} rows given by --dataset-path")
    p.add_argument("--dataset-path", help="JSONL prompt file for --dataset-name custom")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--custom-output-len", type=int, default=256, help="output tokens for custom prompts")
    p.add_argument("--request-rate", default="inf",
                   help="requests/s, Poisson arrivals; 'inf' sends all at once; a comma list sweeps (e.g. 1,2,inf)")
    p.add_argument("--burstiness", type=float, default=1.0, help="1.0 is Poisson; lower is burstier")
    p.add_argument("--max-concurrency", default=None,
                   help="most requests in flight; a comma list sweeps (e.g. 1,8,64)")
    p.add_argument("--ignore-eos", action="store_true", help="always generate the full output length")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature sent with every request (default: the server's, as vLLM's benchmark; "
                   "0 for greedy)")
    p.add_argument("--percentile-metrics", default="ttft,tpot,itl", help="of ttft,tpot,itl,e2el")
    p.add_argument("--metric-percentiles", default="99", help="e.g. 50,90,99")
    p.add_argument("--goodput", nargs="+", metavar="KEY:MS", help="SLOs for goodput, e.g. ttft:500 tpot:50")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", help="a label for the result (default: openai)")
    p.add_argument("--save-result", action="store_true", help="write the result JSON")
    p.add_argument("--save-detailed", action="store_true", help="also keep per-request lists in the JSON")
    p.add_argument("--result-dir", help="folder for result files (default: the current one)")
    p.add_argument("--result-filename", help="file name (a sweep adds -rRATE-cCONC before .json)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request counts as failed")


def _parse_list(text: str | None, name: str, kind: type) -> list[Any]:
    if text is None:
        return [None]
    out = []
    for item in str(text).split(","):
        item = item.strip()
        try:
            value = math.inf if kind is float and item.lower() == "inf" else kind(item)
        except ValueError:
            raise UserError(f"--{name} {text!r}: {item!r} is not a {'number' if kind is float else 'whole number'}") from None
        if value <= 0:
            raise UserError(f"--{name} {text!r}: values must be positive")
        out.append(value)
    return out


def _tokenizer_for(args: argparse.Namespace, models: list[dict[str, Any]], model: str) -> tuple[Any, str]:
    from transformers import AutoTokenizer

    source = args.tokenizer
    if not source:
        by_id = {m.get("id"): m for m in models}
        entry = by_id.get(model, {})
        if entry.get("parent") in by_id:  # a LoRA adapter: its base model's tokenizer
            entry = by_id[entry["parent"]]
        source = entry.get("root") or model
    if not Path(source).is_dir():
        raise UserError(f"cannot load a tokenizer for '{model}' from {source!r}: give --tokenizer DIR")
    return AutoTokenizer.from_pretrained(source), str(source)


def build_requests(args: argparse.Namespace, tokenizer: Any) -> list["Request"]:
    from llmfast.serve.loadgen import jsonl_requests, random_requests

    if args.num_prompts < 1:
        raise UserError("--num-prompts must be at least 1")
    if args.dataset_name == "custom":
        if not args.dataset_path:
            raise UserError("--dataset-name custom needs --dataset-path FILE.jsonl")
        if not Path(args.dataset_path).is_file():
            raise UserError(f"--dataset-path {args.dataset_path}: file not found")
        return jsonl_requests(args.dataset_path, tokenizer, args.custom_output_len, args.num_prompts)
    return random_requests(tokenizer, args.num_prompts, args.random_input_len, args.random_output_len,
                           args.random_range_ratio, args.seed)


def _health(base_url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/health", timeout=5) as r:
            return r.status == 200
    except Exception:  # noqa: BLE001 - any failure means "not healthy"
        return False


def run_point(base_url: str, model: str, requests: list["Request"], request_rate: float,
              max_concurrency: int | None, args: argparse.Namespace, desc: str = "requests") -> dict[str, Any]:
    """One load level: send, summarise, and mark the result failed (with the cause) if any request failed."""
    import asyncio

    from tqdm.auto import tqdm

    from llmfast.serve.loadgen import run_load
    from llmfast.serve.metrics import compute_metrics, parse_goodput, parse_metric_names, parse_percentiles

    percentiles = parse_percentiles(args.metric_percentiles)
    metric_names = parse_metric_names(args.percentile_metrics)
    slos = parse_goodput(args.goodput)
    bar = tqdm(total=len(requests), desc=desc, unit="req", leave=False)
    results, duration = asyncio.run(run_load(
        base_url, model, requests, request_rate=request_rate, max_concurrency=max_concurrency,
        burstiness=args.burstiness, ignore_eos=args.ignore_eos, api_key=args.api_key, seed=args.seed,
        request_timeout=args.request_timeout, on_done=lambda r: bar.update(1), endpoint=args.endpoint,
        sampling=None if args.temperature is None else {"temperature": args.temperature}))
    bar.close()
    result: dict[str, Any] = {
        "date": _dt.datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": "openai",
        "endpoint_type": "openai",
        "label": args.label or "openai",
        "model_id": model,
        "tokenizer_id": getattr(args, "tokenizer_id", None),
        "num_prompts": len(requests),
        "request_rate": request_rate if request_rate != math.inf else "inf",
        "burstiness": args.burstiness,
        "max_concurrency": max_concurrency,
        **compute_metrics(results, duration, percentiles, metric_names, slos),
    }
    result["status"] = "ok"
    if result["failed"]:
        errors = Counter((r.error or "unknown").strip().splitlines()[-1][:300] for r in results if not r.success)
        cause, n = errors.most_common(1)[0]
        if not _health(base_url):
            cause = f"the server at {base_url} stopped answering during the run ({n} x {cause})"
        result["status"] = "failed"
        result["failure_cause"] = cause
    if args.save_detailed:
        result.update(input_lens=[r.prompt_len for r in results], output_lens=[r.output_tokens for r in results],
                      ttfts=[r.ttft for r in results], itls=[r.itl for r in results],
                      latencies=[r.latency for r in results], start_times=[r.start_time for r in results],
                      generated_texts=[r.generated_text for r in results], errors=[r.error for r in results])
    return result


def result_path(args: argparse.Namespace, result: dict[str, Any], sweep: bool) -> Path:
    rate, conc = result["request_rate"], result["max_concurrency"]
    if args.result_filename:
        name = args.result_filename
        if sweep:
            stem, dot, ext = name.rpartition(".")
            name = f"{stem or ext}-r{rate}-c{conc}.{ext if dot else 'json'}"
    else:
        base = Path(str(result["model_id"])).name
        name = f"{result['label']}-{rate}qps{f'-concurrency{conc}' if conc else ''}-{base}-{result['date']}.json"
    return Path(args.result_dir or ".") / name


def bench_serve(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the sweep; print and optionally save each point; return the results."""
    from llmfast.artifacts import atomic_write_json
    from llmfast.serve.loadgen import served_models
    from llmfast.serve.metrics import format_summary, parse_goodput, parse_metric_names, parse_percentiles

    # Validate every flag before the first request.
    rates = _parse_list(args.request_rate, "request-rate", float)
    concs = _parse_list(args.max_concurrency, "max-concurrency", int)
    parse_percentiles(args.metric_percentiles)
    parse_metric_names(args.percentile_metrics)
    parse_goodput(args.goodput)
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    models = served_models(base_url, args.api_key)
    model = args.model or (models[0]["id"] if models else None)
    if not model:
        raise UserError(f"{base_url} serves no models")
    ids = [m.get("id") for m in models]
    if model not in ids:
        raise UserError(f"--model {model!r} is not served by {base_url}: it serves {', '.join(map(str, ids))}")
    tokenizer, args.tokenizer_id = _tokenizer_for(args, models, model)
    requests = build_requests(args, tokenizer)
    sweep = len(rates) * len(concs) > 1
    results = []
    for rate in rates:
        for conc in concs:
            desc = f"rate {rate} conc {conc}" if sweep else "requests"
            result = run_point(base_url, model, requests, rate, conc, args, desc=desc)
            print(format_summary(result))
            if result["status"] == "failed":
                print(f"FAILED: {result['failure_cause']}")
            if args.save_result:
                path = result_path(args, result, sweep)
                atomic_write_json(path, result)
                print(f"result: {path}")
            results.append(result)
    return results
