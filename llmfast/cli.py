"""The `llmfast` command: one verb per stage, one-line errors, exit code 2 on user error.

This module builds the parsers and runs a verb; what each verb does is in commands.py. Heavy imports (torch,
transformers) happen inside the verbs, so `--help` and bad arguments answer at once.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from llmfast import __version__
from llmfast.argtypes import positive
from llmfast.errors import UserError, as_user_error, print_error
from llmfast.commands import (cmd_bench_offline, cmd_bench_run, cmd_bench_serve, cmd_eval, cmd_export, cmd_finetune,
                              cmd_models, cmd_quantize, cmd_serve, cmd_sparsify, cmd_tasks)
from llmfast.process_exit import (LOG_BARS, PIPE_CLOSED, end_process_group, exit_process, flush, interrupted_code,
                                  interrupted_line, pipe_closed, process_group_started, quiet_worker, restore_signals,
                                  stop_on_signals)


class _Help(argparse.HelpFormatter):
    """Each option's default in its --help, where it has one to say (not a switch's False, not an unset None) and its
    text does not say it already: bench's vLLM flags and a few others had none (`--num-prompts NUM_PROMPTS`, no
    word of its 1000)."""

    @staticmethod
    def _untold(action: argparse.Action) -> bool:
        d = action.default
        unset = d is None or d is False or d == [] or d is argparse.SUPPRESS
        return bool(action.option_strings) and not unset and "default" not in (action.help or "")

    def _format_action(self, action: argparse.Action) -> str:
        if self._untold(action):
            action = copy.copy(action)  # argparse formats no help line at all for an option without help text
            action.help = f"{action.help or ''} (default: %(default)s)".strip()
        return super()._format_action(action)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{"formatter_class": _Help, **kwargs})

    def format_help(self) -> str:
        if callable(self.description):  # made when the help is shown, from a registry (not for every command line)
            self.description = self.description()
        return super().format_help()

    # argparse's own usage errors also exit 2, but print a usage block; keep them to one line. main() already
    # prints "llmfast: error:", so only a sub-verb's name comes before the message ("finetune: ...").
    def error(self, message: str) -> None:  # type: ignore[override]
        verb = self.prog.removeprefix("llmfast").strip()
        raise UserError(f"{verb + ': ' if verb else ''}{message} (see {self.prog} --help)")


def _add_set(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a recipe key, e.g. --set {example} (repeatable)")


def cmd_run(args: argparse.Namespace) -> int:
    from llmfast.chain.plan import ChainRecipe
    from llmfast.chain.run import run_chain
    from llmfast.recipe import load_recipe

    def run_verb(argv: list[str]) -> int:  # a stage: the verb's own parser and function, in this process
        stage_args = parse_args(argv)
        return stage_args.func(stage_args)

    recipe = load_recipe(args.recipe, ChainRecipe, args.overrides)
    out = run_chain(recipe, Path(args.recipe), run_verb, dry_run=args.dry_run, start=args.start, parse_verb=parse_args)
    if not args.dry_run:
        print(f"run: {out}")
    return 0


def _add_models(sub: Any) -> None:
    p = sub.add_parser("models", help="list the built-in models, or prepare one",
                       description="List the built-in models. With --prepare, convert one into the cache now.")
    p.add_argument("--prepare", nargs="+", metavar="MODEL",
                   help="resolve and cache models (builtin names, GGUF files, hub ids)")
    p.set_defaults(func=cmd_models)


def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="perplexity and task accuracy of a model",
                       description="Evaluate a model: perplexity on held-out text, exact-match accuracy on "
                       "task test sets. Writes a results JSON (see docs/eval.md) and prints a table.")
    p.add_argument("recipe", help="eval recipe YAML, e.g. recipes/eval_smollm2.yaml")
    p.add_argument("--model", help="model to evaluate (overrides the recipe's 'model')")
    p.add_argument("--output", help="results JSON path (overrides the recipe's 'output')")
    _add_set(p, "eval.batch_size=8")
    p.set_defaults(func=cmd_eval)


def _add_finetune(sub: Any) -> None:
    p = sub.add_parser("finetune", help="train a LoRA/QLoRA adapter",
                       description="Train a LoRA or QLoRA adapter from a recipe. Writes OUTPUT/adapter (a PEFT "
                       "adapter), OUTPUT/metrics.json and OUTPUT/train_log.jsonl. For DDP (or FSDP with "
                       "train.fsdp: true) over N processes run it as `torchrun --nproc_per_node N -m llmfast.cli "
                       "finetune RECIPE` (CPUs or GPUs), or under `accelerate launch --multi_gpu` on GPUs.")
    p.add_argument("recipe", help="finetune recipe YAML, e.g. recipes/lora_smollm2_dates.yaml")
    p.add_argument("--resume", action="store_true", help="continue from the run's last complete checkpoint")
    _add_set(p, "train.lr=1e-4")
    p.set_defaults(func=cmd_finetune)


def _add_export(sub: Any) -> None:
    p = sub.add_parser("export", help="merge a LoRA adapter into its base model",
                       description="Write a full model with the adapter merged in. A QLoRA adapter's base is "
                       "dequantized from 4-bit first; merging into 4-bit weights is refused.")
    p.add_argument("adapter", help="adapter directory (or a finetune output directory)")
    p.add_argument("output", help="directory for the merged model")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--base", help="the base model the adapter was trained on (builtin:NAME, a model directory, a "
                   ".gguf or a hub id), where the one it records is not here; default: the recorded one")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output directory (never the adapter or its base)")
    p.set_defaults(func=cmd_export)


def _add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve a model (and LoRA adapters) with vLLM's OpenAI-compatible server",
                       description="Start vLLM's OpenAI-compatible server for a model: builtin:NAME, a model "
                       "directory, a .gguf or a hub id, with LoRA adapters served by name. Defaults come from the "
                       "machine (every core bound, float32 on CPUs without fast bf16, a KV cache that fits). "
                       "Arguments after `--` go to vLLM unchanged.")
    p.add_argument("model", help="model to serve, e.g. builtin:smollm2-135m or runs/lora-dates/merged")
    p.add_argument("vllm_args", nargs="*", metavar="-- VLLM_ARGS", help="extra vLLM server flags, after --")
    p.add_argument("--lora", action="append", metavar="NAME=PATH", help="serve an adapter under NAME (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=os.environ.get("LLMFAST_API_KEY"),
                   help="require this bearer key (default: $LLMFAST_API_KEY, else none)")
    p.add_argument("--served-model-name", help="the model's name in the API (default: its directory name)")
    p.add_argument("--dtype", help="override the machine's choice (float32, bfloat16, float16, auto)")
    p.add_argument("--max-model-len", type=positive(int), help="longest sequence (default: the model's)")
    p.add_argument("--tensor-parallel-size", type=positive(int), default=1, help="vLLM workers splitting the heads")
    p.add_argument("--pipeline-parallel-size", type=positive(int), default=1, help="vLLM workers splitting the layers")
    p.add_argument("--timeout", type=positive(float), default=600.0, help="seconds to wait for /health (default 600)")
    p.add_argument("--log", help="write the server's output here (default: a temporary file, removed after a clean "
                   "stop and named in any error)")
    p.add_argument("--verbose", action="store_true", help="echo vLLM's own output on stderr")
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    p.set_defaults(func=cmd_serve)


def _add_bench(sub: Any) -> None:
    p = sub.add_parser("bench", help="benchmark serving: online load, offline engines, or every variant",
                       description="Benchmarks: `bench serve` (load an OpenAI-compatible endpoint, flags of "
                       "`vllm bench serve`), `bench offline` (vLLM or transformers engine in-process), "
                       "`bench run RECIPE` (every variant of a bench recipe, one report).")
    bench = p.add_subparsers(dest="bench_verb", metavar="KIND", parser_class=_Parser, required=True)
    b = bench.add_parser("serve", help="online benchmark of an OpenAI-compatible endpoint",
                         description="Streaming load against an OpenAI-compatible (chat) completions endpoint: "
                         "the flags, metrics and result keys of `vllm bench serve`; its flags that do not apply to "
                         "text generation are refused with the reason (docs/bench.md). Exit code 1 when requests "
                         "failed.")
    from llmfast.bench.serve_flags import add_arguments as add_serve_bench_arguments  # light: argparse only

    add_serve_bench_arguments(b)
    b.set_defaults(func=cmd_bench_serve)
    b = bench.add_parser("offline", help="offline throughput and latency of vLLM's engine or transformers",
                         description="All requests at once into vLLM's LLM engine (or transformers generate with "
                         "--engine hf); per-request TTFT/TPOT/ITL/E2EL, requests/s and tokens/s.")
    from llmfast.bench.offline import add_arguments as add_offline_arguments

    add_offline_arguments(b)
    b.set_defaults(func=cmd_bench_offline)
    b = bench.add_parser("run", help="measure every variant of a bench recipe, one report",
                         description="Run a bench recipe: each variant (base, LoRA, merged, quantized) served by "
                         "vLLM where it can be, else by transformers (labelled), against the transformers baseline "
                         "on the same prompts; writes report.md, PNG plots and results.json.")
    b.add_argument("recipe", help="bench recipe YAML, e.g. recipes/bench_smollm2.yaml")
    b.add_argument("--overwrite", action="store_true",
                   help="replace an existing output folder (once the new report is complete; never a variant's model)")
    _add_set(b, "workload.num_prompts=16")
    b.set_defaults(func=cmd_bench_run)


def _add_tasks(sub: Any) -> None:
    p = sub.add_parser("tasks", help="list or generate the synthetic tasks",
                       description="Without arguments, list the synthetic tasks. With task names (or 'all'), "
                       "write TASK/train.jsonl and TASK/test.jsonl under --out, deterministic by --seed.")
    p.add_argument("task", nargs="*", help="task names, or 'all'")
    p.add_argument("--out", default="data/tasks", help="output folder (default: data/tasks)")
    p.add_argument("--train", type=int, default=2000, help="training rows per task (default 2000)")
    p.add_argument("--test", type=int, default=200, help="test rows per task (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true",
                   help="replace files that exist with other content (identical files are always left as they are)")
    p.set_defaults(func=cmd_tasks)


def _add_artifact_verb(sub: Any, name: str, help: str, description: str | Callable[[], str], example: str,
                       resume_help: str, func: Callable[[argparse.Namespace], int]) -> None:
    """A verb that writes one artifact from a recipe, resumable when its method trains (quantize, sparsify)."""
    p = sub.add_parser(name, help=help, description=description)
    p.add_argument("recipe", help=f"{name} recipe YAML, e.g. {example}")
    p.add_argument("--resume", action="store_true", help=resume_help)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (and stale checkpoints)")
    _add_set(p, {"quantize": "quantization.group_size=128"}.get(name, "sparsify.config.target=0.5"))
    p.set_defaults(func=func)


def _sparsify_description() -> str:
    from llmfast.sparse.base import SPARSIFIERS  # registers every method (pydantic: only when the help is shown)

    methods = "; ".join(f"{name} ({cls.paper}{'; it trains: --resume continues it' if cls.trains else ''})"
                        for name, cls in SPARSIFIERS.items())
    return ("Write a model whose MLP activations are mostly zero, with a method registered in llmfast/sparse "
            f"(the recipe's sparsify.method): {methods}. Writes OUTPUT atomically; `load_model` and `llmfast eval` "
            "apply it. See docs/sparsify.md.")


def _add_sparsify(sub: Any) -> None:
    _add_artifact_verb(
        sub, "sparsify", "make a model's MLP activations sparse (e.g. TEAL, Deja Vu)", _sparsify_description,
        "recipes/sparsify_teal_smollm2.yaml", "continue an interrupted run of a method that trains from its last "
        "checkpoint", cmd_sparsify)


def _add_quantize(sub: Any) -> None:
    _add_artifact_verb(
        sub, "quantize", "quantize a model into a smaller artifact (int4, 1.58-bit BitNet)",
        "Quantize a full-precision model with a method from llmfast/quant (see docs/quantize.md). Writes OUTPUT "
        "atomically with llmfast.json recording the method, so eval, bench and serve pick the loader and the engine "
        "from the artifact.",
        "recipes/quantize_bitnet_smollm2.yaml", "continue an interrupted training method from its checkpoint",
        cmd_quantize)


def _add_run(sub: Any) -> None:
    p = sub.add_parser("run", help="run a chain of stages (fine-tune, merge, quantize, sparsify, eval, bench)",
                       description="Run a chain recipe: stages in dependency order, each result reused while its "
                       "settings and parents are unchanged; a killed run continues where it stopped.")
    p.add_argument("recipe", help="chain recipe YAML, e.g. recipes/quickstart.yaml")
    p.add_argument("--dry-run", action="store_true", help="print the plan (what runs, what is reused, why) and stop")
    p.add_argument("--from", dest="start", metavar="STAGE", help="run STAGE and every stage that depends on it again")
    _add_set(p, "stages.NAME.with.train.steps=8")
    p.set_defaults(func=cmd_run)


def _add_merge(sub: Any) -> None:
    from llmfast.merge import cli as merge_cli  # light import: no torch at parser-build time

    # The description (with the registered methods) is set by merge_cli.configure.
    merge_cli.configure(sub.add_parser(
        "merge", help="merge models or LoRA adapters that share a base (mergekit-style config)"))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llmfast", description="Adapt, compress, merge, serve and benchmark LLMs.")
    parser.add_argument("--version", action="version", version=f"llmfast {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    for add in (_add_models, _add_tasks, _add_finetune, _add_export, _add_merge, _add_quantize, _add_sparsify,
                _add_eval, _add_serve, _add_bench, _add_run):  # the order of the chain
        add(sub)
    return parser


def _vllm_cut(argv: list[str]) -> int:
    """Where the `serve` verb's own arguments end: its `--` (what follows is vLLM's), else the end. Only the verb
    `serve` takes one (`bench serve` is bench's: `"serve" in argv` took its `--` too and dropped what followed)."""
    verb = next((a for a in argv if not a.startswith("-")), None)
    return argv.index("--") if verb == "serve" and "--" in argv else len(argv)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse a command line; for `serve`, what follows `--` goes to vLLM untouched (argparse alone refuses it)."""
    argv = list(argv)
    cut = _vllm_cut(argv)
    head = [a for a in argv[:cut] if a != "--debug"]  # --debug after the verb too: it belongs to the top parser
    try:
        args = build_parser().parse_args((["--debug"] if len(head) < cut else []) + head)
    except UserError as e:  # argparse takes a file named "-x.yaml" for an option
        if dashed := next((a for a in head if a.startswith("-") and Path(a).is_file()), None):
            raise UserError(f"{e}; {dashed} is a file: write ./{dashed} or put -- before it") from None
        raise
    if cut < len(argv):
        args.vllm_args = argv[cut + 1 :]
    return args


def _pace_bars_in_logs() -> None:
    """tqdm repaints every 0.1 s; into a file each repaint stays, a `\\r`-joined line growing by ~100 bytes a step
    (10 KB for a 50-step fine-tune). Where stderr is not a terminal, bars repaint as LOG_BARS says instead, set before
    tqdm is imported and inherited by vLLM's and torchrun's processes; values the user set (or TQDM_DISABLE=1) win.
    Only as the process's command (`main()` reading sys.argv): a caller's (a script's, a test's) own stderr and
    environment are left alone: set in a script run under nohup, they stayed in its os.environ after main([...])."""
    if sys.stderr is sys.__stderr__ and sys.stderr is not None and not sys.stderr.isatty():  # None: `2>&-`
        for name, value in LOG_BARS.items():
            os.environ.setdefault(name, value)


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        _pace_bars_in_logs()
    argv = list(sys.argv[1:] if argv is None else argv)
    own = argv[: _vllm_cut(argv)]  # after serve's --: vLLM's
    debug = "--debug" in own or bool(os.environ.get("LLMFAST_DEBUG"))
    previous = stop_on_signals()
    callers_group = process_group_started()
    try:
        args = parse_args(argv)
        if not getattr(args, "func", None):
            build_parser().print_help()
            return 2
        func: Callable[[argparse.Namespace], int] = args.func
        code = func(args)
        flush(sys.stdout)  # a closed pipe met here, not at the console script's exit (a traceback, status 120)
        return code
    except SystemExit:  # --help, --version: what argparse printed is flushed here, where a closed pipe is handled
        try:
            flush(sys.stdout)
        except BrokenPipeError:
            return pipe_closed() or PIPE_CLOSED
        raise
    except KeyboardInterrupt as e:
        if not quiet_worker(e, False):  # a launch's workers stop together: process 0 says it
            print_error(interrupted_line(e))
        return interrupted_code(e)
    except Exception as e:  # a UserError, or a full disk met outside the atomic writes (a log line appended)
        # stdout's reader closed it (`| head -1`): the verb's cleanup ran on the way out
        if isinstance(e, BrokenPipeError) and (code := pipe_closed()) is not None:
            return code
        err = as_user_error(e)
        if not debug and quiet_worker(e, err is not None):
            return 1 if err is None else 2
        if debug or err is None:
            raise
        print_error(err)
        return 2
    finally:
        restore_signals(previous)
        end_process_group(callers=callers_group)


if __name__ == "__main__":
    exit_process(main())
