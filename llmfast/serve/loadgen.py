"""An asyncio load generator for any OpenAI-compatible completions endpoint.

Requests stream (`stream: true`, usage in the last chunk) so TTFT and inter-token gaps are observed on the
client, as vLLM's `bench serve` does. Arrivals follow a Poisson process at --request-rate (gamma intervals
with --burstiness, seeded), optionally capped by --max-concurrency. Every request has a deadline and every
failure is recorded with its cause, so a server that dies mid-run gives failed requests and an explanation,
never a hang.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from llmfast.errors import UserError
from llmfast.serve.metrics import RequestResult


@dataclass
class Request:
    prompt: str
    prompt_len: int
    output_len: int
    prompt_ids: list[int] | None = None  # for offline engines that take token ids


def random_requests(tokenizer: Any, num: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                    seed: int = 0) -> list[Request]:
    """Prompts of random non-special tokens with exactly the sampled number of tokens after re-encoding."""
    if input_len < 1 or output_len < 1 or num < 1:
        raise UserError("--random-input-len, --random-output-len and --num-prompts must be at least 1")
    if not 0 <= range_ratio < 1:
        raise UserError(f"--random-range-ratio {range_ratio}: must be in [0, 1)")
    rng = np.random.default_rng(seed)
    allowed = _stable_tokens(tokenizer)
    lo_in, hi_in = math.floor(input_len * (1 - range_ratio)), math.ceil(input_len * (1 + range_ratio))
    lo_out, hi_out = max(1, math.floor(output_len * (1 - range_ratio))), math.ceil(output_len * (1 + range_ratio))
    requests = []
    for _ in range(num):
        n_in = max(1, int(rng.integers(lo_in, hi_in + 1)))
        n_out = int(rng.integers(lo_out, hi_out + 1))
        ids = allowed[rng.integers(0, len(allowed), size=n_in)].tolist()
        # Decoding and re-encoding can merge neighbours; converge on a text that encodes to n_in tokens.
        for _ in range(20):
            text = tokenizer.decode(ids)
            ids2 = tokenizer.encode(text, add_special_tokens=False)
            if len(ids2) == n_in:
                break
            ids = (ids2 + allowed[rng.integers(0, len(allowed), size=n_in)].tolist())[:n_in]
        final = tokenizer.encode(text, add_special_tokens=False)
        requests.append(Request(prompt=text, prompt_len=len(final), output_len=n_out, prompt_ids=final))
    return requests


def _stable_tokens(tokenizer: Any) -> np.ndarray:
    """Non-special tokens that decode to whole characters and encode back to themselves alone.

    Byte-level pieces of a multi-byte character decode to U+FFFD and never come back; leaving them out lets
    random prompts keep their exact token count.
    """
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids])
    back = tokenizer(texts, add_special_tokens=False)["input_ids"]
    keep = [i for i, t, b in zip(ids, texts, back) if b == [i] and "\ufffd" not in t]
    if len(keep) < 100:
        raise UserError("the tokenizer has too few round-trip-stable tokens to build random prompts: "
                        "use --dataset-name custom with a prompt file")
    return np.array(keep)


def jsonl_requests(path: str | Path, tokenizer: Any, output_len: int, num: int | None = None) -> list[Request]:
    """Rows {"prompt": str, "output_len": int (optional)} from a JSONL file; bad rows name their line."""
    from llmfast.data.jsonl import read_jsonl

    rows = read_jsonl(path)
    if not rows:
        raise UserError(f"{path}: no prompts (the file is empty)")
    requests = []
    for row in rows[:num] if num else rows:
        line = row.get("_row", "?")
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise UserError(f"{path}:{line}: needs a non-empty string field 'prompt'")
        n_out = row.get("output_len", output_len)
        if not isinstance(n_out, int) or isinstance(n_out, bool) or n_out < 1:
            raise UserError(f"{path}:{line}: 'output_len' must be a positive integer (got {n_out!r})")
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        requests.append(Request(prompt=prompt, prompt_len=len(ids), output_len=n_out, prompt_ids=ids))
    return requests


def arrival_times(n: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send offsets in seconds: all at 0 for an infinite rate, else gamma-distributed gaps (Poisson at 1.0)."""
    if request_rate == math.inf:
        return [0.0] * n
    if request_rate <= 0 or burstiness <= 0:
        raise UserError("--request-rate and --burstiness must be positive")
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n)
    gaps[0] = 0.0
    return np.cumsum(gaps).tolist()


def _headers(api_key: str | None) -> dict[str, str]:
    h = {"Content-Type": "application/json"}
    if api_key:
        h["Authorization"] = f"Bearer {api_key}"
    return h


async def _one(session: Any, url: str, model: str, req: Request, ignore_eos: bool, api_key: str | None,
               timeout: float, sampling: dict[str, float] | None = None) -> RequestResult:
    import aiohttp

    payload = {"model": model, "prompt": req.prompt, "max_tokens": req.output_len, **(sampling or {}),
               "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos}
    res = RequestResult(prompt_len=req.prompt_len)
    start = time.perf_counter()
    res.start_time = start
    last = start
    chunks = 0
    buffer = b""
    try:
        async with session.post(url, json=payload, headers=_headers(api_key),
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
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
                        if not line.startswith("data:"):
                            continue  # comments and keep-alives
                        body = line[5:].strip()
                        if body == "[DONE]":
                            continue
                        msg = json.loads(body)
                        if msg.get("choices"):
                            now = time.perf_counter()
                            if chunks == 0:
                                res.ttft = now - start
                            else:
                                res.itl.append(now - last)
                            last = now
                            chunks += 1
                            res.generated_text += msg["choices"][0].get("text") or ""
                        if msg.get("usage"):
                            res.output_tokens = int(msg["usage"].get("completion_tokens") or 0)
                            res.prompt_len = int(msg["usage"].get("prompt_tokens") or res.prompt_len)
        if chunks == 0:
            res.error = "the stream ended without a token"
            return res
        res.output_tokens = res.output_tokens or chunks
        res.latency = last - start
        res.success = True
    except asyncio.TimeoutError:
        res.error = f"no complete answer within {timeout:.0f} s (--request-timeout)"
    except Exception as e:  # noqa: BLE001 - every failure becomes a recorded cause, never a crash mid-run
        res.error = f"{type(e).__name__}: {e}".strip()
    return res


async def run_load(base_url: str, model: str, requests: list[Request], request_rate: float = math.inf,
                   max_concurrency: int | None = None, burstiness: float = 1.0, ignore_eos: bool = False,
                   api_key: str | None = None, seed: int = 0, request_timeout: float = 600.0,
                   on_done: Callable[[RequestResult], None] | None = None,
                   endpoint: str = "/v1/completions",
                   sampling: dict[str, float] | None = None) -> tuple[list[RequestResult], float]:
    """Send every request; return the results in request order and the wall duration in seconds.

    `sampling` goes into every request body (e.g. {"temperature": 0.0}); without it the server's defaults apply,
    as with `vllm bench serve`."""
    import aiohttp

    url = base_url.rstrip("/") + endpoint
    offsets = arrival_times(len(requests), request_rate, burstiness, seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    connector = aiohttp.TCPConnector(limit=max_concurrency or 0, limit_per_host=max_concurrency or 0)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        t0 = time.perf_counter()

        async def fire(i: int) -> RequestResult:
            delay = t0 + offsets[i] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if limit is None:
                r = await _one(session, url, model, requests[i], ignore_eos, api_key, request_timeout, sampling)
            else:
                async with limit:
                    r = await _one(session, url, model, requests[i], ignore_eos, api_key, request_timeout, sampling)
            if on_done:
                on_done(r)
            return r

        results = await asyncio.gather(*(fire(i) for i in range(len(requests))))
        duration = time.perf_counter() - t0
    return list(results), duration


def served_models(base_url: str, api_key: str | None = None, timeout: float = 10.0) -> list[dict[str, Any]]:
    """GET /v1/models; an unreachable or refusing endpoint is a one-line error."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(base_url.rstrip("/") + "/v1/models", headers=_headers(api_key))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return list(json.loads(r.read()).get("data") or [])
    except urllib.error.HTTPError as e:
        hint = " (give --api-key or set OPENAI_API_KEY)" if e.code == 401 else ""
        raise UserError(f"{base_url}: /v1/models answered HTTP {e.code}{hint}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"cannot reach {base_url} ({reason}): start a server with `llmfast serve MODEL` "
                        "or check --base-url") from None
