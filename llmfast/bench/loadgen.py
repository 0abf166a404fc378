"""An asyncio load generator for OpenAI-compatible completions and chat-completions endpoints.

Requests stream (`stream: true`, usage in the last chunk) so TTFT and inter-token gaps are observed on the
client, as vLLM's `bench serve` does. Arrivals follow a Poisson process at the request rate (gamma intervals
with burstiness, seeded; optionally ramped from one rate to another), optionally capped by a concurrency
limit. Every failure is recorded with its cause, and no request waits forever: besides the total request
timeout, a request fails once neither it nor any other request has received a token for `stall_timeout`
seconds (a stalled server), while a request merely queued behind others keeps waiting as long as the server
makes progress.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from llmfast.bench.metrics import RequestResult
from llmfast.errors import UserError
from llmfast.serve.endpoint import headers as _headers

if TYPE_CHECKING:
    from llmfast.bench.workload import Request

BACKENDS = {"openai": "completions", "vllm": "completions", "openai-chat": "chat"}  # vLLM's names


@dataclass(frozen=True)
class RampUp:
    strategy: str  # "linear" or "exponential", as vLLM's --ramp-up-strategy
    start_rps: float
    end_rps: float

    def rate(self, i: int, n: int) -> float:
        progress = i / max(n - 1, 1)
        if self.strategy == "linear":
            return self.start_rps + (self.end_rps - self.start_rps) * progress
        return self.start_rps * (self.end_rps / self.start_rps) ** progress


KEEPALIVE_S = 2.0  # below the keep-alive of the servers we measure (vLLM's uvicorn: 5 s)


def arrival_times(n: int, request_rate: float, burstiness: float = 1.0, seed: int = 0,
                  ramp_up: RampUp | None = None) -> list[float]:
    """Send offsets in seconds: all at 0 for an infinite rate, else gamma-distributed gaps (Poisson at 1.0)
    at the request rate, or at the ramp's rate for each request."""
    if burstiness <= 0:
        raise UserError("--burstiness must be positive")
    if ramp_up is None and request_rate == math.inf:
        return [0.0] * n
    rates = [ramp_up.rate(i, n) if ramp_up else request_rate for i in range(n)]
    if min(rates) <= 0:
        raise UserError("--request-rate and the ramp-up rates must be positive")
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (np.asarray(rates) * burstiness), size=n)
    gaps[0] = 0.0
    return np.cumsum(gaps).tolist()


class Progress:
    """The stall clock: when the server last produced a token for any request, and a watchdog that cancels
    every request that has waited `limit` seconds since max(its start, that token). One timestamp per token
    is all the streaming loop pays; the watchdog wakes a few times a second."""

    def __init__(self, stall_timeout: float) -> None:
        self.limit = stall_timeout if stall_timeout > 0 else math.inf
        self.last = time.perf_counter()
        self.inflight: dict["asyncio.Task[Any]", float] = {}  # request task -> its start time
        self.stalled: set["asyncio.Task[Any]"] = set()

    def token(self) -> None:
        self.last = time.perf_counter()

    async def watch(self) -> None:
        while self.limit != math.inf:
            await asyncio.sleep(min(0.25, self.limit / 4))
            now = time.perf_counter()
            for task, start in list(self.inflight.items()):
                if now - max(start, self.last) >= self.limit and task not in self.stalled:
                    self.stalled.add(task)
                    task.cancel()


def _payload(backend: str, model: str, req: "Request", ignore_eos: bool, extra_body: dict[str, Any]) -> dict[str, Any]:
    if BACKENDS[backend] == "chat":
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": req.prompt}],
                                "max_completion_tokens": req.output_len}
    else:
        body = {"model": model, "prompt": req.prompt, "max_tokens": req.output_len}
    body.update(stream=True, stream_options={"include_usage": True})
    if ignore_eos:
        body["ignore_eos"] = True
    return {**body, **extra_body}


def _text(choice: dict[str, Any]) -> str:
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


async def _one(session: Any, url: str, payload: dict[str, Any], req: "Request", hdrs: dict[str, str],
               timeout: float, progress: Progress) -> RequestResult:
    import aiohttp

    res = RequestResult(prompt_len=req.prompt_len)
    start = time.perf_counter()
    res.start_time = last = start
    progress.inflight[asyncio.current_task()] = start  # type: ignore[index]
    chunks = 0
    buffer = b""
    try:
        async with session.post(url, json=payload, headers=hdrs, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                body = (await resp.text())[:300].replace("\n", " ")
                res.error = f"HTTP {resp.status}: {body}"
                return res
            async for data in resp.content.iter_any():
                buffer += data
                # Server-sent events are separated by a blank line; a network chunk may hold several or a part.
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    for line in event.decode("utf-8", errors="replace").splitlines():
                        if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                            continue  # comments, keep-alives, the end marker
                        msg = json.loads(line[5:].strip())
                        if msg.get("choices"):
                            now = time.perf_counter()
                            progress.token()
                            if chunks == 0:
                                res.ttft = now - start
                            else:
                                res.itl.append(now - last)
                            last = now
                            chunks += 1
                            res.generated_text += _text(msg["choices"][0])
                        if msg.get("usage"):
                            res.output_tokens = int(msg["usage"].get("completion_tokens") or 0)
                            res.prompt_len = int(msg["usage"].get("prompt_tokens") or res.prompt_len)
        if chunks == 0:
            res.error = "the stream ended without a token"
            return res
        res.output_tokens = res.output_tokens or chunks
        res.latency = last - start
        res.success = True
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task not in progress.stalled:
            raise  # not ours: the run itself is being cancelled
        if hasattr(task, "uncancel"):  # Python 3.11+: this cancellation is handled, the task goes on
            task.uncancel()
        res.error = f"no token from the server for {progress.limit:.0f} s (--stall-timeout)"
    except asyncio.TimeoutError:
        res.error = f"no complete answer within {timeout:.0f} s (--request-timeout)"
    except Exception as e:  # noqa: BLE001 - every failure becomes a recorded cause, never a crash mid-run
        res.error = f"{type(e).__name__}: {e}".strip()
    finally:
        progress.inflight.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
    return res


def model_names(model: str, lora_modules: list[str] | None, assignment: str, n: int, seed: int) -> list[str]:
    """The model each request names: `model`, or one of the LoRA modules (random, seeded; or round-robin)."""
    if not lora_modules:
        return [model] * n
    if assignment == "round-robin":
        return [lora_modules[i % len(lora_modules)] for i in range(n)]
    rng = np.random.default_rng(seed)
    return [lora_modules[int(i)] for i in rng.integers(0, len(lora_modules), size=n)]


async def run_load(base_url: str, model: str, requests: list["Request"], *, request_rate: float = math.inf,
                   max_concurrency: int | None = None, burstiness: float = 1.0, ignore_eos: bool = False,
                   api_key: str | None = None, seed: int = 0, request_timeout: float = 600.0,
                   stall_timeout: float = 60.0, on_done: Callable[[RequestResult], None] | None = None,
                   backend: str = "openai", endpoint: str = "/v1/completions", extra_body: dict[str, Any] | None = None,
                   extra_headers: dict[str, str] | None = None, lora_modules: list[str] | None = None,
                   lora_assignment: str = "random", ramp_up: RampUp | None = None,
                   num_warmups: int = 0, request_id_prefix: str | None = None) -> tuple[list[RequestResult], float]:
    """Send every request; return the results in request order and the wall duration in seconds.

    `extra_body` goes into every request body (sampling parameters such as {"temperature": 0.0}); without
    them the server's defaults apply, as with `vllm bench serve`. `num_warmups` requests (the first prompts,
    at the concurrency limit) run before the measured ones and are not counted."""
    import aiohttp

    url = base_url.rstrip("/") + endpoint
    hdrs = _headers(api_key, extra_headers)
    names = model_names(model, lora_modules, lora_assignment, len(requests), seed)
    offsets = arrival_times(len(requests), request_rate, burstiness, seed, ramp_up)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    # A pooled connection is reused only within KEEPALIVE_S of its last answer: past the server's own keep-alive
    # (uvicorn's, vLLM's: 5 s) the server closes it, and a request sent as that close crosses it fails with
    # "Server disconnected" (aiohttp's default 15 s let a warm-up's idle connection hit that).
    connector = aiohttp.TCPConnector(limit=max_concurrency or 0, limit_per_host=max_concurrency or 0,
                                     keepalive_timeout=KEEPALIVE_S)
    body = extra_body or {}
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        progress = Progress(stall_timeout)

        async def send(i: int, tag: str = "") -> RequestResult:
            payload = _payload(backend, names[i], requests[i], ignore_eos, body)
            h = {**hdrs, "x-request-id": f"{request_id_prefix}{tag}{i}"} if request_id_prefix else hdrs
            if limit is None:
                return await _one(session, url, payload, requests[i], h, request_timeout, progress)
            async with limit:
                return await _one(session, url, payload, requests[i], h, request_timeout, progress)

        if num_warmups:
            await asyncio.gather(*(send(i % len(requests), f"warmup{i}-") for i in range(num_warmups)))
            progress.stalled.clear()
        t0 = time.perf_counter()
        progress.token()

        async def fire(i: int) -> RequestResult:
            delay = t0 + offsets[i] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            r = await send(i)
            if on_done:
                on_done(r)
            return r

        watchdog = asyncio.ensure_future(progress.watch())
        try:
            results = await asyncio.gather(*(fire(i) for i in range(len(requests))))
        finally:
            watchdog.cancel()
        duration = time.perf_counter() - t0
    return list(results), duration
