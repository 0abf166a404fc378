"""The fused CPU kernel for ternary layers (ternary_gemv.c): the same bits as TernaryLinear's torch path on every
instruction-set path this machine can build, the dispatch inside TernaryLinear, and the build cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmfast import native
from llmfast.quant.bitnet import cpu_kernel
from llmfast.quant.bitnet.layers import TernaryLinear, quantize_activations, ternarize
from llmfast.testing import build_tiny_llama

# -march=native, then the AVX2 path, then plain C (each -mno-... also turns off what depends on it).
PATHS = {"native": (), "avx2": ("-mno-avx512f",), "c": ("-mno-avx2", "-mno-avx512f")}


def _cpu_has(flag: str) -> bool:
    return flag in Path("/proc/cpuinfo").read_text().split()


@pytest.fixture(scope="module", params=list(PATHS))
def kernel(request: pytest.FixtureRequest) -> cpu_kernel.TernaryKernel:
    k = cpu_kernel.ternary_kernel(PATHS[request.param])
    assert k is not None, "the test machine has a C compiler: the kernel must build"
    return k


def test_each_build_takes_the_path_its_flags_allow() -> None:
    paths = {name: cpu_kernel.ternary_kernel(flags).path for name, flags in PATHS.items()}  # type: ignore[union-attr]
    assert paths["c"] == "c"
    assert paths["avx2"] == ("avx2" if _cpu_has("avx2") else "c")
    assert paths["native"] == ("avx512-vnni" if _cpu_has("avx512_vnni") and _cpu_has("avx512bw") else paths["avx2"])


def _reference(x: torch.Tensor, values: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """transformers' BitLinear arithmetic in torch: codes @ W^T in float32 (exact: small integers), then scaled."""
    codes, a_scale = quantize_activations(x)
    return F.linear(codes, values.float()) / (weight_scale * a_scale)


# Sizes off every tiling: inputs not a multiple of 4, outputs not a multiple of 64 (or 16), 1 to 8 rows.
@pytest.mark.parametrize("k,n,rows", [(64, 20, 1), (576, 1536, 1), (1536, 576, 2), (7, 5, 3), (130, 70, 8),
                                      (3, 129, 4)])
def test_kernel_is_bit_identical_to_the_torch_arithmetic(kernel: cpu_kernel.TernaryKernel, k: int, n: int,
                                                         rows: int) -> None:
    g = torch.Generator().manual_seed(k * n + rows)
    values, scale = ternarize(torch.randn(n, k, generator=g))
    x = torch.randn(rows, k, generator=g) * 3
    x[0, : k // 2] *= 1e4  # one row with a wide range (most of its codes round to 0)
    if rows > 2:
        x[1] = 0.0  # the scale floor: every code 0
        x[2] *= 1e-9  # below the floor: codes shrink instead of blowing up
    got = kernel(x, kernel.pack(values, float(scale)))
    assert got.shape == (rows, n)
    assert torch.equal(got, _reference(x, values, scale))


def _exact_bf16(x: torch.Tensor, values: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """bfloat16 the kernels' way: torch's codes of the bfloat16 x, their integer sums exactly (float64), divided in
    float32 by the scales' bfloat16 product, rounded once to bfloat16 (what the Triton kernel's test pins too)."""
    codes, a_scale = quantize_activations(x)
    return ((codes.double() @ values.double().T).float() / (weight_scale * a_scale).float()).bfloat16()


@pytest.mark.parametrize("k,n,rows", [(64, 20, 1), (576, 1536, 1), (1536, 576, 2), (7, 5, 3), (130, 70, 8),
                                      (3, 129, 4)])
def test_bfloat16_rows_give_torch_codes_summed_exactly_and_rounded_once(kernel: cpu_kernel.TernaryKernel, k: int,
                                                                        n: int, rows: int) -> None:
    g = torch.Generator().manual_seed(k * n + rows)
    values, scale = ternarize(torch.randn(n, k, generator=g))
    ws = scale.bfloat16()
    x = torch.randn(rows, k, generator=g) * 3
    x[0, : k // 2] *= 1e4
    if rows > 2:
        x[1] = 0.0  # the scale floor (1e-5 rounded to bfloat16)
        x[2] *= 1e-9
    x = x.bfloat16()
    got = kernel(x, kernel.pack(values, float(ws.float())))
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    assert torch.equal(got, _exact_bf16(x, values, ws))


def test_a_bfloat16_layer_gives_the_same_bits_at_decode_and_prefill_and_near_transformers_rounding() -> None:
    """Decode rows (the C kernel) and prefill rows (oneDNN on the codes) give the exact-sum bits; transformers'
    arithmetic (`fast = False`) rounds the sums to bfloat16 (8 bits) and divides in bfloat16: within two roundings
    of 2^-8 of it."""
    layer, reference = _layer(576, 1536, 9, bias=True), _layer(576, 1536, 9, bias=True)
    layer.to(torch.bfloat16)
    reference.to(torch.bfloat16)
    reference.fast = False
    x = (torch.randn(1, cpu_kernel.MAX_ROWS + 3, 576, generator=torch.Generator().manual_seed(9)) * 2).bfloat16()
    exact = _exact_bf16(x, layer.weight, layer.weight_scale) + layer.bias
    decode = torch.cat([layer(x[:, i : i + 1]) for i in range(x.shape[1])], dim=1)
    assert layer._kernel_weights is not None and decode.dtype == torch.bfloat16
    layer._kernel_weights = None
    prefill = layer(x)
    assert layer._kernel_weights is None  # more rows than MAX_ROWS: not the kernel
    assert torch.equal(decode, exact) and torch.equal(prefill, exact)
    rounded = reference(x)
    assert rounded.dtype == torch.bfloat16 and not torch.equal(rounded, exact)
    plain = exact - layer.bias  # the bias adds a third rounding to both
    assert ((rounded - layer.bias).float() - plain.float()).abs().max() <= 2 ** -6 * plain.float().abs().max()


@pytest.mark.parametrize("onednn", [True, False])
def test_16_bit_prefill_without_onednn_and_rows_with_infinity_match_the_kernel(monkeypatch: pytest.MonkeyPatch,
                                                                                onednn: bool) -> None:
    """Prefill of bfloat16 rows takes exact sums with or without oneDNN's int8 GEMM (a float32 matmul of the codes
    where torch has none), so it gives the kernel's bits; a row holding an infinity (scale 0, NaN codes, which
    oneDNN's uint8 cast turns into numbers) gives NaN on every path."""
    from llmfast.quant.bitnet import layers

    if not onednn:
        monkeypatch.setattr(layers, "_onednn_int8", lambda: False)
    layer = _layer(96, 70, 11, bias=True).to(torch.bfloat16)
    x = (torch.randn(1, cpu_kernel.MAX_ROWS + 4, 96, generator=torch.Generator().manual_seed(11)) * 3).bfloat16()
    x[0, 2, 5], x[0, 9, 0] = float("inf"), float("-inf")
    prefill = layer(x)
    decode = torch.cat([layer(x[:, i : i + 1]) for i in range(x.shape[1])], dim=1)
    assert prefill[0, [2, 9]].isnan().all() and decode[0, [2, 9]].isnan().all()
    keep = [i for i in range(x.shape[1]) if i not in (2, 9)]
    assert torch.equal(prefill[:, keep], decode[:, keep])
    assert torch.equal(prefill[:, keep], _exact_bf16(x[:, keep], layer.weight, layer.weight_scale) + layer.bias)


@pytest.mark.parametrize("threads", [2, 3, 7])
def test_kernel_splits_rows_over_threads_with_the_same_result(threads: int) -> None:
    kernel = cpu_kernel.ternary_kernel()
    assert kernel is not None
    g = torch.Generator().manual_seed(threads)
    values, scale = ternarize(torch.randn(300, 130, generator=g))  # 5 blocks of 64 rows: uneven shares
    x = torch.randn(2, 130, generator=g)
    packed = kernel.pack(values, float(scale))
    assert torch.equal(kernel(x, packed, threads=threads), _reference(x, values, scale))


def test_pack_refuses_values_outside_minus_one_to_one() -> None:
    kernel = cpu_kernel.ternary_kernel()
    assert kernel is not None
    with pytest.raises(ValueError, match="-1, 0 or 1"):
        kernel.pack(torch.tensor([[0, 2]], dtype=torch.int8), 1.0)
    with pytest.raises(TypeError, match="int8"):
        kernel.pack(torch.zeros(2, 2), 1.0)


def _layer(k: int, n: int, seed: int, bias: bool = False) -> TernaryLinear:
    g = torch.Generator().manual_seed(seed)
    layer = TernaryLinear(k, n, bias=bias)
    values, scale = ternarize(torch.randn(n, k, generator=g))
    layer.weight.copy_(values)
    layer.weight_scale.copy_(scale)
    if bias:
        layer.bias.normal_(generator=g)
    return layer


def test_ternary_linear_takes_the_kernel_for_decode_rows_only() -> None:
    layer = _layer(96, 40, 0, bias=True)
    reference = _layer(96, 40, 0, bias=True)
    reference.fast = False
    decode = torch.randn(1, 1, 96)
    assert torch.equal(layer(decode), reference(decode))
    assert layer._kernel_weights is not None  # the kernel ran
    layer._kernel_weights = None
    most = torch.randn(2, cpu_kernel.MAX_ROWS // 2, 96)  # exactly MAX_ROWS rows, over two sequences: still decode
    assert torch.equal(layer(most), reference(most))
    assert layer._kernel_weights is not None
    layer._kernel_weights = None
    prefill = torch.randn(1, cpu_kernel.MAX_ROWS + 1, 96)
    assert torch.equal(layer(prefill), reference(prefill))
    assert layer._kernel_weights is None  # more rows than MAX_ROWS: oneDNN's GEMM, not the kernel


def test_ternary_linear_follows_weights_changed_after_its_first_call() -> None:
    layer, other = _layer(64, 64, 1), _layer(64, 64, 2)
    x = torch.randn(1, 64)
    before = layer(x)
    layer.load_state_dict(other.state_dict())  # copies into the same buffers: the cached layouts must go
    other.fast = False
    after = layer(x)
    assert not torch.equal(before, after)
    assert torch.equal(after, other(x))
    layer.weight_scale.mul_(2)
    assert torch.equal(layer(x), after / 2)


def test_ternary_linear_without_a_compiler_keeps_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_kernel, "ternary_kernel", lambda *flags: None)  # what no compiler gives
    layer, reference = _layer(64, 20, 3), _layer(64, 20, 3)
    reference.fast = False
    x = torch.randn(1, 64)
    assert torch.equal(layer(x), reference(x))
    assert layer._kernel_weights is None


def test_no_compiler_says_so_once_and_builds_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LLMFAST_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert native.load_kernel.__wrapped__(cpu_kernel.SOURCE) is None  # type: ignore[attr-defined]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no C compiler" in err[0] and "ternary_gemv" in err[0]
    assert not any(tmp_path.rglob("*.so"))


def test_a_source_that_does_not_compile_is_reported_and_leaves_nothing(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LLMFAST_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.c"
    bad.write_text("int f(void) { return }\n")
    assert native.load_kernel.__wrapped__(bad) is None  # type: ignore[attr-defined]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llmfast: building broken.c failed (")
    assert list((tmp_path / "cache" / "kernels").iterdir()) == []  # no half-built library


def test_a_built_kernel_is_reused_and_a_changed_flag_builds_another(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMFAST_CACHE", str(tmp_path))
    build = native.load_kernel.__wrapped__  # type: ignore[attr-defined]
    assert build(cpu_kernel.SOURCE) is not None
    (first,) = (tmp_path / "kernels").iterdir()
    stamp = first.stat().st_mtime_ns
    assert build(cpu_kernel.SOURCE) is not None
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [first.name] and first.stat().st_mtime_ns == stamp
    assert build(cpu_kernel.SOURCE, ("-mno-avx512f",)) is not None
    assert len(list((tmp_path / "kernels").iterdir())) == 2


def test_native_off_by_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LLMFAST_CACHE", str(tmp_path))
    monkeypatch.setenv("LLMFAST_NATIVE", "0")
    assert native.load_kernel.__wrapped__(cpu_kernel.SOURCE) is None  # type: ignore[attr-defined]
    assert capsys.readouterr().err == ""  # asked for: nothing to report
    assert not (tmp_path / "kernels").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_ternary_model_decodes_the_same_with_and_without_the_kernel(tmp_path: Path, dtype: torch.dtype) -> None:
    from transformers import AutoModelForCausalLM

    from llmfast.quant.bitnet.convert import replace_linears, to_ternary

    model = AutoModelForCausalLM.from_pretrained(build_tiny_llama(tmp_path / "tiny"), dtype=torch.float32).eval()
    replace_linears(model, to_ternary)
    model.to(dtype)
    prompt = torch.tensor([[1, 17, 42, 99, 5, 8, 13, 21, 34, 55]])  # more rows than MAX_ROWS: prefill on oneDNN
    runs = {}
    try:
        for kernel in (True, False):
            TernaryLinear.kernel = kernel
            with torch.no_grad():
                out = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                     output_logits=True, return_dict_in_generate=True)
            runs[kernel] = (out.sequences, torch.stack(out.logits))
    finally:
        TernaryLinear.kernel = True
    assert any(m._kernel_weights is not None for m in model.modules() if isinstance(m, TernaryLinear))
    assert torch.equal(runs[True][0], runs[False][0])
    assert torch.equal(runs[True][1], runs[False][1])  # prefill on oneDNN, every decode step on the kernel


def test_no_rows_give_an_empty_output() -> None:
    layer = _layer(32, 8, 4)
    assert layer(torch.zeros(0, 32)).shape == (0, 8)
    assert layer(torch.zeros(1, 0, 32)).shape == (1, 0, 8)


def test_a_row_with_nan_or_infinity_gives_nan_and_leaves_the_other_rows_alone(
        kernel: cpu_kernel.TernaryKernel) -> None:
    values, scale = ternarize(torch.randn(70, 40, generator=torch.Generator().manual_seed(5)))
    x = torch.randn(3, 40)
    x[0, 7], x[2, 3] = float("nan"), float("inf")
    got = kernel(x, kernel.pack(values, float(scale)))
    assert got[0].isnan().all() and got[2].isnan().all()  # torch's codes are NaN there: so is every output
    assert torch.equal(got[1], _reference(x[1:2], values, scale)[0])
    assert _reference(x, values, scale)[[0, 2]].isnan().all()  # the reference agrees on those rows
    xb, ws = x.bfloat16(), scale.bfloat16()
    got = kernel(xb, kernel.pack(values, float(ws.float())))
    assert got[0].isnan().all() and got[2].isnan().all()
    assert torch.equal(got[1], _exact_bf16(xb[1:2], values, ws)[0])


def test_the_largest_finite_float32_is_a_number_not_an_infinity(kernel: cpu_kernel.TernaryKernel) -> None:
    """A row whose absmax is float32's largest finite value quantizes as torch does (its code 127), not as the NaN
    row of an infinity."""
    values, scale = ternarize(torch.randn(20, 12, generator=torch.Generator().manual_seed(6)))
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(7))
    big = torch.finfo(torch.float32).max
    x[0, 3], x[2, 5] = big, -big
    want = _reference(x, values, scale)
    assert not want.isnan().any()
    assert torch.equal(kernel(x, kernel.pack(values, float(scale))), want)


def test_kernel_refuses_an_input_of_the_wrong_width_or_dtype() -> None:
    kernel = cpu_kernel.ternary_kernel()
    assert kernel is not None
    packed = kernel.pack(torch.zeros(8, 16, dtype=torch.int8), 1.0)
    with pytest.raises(ValueError, match=r"\(\.\.\., 16\), got torch.float32 \(1, 15\)"):
        kernel(torch.zeros(1, 15), packed)
    with pytest.raises(ValueError, match="float64"):
        kernel(torch.zeros(1, 16, dtype=torch.float64), packed)
    with pytest.raises(ValueError, match="float16"):
        kernel(torch.zeros(1, 16, dtype=torch.float16), packed)


def test_ternary_linear_with_a_wrong_width_raises_as_the_torch_path_does() -> None:
    layer = _layer(32, 8, 6)
    with pytest.raises(RuntimeError):  # the kernel must not read past the row: the torch path's shape error
        layer(torch.randn(1, 31))


def test_ternary_linear_with_a_float64_scale_keeps_the_torch_path() -> None:
    layer = _layer(32, 8, 7)
    layer.weight_scale = layer.weight_scale.double()  # the torch path's output is then float64
    y = layer(torch.randn(1, 32))
    assert y.dtype == torch.float64 and layer._kernel_weights is None


def test_ternary_linear_with_16_bit_x_and_a_float32_scale_keeps_the_torch_arithmetic() -> None:
    """A float32 layer given bfloat16 rows: transformers' arithmetic, whose division by the float32 scale promotes
    the output to float32; the kernels' exact sums rounded to bfloat16 are for bfloat16 layers only."""
    layer, reference = _layer(64, 16, 11), _layer(64, 16, 11)
    reference.fast = False
    for rows in (1, cpu_kernel.MAX_ROWS + 4):  # decode and prefill
        x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)).bfloat16()
        y = layer(x)
        assert y.dtype == torch.float32 and torch.equal(y, reference(x))


def test_ternary_linear_keeps_autograd_for_rows_that_require_grad() -> None:
    """The C kernel has no backward: a decode-sized input that requires grad takes the torch path, whose gradient
    (through the per-row scale; the rounded codes pass none) is transformers' arithmetic's."""
    for rows in (1, cpu_kernel.MAX_ROWS + 3):
        layer, reference = _layer(64, 16, 12), _layer(64, 16, 12)
        reference.fast = False
        x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows), requires_grad=True)
        y = layer(x)
        assert y.requires_grad and layer._kernel_weights is None
        y.square().sum().backward()
        x2 = x.detach().clone().requires_grad_()
        y2 = reference(x2)
        y2.square().sum().backward()
        assert torch.equal(y.detach(), y2.detach())
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=0)
        assert x.grad.abs().max() > 0


def test_ternary_linear_follows_a_replaced_buffer_and_runs_in_inference_mode() -> None:
    layer, other = _layer(64, 16, 8), _layer(64, 16, 9)
    x = torch.randn(1, 64)
    layer(x)
    layer.weight_scale = other.weight_scale.clone()  # a new tensor object: the cached layout must not survive
    layer.weight = other.weight.clone()
    other.fast = False
    assert torch.equal(layer(x), other(x))
    with torch.inference_mode():
        fresh = _layer(64, 16, 10)  # inference tensors keep no version counter
        reference = _layer(64, 16, 10)
        reference.fast = False
        assert torch.equal(fresh(x), reference(x))


def test_a_cached_library_that_does_not_load_is_built_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    import os
    import subprocess
    import sys

    monkeypatch.setenv("LLMFAST_CACHE", str(tmp_path))
    # Built by another process: this one must not have the library mapped when its file is spoiled.
    subprocess.run([sys.executable, "-c", "from llmfast import native; from llmfast.quant.bitnet import cpu_kernel; "
                    "assert native.load_kernel(cpu_kernel.SOURCE)"], check=True, env=os.environ.copy())
    (library,) = (tmp_path / "kernels").iterdir()
    library.write_bytes(b"truncated")  # a disk that filled up mid-copy
    lib = native.load_kernel.__wrapped__(cpu_kernel.SOURCE)  # type: ignore[attr-defined]
    assert lib is not None and cpu_kernel.TernaryKernel(lib).path in ("avx512-vnni", "avx2", "c")
    assert library.stat().st_size > 1000 and library.stat().st_mode & 0o777 == 0o755
    assert capsys.readouterr().err == ""


def test_cc_may_carry_words(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    monkeypatch.setenv("LLMFAST_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", f"{shutil.which('cc') or shutil.which('gcc')} -DLLMFAST_UNUSED=1")
    assert native.load_kernel.__wrapped__(cpu_kernel.SOURCE) is not None  # type: ignore[attr-defined]
