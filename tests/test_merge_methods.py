"""Every registered merge method, whatever it is, honours the method contract (the conformance test).

A new file in llmfast/merge/methods/ is picked up here with nothing else to edit: it must merge a base
and two fine-tunes into a model of the same tensors and shapes, in the dtype asked for, the same twice
with one seed, and refuse out-of-range, mistyped, missing and unknown parameters with one line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from llmfast.merge.methods import METHODS, Param
from tests.conftest import run_cli
from tests.test_merge import _load, _merge, _sd, family  # noqa: F401  (family is a fixture)


def _valid(p: Param) -> object:
    if p.kind is bool:
        return p.default
    if p.low is not None and p.high is not None:
        return (p.low + p.high) / 2
    return 0.5


def _method_config(tmp: Path, name: str, fam: dict[str, Path], tag: str, per_input: dict | None = None,
                   shared: dict | None = None, **top: object) -> Path:
    method = METHODS.get(name)
    own = {p.name: _valid(p) for p in method.per_input_params} if per_input is None else per_input
    models = [fam["ft1"], fam["ft2"]] + ([] if method.needs_base else [fam["base"]])
    cfg: dict = {"merge_method": name, "models": [{"model": str(m), "parameters": own} for m in models]}
    if method.needs_base:
        cfg["base_model"] = str(fam["base"])
    if shared:
        cfg["parameters"] = shared
    cfg.update(top)
    path = tmp / f"{name}-{tag}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _refused(cfg: Path, out: Path, *needles: str) -> None:
    code, _, err = run_cli("merge", str(cfg), str(out), "--no-progress")
    line = err.strip()
    assert code == 2 and line.startswith("llmfast: error: ") and "\n" not in line, err
    for n in needles:
        assert n in line, line
    assert not out.exists()


@pytest.mark.parametrize("name", METHODS.names())
def test_method_merges_three_models_deterministically(name, family, tmp_path):  # noqa: F811
    base = _sd(family["base"])
    cfg = _method_config(tmp_path, name, family, "ok")
    first = _merge(cfg, tmp_path / "a", "--seed", "5")
    again = _merge(cfg, tmp_path / "b", "--seed", "5")
    assert set(first) == set(base)
    for k, v in first.items():
        assert v.shape == base[k].shape and v.dtype == torch.float32, k
        assert torch.isfinite(v).all(), k
        assert torch.equal(v, again[k]), f"{name} is not deterministic for one seed: {k}"
    assert any(not torch.equal(first[k], base[k]) for k in base), f"{name} returned the base unchanged"
    # The output dtype is the one asked for, the same values rounded once.
    cfg16 = _method_config(tmp_path, name, family, "bf16", out_dtype="bfloat16")
    half = _merge(cfg16, tmp_path / "c", "--seed", "5")
    for k, v in half.items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, first[k].to(torch.bfloat16)), k


@pytest.mark.parametrize("name", METHODS.names())
def test_method_validates_its_parameters(name, family, tmp_path):  # noqa: F811
    method = METHODS.get(name)
    out = tmp_path / "out"
    for p in method.params:
        bad_value: object = "yes" if p.kind is bool else "lots"
        place = {p.name: bad_value}
        if p.per_input:
            own = {q.name: _valid(q) for q in method.per_input_params} | place
            cfg = _method_config(tmp_path, name, family, f"type-{p.name}", per_input=own)
        else:
            cfg = _method_config(tmp_path, name, family, f"type-{p.name}", shared=place)
        _refused(cfg, out, f"'{p.name}'", "yaml:")
        for bound, outside in ((p.low, -1.0), (p.high, 1.0)):
            if bound is None:
                continue
            own = {q.name: _valid(q) for q in method.per_input_params} | {p.name: bound + outside}
            cfg = _method_config(tmp_path, name, family, f"range-{p.name}", per_input=own) if p.per_input else \
                _method_config(tmp_path, name, family, f"range-{p.name}", shared={p.name: bound + outside})
            _refused(cfg, out, f"'{p.name}' must be between")
        if p.required:
            own = {q.name: _valid(q) for q in method.per_input_params if q.name != p.name}
            cfg = _method_config(tmp_path, name, family, f"missing-{p.name}", per_input=own)
            _refused(cfg, out, f"no '{p.name}'")
    cfg = _method_config(tmp_path, name, family, "unknown", shared={"not_a_parameter": 1})
    _refused(cfg, out, "has no parameter 'not_a_parameter'")


def test_every_method_module_registers_and_lists_in_help():
    import pkgutil

    import llmfast.merge.methods as pkg

    helpers = {"base", "sparsify"}
    modules = {m.name for m in pkgutil.iter_modules(pkg.__path__)} - helpers
    registered = {type(m).__module__.rsplit(".", 1)[-1] for _n, m in METHODS.items()}
    assert modules == registered  # a method file that registers nothing is a mistake
    import contextlib
    import io

    from llmfast.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["merge", "--help"])
    for name in METHODS.names():
        assert name in " ".join(out.getvalue().split())




def test_the_kept_statistic_counts_no_more_than_the_nonzero_entries():
    """TIES trims to `density` of the entries, but a task vector with fewer nonzero entries keeps only those: the
    manifest's kept fraction counts them (s44's mutation audit: max(1, density * size) passed every test)."""
    import numpy as np

    from llmfast.merge.methods.base import TensorContext

    base = np.zeros(1000, dtype=np.float32)
    sparse_delta = np.zeros(1000, dtype=np.float32)
    sparse_delta[::10] = np.arange(1, 101, dtype=np.float32)  # 100 nonzero entries
    dense_delta = np.arange(1, 1001, dtype=np.float32)
    stats: dict = {}
    METHODS.get("ties").merge(base, [sparse_delta, dense_delta], [{"weight": 1.0, "density": 0.5}] * 2,
                              {"normalize": True, "lambda": 1.0, "rescale": False}, TensorContext("t", 0, stats))
    assert stats == {"nonzero": 1100, "kept": 100 + 500}


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if m.param("density") is not None])
def test_density_0_keeps_the_base_and_1_is_in_range(name, family, tmp_path):  # noqa: F811
    """density is a fraction with both ends included: at 0 every task vector is dropped, so the merge is the base
    (not one entry kept per tensor); at 1 nothing is: magnitude_prune is then task arithmetic."""
    base = _sd(family["base"])
    got = _merge(_method_config(tmp_path, name, family, "d0", per_input={"weight": 1.0, "density": 0.0}),
                 tmp_path / "d0")
    for k, v in base.items():
        assert torch.equal(got[k], v), k
    if name == "magnitude_prune":
        got = _merge(_method_config(tmp_path, name, family, "d1", per_input={"weight": 0.5, "density": 1.0}),
                     tmp_path / "d1")
        a, b = _sd(family["ft1"]), _sd(family["ft2"])
        for k, v in base.items():
            torch.testing.assert_close(got[k], v + 0.5 * (a[k] - v) + 0.5 * (b[k] - v), rtol=0, atol=1e-6)


def test_a_weight_past_float32_or_written_as_true_is_refused(family, tmp_path):  # noqa: F811
    """1e39 is inf in float32 (the merged model would be inf and NaN); `true` is not a number, though Python's
    float(True) is 1.0."""
    for bad, needle in ((1e39, "must be a finite number"), (True, "must be a number")):
        cfg = _method_config(tmp_path, "task_arithmetic", family, f"bad-{bad}", per_input={"weight": bad})
        _refused(cfg, tmp_path / "out", "'weight'", needle)


def test_l1_summed_block_by_block_has_the_whole_sums_bits():
    """The blockwise merges' L1 norm (for `rescale`) against `_l1` over the whole array, float64 bit for bit, with
    blocks that cut numpy's 8192-entry sum buffers anywhere. Magnitudes spanning ~10^30: a sum grouped differently
    (per block, then added) differs in its last bits on most of these arrays."""
    import numpy as np

    from llmfast.merge.methods.task_arithmetic import L1Sum, _l1

    rng = np.random.default_rng(0)
    for trial in range(40):
        n = int(rng.integers(1, 8192 * 7))
        x = (rng.standard_normal(n) * np.exp(rng.standard_normal(n) * 10)).astype(np.float32)
        total, at = L1Sum(), 0
        while at < n:
            step = int(rng.choice([1, 7, 4000, 8192, 8193, 20000]))
            total.add(np.abs(x[at: at + step]))
            at += step
        assert total.value() == _l1(x), (trial, n)
