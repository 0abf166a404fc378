"""The benchmark scripts' measuring rules (scripts/bench_common.py and the scripts that use it), asserted on what they
record (order of the rounds, medians, ratios, spread, provenance, the refusal to replace a file), never on a time."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import bench_common  # noqa: E402

PY = [sys.executable]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _counter(values):
    it = iter(values)
    return lambda: next(it)


def test_rounds_alternate_after_unrecorded_warmup():
    """Warm-up values are not recorded; then each round's order is the previous one's reversed."""
    got, order = bench_common.rounds({"ours": _counter([99, 1, 2, 3, 4]), "base": _counter([99, 5, 6, 7, 8])}, 4,
                                     warmup=1)
    assert got == {"ours": [1, 2, 3, 4], "base": [5, 6, 7, 8]}
    assert order == ["ours", "base", "base", "ours", "ours", "base", "base", "ours"]
    assert [bench_common.order(["a", "b"], r) for r in range(3)] == [["a", "b"], ["b", "a"], ["a", "b"]]


def test_compare_is_median_over_median_with_spread():
    """The ratio is median(ours) / median(baseline), not a mean or a min; the spread is (max - min) / median."""
    c = bench_common.compare([1.0, 9.0, 2.0], [4.0, 4.0, 100.0])
    assert c["ratio"] == pytest.approx(2.0 / 4.0)
    assert c["ours"] == {"median": 2.0, "min": 1.0, "max": 9.0, "spread": pytest.approx(4.0), "n": 3}
    assert c["noise"] == pytest.approx(24.0) and c["beyond_noise"] is False
    tight = bench_common.compare([1.0, 1.01], [2.0, 2.02])
    assert tight["beyond_noise"] is True
    assert bench_common.compare([1.0], [0.0])["ratio"] is None
    med, noise = bench_common.medians({"a": _counter([3, 1, 2]), "b": _counter([10, 10, 10])}, 3)
    assert med == {"a": 2, "b": 10} and noise == pytest.approx(1.0)


def test_one_round_has_an_unknown_spread_never_beyond_noise():
    """One measurement shows no spread however noisy the machine: the spread and the noise are unknown (None in the
    JSON, "n/a" printed), never 0, and a ratio beside them is not called beyond the noise, however far from 1."""
    c = bench_common.compare([1.0], [3.0])
    assert c["ratio"] == pytest.approx(1 / 3) and c["ours"]["spread"] is None and c["ours"]["n"] == 1
    assert c["noise"] is None and c["beyond_noise"] is None
    mixed = bench_common.compare([1.0, 1.01], [3.0])  # one side measured once: the row's noise is unknown
    assert mixed["ours"]["spread"] == pytest.approx(0.01 / 1.005) and mixed["noise"] is None
    assert mixed["beyond_noise"] is None
    assert bench_common.spread([0.0, 0.0, 5.0])["spread"] is None  # values that differ around a median of 0
    assert bench_common.spread([0.0, 0.0])["spread"] == 0.0  # no failures in every round: no spread at all
    med, noise = bench_common.medians({"a": _counter([3]), "b": _counter([10])}, 1)
    assert med == {"a": 3, "b": 10} and noise is None
    assert bench_common.largest([0.1, None]) is None and bench_common.largest([0.1, 0.3]) == 0.3
    assert (bench_common.pct(None), bench_common.pct(0.25), bench_common.pct(0.0123, 1)) == ("n/a", "25%", "1.2%")
    assert bench_common.percent(None) is None and bench_common.percent(0.0123) == 1.2
    assert json.loads(json.dumps(c))["noise"] is None


def test_one_round_tables_print_n_a(capsys):
    """The tables of the scripts that keep their own printing (compare_mergekit, merge_trim_memory, the markdown rows
    of bench_ternary and bench_sparse_decode) print an unknown spread as n/a, and a measured one as a percentage."""
    import compare_mergekit
    import merge_trim_memory

    side = {"median_seconds": 2.0, "peak_rss_gib": 1.0, "gb_per_s": 1.0}
    method = {"diff": {"max_abs_diff": 0.0}, "llmfast": side, "mergekit": side, "speedup": 1.0, "rss_ratio": 1.0,
              "llmfast_over_floor": 3.0}
    compare_mergekit.print_table({"shape": "135m", "dtype": "float32", "threads": 2, "rounds": 1,
                                  "loadavg_at_start": [0.1], "methods": {"linear": {**method, "noise": None},
                                                                         "ties": {**method, "noise": 0.04}}})
    version = {"wall_s_median": 1.0, "wall_ratio_vs_a": 1.0, "rss_growth_median": 0.0, "rss_bytes_per_entry": 0.0,
               "numpy_peak_bytes_per_entry": 0.0}
    merge_trim_memory.print_row({"shape": "135m", "method": "ties", "dtype": "float32", "models": 2, "entries": 10,
                                 "threads": 2, "density": 0.5, "grid": True, "rescale": True, "native": True,
                                 "identical_outputs": True, "versions": {"a": {**version, "noise": None},
                                                                          "b": {**version, "noise": 0.5}}})
    bench_common.print_rows([{"case": "x", "spread %": bench_common.percent(None)}, {"case": "y", "spread %": 1.5}])
    lines = capsys.readouterr().out.splitlines()
    assert [w for w in next(x for x in lines if x.startswith("linear")).split() if "%" in w or w == "n/a"] == ["n/a"]
    assert "4%" in next(x for x in lines if x.startswith("ties")).split()
    assert [x.split(" | ")[3] for x in lines if x.startswith(("| a |", "| b |"))] == ["n/a", "50%"]
    assert lines[-2:] == ["| x | n/a |", "| y | 1.5 |"]


def test_write_json_provenance_and_no_silent_overwrite(tmp_path, capsys):
    """The JSON carries provenance and the machine's load before and after; an existing file is refused (exit 2,
    one line, file untouched) unless force is given, and no partial file is left behind."""
    out = tmp_path / "sub" / "r.json"
    state = bench_common.machine_state()
    bench_common.write_json(out, {"x": 1}, False, state)
    data = json.loads(out.read_text())
    # git_commit: outside a git checkout (a tarball) there is none, and the key says so
    assert data["x"] == 1 and "git_commit" in data["provenance"] and data["provenance"]["machine"]["cores"]
    assert set(data["machine_state"]) == {"start", "end"} and "busy" in data["machine_state"]["end"]
    with pytest.raises(SystemExit) as e:  # before measuring: refused
        bench_common.check_output(out, False)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {out} exists: give another --json or --force to replace it"
    # after measuring (the file appeared meanwhile): kept, and the record goes beside it
    assert bench_common.write_json(out, {"x": 2}, False, state) == out.with_name("r-2.json")
    assert json.loads(out.read_text())["x"] == 1 and json.loads(out.with_name("r-2.json").read_text())["x"] == 2
    said = capsys.readouterr().err.strip().splitlines()  # then the load warning, on a busy machine
    assert "bench: r.json exists (another run's result): this one is r-2.json" in said
    out.with_name("r-2.json").unlink()
    bench_common.write_json(out, {"x": 3}, True, state)
    assert json.loads(out.read_text())["x"] == 3 and sorted(p.name for p in out.parent.iterdir()) == ["r.json"]
    bench_common.write_json(out, {"x": 4}, True, None)  # counts, not timings: provenance without a load record
    data = json.loads(out.read_text())
    assert data["x"] == 4 and "provenance" in data and "machine_state" not in data


def test_busy_machine_warns(monkeypatch, capsys):
    monkeypatch.setattr(bench_common.os, "getloadavg", lambda: (3.0, 2.0, 1.0))
    assert bench_common.machine_state()["busy"] is True
    assert "not idle" in capsys.readouterr().err
    monkeypatch.setattr(bench_common.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert bench_common.machine_state()["busy"] is False
    assert capsys.readouterr().err == ""


def test_chat_turns_script_alternates_and_records(tmp_path):
    """bench_chat_turns at its smallest: the paths alternate by row, the warm-up row is not among the samples, the
    speedup is median over median, spread and provenance are recorded."""
    out = tmp_path / "ct.json"
    cmd = [*PY, "scripts/bench_chat_turns.py", "--turns", "1", "--rows", "3", "--json", str(out)]
    p = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "spread" in p.stdout.splitlines()[1]
    data = json.loads(out.read_text())
    r = data["results"][0]
    assert r["order"] == ["every_prefix", "read_off", "read_off", "every_prefix", "every_prefix", "read_off"]
    assert r["every_prefix"]["n"] == r["read_off"]["n"] == 3
    assert r["ratio"] == pytest.approx(r["read_off"]["median"] / r["every_prefix"]["median"])
    assert r["speedup"] == pytest.approx(1 / r["ratio"]) and "spread" in r["read_off"] and "noise" in r
    assert data["provenance"]["libraries"]["transformers"] and "loadavg" in data["machine_state"]["start"]


# Each script's way to name an existing JSON, with the other arguments it requires (never used: it stops first).
REFUSE = {"bench_chat_turns": ["--json"], "bench_data_scale": ["--json"], "bench_finetune": ["--json"],
          "bench_fsdp": ["--json"], "bench_launch_encode": ["--json"], "bench_sparse_decode": ["--json"],
          "bench_ternary": ["--json"], "bench_serve_dtype": ["--fp32", "x", "--w4", "y", "--out"],
          "bench_w4": ["--out"], "compare_mergekit": ["--out"], "compare_qlora_deploy": ["--out"],
          "compare_vllm_bench": ["--json"], "merge_trim_memory": ["--code", "a=.", "--out"],
          "estimate_finetune_memory": ["--json"], "bench_sparse": ["--out"]}
FOLDER_OUT = {"bench_sparse"}  # its --out is a folder, whose results.json is the record


@pytest.mark.parametrize("script", sorted(REFUSE))
def test_script_refuses_an_existing_json_before_measuring(script, tmp_path, monkeypatch, capsys):
    """Every benchmark script stops at once (exit 2, one line naming the file and the flags) when its JSON exists and
    --force is not given, and leaves the file as it was; run in this process (the scripts import torch, which the
    suite has imported already), so the refusal costs no start-up."""
    import runpy

    out = tmp_path / ("results.json" if script in FOLDER_OUT else "old.json")
    out.write_text('{"kept": true}')
    flag = REFUSE[script][-1]
    monkeypatch.setattr(sys, "argv", [f"scripts/{script}.py", *REFUSE[script],
                                      str(tmp_path if script in FOLDER_OUT else out)])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(REPO / "scripts" / f"{script}.py"), run_name="__main__")
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {out} exists: give another {flag} or --force to replace it"
    assert out.read_text() == '{"kept": true}' and [p.name for p in tmp_path.iterdir()] == [out.name]
