"""Serving metrics by vLLM's definitions (vllm/benchmarks/serve.py), with its result-JSON key names.

Per successful request: TTFT is the time to the first streamed token; TPOT is (E2EL - TTFT) / (output tokens
- 1), so it excludes the first token and is defined only for outputs longer than one token; ITL are the gaps
between streamed chunks; E2EL is send-to-last-token. Throughputs divide by the benchmark's wall duration; the
peaks are the busiest whole second's streamed tokens and requests in flight.
A request is "good" when every SLO given to --goodput holds (a one-token output counts as TPOT 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmfast.errors import UserError

METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass
class RequestResult:
    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0  # seconds
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0  # E2EL, seconds
    start_time: float = 0.0
    generated_text: str = ""
    error: str = ""

    @property
    def tpot(self) -> float | None:
        if not self.success or self.output_tokens <= 1:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def parse_percentiles(text: str) -> list[float]:
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UserError(f"--metric-percentiles {text!r}: expected numbers such as 50,90,99") from None
    if not values or any(not 0 < p <= 100 for p in values):
        raise UserError(f"--metric-percentiles {text!r}: each percentile must be in (0, 100]")
    return values


def parse_metric_names(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise UserError(f"--percentile-metrics {text!r}: choose from {','.join(METRICS)}")
    return names


def parse_goodput(pairs: list[str] | None) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] -> SLOs in milliseconds, as vLLM's --goodput takes them."""
    slos: dict[str, float] = {}
    for pair in pairs or []:
        for item in pair.split():
            name, sep, value = item.partition(":")
            if not sep or name not in ("ttft", "tpot", "e2el"):
                raise UserError(f"--goodput {item!r}: expected ttft:MS, tpot:MS or e2el:MS")
            try:
                slos[name] = float(value)
            except ValueError:
                raise UserError(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from None
            if not slos[name] >= 0:  # NaN too: no request would meet it, a goodput of 0 from a typo
                raise UserError(f"--goodput {item!r}: an SLO cannot be negative or NaN: give milliseconds, 0 or more")
    return slos


def _word(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def peak_rates(ok: list[RequestResult]) -> tuple[float, int]:
    """vLLM's "peak output token throughput" and "peak concurrent requests": streamed tokens (one per chunk, at
    TTFT and after each ITL) and requests in flight, counted in whole seconds from the first send; the busiest
    second of each. (0.0, 0) without a successful request."""
    if not ok:
        return 0.0, 0
    first = min(r.start_time for r in ok)
    seconds = int(math.ceil(max(r.start_time + r.latency for r in ok) - first)) + 1
    tokens, active = [0] * seconds, [0] * seconds
    for r in ok:
        t = r.start_time + r.ttft
        for gap in [0.0, *r.itl]:
            t += gap
            if 0 <= int(t - first) < seconds:
                tokens[int(t - first)] += 1
        for second in range(int(r.start_time - first), int(r.start_time + r.latency - first) + 1):
            active[second] += 1
    return float(max(tokens)), max(active)


def compute_metrics(
    results: list[RequestResult],
    duration: float,
    percentiles: list[float] = [99.0],  # noqa: B006 - read only
    metrics: list[str] = ["ttft", "tpot", "itl"],  # noqa: B006 - vLLM's default selection
    goodput: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The summary dict: counts, throughputs, and mean/median/std/pNN of the selected latency metrics in ms."""
    ok = [r for r in results if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    values = {
        "ttft": [r.ttft for r in ok],
        "tpot": [r.tpot for r in ok if r.tpot is not None],
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.latency for r in ok],
    }
    out: dict[str, Any] = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "request_goodput": None,
        "output_throughput": total_out / duration if duration > 0 else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration > 0 else 0.0,
    }
    out["max_output_tokens_per_s"], out["max_concurrent_requests"] = peak_rates(ok)
    if goodput:
        good = 0
        for r in ok:
            seen = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.latency}
            # seconds against the SLO over 1000, as vLLM compares them: ms against the SLO differed in the last bit
            good += all(seen[k] <= slo / 1000 for k, slo in goodput.items())
        out["request_goodput"] = good / duration if duration > 0 else 0.0
    for name in metrics:
        v = np.asarray(values[name] or [0.0]) * 1000  # vLLM reports 0 for an empty set, not NaN
        out[f"mean_{name}_ms"] = float(v.mean())
        out[f"median_{name}_ms"] = float(np.median(v))
        out[f"std_{name}_ms"] = float(v.std())
        for p in percentiles:
            out[f"p{_word(p)}_{name}_ms"] = float(np.percentile(v, p))
    errors: dict[str, int] = {}
    for r in results:
        if not r.success:
            key = (r.error or "unknown error").strip().splitlines()[-1][:300]
            errors[key] = errors.get(key, 0) + 1
    out["error_counts"] = errors
    return out


def format_summary(result: dict[str, Any], title: str = "Serving Benchmark Result") -> str:
    """A plain text block in the shape of vLLM's printout."""
    lines = [f"{' ' + title + ' ':=^60}"]

    def row(label: str, value: Any, fmt: str = "") -> None:
        lines.append(f"{label:<44} {value:{fmt}}" if value is not None else f"{label:<44} -")

    row("Successful requests:", result["completed"])
    row("Failed requests:", result["failed"])
    if result.get("max_concurrency") is not None:
        row("Maximum request concurrency:", result["max_concurrency"])
    row("Benchmark duration (s):", result["duration"], ".2f")
    row("Total input tokens:", result["total_input_tokens"])
    row("Total generated tokens:", result["total_output_tokens"])
    row("Request throughput (req/s):", result["request_throughput"], ".2f")
    if result.get("request_goodput") is not None:
        row("Request goodput (req/s):", result["request_goodput"], ".2f")
    row("Output token throughput (tok/s):", result["output_throughput"], ".2f")
    row("Total token throughput (tok/s):", result["total_token_throughput"], ".2f")
    if result.get("max_output_tokens_per_s") is not None:  # absent from results written before llmfast had them
        row("Peak output token throughput (tok/s):", result["max_output_tokens_per_s"], ".2f")
        row("Peak concurrent requests:", result["max_concurrent_requests"])
    for name in METRICS:
        if f"mean_{name}_ms" not in result:
            continue
        lines.append(f"{' ' + name.upper() + ' ':-^60}")
        for k, v in result.items():
            if k.endswith(f"_{name}_ms") and not k.startswith("std_"):
                stat = k[: -len(f"_{name}_ms")]
                row(f"{stat.capitalize() if stat in ('mean', 'median') else stat.upper()} {name.upper()} (ms):", v, ".2f")
    for err, n in (result.get("error_counts") or {}).items():
        lines.append(f"error x{n}: {err}")
    lines.append("=" * 60)
    return "\n".join(lines)
