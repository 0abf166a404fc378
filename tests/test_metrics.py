"""The numbers the bench prints, recomputed another way: the serving metrics against vLLM's own `calculate_metrics`
(vllm/benchmarks/serve.py) and against textbook arithmetic on the same recorded timings; the report's columns
against the points they name."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llmfast.bench.metrics import RequestResult, compute_metrics

PERCENTILES = [25.0, 50.0, 90.0, 99.0, 99.9]
# SLOs (ms) whose float boundary a request below sits on: 0.043000000000000003 s is over 43 ms as vLLM compares
# (s against ms / 1000) but 43.0 ms after * 1000; 0.0637 s less one ulp is within 63.7 ms, and 63.7000...01 ms after
# * 1000 (found by a scan of SLOs 0.1 ms apart)
TTFT_EDGE, E2EL_EDGE = 0.043 * (1 + 2**-52), 0.0637 * (1 - 2**-53)
GOODPUTS = [{"ttft": 43.0}, {"e2el": 63.7}, {"ttft": 43.0, "tpot": 9.0, "e2el": 63.7}, {"tpot": 0.0}]


@pytest.fixture(scope="module")
def recorded() -> list[RequestResult]:
    """40 requests as the load generator records them: random TTFTs and gaps, some of one token (no TPOT), some
    failed (counted nowhere but `failed`), two on the SLO boundaries above."""
    rng = np.random.default_rng(7)
    out = []
    for i in range(40):
        n = int(rng.integers(1, 9)) if i % 7 else 1
        ttft = float(rng.uniform(0.01, 0.2))
        itl = [float(g) for g in rng.uniform(0.001, 0.02, size=n - 1)]
        r = RequestResult(success=i % 11 != 5, prompt_len=int(rng.integers(3, 50)), output_tokens=n, ttft=ttft,
                          itl=itl, latency=ttft + sum(itl), start_time=float(rng.uniform(100.0, 102.5)))
        if not r.success:
            r.error, r.output_tokens, r.itl = "HTTP 500: boom", 0, []
        out.append(r)
    out[1].ttft = TTFT_EDGE
    out[2].itl, out[2].output_tokens, out[2].latency = [], 1, E2EL_EDGE
    assert out[1].success and out[2].success
    return out


def test_serving_metrics_equal_vllms_calculate_metrics(recorded):
    """Counts, throughputs, goodput, the peaks and every mean/median/std/percentile are vLLM's for the same requests
    (to float64 rounding: vLLM scales after averaging, llmfast before; 1e-12 relative is thousands of ulps). Goodput
    is a count and must be equal: an SLO met exactly at its boundary was judged in milliseconds (seconds * 1000)
    where vLLM divides the SLO by 1000, and differed in the last bit."""
    serve = pytest.importorskip("vllm.benchmarks.serve")
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncOutput

    theirs_in = [RequestFuncOutput(success=r.success, latency=r.latency, output_tokens=r.output_tokens, ttft=r.ttft,
                                   itl=list(r.itl), prompt_len=r.prompt_len, error=r.error, start_time=r.start_time)
                 for r in recorded]
    duration = 3.7
    for slos in GOODPUTS:
        ours = compute_metrics(recorded, duration, PERCENTILES, ["ttft", "tpot", "itl", "e2el"], slos)
        theirs, _ = serve.calculate_metrics([], theirs_in, duration, None, PERCENTILES, slos)
        assert (ours["completed"], ours["failed"], ours["total_input_tokens"], ours["total_output_tokens"]) == (
            theirs.completed, theirs.failed, theirs.total_input, theirs.total_output)
        assert ours["request_goodput"] * duration == pytest.approx(theirs.request_goodput * duration, abs=1e-9), slos
        assert (ours["max_output_tokens_per_s"], ours["max_concurrent_requests"]) == (
            theirs.max_output_tokens_per_s, theirs.max_concurrent_requests)
        for key in ("request_throughput", "output_throughput", "total_token_throughput"):
            assert ours[key] == pytest.approx(getattr(theirs, key), rel=1e-12), key
        for name in ("ttft", "tpot", "itl", "e2el"):
            for stat in ("mean", "median", "std"):
                key = f"{stat}_{name}_ms"
                assert ours[key] == pytest.approx(getattr(theirs, key), rel=1e-12, abs=1e-12), key
            for p, value in getattr(theirs, f"percentiles_{name}_ms"):
                key = f"p{int(p) if int(p) == p else p}_{name}_ms"
                assert ours[key] == pytest.approx(value, rel=1e-12), key
    good = compute_metrics(recorded, 1.0, goodput=GOODPUTS[0])["request_goodput"]
    assert recorded[1].ttft > 0.043 and recorded[1].ttft * 1000 == 43.0  # the boundary request is not good
    assert good == sum(r.success and r.ttft <= 0.043 for r in recorded) == 6


def _percentile(values: list[float], p: float) -> float:
    """The linear-interpolation percentile of the textbook (numpy's and vLLM's default): rank p/100 * (n - 1)."""
    xs = sorted(values)
    rank = p / 100 * (len(xs) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def test_serving_metrics_by_hand(recorded):
    """The same numbers from their definitions, in plain Python: only successful requests count; TPOT is (E2EL -
    TTFT) / (output tokens - 1) over requests of two tokens or more; ITLs are pooled over requests; throughputs divide
    by the run's wall time; std is the population's; percentiles interpolate between ranks."""
    duration = 2.5
    m = compute_metrics(recorded, duration, PERCENTILES, ["ttft", "tpot", "itl", "e2el"])
    ok = [r for r in recorded if r.success]
    assert (m["completed"], m["failed"]) == (len(ok), len(recorded) - len(ok)) == (36, 4)
    assert m["total_output_tokens"] == sum(r.output_tokens for r in ok)
    assert m["output_throughput"] == pytest.approx(sum(r.output_tokens for r in ok) / duration, rel=1e-12)
    assert m["total_token_throughput"] == pytest.approx(sum(r.output_tokens + r.prompt_len for r in ok) / duration,
                                                        rel=1e-12)
    assert m["request_throughput"] == pytest.approx(36 / duration, rel=1e-12)
    series = {"ttft": [r.ttft for r in ok], "e2el": [r.latency for r in ok],
              "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1],
              "itl": [g for r in ok for g in r.itl]}
    assert len(series["tpot"]) < len(ok) and len(series["itl"]) == sum(r.output_tokens - 1 for r in ok)
    for name, xs in series.items():
        ms = [1000 * x for x in xs]
        mean = sum(ms) / len(ms)
        assert m[f"mean_{name}_ms"] == pytest.approx(mean, rel=1e-12)
        assert m[f"std_{name}_ms"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in ms) / len(ms)), rel=1e-9)
        assert m[f"median_{name}_ms"] == pytest.approx(_percentile(ms, 50), rel=1e-12)
        for p in PERCENTILES:
            key = f"p{int(p) if int(p) == p else p}_{name}_ms"
            assert m[key] == pytest.approx(_percentile(ms, p), rel=1e-12), key


def _variant(name: str, points: dict[int, float]) -> dict:
    return {"name": name, "engine": "vllm", "peak_rss_gib": 1.0, "notes": [], "lineage": [], "size": {},
            "quality": None, "training_logs": {},
            "points": [{"max_concurrency": c, "output_throughput": t, "request_throughput": 1.0,
                        "total_token_throughput": t, "median_ttft_ms": c * 10.0, "median_tpot_ms": c * 1.0,
                        "p99_e2el_ms": 99.0, "failed": 0, "status": "ok"} for c, t in points.items()]}


def test_the_summarys_speed_columns_hold_the_points_they_name():
    """"out tok/s c=16" holds each variant's point at concurrency 16: a variant whose server stopped after its c=1
    point showed that point's throughput under c=16 (its own highest point), and one measured from c=4 showed its c=4
    TTFT under "TTFT p50 ms c=1"."""
    from llmfast.bench.report import markdown

    results = {"name": "t", "date": "d", "machine": "m", "comparisons": [],
               "workload": {"num_prompts": 4, "input_len": 8, "output_len": 8, "ignore_eos": True,
                            "request_rate": "inf", "max_concurrency": [1, 4, 16], "percentiles": [50]},
               "variants": [_variant("full", {1: 30.0, 4: 90.0, 16: 200.0}), _variant("died", {1: 31.0}),
                            _variant("late", {4: 95.0, 16: 210.0})]}
    summary = markdown(results, []).split("## Variants")[1].split("## Every load level")[0]
    head, _, *rows = [line.split("|")[1:-1] for line in summary.splitlines() if line.startswith("|")]
    cols = {h.strip(): i for i, h in enumerate(head)}
    got = {r[0].strip(): [r[cols[k]].strip() for k in ("out tok/s c=1", "out tok/s c=16", "TTFT p50 ms c=1",
                                                        "TPOT p50 ms c=1")] for r in rows}
    assert got == {"full": ["30.0", "200.0", "10.0", "1.0"], "died": ["31.0", "-", "10.0", "1.0"],
                   "late": ["-", "210.0", "-", "-"]}


def test_peak_tokens_and_concurrency_count_whole_seconds_from_the_first_send():
    """vLLM's peaks by hand: tokens land at start + TTFT + the ITLs so far, in the second (from the first send) they
    fall in; a request is in flight in every second from its send's to its last token's, both counted."""
    from llmfast.bench.metrics import peak_rates

    a = RequestResult(success=True, output_tokens=4, start_time=10.0, ttft=0.5, itl=[0.2, 0.2, 0.2], latency=1.1)
    b = RequestResult(success=True, output_tokens=2, start_time=10.9, ttft=0.3, itl=[1.0], latency=1.3)
    c = RequestResult(success=True, output_tokens=1, start_time=12.5, ttft=0.1, latency=0.1)
    # tokens: a at 0.5, 0.7, 0.9, 1.1 s; b at 1.2, 2.2; c at 2.6 -> seconds 0: 3, 1: 2, 2: 2
    # in flight: a in seconds 0-1, b 0-2, c 2 -> 0: 2, 1: 2, 2: 2
    assert peak_rates([a, b, c]) == (3.0, 2)
    assert peak_rates([]) == (0.0, 0)
    m = compute_metrics([a, b, c, RequestResult(error="boom")], 3.0)
    assert (m["max_output_tokens_per_s"], m["max_concurrent_requests"]) == (3.0, 2)
