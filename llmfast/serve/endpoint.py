"""Talking to an OpenAI-compatible server: its URL, /health, /v1/models, and "is it ready for this model".

One place for these, used by `llmfast serve` (is *our* server up?) and by the benchmarks (what does this
server serve? did it stop answering?). Every way a URL can be wrong (not a URL, nothing listening, something
that is not HTTP, an HTTP error) becomes one line naming the URL.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable

from llmfast.errors import UserError


def check_base_url(url: str, flag: str = "--base-url") -> str:
    """An http(s)://HOST[:PORT][/PATH] URL without its trailing slash, or a one-line error."""
    parsed = urllib.parse.urlparse(url.strip())
    try:
        parsed.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        raise UserError(f"{flag} {url!r}: the port is not a number from 0 to 65535") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UserError(f"{flag} {url!r}: expected a URL such as http://127.0.0.1:8000")
    return url.strip().rstrip("/")


def headers(api_key: str | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    h = {"Content-Type": "application/json", **(extra or {})}
    if api_key:
        h["Authorization"] = f"Bearer {api_key}"
    return h


class Answered(UserError):
    """A server answered with an HTTP error status: it is up, so hints to start one do not apply."""


def get_json(url: str, api_key: str | None = None, timeout: float = 10.0) -> Any:
    """GET a JSON document; every failure is a UserError naming the URL and the cause."""
    req = urllib.request.Request(url, headers=headers(api_key))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
    except urllib.error.HTTPError as e:
        hint = " (give --api-key or set OPENAI_API_KEY)" if e.code == 401 else ""
        raise Answered(f"{url} answered HTTP {e.code}{hint}") from None
    except urllib.error.URLError as e:
        raise UserError(f"cannot reach {url} ({e.reason})") from None
    except TimeoutError:
        raise UserError(f"{url} did not answer within {timeout:.0f} s") from None
    except (http.client.HTTPException, OSError) as e:  # a port that speaks something else, a reset
        raise UserError(f"{url} did not answer in HTTP ({type(e).__name__}): is this an HTTP server?") from None
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{url} answered something that is not JSON ({body[:60]!r})") from None


def healthy(base_url: str, timeout: float = 5.0) -> bool:
    """/health answers 200 (vLLM's liveness endpoint)."""
    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except Exception:  # noqa: BLE001 - any failure means "not healthy"
        return False


def served_models(base_url: str, api_key: str | None = None, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The entries of GET /v1/models; an unreachable or foreign endpoint is a one-line error."""
    try:
        doc = get_json(base_url.rstrip("/") + "/v1/models", api_key, timeout)
    except Answered:  # a server that answered an HTTP error (401: it wants a key) is there: no hint to start one
        raise
    except UserError as e:
        raise UserError(f"{e} (start a server with `llmfast serve MODEL` or check --base-url)") from None
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        raise UserError(f"{base_url}/v1/models is not an OpenAI model list: is this an OpenAI-compatible server?")
    return [m for m in data if isinstance(m, dict)]


def wait_ready(base_url: str, model: str, alive: Callable[[], bool], timeout: float, api_key: str | None = None,
               why_dead: Callable[[], str] = lambda: "") -> None:
    """Wait until the server process is alive, /health answers and /v1/models names `model`.

    /health alone is not enough: another server on the port may answer it. A process that exits is reported
    at once with `why_dead()`; a server that never gets ready within `timeout` seconds is a TimeoutError.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise UserError(why_dead() or "the server exited during start-up")
        if healthy(base_url):
            try:
                if model in [m.get("id") for m in served_models(base_url, api_key)]:
                    if alive():
                        return
            except UserError:
                pass  # /health can answer before the API routes do
        time.sleep(0.5)
    raise TimeoutError(f"{base_url} did not serve '{model}' within {timeout:.0f} s")
