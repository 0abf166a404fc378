"""What each verb of the `llmfast` command does with its parsed arguments (cli.py builds the parsers and runs them).

Heavy imports (torch, transformers) happen inside each verb, so `--help` and bad arguments answer at once.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from llmfast.errors import UserError
from llmfast.process_exit import raise_interrupt, restore_signals


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
    cache = cache_dir()  # a bad $LLMFAST_CACHE is its one line before the table's header, not after it
    print(f"{'name':<24} {'installed':<10} {'prepared':<9} description")
    for m in BUILTINS.values():
        try:
            builtin_gguf_path(m)
            installed = "yes"
        except UserError:
            installed = "no"
        prepared = "yes" if (cache / "models" / "builtin" / m.name / "llmfast.json").is_file() else "no"
        print(f"{'builtin:' + m.name:<24} {installed:<10} {prepared:<9} {m.description}")
        print(f"{'':<45} source: {m.source}; license {m.license}")
    print(f"\ncache: {cache} (set LLMFAST_CACHE to move it)")
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
          f"  peak memory: {metrics['peak_memory_gib']:.2f} GiB ({metrics['memory_kind']})"
          + (f", {reserved:.2f} GiB reserved" if (reserved := metrics.get("peak_memory_reserved_gib")) else ""))
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
        # vLLM's API server exits 0 also when its engine died under it (a worker killed): it stopped, not finished
        raise UserError(f"vLLM server stopped while serving (exit code {code}): {server.error_summary()} "
                        f"(log: {server.log_path})")
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
