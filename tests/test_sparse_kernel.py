"""The sparse runtime's C kernel (gather_gemv.c): products against a float64 reference within float32's summation
error bound, the thresholds' strictness, the dense fallback, one OpenMP runtime, and the runtime using it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmfast.sparse import cpu_kernel, kernels

U = 2.0**-24  # float32 unit roundoff


@pytest.fixture(scope="module")
def kernel() -> cpu_kernel.GatherKernel:
    k = cpu_kernel.gather_kernel()
    assert k is not None, "the test machine has a C compiler with OpenMP: the kernel must build"
    return k


def _within_summation_bound(got: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor, wt: torch.Tensor,
                            threads: int) -> None:
    """|got - exact| <= (k + threads) * u * sum_k |vals[k] * wt[idx[k]]|: k float32 products summed in order by each
    thread, then the threads' partial sums added (each product's own rounding counted as one more term)."""
    v64, w64 = vals.double(), wt.double()[idx]
    exact = v64 @ w64
    bound = (idx.numel() + threads + 1) * U * (v64.abs() @ w64.abs())
    assert got.dtype == torch.float32 and got.shape == exact.shape
    assert bool(((got.double() - exact).abs() <= bound).all()), float(((got.double() - exact).abs() - bound).max())


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n,out", [(576, 3072), (1536, 576), (37, 19), (5, 1)])
def test_threshold_product_keeps_entries_strictly_above_t(kernel: cpu_kernel.GatherKernel, n: int, out: int,
                                                          threads: int) -> None:
    g = torch.Generator().manual_seed(n + out + threads)
    v, wt = torch.randn(n, generator=g), torch.randn(n, out, generator=g)
    t = float(v.abs().median())
    v[0] = t  # on the threshold: dropped (|v| > t, as the hooks and TEAL's paper)
    v[-1] = -t
    keep = v.abs() > t
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = kernel.threshold(v, t, wt, n)
    finally:
        torch.set_num_threads(before)
    assert got is not None
    _within_summation_bound(got, keep.nonzero().view(-1), v[keep], wt, threads)


def test_threshold_product_leaves_the_dense_fallback_to_the_caller(kernel: cpu_kernel.GatherKernel) -> None:
    v, wt = torch.tensor([3.0, -2.0, 0.5, 0.1]), torch.randn(4, 8)
    assert kernel.threshold(v, 0.3, wt, max_kept=2) is None  # 3 kept > 2: nothing computed
    got = kernel.threshold(v, 0.3, wt, max_kept=3)
    assert got is not None
    _within_summation_bound(got, torch.tensor([0, 1, 2]), v[:3], wt, 2)
    assert torch.equal(kernel.threshold(v, 5.0, wt, max_kept=4), torch.zeros(8))  # nothing kept: exactly zero


def test_gather_takes_any_indices_in_any_order(kernel: cpu_kernel.GatherKernel) -> None:
    g = torch.Generator().manual_seed(7)
    wt = torch.randn(300, 130, generator=g)
    idx = torch.tensor([299, 0, 17, 17, 150, 3])  # unsorted, repeated: each term counted once per occurrence
    vals = torch.randn(6, generator=g)
    _within_summation_bound(kernel.gather(idx, vals, wt), idx, vals, wt, 2)
    assert torch.equal(kernel.gather(idx[:0], vals[:0], wt), torch.zeros(130))


def test_the_kernel_shares_torch_openmp_runtime(kernel: cpu_kernel.GatherKernel) -> None:
    """Loading the kernel maps no OpenMP runtime besides torch's (other packages, sentencepiece for one, may bring
    their own: checked in a fresh process)."""
    import subprocess
    import sys

    script = ("import torch\nfrom llmfast.sparse import cpu_kernel as c\nbefore = c._openmp_runtimes()\n"
              "assert c.gather_kernel() is not None\nprint(sorted(before), sorted(c._openmp_runtimes() - before))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    before, added = done.stdout.strip().rsplit("] [", 1)
    assert "torch" in before and added == "]"  # torch's pool only, nothing added by the kernel


def test_kernel_takes_float32_and_bfloat16_cpu_inference_only(kernel: cpu_kernel.GatherKernel) -> None:
    assert kernel.holds(torch.zeros(4, 3)) and not kernel.holds(torch.zeros(4, 3, dtype=torch.float64))
    assert kernel.holds(torch.zeros(4, 3, dtype=torch.bfloat16)) and not kernel.holds(torch.zeros(4, 3).half())
    assert kernel.takes(torch.zeros(4, dtype=torch.bfloat16)) and not kernel.takes(torch.zeros(4).half())
    assert not kernel.holds(torch.zeros(3, 4).t())  # not contiguous: W^T must be laid out row by row
    assert kernel.takes(torch.zeros(4)) and not kernel.takes(torch.zeros(4, dtype=torch.float64))
    assert not kernel.takes(torch.zeros(8)[::2])
    assert not kernel.takes(torch.zeros(4, requires_grad=True))


def test_projections_take_the_kernel_up_to_its_own_crossover(kernel: cpu_kernel.GatherKernel) -> None:
    g = torch.Generator().manual_seed(3)
    lins = [torch.nn.Linear(100, 40, bias=False), torch.nn.Linear(100, 24, bias=True)]
    x = torch.randn(1, 1, 100, generator=g)
    t = float(x.abs().quantile(0.2))  # ~80% kept: above the torch path's 65%, below the kernel's 90%
    expected = [torch.nn.functional.linear(torch.where(x.abs() > t, x, 0.0), lin.weight.detach().clone(),
                                           None if lin.bias is None else lin.bias.detach().clone()) for lin in lins]
    rt = kernels.SparseProjections(lins, t=t)
    assert rt.native is kernel
    with torch.no_grad():
        got = [lin(x) for lin in lins]
    assert rt.calls == {"sparse": 1, "dense": 0, "prefill": 0}
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=100 * 2 * U * float(b.abs().max() + 1))
    explicit = kernels.SparseProjections([torch.nn.Linear(100, 8, bias=False)], t=t, dense_above=0.5)
    with torch.no_grad():
        explicit.product(x)
    assert explicit.calls["dense"] == 1  # a dense_above given is kept as given


@pytest.mark.parametrize("method", ["teal-attention", "cats", "dejavu"])
def test_float32_sparse_model_decodes_as_the_torch_path(method: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The runtime with the kernel against the same runtime on torch's gathers, both float32: the same greedy
    tokens and logits within float32 rounding of a 2-layer model's sums."""
    from tests.test_sparse_runtime import make_artifact, prefill_and_decode, prompt_ids

    from llmfast.loading import from_pretrained
    from llmfast.sparse.runtime import install_sparse_runtime, runtime_calls, sparse_forwards
    from llmfast.testing import build_tiny_llama

    art = make_artifact(build_tiny_llama(tmp_path / "tiny"), tmp_path / method, method)
    with_kernel = from_pretrained(art, "float32").eval()
    install_sparse_runtime(with_kernel, art)
    assert all(rt.native is not None for rt in sparse_forwards(with_kernel))
    monkeypatch.setattr(cpu_kernel, "gather_kernel", lambda: None)  # what a machine without a compiler gets
    torch_path = from_pretrained(art, "float32").eval()
    install_sparse_runtime(torch_path, art)
    assert all(rt.native is None for rt in sparse_forwards(torch_path))
    ids = prompt_ids(art)
    for a, b in zip(prefill_and_decode(with_kernel, ids), prefill_and_decode(torch_path, ids)):
        # hidden 128, intermediate 256: sums of at most 256 float32 terms, relative error <= 257 u ~ 1.5e-5 each;
        # 1e-4 of the logits' norm leaves room for two layers carrying it forward.
        assert float((a - b).norm()) <= 1e-4 * float(b.norm())
    assert runtime_calls(with_kernel, "mlp")["sparse"] > 0
    if method == "teal-attention":
        assert runtime_calls(with_kernel, "attention")["sparse"] > 0
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    with torch.no_grad():
        assert with_kernel.generate(ids, **kw).tolist() == torch_path.generate(ids, **kw).tolist()


def test_kernel_refuses_vectors_that_do_not_match_the_weights(kernel: cpu_kernel.GatherKernel) -> None:
    wt = torch.randn(6, 4)
    with pytest.raises(ValueError, match="5 entries, the weights 6 rows"):
        kernel.threshold(torch.randn(5), 0.1, wt, 6)
    with pytest.raises(ValueError, match="one length"):
        kernel.gather(torch.tensor([0, 1]), torch.randn(3), wt)
    with pytest.raises(ValueError, match="int64 and float32 or bfloat16"):
        kernel.gather(torch.tensor([0, 1], dtype=torch.int32), torch.randn(2), wt)


def test_fewer_openmp_threads_than_asked_still_fill_the_output(tmp_path: Path) -> None:
    """OMP_THREAD_LIMIT=1 makes OpenMP start one thread where torch asks for 3: that thread must write y itself."""
    import os
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from llmfast.sparse import cpu_kernel\n"
        "k = cpu_kernel.gather_kernel()\n"
        "assert k is not None\n"
        "torch.set_num_threads(3)\n"
        "g = torch.Generator().manual_seed(1)\n"
        "wt, idx = torch.randn(50, 40, generator=g), torch.arange(0, 50, 2)\n"
        "vals = torch.randn(25, generator=g)\n"
        "for _ in range(20):\n"
        "    torch.empty(40).fill_(float('nan'))  # leave garbage where the output may be allocated\n"
        "    y = k.gather(idx, vals, wt)\n"
        "    torch.testing.assert_close(y, vals @ wt[idx], rtol=1e-5, atol=1e-5)\n"
        "    v = torch.zeros(50)\n"
        "    v[idx] = vals\n"
        "    torch.testing.assert_close(k.threshold(v, 0.0, wt, 50), vals @ wt[idx], rtol=1e-5, atol=1e-5)\n"
    )
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("width,n", [(2, 576), (1, 1536), (2, 37), (1, 5)])
def test_rows_product_dots_only_the_kept_rows(kernel: cpu_kernel.GatherKernel, width: int, n: int) -> None:
    """w[idx[k], r] . v against float64 within the bound of any summation order of n products, (n + 1) u sum |terms|,
    and the same bits for every thread count (each output is one thread's)."""
    g = torch.Generator().manual_seed(width * 1000 + n)
    rows = 300
    w = torch.randn(rows, width, n, generator=g) if width > 1 else torch.randn(rows, n, generator=g)
    v = torch.randn(n, generator=g)
    idx = torch.tensor([299, 0, 17, 17, 150, 3, *range(20, 120, 7)])  # unsorted, repeated
    w3 = w.view(rows, width, n).double()[idx]
    exact, bound = w3 @ v.double(), (n + 1) * U * (w3.abs() @ v.double().abs())
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(kernel.rows(idx, w, v))
    finally:
        torch.set_num_threads(before)
    got = results[0]
    assert got.dtype == torch.float32 and got.shape == (idx.numel(), width)
    assert bool(((got.double() - exact).abs() <= bound).all())
    assert all(torch.equal(got, r) for r in results[1:])
    assert kernel.rows(idx[:0], w, v).shape == (0, width)
    with pytest.raises(ValueError, match="float32 or bfloat16 vector of"):
        kernel.rows(idx, w, torch.randn(n + 1))
    with pytest.raises(ValueError, match="contiguous float32 or bfloat16 CPU weights"):
        kernel.rows(idx, w.double(), v)


B = 2.0**-8  # bfloat16 unit roundoff (8 significant bits)


@pytest.mark.parametrize("n,out", [(576, 3072), (1536, 576), (37, 19)])
def test_bfloat16_products_are_the_float32_sums_of_the_bfloat16_terms_rounded_once(kernel: cpu_kernel.GatherKernel,
                                                                                n: int, out: int) -> None:
    """bfloat16 weights and vectors: each product of two bfloat16 values is exact in float32 (8 x 8 significant
    bits), so against the float64 sum of the same terms the float32 result is off by float32 summation,
    e = (k + threads + 1) u sum |terms|, and rounding it to bfloat16 adds at most B (|exact| + e) (B = 2^-8, the
    half-ulp of 8 significant bits)."""
    g = torch.Generator().manual_seed(n + out)
    wt = torch.randn(n, out, generator=g).bfloat16()
    v = torch.randn(n, generator=g).bfloat16()
    t = float(v.float().abs().quantile(0.5))
    keep = (v.abs() > t).nonzero().flatten()  # compared in bfloat16, as the kernel does (test below)
    w64, v64 = wt.double()[keep], v.double()[keep]
    exact, terms = v64 @ w64, v64.abs() @ w64.abs()
    threads = torch.get_num_threads()
    e = (keep.numel() + threads + 1) * U * terms
    bound = e + B * (exact.abs() + e)
    got = kernel.threshold(v, t, wt, max_kept=n)
    assert got is not None and got.dtype == torch.bfloat16 and got.shape == (out,)
    assert bool(((got.double() - exact).abs() <= bound).all())
    gathered = kernel.gather(keep, v[keep], wt)
    assert gathered.dtype == torch.bfloat16 and bool(((gathered.double() - exact).abs() <= bound).all())
    # rows: the kept rows of W itself (W^T's columns here) dotted with a dense bfloat16 vector
    w = wt.t().contiguous()  # (out, n)
    x = torch.randn(n, generator=g).bfloat16()
    idx = torch.arange(0, out, 3)
    exact_rows = w.double()[idx] @ x.double()
    e_rows = (n + 1) * U * (w.double()[idx].abs() @ x.double().abs())
    bound_rows = e_rows + B * (exact_rows.abs() + e_rows)
    rows = kernel.rows(idx, w, x)
    assert rows.dtype == torch.bfloat16 and rows.shape == (idx.numel(), 1)
    assert bool(((rows[:, 0].double() - exact_rows).abs() <= bound_rows).all())
    with pytest.raises(ValueError, match="a torch.float32 vector with torch.bfloat16 weights"):
        kernel.threshold(v.float(), t, wt, max_kept=n)


def test_bfloat16_threshold_is_compared_in_bfloat16(kernel: cpu_kernel.GatherKernel) -> None:
    """As torch compares a bfloat16 tensor with a Python number (and the hook model its rounded threshold): an entry
    equal to bfloat16(t) is dropped even where it exceeds t itself."""
    t = 0.5035  # bfloat16(t) = 0.50390625 (spacing 2^-8 near 0.5), above t
    assert float(torch.tensor(t, dtype=torch.bfloat16)) == 0.50390625
    v = torch.tensor([0.50390625, 0.5078125, -0.50390625, 0.25], dtype=torch.bfloat16)
    wt = torch.eye(4, dtype=torch.bfloat16)
    assert kernel.threshold(v, t, wt, max_kept=4).tolist() == [0.0, 0.5078125, 0.0, 0.0]
    assert (v.abs() > t).tolist() == [False, True, False, False]  # torch's own comparison agrees


@pytest.mark.parametrize("method", ["teal-attention", "cats", "relufy", "dejavu"])
def test_bfloat16_sparse_model_takes_the_kernel(kernel: cpu_kernel.GatherKernel, tmp_path: Path, tiny_dir: Path,
                                                method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bfloat16 model's sparse runtime runs every one-token product through the kernel: torch's gathers are made
    to fail, and the decode steps still run, gathered, in bfloat16. (The kernel's numbers are checked above.)"""
    from test_sparse_runtime import make_artifact, prefill_and_decode, prompt_ids

    from llmfast.loading import from_pretrained
    from llmfast.sparse.runtime import install_sparse_runtime, runtime_calls, sparse_forwards

    def torch_path(*args: object, **kw: object) -> None:
        raise AssertionError("a product took torch's gathers")

    art = make_artifact(tiny_dir, tmp_path / method, method)
    model = from_pretrained(art, "bfloat16").eval()
    install_sparse_runtime(model, art)
    assert all(rt.native is kernel for rt in sparse_forwards(model))
    monkeypatch.setattr(kernels, "gather_sum", torch_path)
    monkeypatch.setattr(kernels, "bag_sum", torch_path)
    logits = prefill_and_decode(model, prompt_ids(art), steps=4)
    assert all(l.dtype == torch.bfloat16 and bool(l.isfinite().all()) for l in logits)
    calls = runtime_calls(model)
    assert calls["sparse"] > 0 and calls.get("dense", 0) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # the C kernel's path, the torch path
def test_the_dense_product_runs_only_above_the_kept_fraction_given(kernel: cpu_kernel.GatherKernel,
                                                                  dtype: torch.dtype) -> None:
    """dense_above 0.5 of 100 inputs: 50 kept is the gather, 51 the dense product, on either path; both give the
    product of the zeroed input (s45's mutation audit: the C path's limit one higher passed every test)."""
    lin = torch.nn.Linear(100, 16, bias=False, dtype=dtype)
    weight = lin.weight.detach().clone()
    rt = kernels.SparseProjections([lin], t=0.5, dense_above=0.5)
    assert (rt.native is kernel) == (dtype == torch.float32)
    g = torch.Generator().manual_seed(0)
    for kept, path in ((50, "sparse"), (51, "dense"), (0, "sparse"), (100, "dense")):
        x = torch.rand(100, generator=g, dtype=dtype) * 0.5  # |x| <= 0.5: dropped
        x[torch.randperm(100, generator=g)[:kept]] = 1 + torch.rand(kept, generator=g, dtype=dtype)
        before = dict(rt.calls)
        with torch.no_grad():
            got = lin(x.view(1, 1, 100))
        assert {k: rt.calls[k] - before[k] for k in rt.calls} == {"sparse": 0, "dense": 0, "prefill": 0, path: 1}
        want = torch.where(x > 0.5, x, 0.0).double() @ weight.double().t()
        assert torch.allclose(got.view(-1).double(), want, rtol=0, atol=200 * U * float(want.abs().max() + 1)), kept
