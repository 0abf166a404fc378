"""What a chain recipe's `launch:` may run: torchrun or `accelerate launch`, starting `python -m llmfast.cli`.

A chain recipe is data (one may come with a model or a tutorial), and `launch:` is a command line that `llmfast run`
starts: `launch: [sh, -c, ...]` ran whatever the recipe said. So the launcher is named (found on $PATH, or this
environment's own), and its words are read by its own argument parser, which must find the script llmfast appends
(`-m llmfast.cli`) run as a module by python: `--no-python`, `--run-path` or a script of the recipe's own are
refused, and so are accelerate's flags that reach beyond this machine's processes or read settings from another file
(a config file, hosts to start on, a TPU pod, a hub kernel). To run a verb under another launcher, start it yourself:
`LAUNCHER -m llmfast.cli VERB RECIPE`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
from pathlib import Path
from typing import Sequence

from llmfast.errors import UserError

LAUNCHERS = ("torchrun", "accelerate")
_SCRIPT = "llmfast.cli"
# accelerate launch's settings a chain recipe may give (the rest: a config file, hosts, TPU pods, environment
# variables for them, a hub-hosted attention kernel, no python): processes on this machine or a plain multi-node run
_ACCELERATE = {"cpu", "multi_gpu", "num_processes", "num_machines", "machine_rank", "main_process_ip",
               "main_process_port", "same_network", "rdzv_backend", "rdzv_conf", "max_restarts", "monitor_interval",
               "gpu_ids", "num_cpu_threads_per_process", "mixed_precision", "quiet", "debug", "use_fsdp"}


def _refuse(launch: Sequence[str], why: str) -> UserError:
    return UserError(f"launch: {' '.join(launch)}: {why}; to run the verb under another launcher, start it yourself "
                     f"(LAUNCHER -m {_SCRIPT} VERB RECIPE)")


def _named(launch: Sequence[str]) -> str:
    """The launcher's name: given by name (found on $PATH), or as the path of the one on $PATH or in this
    interpreter's environment; never a program the recipe brings along."""
    first = launch[0]
    name = Path(first).name
    if name not in LAUNCHERS:
        raise _refuse(launch, f"a chain runs its stages under {' or '.join(LAUNCHERS)} only")
    if first != name:
        known = [p for p in (shutil.which(name), Path(sys.executable).parent / name) if p is not None]
        if not any(Path(first).resolve() == Path(p).resolve() for p in known):
            raise _refuse(launch, f"{first} is not the {name} on $PATH or of this Python ({sys.executable}): name "
                                  f"it as `{name}`")
    return name


def _parsed(parser: argparse.ArgumentParser, words: list[str], launch: Sequence[str]) -> argparse.Namespace:
    parser.prog = launch[0]
    try:
        with contextlib.redirect_stderr(io.StringIO()) as err:  # argparse prints its usage, then exits
            return parser.parse_args([*words, "-m", _SCRIPT, "VERB"])
    except SystemExit:
        said = [line for line in err.getvalue().splitlines() if line.strip()]
        raise _refuse(launch, f"its parser refuses it ({said[-1] if said else 'no message'})") from None


def check_launch(launch: Sequence[str]) -> None:
    """A one-line UserError unless `launch` runs `python -m llmfast.cli` under torchrun or `accelerate launch`."""
    if not launch:
        return
    name = _named(launch)
    if name == "torchrun":
        from torch.distributed.run import get_args_parser

        args = _parsed(get_args_parser(), list(launch[1:]), launch)
        bad = "--no-python" if args.no_python else "--run-path" if args.run_path else None
    else:
        if list(launch[1:2]) != ["launch"]:
            raise _refuse(launch, "accelerate runs a stage as `accelerate launch ...` only")
        from accelerate.commands.launch import launch_command_parser

        parser = launch_command_parser()
        args = _parsed(parser, list(launch[2:]), launch)
        default = _parsed(launch_command_parser(), [], launch)
        flags: dict[str, str] = {}
        for action in parser._actions:  # a dest's first flag (--tpu_cluster, not its internal --no_tpu_cluster)
            if action.option_strings:
                flags.setdefault(action.dest, action.option_strings[0])
        given = sorted(d for d, v in vars(args).items() if v != getattr(default, d, None) and d in flags
                       and d not in _ACCELERATE and not d.startswith("fsdp_") and d != "module")
        bad = flags[given[0]] if given else "--no-python" if args.no_python else None
    if bad is not None:
        raise _refuse(launch, f"{bad} is not taken from a chain recipe (it would run another program than "
                              "llmfast, or read settings from elsewhere)")
    if not args.module or args.training_script != _SCRIPT or args.training_script_args != ["VERB"]:
        raise _refuse(launch, f"it names a script or module of its own ({args.training_script}); llmfast adds "
                              f"`-m {_SCRIPT}` itself")
