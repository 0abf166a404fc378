"""`llmfast bench serve`: the online benchmark, with the flags and result keys of `vllm bench serve`.

One run is a sweep: every --request-rate times every --max-concurrency (each may be a comma list), one
result JSON per point. A run whose requests failed is marked `"status": "failed"` with the cause, and a
server that stopped answering during the run is named as the cause. Everything a user can get wrong (the
URL, the server, the result folder, a flag) is checked before the first request.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmfast.errors import UserError

# The load generator and metrics (numpy, asyncio, aiohttp) are imported inside the functions: the CLI builds
# this verb's parser on every start.
if TYPE_CHECKING:
    from llmfast.bench.loadgen import RampUp
    from llmfast.bench.workload import Request


# Result keys --metadata may replace: the setup vLLM writes before its metadata (vllm/benchmarks/serve.py).
METADATA_REPLACES = ("date", "endpoint_type", "backend", "label", "model_id", "tokenizer_id", "num_prompts")


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
        if not value > 0:  # NaN too
            raise UserError(f"--{name} {text!r}: values must be positive")
        if value in out:  # the two points' result files would replace each other
            raise UserError(f"--{name} {text!r}: {item} is given twice: give each value once")
        out.append(value)
    return out


def _tokenizer_for(source: str | None, models: list[dict[str, Any]], model: str) -> tuple[Any, str]:
    from transformers import AutoTokenizer

    if not source:
        by_id = {m.get("id"): m for m in models}
        entry = by_id.get(model, {})
        if entry.get("parent") in by_id:  # a LoRA adapter: its base model's tokenizer
            entry = by_id[entry["parent"]]
        source = entry.get("root") or model
    if not Path(source).is_dir():
        raise UserError(f"cannot load a tokenizer for '{model}' from {source!r}: give --tokenizer DIR")
    from llmfast.modelfiles import refuse_model_code

    refuse_model_code(Path(source), {})  # its own tokenizer code (auto_map): one line, never run
    return AutoTokenizer.from_pretrained(source, trust_remote_code=False), str(source)


def run_point(base_url: str, model: str, requests: list["Request"], *, request_rate: float = math.inf,
              max_concurrency: int | None = None, burstiness: float = 1.0, ignore_eos: bool = False,
              api_key: str | None = None, seed: int = 0, request_timeout: float = 600.0, stall_timeout: float = 60.0,
              backend: str = "openai", endpoint: str = "/v1/completions", extra_body: dict[str, Any] | None = None,
              extra_headers: dict[str, str] | None = None, lora_modules: list[str] | None = None,
              lora_assignment: str = "random", ramp_up: "RampUp | None" = None, num_warmups: int = 0,
              request_id_prefix: str | None = None, percentiles: list[float] | None = None, metrics: list[str] | None = None,
              goodput: dict[str, float] | None = None, label: str | None = None, model_id: str | None = None,
              tokenizer_id: str | None = None, save_detailed: bool = False, disable_tqdm: bool = False,
              desc: str = "requests") -> dict[str, Any]:
    """One load level: send, summarise in vLLM's result keys, and mark the result failed (with the cause) if
    any request failed. `model` is the name requests send; `model_id` is what the result records."""
    import asyncio

    from tqdm.auto import tqdm

    from llmfast.bench.loadgen import run_load
    from llmfast.bench.metrics import compute_metrics
    from llmfast.provenance import utc_stamp
    from llmfast.serve.endpoint import healthy

    # `disable` only to switch it off: passed False, it overrode tqdm's TQDM_DISABLE=1
    bar = tqdm(total=len(requests), desc=desc, unit="req", leave=False, file=sys.stderr,
               **({"disable": True} if disable_tqdm else {}))
    results, duration = asyncio.run(run_load(
        base_url, model, requests, request_rate=request_rate, max_concurrency=max_concurrency,
        burstiness=burstiness, ignore_eos=ignore_eos, api_key=api_key, seed=seed, request_timeout=request_timeout,
        stall_timeout=stall_timeout, on_done=lambda r: bar.update(1), backend=backend, endpoint=endpoint,
        extra_body=extra_body, extra_headers=extra_headers, lora_modules=lora_modules,
        lora_assignment=lora_assignment, ramp_up=ramp_up, num_warmups=num_warmups,
        request_id_prefix=request_id_prefix))
    bar.close()
    result: dict[str, Any] = {
        "date": utc_stamp(),  # vLLM's form, in UTC (its local time told two machines' runs apart by their zones)
        "backend": backend,
        "endpoint_type": backend,
        "label": label or backend,
        "model_id": model_id or model,
        "tokenizer_id": tokenizer_id,
        "num_prompts": len(requests),
        "request_rate": request_rate if request_rate != math.inf else "inf",
        "burstiness": burstiness,
        "max_concurrency": max_concurrency,
        **compute_metrics(results, duration, percentiles or [99.0], metrics or ["ttft", "tpot", "itl"], goodput),
    }
    if ramp_up is not None:
        result.update(ramp_up_strategy=ramp_up.strategy, ramp_up_start_rps=ramp_up.start_rps,
                      ramp_up_end_rps=ramp_up.end_rps)
    result["status"] = "ok"
    if result["failed"]:
        errors = Counter((r.error or "unknown").strip().splitlines()[-1][:300] for r in results if not r.success)
        cause, n = errors.most_common(1)[0]
        if not healthy(base_url):
            cause = f"the server at {base_url} stopped answering during the run ({n} x {cause})"
        result["status"] = "failed"
        result["failure_cause"] = cause
    if save_detailed:
        result.update(input_lens=[r.prompt_len for r in results], output_lens=[r.output_tokens for r in results],
                      ttfts=[r.ttft for r in results], itls=[r.itl for r in results],
                      latencies=[r.latency for r in results], start_times=[r.start_time for r in results],
                      generated_texts=[r.generated_text for r in results], errors=[r.error for r in results])
    return result


def result_path(result_dir: str | None, result_filename: str | None, result: dict[str, Any], sweep: bool) -> Path:
    rate, conc = result["request_rate"], result["max_concurrency"]
    if result_filename:
        name = result_filename
        if sweep:
            stem, dot, ext = name.rpartition(".")
            name = f"{stem or ext}-r{rate}-c{conc}.{ext if dot else 'json'}"
    else:
        base = Path(str(result["model_id"])).name
        name = f"{result['label']}-{rate}qps{f'-concurrency{conc}' if conc else ''}-{base}-{result['date']}.json"
    return Path(result_dir or ".") / name


def save_result(path: Path, result: dict[str, Any], replace: bool = False) -> Path:
    """Write `result` at `path`, or where that is taken (by a run started in the same second under the same default
    name, or a file that appeared during this run) and `replace` is off, at the first free PATH-2.json, PATH-3.json...;
    return where. Taking the name and writing the file are one step, so two runs never write over each other."""
    from llmfast.artifacts import atomic_write_json

    if replace:
        return atomic_write_json(path, result)
    # a temporary sibling of the name reap_stale_temps removes if this process dies before it is linked
    tmp = atomic_write_json(path.with_name(f".{path.name}.tmp-{os.getpid()}-result"), result)
    try:
        for n in range(1, 10_000):
            candidate = path if n == 1 else path.with_name(f"{path.stem}-{n}{path.suffix}")
            try:
                _link_new(tmp, candidate)
            except FileExistsError:
                continue
            if n > 1:
                print(f"bench: {path.name} exists (another run's result): this one is {candidate.name}",
                      file=sys.stderr)
            return candidate
        raise UserError(f"{path}: 9999 results of that name are there already: give --result-dir another folder")
    finally:
        tmp.unlink(missing_ok=True)


def _link_new(src: Path, dst: Path) -> None:
    """`dst` made `src`'s content, failing with FileExistsError if `dst` exists: a hard link, or on a file system
    without them an exclusive create (taken in that same step) then a rename over it."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (some network and FAT file systems)
        os.close(os.open(dst, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        os.replace(src, dst)


def _check_result_files(result_dir: str | None, result_filename: str, rates: list[float], concs: list[int]) -> None:
    """Before the run: a result file of that name that exists would be replaced after minutes of load."""
    sweep = len(rates) * len(concs) > 1
    for rate in rates:
        for conc in concs:
            path = result_path(result_dir, result_filename,
                               {"request_rate": rate if rate != math.inf else "inf", "max_concurrency": conc}, sweep)
            if path.exists():
                raise UserError(f"--result-filename: {path} already exists: choose another name, or pass --overwrite "
                                "to replace it")


def _check_default_names(args: argparse.Namespace, metadata: dict[str, Any], model_id: str, rates: list[float],
                         concs: list[int]) -> None:
    """Before the run: a result file named from --label or --metadata's label/date (vLLM's default name) must be one
    file name in --result-dir: a '/' would write elsewhere, a name over 255 bytes would fail after the whole run."""
    named = {"label": metadata.get("label", args.label or args.backend), "date": metadata.get("date", "0" * 15),
             "model_id": metadata.get("model_id", model_id)}
    for key in ("label", "date"):
        if any(c in str(named[key]) for c in "/\0"):
            flag = "--label " if key == "label" and "label" not in metadata else f"--metadata {key}="
            raise UserError(f"{flag}{named[key]!r}: names the result file, so it may not hold '/' or NUL: give "
                            "another, or name the file with --result-filename")
    for rate in rates:
        for conc in concs:
            name = result_path(None, None, {**named, "request_rate": rate if rate != math.inf else "inf",
                                            "max_concurrency": conc}, False).name
            if len(name.encode()) > 255:
                raise UserError(f"the result file name {name[:40]}... would be {len(name.encode())} bytes (a file name "
                                "holds at most 255): give a shorter --label or --metadata, or --result-filename")


def _check_result_dir(result_dir: str | None) -> None:
    """Before the run: a result folder that is a file, or that cannot be written, would lose the results."""
    import os

    d = Path(result_dir or ".")
    if d.exists() and not d.is_dir():
        raise UserError(f"--result-dir {d}: is a file, not a folder")
    existing = next((p for p in [d, *d.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        raise UserError(f"--result-dir {d}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--result-dir {d}: {existing} is not writable")


def _ramp_up(args: argparse.Namespace) -> "RampUp | None":
    from llmfast.bench.loadgen import RampUp

    given = [args.ramp_up_strategy, args.ramp_up_start_rps, args.ramp_up_end_rps]
    if all(g is None for g in given):
        return None
    if any(g is None for g in given):
        raise UserError("--ramp-up-strategy, --ramp-up-start-rps and --ramp-up-end-rps go together")
    if args.ramp_up_start_rps < 0 or args.ramp_up_end_rps <= 0 or args.ramp_up_end_rps < args.ramp_up_start_rps:
        raise UserError("--ramp-up-start-rps and --ramp-up-end-rps: 0 <= start <= end, end > 0")
    if args.ramp_up_strategy == "exponential" and args.ramp_up_start_rps == 0:
        raise UserError("--ramp-up-strategy exponential needs --ramp-up-start-rps above 0")
    if args.request_rate not in ("inf", None):
        raise UserError("--ramp-up-* sets the request rate: leave --request-rate out")
    return RampUp(args.ramp_up_strategy, float(args.ramp_up_start_rps), float(args.ramp_up_end_rps))


def _check_lengths(requests: list[Any], models: list[dict[str, Any]], sent: str) -> None:
    """Requests longer than the server takes for `sent` (its /v1/models max_model_len) fail one by one with HTTP 400
    after the run starts: refused before the first one."""
    by_id = {m.get("id"): m for m in models}
    entry = by_id.get(sent, {})
    limit = entry.get("max_model_len") or by_id.get(entry.get("parent"), {}).get("max_model_len")  # a LoRA: its base
    longest = max((r.prompt_len + r.output_len for r in requests), default=0)
    if isinstance(limit, int) and longest > limit:
        raise UserError(f"the longest request is {longest} tokens (prompt and output), beyond the {limit} the server "
                        f"takes for {sent!r} (its max_model_len): shorten the requests, or serve with a larger "
                        "--max-model-len")


def _wait_for_models(base_url: str, api_key: str | None, wait: float) -> list[dict[str, Any]]:
    from llmfast.serve.endpoint import served_models

    deadline = time.monotonic() + wait
    while True:
        try:
            return served_models(base_url, api_key)
        except UserError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(1.0)


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    from llmfast.bench.serve_flags import json_object

    names = ("temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty")
    body = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if args.logprobs is not None:
        body["logprobs"] = args.logprobs
    if args.chat_template_kwargs is not None:
        body["chat_template_kwargs"] = json_object(args.chat_template_kwargs, "--chat-template-kwargs")
    return {**body, **json_object(args.extra_body, "--extra-body")}  # as vLLM: --extra-body wins


def _check_choices(args: argparse.Namespace) -> None:
    from llmfast.bench.loadgen import BACKENDS
    from llmfast.bench.serve_flags import BACKENDS_REFUSED, DATASET_NAMES_REFUSED
    from llmfast.bench.workload import DATASETS

    if args.backend not in BACKENDS:
        raise UserError(f"--backend {args.backend} does not apply to llmfast bench serve: {BACKENDS_REFUSED}")
    if args.dataset_name in DATASET_NAMES_REFUSED:
        raise UserError(f"--dataset-name {args.dataset_name} does not apply to llmfast bench serve: "
                        f"{DATASET_NAMES_REFUSED[args.dataset_name]}")
    if args.dataset_name not in DATASETS:
        raise UserError(f"--dataset-name {args.dataset_name}: choose from {', '.join(DATASETS)}")
    if args.tokenizer_mode not in ("auto", "hf"):
        raise UserError(f"--tokenizer-mode {args.tokenizer_mode} does not apply to llmfast bench serve: "
                        "prompts are built with the model's transformers tokenizer (auto or hf)")
    # written so that NaN fails (it passed every `< 0`); an infinite request timeout failed every request
    # (OverflowError) and an infinite stall timeout is none, as 0
    if not (args.num_warmups >= 0 and args.stall_timeout >= 0 and args.ready_check_timeout_sec >= 0
            and 0 < args.request_timeout < math.inf):
        raise UserError("--num-warmups, --stall-timeout and --ready-check-timeout-sec must be 0 or more, "
                        "--request-timeout positive and finite")


def bench_serve(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Check every flag, the server and the result folder; run the sweep; print and save each point."""
    from llmfast.bench.metrics import format_summary, parse_goodput, parse_metric_names, parse_percentiles
    from llmfast.bench.serve_flags import headers_from, metadata_from
    from llmfast.bench.workload import build_requests
    from llmfast.provenance import provenance
    from llmfast.serve.endpoint import check_base_url

    _check_choices(args)
    rates = _parse_list(args.request_rate, "request-rate", float)
    concs = _parse_list(args.max_concurrency, "max-concurrency", int)
    # before the first request, not on its progress bar; inf drew NaN gaps and wrote `Infinity`, which is not JSON
    if not 0 < args.burstiness < math.inf:
        raise UserError(f"--burstiness {args.burstiness}: must be positive and finite (1 is a Poisson process)")
    ramp_up = _ramp_up(args)
    percentiles = parse_percentiles(args.metric_percentiles)
    metric_names = parse_metric_names(args.percentile_metrics)
    slos = parse_goodput(args.goodput)
    extra_body, extra_headers, metadata = _sampling(args), headers_from(args), metadata_from(args)
    if args.save_result:
        _check_result_dir(args.result_dir)
        if args.result_filename and not args.overwrite:  # a named file is known now; default names carry the time
            _check_result_files(args.result_dir, args.result_filename, rates, concs)
    chat = args.backend == "openai-chat"
    endpoint = args.endpoint or ("/v1/chat/completions" if chat else "/v1/completions")
    if chat != endpoint.rstrip("/").endswith("chat/completions"):
        raise UserError(f"--endpoint {endpoint} does not fit --backend {args.backend}: "
                        "openai-chat uses /v1/chat/completions, openai and vllm /v1/completions")
    base_url = check_base_url(args.base_url or f"http://{args.host}:{args.port}",
                              "--base-url" if args.base_url else "--host/--port")
    models = _wait_for_models(base_url, args.api_key, args.ready_check_timeout_sec)
    model_id = args.model or (models[0]["id"] if models else None)
    if not model_id:
        raise UserError(f"{base_url} serves no models")
    sent = args.served_model_name or model_id
    ids = [m.get("id") for m in models]
    for name in [sent, *(args.lora_modules or [])]:
        if name not in ids:
            raise UserError(f"model {name!r} is not served by {base_url}: it serves {', '.join(map(str, ids))}")
    # As vLLM: --tokenizer, else --model when it is a local folder, else the served model's own folder.
    tok_source = args.tokenizer or (model_id if Path(model_id).is_dir() else None)
    tokenizer, tokenizer_id = _tokenizer_for(tok_source, models, sent)
    out_len = args.output_len

    def given(value: Any, default: Any) -> Any:  # `--output-len 0` is refused by name, not replaced by a default
        return default if value is None else value

    requests = build_requests(
        tokenizer, dataset_name=args.dataset_name, dataset_path=args.dataset_path, num_prompts=args.num_prompts,
        input_len=given(args.input_len, args.random_input_len), output_len=given(out_len, args.random_output_len),
        range_ratio=args.random_range_ratio, prefix_len=args.random_prefix_len,
        custom_output_len=given(out_len, args.custom_output_len),
        sharegpt_output_len=given(out_len, args.sharegpt_output_len),
        seed=args.seed, shuffle=not args.disable_shuffle)
    _check_lengths(requests, models, sent)
    if args.save_result and not args.result_filename:
        _check_default_names(args, metadata, model_id, rates, concs)
    sweep = len(rates) * len(concs) > 1
    results = []
    for rate in rates:
        for conc in concs:
            result = run_point(
                base_url, sent, requests, request_rate=rate, max_concurrency=conc, burstiness=args.burstiness,
                ignore_eos=args.ignore_eos, api_key=args.api_key, seed=args.seed, request_timeout=args.request_timeout,
                stall_timeout=args.stall_timeout, backend=args.backend, endpoint=endpoint, extra_body=extra_body,
                extra_headers=extra_headers, lora_modules=args.lora_modules, lora_assignment=args.lora_assignment,
                ramp_up=ramp_up, num_warmups=args.num_warmups, request_id_prefix=args.request_id_prefix,
                percentiles=percentiles, metrics=metric_names,
                goodput=slos, label=args.label, model_id=model_id, tokenizer_id=tokenizer_id,
                save_detailed=args.save_detailed, disable_tqdm=args.disable_tqdm,
                desc=f"rate {rate} conc {conc}" if sweep else "requests")
            # the load generator's side: this process and machine (the server's vLLM may run on another)
            result["provenance"] = provenance()
            # --metadata may replace the run's setup, as in vLLM, never what it measured (vLLM merges those last)
            result.update({k: v for k, v in metadata.items() if k in METADATA_REPLACES or k not in result})
            path = result_path(args.result_dir, args.result_filename, result, sweep) if args.save_result else None
            if path is not None:  # saved before the summary is printed: `| head -1` then closes no result's file
                path = save_result(path, result, replace=bool(args.overwrite and args.result_filename))
            print(format_summary(result))
            if result["status"] == "failed":
                print(f"FAILED: {result['failure_cause']}")
            if path is not None:
                print(f"result: {path}")
            results.append(result)
    return results
