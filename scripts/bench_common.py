"""The house's measuring rules in one place for the benchmark scripts under scripts/ (imported by them, not run).

- rounds alternate the sides' order (llmfast.timing.order) after warm-up calls that are not recorded;
- each side is summarised by its median over the rounds and its spread ((max - min) / median), and a comparison by
  the ratio of the medians with the larger of the two spreads beside it, so a reader sees whether the ratio is
  bigger than the noise; one measurement (--rounds 1) has no spread to measure: it is unknown (None in the JSON,
  "n/a" in a table, through `pct`), never 0, and a ratio beside an unknown spread is not called beyond the noise;
- the load average is read before measuring: a busy machine (another job, another benchmark) slows the sides
  unevenly, so the script warns and the JSON says so;
- the JSON carries its provenance (llmfast.provenance) and never replaces an existing file without --force, which
  is checked before any measuring so a refused run wastes nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python scripts/x.py` from anywhere

from llmfast.provenance import provenance  # noqa: E402
from llmfast import timing  # noqa: E402

# A 1-minute load average above this is a machine with other runnable work: timings from it are not for BENCHMARKS.md
# (a merge speed-up measured under load, 2.4-5.3x, was 1.4-2.0x when re-measured idle).
BUSY_LOAD = 0.5
order = timing.order  # the sides' order in a round: reversed every other round


def add_output_args(ap: argparse.ArgumentParser, default: str | None, flag: str = "--json") -> None:
    """The JSON's path (`flag`) and --force, the explicit permission to replace a file already there."""
    ap.add_argument(flag, default=default, help=f"where the JSON goes (default: {default})")
    ap.add_argument("--force", action="store_true", help="replace the JSON file if it exists")


def check_output(path: str | os.PathLike[str] | None, force: bool, flag: str = "--json") -> None:
    """Exit 2 with one line, before anything is measured, when `path` exists and --force was not given."""
    if path is not None and Path(path).exists() and not force:
        print(f"error: {path} exists: give another {flag} or --force to replace it", file=sys.stderr)
        raise SystemExit(2)


def machine_state(note: str = "") -> dict[str, Any]:
    """The load average and CPUs now, with `busy` set (and a warning printed) when other work is running."""
    load = [round(x, 2) for x in os.getloadavg()]
    busy = load[0] > BUSY_LOAD
    if busy:
        print(f"WARNING: load average {load[0]:.2f} on {os.cpu_count()} CPUs{note}: the machine is not idle, so these "
              "timings are not for BENCHMARKS.md (measure again on an idle machine)", file=sys.stderr, flush=True)
    return {"loadavg": load, "cpus": os.cpu_count(), "busy": busy}


def rounds(sides: dict[str, Callable[[], Any]], n: int, warmup: int = 0) -> tuple[dict[str, list[Any]], list[str]]:
    """Each side's `n` measurements (whatever a side returns: seconds, or a dict of phases) and the order they were
    taken in: `warmup` unrecorded calls of each side first, then llmfast.timing.rounds (order reversed every other
    round)."""
    for f in sides.values():
        for _ in range(warmup):
            f()
    return timing.rounds(sides, n)


def spread(values: Iterable[float]) -> dict[str, Any]:
    """Median, min, max and the relative spread (max - min) / median of one side's measurements; the spread is None
    (unknown) for a single measurement, which shows no noise however noisy the machine, and for a median of 0 with
    values that differ (relative to nothing)."""
    v = list(values)
    med, lo, hi = statistics.median(v), min(v), max(v)
    rel = None if len(v) < 2 or (med == 0 and hi != lo) else (hi - lo) / med if med else 0.0
    return {"median": med, "min": lo, "max": hi, "spread": rel, "n": len(v)}


def largest(spreads: Iterable[float | None]) -> float | None:
    """The largest of some sides' spreads, the noise of a row of them: None (unknown) when any side's is unknown."""
    v = list(spreads)
    return None if any(x is None for x in v) else max(v)


def pct(x: float | None, decimals: int = 0) -> str:
    """A spread for a printed table: a percentage, or "n/a" where it is unknown (one round)."""
    return "n/a" if x is None else f"{x:.{decimals}%}"


def percent(x: float | None) -> float | None:
    """A spread as the tables' "spread %" cell (one decimal), None where it is unknown."""
    return None if x is None else round(100 * x, 1)


def print_rows(rows: list[dict[str, Any]]) -> None:
    """Rows as a markdown table, the columns every key in the order first seen; a row without a key has an empty
    cell, an unknown value (None: a spread of one round) "n/a"."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join("n/a" if r.get(k, "") is None else str(r.get(k, "")) for k in keys) + " |")


def medians(sides: dict[str, Callable[[], float]], n: int, warmup: int = 0) -> tuple[dict[str, float], float | None]:
    """Each side's median over `rounds` and the largest relative spread among the sides (the row's noise; None when
    n is 1)."""
    got, _ = rounds(sides, n, warmup)
    stats = {s: spread(v) for s, v in got.items()}
    return {s: v["median"] for s, v in stats.items()}, largest(v["spread"] for v in stats.values())


def compare(ours: Iterable[float], baseline: Iterable[float]) -> dict[str, Any]:
    """Both sides' spreads and the ratio median(ours) / median(baseline); `noise` is the larger relative spread,
    and `beyond_noise` says whether the ratio's distance from 1 is bigger than it (None where either is unknown:
    no ratio, or a side with one measurement)."""
    o, b = spread(ours), spread(baseline)
    ratio = o["median"] / b["median"] if b["median"] else None  # a baseline of 0 (no failures, say) has no ratio
    noise = largest([o["spread"], b["spread"]])
    return {"ours": o, "baseline": b, "ratio": ratio, "noise": noise,
            "beyond_noise": None if ratio is None or noise is None else abs(ratio - 1) > noise}


def write_json(path: str | os.PathLike[str], record: dict[str, Any], force: bool, state: dict[str, Any] | None,
               used: Iterable[str] = (), threads: int | None = None) -> Path:
    """`record` with its provenance and the machine's state (before and after; none where `state` is None: a record
    of no timings) written as llmfast's bench results are (llmfast.bench.online.save_result): in one step through a
    temporary file, an existing file replaced only with `force`. One that appeared while measuring (another run on
    the same default path; the start checked with check_output) keeps its contents, and the record goes beside it
    under the first free -2, -3 name, said on stderr, so the measurements are not lost."""
    from llmfast.bench.online import save_result

    full = {**record, "provenance": provenance(used, threads)}
    if state is not None:
        full["machine_state"] = {"start": state, "end": machine_state(" at the end")}
    return save_result(Path(path), full, replace=force)
