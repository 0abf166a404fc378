"""The `llmfast` command: one verb per stage, one-line errors, exit code 2 on user error.

Heavy imports (torch, transformers) happen inside the verbs, so `--help` and bad arguments answer at once.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from llmfast import __version__
from llmfast.argtypes import positive
from llmfast.errors import UserError, as_user_error, print_error
from llmfast.process_exit import (end_process_group, exit_process, interrupted_code, interrupted_line, quiet_worker,
                                  raise_interrupt, restore_signals, stop_on_signals)


class _Parser(argparse.ArgumentParser):
    # argparse's own usage errors also exit 2, but print a usage block; keep them to one line. main() already
    # prints "llmfast: error:", so only a sub-verb's name comes before the message ("finetune: ...").
    def error(self, message: str) -> None:  # type: ignore[override]
        verb = self.prog.removeprefix("llmfast").strip()
        raise UserError(f"{verb + ': ' if verb else ''}{message} (see {self.prog} --help)")


def _add_set(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a recipe key, e.g. --set {example} (repeatable)")


def cmd_models(args: argparse.Namespace) -> int:
    from llmfast.modelfiles import describe_model_dir
    from llmfast.models import BUILTINS, builtin_gguf_path, cache_dir, refuse_pickle_weights, resolve_model

    if args.prepare:
        for name in args.prepare:
            # A bare built-in name is a shorthand; anything else (builtin:NAME, a .gguf, a directory, a hub id)
            # resolves as everywhere else.
            path = resolve_model(f"builtin:{name}" if name in BUILTINS else name)
            refuse_pickle_weights(path)  # prepared means loadable: every other verb refuses pickle-only weights
            info = describe_model_dir(path)
            print(f"{name}: {path} ({info['architecture']}, {info['layers']} layers, {info['dtype']})")
        return 0
    print(f"{'name':<24} {'installed':<10} {'prepared':<9} description")
    for m in BUILTINS.values():
        try:
            builtin_gguf_path(m)
            installed = "yes"
        except UserError:
            installed = "no"
        prepared = "yes" if (cache_dir() / "models" / "builtin" / m.name / "llmfast.json").is_file() else "no"
        print(f"{'builtin:' + m.name:<24} {installed:<10} {prepared:<9} {m.description}")
        print(f"{'':<45} source: {m.source}; license {m.license}")
    print(f"\ncache: {cache_dir()} (set LLMFAST_CACHE to move it)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from llmfast.evaluate import format_table, run_eval
    from llmfast.overrides import blamed_on_flags, flag_overrides
    from llmfast.recipe import EvalRecipe, load_recipe

    flags = {"model": args.model, "output": args.output}
    try:
        recipe = load_recipe(args.recipe, EvalRecipe, flag_overrides(args.overrides, flags))
    except UserError as e:
        raise blamed_on_flags(e, flags) from None
    results = run_eval(recipe)
    print(format_table(results))
    print(f"results: {recipe.output}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from llmfast.preflight import check_finetune_inputs
    from llmfast.recipe import FinetuneRecipe, load_recipe

    recipe = load_recipe(args.recipe, FinetuneRecipe, args.overrides)
    check_finetune_inputs(recipe, args.resume)  # before torch is imported: mistakes answer at once
    from llmfast.finetune.trainer import run_finetune

    metrics = run_finetune(recipe, resume=args.resume)
    out = Path(recipe.output)
    if int(os.environ.get("RANK", "0")) != 0:  # one summary for a run over several processes
        return 0
    print(f"adapter: {out / 'adapter'}  steps: {metrics['steps']}  final loss: {metrics['final_train_loss']}"
          f"  eval loss: {metrics['final_eval_loss']}  tokens/s: {metrics['train_tokens_per_s']}"
          f"  peak memory: {metrics['peak_memory_gib']:.2f} GiB ({metrics['memory_kind']})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from llmfast.finetune.export import export_merged
    from llmfast.models import adapter_dir

    out = export_merged(adapter_dir(args.adapter), args.output, args.dtype, overwrite=args.overwrite, base=args.base)
    print(f"merged model: {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from llmfast.serve.server import VllmServer, check_host, check_log, prepare_spec

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: a port is 0 to 65535 (0 picks a free one)")
    check_host(args.host)
    check_log(args.log)
    spec = prepare_spec(args.model, args.lora, served_name=args.served_model_name, host=args.host, port=args.port,
                        api_key=args.api_key, dtype=args.dtype, max_model_len=args.max_model_len,
                        tensor_parallel_size=args.tensor_parallel_size,
                        pipeline_parallel_size=args.pipeline_parallel_size, extra_args=args.vllm_args)
    # vLLM's own output goes to the log (echoed to stderr with --verbose); stdout carries only the ready line.
    server = VllmServer(spec, log_path=args.log, echo=sys.stderr if args.verbose else None)
    kept = "" if args.log else ", removed after a clean stop"
    print(f"starting vLLM on {server.base_url} for {spec.model} (log: {server.log_path}{kept})", file=sys.stderr)
    # SIGTERM (docker stop, systemd, kill) stops vLLM like Ctrl-C does, instead of orphaning it; and Ctrl-C works
    # even when started as a shell's background job, which inherits SIGINT ignored.
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        server.start()
        server.wait_ready(args.timeout)
        names = [spec.name, *[a.name for a in spec.loras]]
        print(f"ready: {server.base_url}/v1  models: {', '.join(names)}  (Ctrl-C stops)", flush=True)
        code = server.proc.wait() if server.proc else 1
        raise UserError(f"vLLM server exited (code {code}): {server.error_summary()} (log: {server.log_path})")
    except KeyboardInterrupt:
        print("stopping vLLM ...", file=sys.stderr)
        server.stop()
        server.discard_log()
        return 0
    finally:
        server.stop()
        restore_signals(previous)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from llmfast.bench.online import bench_serve

    results = bench_serve(args)
    return 1 if any(r["status"] == "failed" for r in results) else 0


def cmd_bench_offline(args: argparse.Namespace) -> int:
    from llmfast.bench.offline import bench_offline

    result = bench_offline(args)
    return 1 if result["status"] == "failed" else 0


def cmd_bench_run(args: argparse.Namespace) -> int:
    from llmfast.recipe import BenchRecipe, load_recipe
    from llmfast.bench.runner import run_bench

    recipe = load_recipe(args.recipe, BenchRecipe, args.overrides)
    report = run_bench(recipe, overwrite=args.overwrite)
    print(f"report: {report}")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from llmfast.data.tasks import TASKS, plan_task_files, write_planned

    if not args.task:
        for t in TASKS.values():
            print(f"{t.name:<10} {t.description}")
        return 0
    names = list(TASKS) if args.task == ["all"] else list(dict.fromkeys(args.task))  # each once, in the order given
    # Every file is generated and checked before the first is written: one refusal writes nothing.
    plan = plan_task_files(names, args.out, args.train, args.test, args.seed, args.overwrite)
    write_planned(plan)
    for name, (train, test) in zip(names, zip(plan[::2], plan[1::2])):
        same = "" if train[2] or test[2] else " (unchanged)"
        print(f"{name}: {train[0]} ({args.train} rows), {test[0]} ({args.test} rows){same}")
    return 0


def cmd_sparsify(args: argparse.Namespace) -> int:
    from llmfast.sparse.run import load_sparsify_recipe, run_sparsify

    recipe, method = load_sparsify_recipe(args.recipe, args.overrides)
    metrics = run_sparsify(recipe, method, resume=args.resume, overwrite=args.overwrite)
    held = metrics["heldout_sparsity"]
    sites = "  ".join(f"{site}: {v['mean']:.1%}" for site, v in held.items())
    print(f"sparsified model: {recipe.output}  method: {method.name}  held-out sparsity ({held['down_in']['tokens']} "
          f"tokens) {sites}  wall: {metrics['wall_seconds']}s  peak memory: {metrics['peak_memory_gib']:.2f} GiB")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from llmfast.quant.run import run_quantize
    from llmfast.recipe import QuantizeRecipe, load_recipe

    recipe = load_recipe(args.recipe, QuantizeRecipe, args.overrides)
    out, metrics = run_quantize(recipe, resume=args.resume, overwrite=args.overwrite)
    size = metrics.get("weights_file_bytes")
    print(f"quantized model: {out}  method: {recipe.quantization.method}"
          + (f"  weights file: {size / 2**20:.1f} MiB" if size else "")
          + f"  wall: {metrics['wall_seconds']}s  peak RSS: {metrics['peak_rss_gib']:.2f} GiB")
    return 0


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


def _add_artifact_verb(sub: Any, name: str, help: str, description: str, example: str, resume_help: str,
                       func: Callable[[argparse.Namespace], int]) -> None:
    """A verb that writes one artifact from a recipe, resumable when its method trains (quantize, sparsify)."""
    p = sub.add_parser(name, help=help, description=description)
    p.add_argument("recipe", help=f"{name} recipe YAML, e.g. {example}")
    p.add_argument("--resume", action="store_true", help=resume_help)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (and stale checkpoints)")
    _add_set(p, {"quantize": "quantization.group_size=128"}.get(name, "sparsify.config.target=0.5"))
    p.set_defaults(func=func)


def _add_sparsify(sub: Any) -> None:
    _add_artifact_verb(
        sub, "sparsify", "make a model's MLP activations sparse (TEAL, CATS, ReLU-fication, Deja Vu)",
        "Write a model whose MLP activations are mostly zero: training-free thresholds (teal, cats) calibrated to a "
        "target sparsity, ReLU-fication with recovery by distillation (relufy), or Deja Vu predictors of the active "
        "neurons (dejavu). Writes OUTPUT atomically; "
        "`load_model` and `llmfast eval` apply it. See docs/sparsify.md.",
        "recipes/sparsify_teal_smollm2.yaml", "continue an interrupted relufy run from its last checkpoint",
        cmd_sparsify)


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


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse a command line; for `serve`, what follows `--` goes to vLLM untouched (argparse alone refuses it)."""
    argv = list(argv)
    cut = argv.index("--") if "serve" in argv and "--" in argv else len(argv)
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own = argv[: argv.index("--")] if "serve" in argv and "--" in argv else argv  # after serve's --: vLLM's
    debug = "--debug" in own or bool(os.environ.get("LLMFAST_DEBUG"))
    previous = stop_on_signals()
    try:
        args = parse_args(argv)
        if not getattr(args, "func", None):
            build_parser().print_help()
            return 2
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except KeyboardInterrupt as e:
        if not quiet_worker(e, False):  # a launch's workers stop together: process 0 says it
            print_error(interrupted_line(e))
        return interrupted_code(e)
    except Exception as e:  # a UserError, or a full disk met outside the atomic writes (a log line appended)
        err = as_user_error(e)
        if not debug and quiet_worker(e, err is not None):
            return 1 if err is None else 2
        if debug or err is None:
            raise
        print_error(err)
        return 2
    finally:
        restore_signals(previous)
        end_process_group()


if __name__ == "__main__":
    exit_process(main())
