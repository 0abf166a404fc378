"""The GPU kernels (Triton) run here under Triton's interpreter (`TRITON_INTERPRET=1`, numpy on the CPU): the same
kernel source a GPU compiles, checked against torch computed another way. Each check runs in a child process so
the interpreter setting (read when a kernel is defined) touches nothing else in the suite. Their speed is a GPU
matter: scripts/gpu_compression_checks.py."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

pytest.importorskip("triton")  # a dev dependency: `make install` brings it


def interpret(code: str) -> dict:
    """Run `code` (which prints one JSON line last) in a child process with the interpreter on."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_jit_functions_carry_no_annotations_the_compiler_cannot_resolve():
    """Triton's compiler (not its interpreter) resolves a @triton.jit function's annotations as globals and refuses
    `typing.Any` (it cost a lent GPU's first run): only `tl.constexpr` (or none) is allowed."""
    import ast

    files = [REPO / "llmfast" / "triton_math.py", REPO / "llmfast" / "triton_split.py", REPO / "llmfast" / "quant" / "bitnet" / "triton_kernel.py",
             REPO / "llmfast" / "sparse" / "triton_kernel.py"]
    checked = 0
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
                checked += 1
                notes = [a.annotation for a in node.args.args + node.args.kwonlyargs if a.annotation] + (
                    [node.returns] if node.returns else [])
                bad = [ast.unparse(n) for n in notes if ast.unparse(n) != "tl.constexpr"]
                assert not bad, f"{path.name}:{node.lineno} {node.name}: {bad}"
    assert checked >= 5


def test_ternary_kernel_gives_ternary_linears_bits_in_float32_and_exact_sums_in_bfloat16():
    got = interpret("""
        import json, torch
        from llmfast.quant.bitnet.layers import TernaryLinear, quantize_activations, ternarize
        from llmfast.quant.bitnet.pack import pack_ternary
        from llmfast import triton_split
        from llmfast.quant.bitnet.triton_kernel import ternary_matmul

        torch.manual_seed(0)
        report = []
        # (out, in, tokens, bias, block_k): inputs not a multiple of the block, 1 to 16 tokens, 4 outputs per byte
        for out, k, m, bias, block_k in [(64, 96, 1, False, 64), (128, 300, 3, True, 64), (32, 520, 16, True, 128),
                                         (16, 40, 7, False, 32)]:
            vals, ws = ternarize(torch.randn(out, k))
            for dtype in (torch.float32, torch.bfloat16):
                lin = TernaryLinear(k, out, bias=bias, dtype=dtype)
                lin.weight.copy_(vals)
                lin.weight_scale.copy_(ws.to(dtype))
                if bias:
                    lin.bias.copy_(torch.randn(out).to(dtype))
                x = (torch.randn(2, m, k) * 3).to(dtype)[:1]
                x[0, 0, :5] = 0.0  # a few exact zeros, and one all-zero token when m > 1
                if m > 1:
                    x[0, 1] = 0.0
                TernaryLinear.fast = False  # torch's own ops
                ref = lin(x)
                y = ternary_matmul(x, pack_ternary(vals), lin.weight_scale, lin.bias, block_k=block_k)
                # the tokens quantized once in a first launch: the same codes and scales, so the same bits
                pre = ternary_matmul(x, pack_ternary(vals), lin.weight_scale, lin.bias, block_k=block_k, prequant=True)
                codes, a_scale = quantize_activations(x)  # in x's dtype, as the layer does
                exact = (codes.double() @ vals.double().T).float() / (lin.weight_scale * a_scale).float()
                exact = exact.to(dtype)
                if bias:
                    exact = exact + lin.bias
                report.append({"dtype": str(dtype), "shape": [out, k, m], "same_as_layer": torch.equal(y, ref),
                               "same_as_exact": torch.equal(y, exact), "finite": bool(torch.isfinite(y).all()),
                               "max_rel_to_layer": ((y.float() - ref.float()).abs().max()
                                                    / ref.float().abs().max()).item(),
                               "out_shape": list(y.shape), "prequant_same": torch.equal(pre, y)})
        bias = torch.randn(vals.shape[0])
        split = ternary_matmul(x.float(), pack_ternary(vals), ws, bias, block_k=32, split_k=3)
        whole = ternary_matmul(x.float(), pack_ternary(vals), ws, bias, block_k=32, split_k=1)
        # every launch setting, either product (GEMV or tl.dot), split or not: exact sums, so the same bits
        settings = [dict(block_n=bn, block_k=bk, split_k=sk, product=d, prequant=q) for bn in (4, 16)
                    for bk in (32, 64) for sk in (1, 2, 5) for d in ("fma", "dot", "dp4a") for q in (False, True)]
        same_everywhere = True
        for xb in (x.to(torch.bfloat16), x[0, 2:3].to(torch.bfloat16)):  # 7 tokens; one token (dp4a's words)
            same_everywhere &= all(
                torch.equal(ternary_matmul(xb, pack_ternary(vals), ws.bfloat16(), **kw),
                            ternary_matmul(xb, pack_ternary(vals), ws.bfloat16(), split_k=1, product="fma"))
                for kw in settings)
        counters_zero = all(int(c.abs().sum()) == 0 for c in triton_split._COUNTERS.values())
        half = TernaryLinear(vals.shape[1], vals.shape[0], dtype=torch.float16)  # float16: rounded like bfloat16
        half.weight.copy_(vals)
        half.weight_scale.copy_(ws.half())
        xh = x[0, 2:].half()  # not the all-zero token: 1 / SCALE_FLOOR overflows float16, in torch too
        codes, a_scale = quantize_activations(xh)
        exact16 = ((codes.double() @ vals.double().T).float() / (half.weight_scale * a_scale).float()).half()
        same16 = torch.equal(ternary_matmul(xh, pack_ternary(vals), half.weight_scale), exact16)
        errors = []
        for bad in [lambda: ternary_matmul(torch.randn(17, 40), pack_ternary(vals), ws),
                    lambda: ternary_matmul(torch.randn(2, 41), pack_ternary(vals), ws)]:
            try:
                bad()
            except ValueError as e:
                errors.append(str(e))
        print(json.dumps({"cases": report, "split_same": torch.equal(split, whole), "errors": errors,
                          "same16": same16, "same_everywhere": same_everywhere, "counters_zero": counters_zero,
                          "counters_used": len(triton_split._COUNTERS)}))
    """)
    for case in got["cases"]:
        assert case["finite"] and case["out_shape"][-1] == case["shape"][0] and case["prequant_same"], case
        if case["dtype"] == "torch.float32":  # integer sums below 2^24 are exact in float32 too: the same bits
            assert case["same_as_layer"], case
        else:  # torch's bfloat16 matmul rounds the integer sums; the kernel keeps them exact, then rounds once
            assert case["same_as_exact"], case
            assert case["max_rel_to_layer"] <= 2 ** -7, case
    assert got["split_same"] and got["same_everywhere"]  # exact integer sums: no setting changes a bit
    assert got["counters_zero"] and got["counters_used"] == 1  # every split launch left its counters at zero
    assert got["same16"]
    assert "at most 16" in got["errors"][0] and "do not fit an input of 41" in got["errors"][1]


def test_threshold_matvec_reads_only_kept_rows_and_matches_the_zeroed_product():
    got = interpret("""
        import json, torch
        from llmfast import triton_split
        from llmfast.sparse.triton_kernel import teal_mlp_token, threshold_matvec

        torch.manual_seed(0)
        cases = []
        for k, n, t, split, dtype in [(100, 70, 0.5, 1, torch.float32), (300, 130, 1.0, 3, torch.float32),
                                      (64, 64, 0.0, 1, torch.float32), (200, 96, 0.7, 1, torch.bfloat16)]:
            v = torch.randn(k).to(dtype)
            v[::4] = 0.0  # exact zeros: dropped even at t = 0 (a ReLU-fied activation)
            wt = torch.randn(k, n).to(dtype)
            keep = v.abs() > t
            poisoned = wt.clone()
            poisoned[~keep] = float("nan")  # a dropped row that were read would turn the sums into NaN
            y = threshold_matvec(v, t, poisoned, block_k=32, block_n=32, split_k=split)
            listed = threshold_matvec(v, t, poisoned, block_k=32, block_n=32, split_k=split, compact=True)
            terms = v.double()[:, None] * wt.double()
            ref = (torch.where(keep, v, torch.zeros((), dtype=dtype)).double() @ wt.double())
            bound = (terms.abs() * keep.double()[:, None]).sum(0)  # |sum| <= sum |terms|: the error scale
            cases.append({"dtype": str(dtype), "kept": keep.float().mean().item(), "finite": bool(torch.isfinite(y).all()),
                          "err": ((y.double() - ref).abs() / bound.clamp(min=1e-30)).max().item(),
                          "dtype_out": str(y.dtype), "listed_finite": bool(torch.isfinite(listed).all()),
                          "listed_err": ((listed.double() - ref).abs() / bound.clamp(min=1e-30)).max().item()})
        # TEAL's MLP for one token: thresholds on the MLP input and on the down projection's input
        hidden, inter = 48, 80
        g, u, d = (torch.randn(inter, hidden), torch.randn(inter, hidden), torch.randn(hidden, inter) / 8)
        x = torch.randn(hidden)
        wt_gu = torch.cat([g, u]).T.contiguous()
        xs = torch.where(x.abs() > 0.6, x, 0.0).double()
        act = torch.nn.functional.silu(g.double() @ xs) * (u.double() @ xs)
        ref = d.double() @ torch.where(act.abs() > 0.3, act, 0.0)
        mlp_err = []
        for launch in [dict(block_k=16, block_n=32, split_k=1), dict(block_k=16, block_n=32, split_k=3), {},
                       dict(block_k=16, block_n=32, split_k=3, compact=True), dict(compact=True)]:
            y = teal_mlp_token(x, 0.6, wt_gu, 0.3, d.T.contiguous(), up_launch=launch, down_launch=launch)
            mlp_err.append(((y.double() - ref).abs().max() / ref.abs().max()).item())
        # the gated epilogue in bfloat16: silu(gate) * up rounded as torch rounds it on bfloat16 tensors
        xb, wb = x.bfloat16(), wt_gu.bfloat16()
        keep = xb.abs() > 0.6
        gu = torch.where(keep, xb, torch.zeros((), dtype=torch.bfloat16)) @ wb
        want = torch.nn.functional.silu(gu[:inter]) * gu[inter:]
        got = threshold_matvec(xb, 0.6, wb, gated=True, block_k=16, block_n=32, split_k=2)
        gated_ulps = ((got.float() - want.float()).abs() / want.float().abs().clamp(min=1e-3)).max().item()
        # the listed walk: the same kept rows, float32 sums grouped otherwise, then the same roundings
        listed = threshold_matvec(xb, 0.6, wb, gated=True, block_k=16, block_n=32, split_k=2, compact=True)
        listed_rel = ((listed.float() - want.float()).abs() / want.float().abs().clamp(min=1e-3)).max().item()
        # nothing kept: zeros, through both walks
        empty = [threshold_matvec(x, 1e9, wt_gu[:, :inter].contiguous(), compact=c).abs().max().item()
                 for c in (False, True)]
        print(json.dumps({"cases": cases, "mlp_err": max(mlp_err), "gated_dtype": str(got.dtype),
                          "gated_rel": gated_ulps, "listed_rel": listed_rel, "empty": empty,
                          "counters_zero": all(int(c.abs().sum()) == 0
                                                                    for c in triton_split._COUNTERS.values())}))
    """)
    for case in got["cases"]:
        assert case["finite"] and case["dtype_out"] == case["dtype"], case
        assert 0.2 < case["kept"] < 0.8
        # float32 sums of up to 300 terms: within 300 eps of the sum of |terms|; bfloat16: one rounding of the output
        assert case["err"] <= (300 * 2 ** -24 if case["dtype"] == "torch.float32" else 2 ** -8), case
        # the listed walk (compact=True) reads the kept rows only too (the poisoned rows would give NaN)
        assert case["listed_finite"] and case["listed_err"] <= (300 * 2 ** -24 if case["dtype"] == "torch.float32"
                                                                  else 2 ** -8), case
    assert got["mlp_err"] < 1e-5  # float32 through both launches, split or not
    # bfloat16: torch rounds the gate|up sums (a bf16 matmul) where the kernel keeps float32 sums, then both round
    # silu and the product: a few roundings of 2^-8 relative
    assert got["gated_dtype"] == "torch.bfloat16" and got["gated_rel"] < 2 ** -5
    assert got["counters_zero"]
    assert got["listed_rel"] < 2 ** -5 and got["empty"] == [0.0, 0.0]


def test_sparse_runtime_runs_its_one_token_products_through_the_triton_kernel():
    """What SparseMLP and SparseProjections run on CUDA weights (kernels.native_for picks TritonGather there),
    here on the interpreter: every mode's one-token output against its own dense path (the same zeros on dense
    matmuls), with the kernel seen to run and the sparse path taken."""
    got = interpret("""
        import json, torch
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaMLP
        import llmfast.sparse.triton_kernel as tk
        from llmfast.sparse.kernels import SparseMLP, SparseProjections

        launches = []
        real = tk.threshold_matvec
        tk.threshold_matvec = lambda *a, **k: launches.append(1) or real(*a, **k)  # counts, then runs the kernel
        torch.manual_seed(0)
        report = []
        for dtype in (torch.float32, torch.bfloat16):
            for mode, act, kw in [("teal", "silu", {"t_in": 0.6, "t_down": 0.05}), ("cats", "silu", {"t_gate": 0.2}),
                                  ("relu", "relu", {})]:
                cfg = LlamaConfig(hidden_size=48, intermediate_size=200, hidden_act=act, num_attention_heads=4)
                mlp = LlamaMLP(cfg).to(dtype)
                rt = SparseMLP(mlp, mode, **kw)
                rt.native = tk.gather_kernel("cpu")  # as native_for gives it for CUDA weights
                x = torch.randn(1, 1, 48).to(dtype)
                before = len(launches)
                with torch.no_grad():
                    y, ref = rt(x), rt.dense(x)
                report.append({"mode": mode, "dtype": str(dtype), "launches": len(launches) - before,
                               "calls": dict(rt.calls), "dtype_out": str(y.dtype),
                               "err": ((y.double() - ref.double()).abs().max() / ref.double().abs().max()).item()})
        lins = [torch.nn.Linear(64, n, bias=False) for n in (64, 16, 16)]
        proj = SparseProjections(lins, t=0.7)
        proj.native = tk.gather_kernel("cpu")
        x = torch.randn(1, 1, 64)
        before = len(launches)
        with torch.no_grad():
            outs = [lin(x) for lin in lins]
        xs = torch.where(x.abs() > 0.7, x, 0.0)
        ref = [xs @ lin.weight.T for lin in lins]
        proj_err = max((o - r).abs().max().item() for o, r in zip(outs, ref))
        print(json.dumps({"mlp": report, "proj_err": proj_err, "proj_launches": len(launches) - before,
                          "proj_calls": proj.calls}))
    """)
    for r in got["mlp"]:
        products = 2 if r["mode"] == "teal" else 1  # teal: gate|up and down; cats, relu: down (up is dense)
        assert r["launches"] == products, r
        assert r["calls"] == {"sparse": products, "dense": 0, "prefill": 0}, r  # the kernel's dense_above is 1.0
        assert r["dtype_out"] == r["dtype"]
        # float32: sums of at most 200 terms in another order; bfloat16: the dense path rounds its intermediates
        # (gate, up, their product) to bfloat16 where the kernel keeps float32 sums, a few roundings of 2^-8
        assert r["err"] < (1e-5 if r["dtype"] == "torch.float32" else 2 ** -5), r
    assert got["proj_launches"] == 1 and got["proj_calls"] == {"sparse": 1, "dense": 0, "prefill": 0}
    assert got["proj_err"] < 1e-5


def test_the_gpu_check_script_runs_every_path_in_its_cpu_smoke_mode(tmp_path):
    """scripts/gpu_compression_checks.py is for a lent GPU's few minutes: its --smoke mode (tiny shapes, the
    interpreter, wall-clock timing) runs every code path but the CUDA graph here, so it cannot rot unseen."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "scripts/gpu_compression_checks.py", "--smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_compression.json").read_text())
    checks = result["ternary_checks"]
    assert all(v["same_as_layer"] for k, v in checks.items() if "float32" in k)
    assert all(v["same_as_exact"] for k, v in checks.items() if "bfloat16" in k)
    runtime = result["sparse_checks"].pop("runtime")
    assert max(v["err_over_sum_abs"] for v in result["sparse_checks"].values()) < 2 ** -8
    assert runtime["float32"]["err_over_max"] < 1e-5 and runtime["bfloat16"]["err_over_max"] < 2 ** -5
    assert all(r["calls"] == {"sparse": 2, "dense": 0, "prefill": 0} for r in runtime.values())
    assert len(result["ternary"]) == 9 and all("speedup" in r for r in result["ternary"])
    assert [r["sparsity"] for r in result["sparse"]] == [0.5, 0.7, 0.9]
    assert all(abs(r["kept"]["input"] - (1 - r["sparsity"])) < 0.05 for r in result["sparse"])
    assert "WRONG" not in out.stdout
