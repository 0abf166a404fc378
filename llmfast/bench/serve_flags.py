"""The command line of `llmfast bench serve`: `vllm bench serve`'s flags, each either honoured or refused.

A user pastes a vLLM command line: every flag that applies to text generation against an OpenAI-compatible
server works under the same name and meaning; every other vLLM flag is still known to the parser and
answered with one line naming it and why (multimodal and embedding datasets, hub datasets, profiling...),
so nothing is silently ignored. This module is imported on every CLI start: argparse only, nothing heavy.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

from llmfast.argtypes import finite
from llmfast.errors import UserError

_HUB = "datasets are read from local files only: download it and use --dataset-name custom or sharegpt"
_MM = "llmfast benchmarks text generation only (no images, audio or video)"
_POOL = "llmfast benchmarks text generation, not embeddings or reranking"
_DATASET = "that dataset is not supported: use --dataset-name random, custom or sharegpt"
_PLOT = "llmfast does not draw vLLM's plots: `llmfast bench run` writes its own report and plots"

# vLLM's flags (vllm/benchmarks/serve.py, datasets.py) that llmfast refuses, with the reason.
REFUSED: dict[str, str] = {
    "--trust-remote-code": "llmfast never runs a model repository's own code",
    "--no-stream": "TTFT and inter-token latencies come from streamed tokens: streaming stays on",
    "--enable-multimodal-chat": _MM,
    "--custom-ensure-client-side-data": "llmfast always sends the prompt text it built",
    "--spec-bench-output-len": _DATASET, "--spec-bench-category": _DATASET,
    "--timed-trace-chunk-hash-size": _DATASET, "--timed-trace-sec-multiplier": _DATASET,
    "--timed-trace-label-timestamp": _DATASET, "--timed-trace-label-input-length": _DATASET,
    "--timed-trace-label-output-length": _DATASET, "--timed-trace-label-hash-ids": _DATASET,
    "--self-timed": _DATASET, "--no-self-timed": _DATASET,
    "--blazedit-min-distance": _DATASET, "--blazedit-max-distance": _DATASET,
    "--asr-max-audio-len-sec": _MM, "--asr-min-audio-len-sec": _MM,
    "--random-batch-size": _POOL, "--no-reranker": _POOL,
    "--random-mm-base-items-per-request": _MM, "--random-mm-num-mm-items-range-ratio": _MM,
    "--random-mm-limit-mm-per-prompt": _MM, "--random-mm-bucket-config": _MM,
    "--hf-subset": _HUB, "--hf-split": _HUB, "--hf-name": _HUB, "--hf-output-len": _HUB,
    "--bfcl-categories": _DATASET,
    "--prefix-repetition-prefix-len": _DATASET + " (--random-prefix-len shares a prefix)",
    "--prefix-repetition-suffix-len": _DATASET, "--prefix-repetition-num-prefixes": _DATASET,
    "--prefix-repetition-output-len": _DATASET,
    "--speed-bench-dataset-subset": _DATASET, "--speed-bench-output-len": _DATASET, "--speed-bench-category": _DATASET,
    "--use-beam-search": "beam search is not a serving load: sample or decode greedily (--temperature 0)",
    "--probe-request-rate": "rate probing is not implemented: sweep rates with --request-rate 1,2,4,inf",
    "--profile": "profiling needs a server started with vLLM's torch profiler: run vLLM's own benchmark for it",
    "--append-result": "every run writes its own result file (--result-filename)",
    "--skip-tokenizer-init": "prompts are built and counted with the tokenizer",
    "--insecure": "https certificates are always verified: point SSL_CERT_FILE at the server's certificate",
    "--plot-timeline": _PLOT, "--timeline-itl-thresholds": _PLOT, "--plot-dataset-stats": _PLOT,
}
DATASET_NAMES_REFUSED = {"burstgpt": _DATASET, "random-mm": _MM, "random-rerank": _POOL, "hf": _HUB,
                         "custom_audio": _MM, "custom_image": _MM, "prefix_repetition": _DATASET,
                         "spec_bench": _DATASET, "speed_bench": _DATASET, "timed_trace": _DATASET}
BACKENDS_REFUSED = "llmfast sends completions (openai, vllm) or chat completions (openai-chat) requests only"


class _Refuse(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        raise UserError(f"{option_string} does not apply to llmfast bench serve: {REFUSED[str(option_string)]}")


def _key_values(items: Sequence[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{flag} {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """vLLM's flags under their names (and defaults), plus --api-key, --request-timeout and --stall-timeout."""
    g = p.add_argument_group("server")
    g.add_argument("--base-url", help="server URL, e.g. http://127.0.0.1:8000 (default: http://HOST:PORT)")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--backend", default="openai", help="openai or vllm (completions), openai-chat (chat completions)")
    g.add_argument("--endpoint", default=None,
                   help="API path (default /v1/completions; /v1/chat/completions with --backend openai-chat)")
    g.add_argument("--header", nargs="*", metavar="KEY=VALUE", help="HTTP headers sent with every request")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    g.add_argument("--ready-check-timeout-sec", type=int, default=0,
                   help="wait up to this long for the server to list its models (default 0: it must answer now)")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="model id (default: the server's first model); the name requests use unless "
                   "--served-model-name is given")
    g.add_argument("--served-model-name", help="the name requests send, when it differs from --model")
    g.add_argument("--tokenizer", help="tokenizer directory for building prompts (default: the served model's)")
    g.add_argument("--tokenizer-mode", default="auto", help="auto or hf (both: the model's transformers tokenizer)")
    g.add_argument("--lora-modules", nargs="+", help="LoRA names served by the server; each request names one")
    g.add_argument("--lora-assignment", default="random", choices=["random", "round-robin"])
    g = p.add_argument_group("prompts")
    g.add_argument("--dataset-name", default="random",
                   help="random (token prompts), custom (JSONL of {\"prompt\": ...}), sharegpt (ShareGPT JSON)")
    g.add_argument("--dataset-path", help="the prompt file for custom and sharegpt (a local file)")
    g.add_argument("--num-prompts", type=int, default=1000)
    g.add_argument("--input-len", type=int, help="sets --random-input-len")
    g.add_argument("--output-len", type=int, help="sets the output length of the chosen dataset")
    g.add_argument("--random-input-len", type=int, default=1024)
    g.add_argument("--random-output-len", type=int, default=128)
    g.add_argument("--random-range-ratio", type=float, default=0.0)
    g.add_argument("--random-prefix-len", type=int, default=0, help="shared random tokens before every prompt")
    g.add_argument("--custom-output-len", type=int, default=256, help="output tokens for custom prompts")
    g.add_argument("--sharegpt-output-len", type=int, help="output tokens for sharegpt (default: the reply's length)")
    g.add_argument("--disable-shuffle", action="store_true", help="sharegpt: keep the file's order")
    g.add_argument("--no-oversample", action="store_true", help="accepted: prompts are never repeated")
    g.add_argument("--skip-chat-template", action="store_true", help="accepted: custom prompts are sent as written")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("load")
    g.add_argument("--request-rate", default="inf",
                   help="requests/s, Poisson arrivals; 'inf' sends all at once; a comma list sweeps (e.g. 1,2,inf)")
    g.add_argument("--burstiness", type=float, default=1.0, help="1.0 is Poisson; lower is burstier")
    g.add_argument("--max-concurrency", default=None, help="most requests in flight; a comma list sweeps (e.g. 1,8,64)")
    g.add_argument("--ramp-up-strategy", choices=["linear", "exponential"],
                   help="raise the rate from --ramp-up-start-rps to --ramp-up-end-rps over the run")
    g.add_argument("--ramp-up-start-rps", type=int)
    g.add_argument("--ramp-up-end-rps", type=int)
    g.add_argument("--num-warmups", type=int, default=0, help="requests sent (and not counted) before the run")
    g.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request counts as failed")
    g.add_argument("--stall-timeout", type=float, default=60.0,
                   help="fail in-flight requests when the server sends no token for this long (default 60; 0: never)")
    g.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    g = p.add_argument_group("sampling (sent with every request; default: the server's)")
    g.add_argument("--ignore-eos", action="store_true", help="always generate the full output length")
    for name in ("temperature", "top-p", "min-p", "frequency-penalty", "presence-penalty", "repetition-penalty"):
        g.add_argument(f"--{name}", type=finite)
    g.add_argument("--top-k", type=int)
    g.add_argument("--logprobs", type=int, help="log-probabilities per token to return")
    g.add_argument("--extra-body", help="a JSON object merged into every request body")
    g.add_argument("--chat-template-kwargs", help="a JSON object for the chat template (openai-chat)")
    g.add_argument("--request-id-prefix", help="send x-request-id: PREFIX + the request's index")
    g = p.add_argument_group("results")
    g.add_argument("--percentile-metrics", default="ttft,tpot,itl", help="of ttft,tpot,itl,e2el")
    g.add_argument("--metric-percentiles", default="99", help="e.g. 50,90,99")
    g.add_argument("--goodput", nargs="+", metavar="KEY:MS", help="SLOs for goodput, e.g. ttft:500 tpot:50")
    g.add_argument("--label", help="a label for the result (default: the backend)")
    g.add_argument("--metadata", nargs="*", metavar="KEY=VALUE", help="recorded in the result JSON")
    g.add_argument("--save-result", action="store_true", help="write the result JSON")
    g.add_argument("--save-detailed", action="store_true", help="also keep per-request lists in the JSON")
    g.add_argument("--result-dir", help="folder for result files (default: the current one)")
    g.add_argument("--result-filename", help="file name (a sweep adds -rRATE-cCONC before .json)")
    g.add_argument("--overwrite", action="store_true", help="replace result files of that name (default: refused "
                   "before the run; llmfast's own flag, not vLLM's)")
    for flag in REFUSED:
        p.add_argument(flag, nargs="*", action=_Refuse, help=argparse.SUPPRESS)


def headers_from(args: argparse.Namespace) -> dict[str, str]:
    return _key_values(args.header, "--header")


def metadata_from(args: argparse.Namespace) -> dict[str, str]:
    return _key_values(args.metadata, "--metadata")


def json_object(text: str | None, flag: str) -> dict[str, Any]:
    import json

    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{flag} {text!r}: not valid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise UserError(f"{flag} {text!r}: expected a JSON object such as '{{\"key\": 1}}'")
    return value
