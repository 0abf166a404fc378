"""`llmfast bench run RECIPE`: every variant measured the same way, one report.

Variants that vLLM can load are served (a server per distinct model; the LoRA variants of a model share
one more server, with LoRA enabled, and are served by name) and loaded at every concurrency of the sweep
through the online benchmark. Variants it cannot load here (bitsandbytes 4-bit) run on the transformers
engine, labelled `hf`. The transformers engine is also the baseline: it runs the first (or every) vLLM
variant on the same prompts, so each report states vLLM's throughput against plain `generate`. Each
transformers run is a child process, so its peak RSS is its own. Quality comes from `llmfast eval` on each
variant. Everything lands atomically in the output directory.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmfast.errors import UserError

if TYPE_CHECKING:
    from llmfast.recipe import BenchRecipe, VariantConfig


def _engine(v: "VariantConfig") -> str:
    if v.quantization and v.engine == "vllm":
        raise UserError(f"variant '{v.name}': bitsandbytes 4-bit cannot run on vLLM's CPU backend: "
                        "use engine: hf or auto")
    if v.engine != "auto":
        return v.engine
    return "hf" if v.quantization else "vllm"


def _check(recipe: "BenchRecipe") -> list[dict[str, Any]]:
    """Resolve every model and adapter before anything starts; a bad variant is a one-line error."""
    from llmfast.models import resolve_model
    from llmfast.serve.server import check_lora

    names = [v.name for v in recipe.variants]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"variants: names must differ ({', '.join(dup)} repeated)")
    plan = []
    for v in recipe.variants:
        try:
            model_dir = resolve_model(v.model)
        except UserError as e:
            raise UserError(f"variant '{v.name}': {e}") from None
        adapter = check_lora(v.name, v.lora, base=model_dir) if v.lora else None
        plan.append({"cfg": v, "name": v.name, "model_dir": model_dir, "adapter": adapter,
                     "lora": adapter.path if adapter else None, "engine": _engine(v)})
    return plan


def _point_args(recipe: "BenchRecipe") -> argparse.Namespace:
    w = recipe.workload
    return argparse.Namespace(metric_percentiles=",".join(str(p) for p in w.percentiles),
                              percentile_metrics="ttft,tpot,itl,e2el", goodput=None, burstiness=1.0,
                              ignore_eos=w.ignore_eos, api_key=None, seed=w.seed, request_timeout=600.0,
                              endpoint="/v1/completions", label="llmfast-bench", save_detailed=False,
                              tokenizer_id=None, temperature=0.0)  # greedy, like the transformers baseline


def _rate(recipe: "BenchRecipe") -> float:
    r = recipe.workload.request_rate
    return math.inf if r == "inf" else float(r)


def _run_vllm_group(recipe: "BenchRecipe", group: list[dict[str, Any]], requests: list[Any], out: Path) -> None:
    """One server for a model and its LoRA variants; every variant through every concurrency."""
    from llmfast.serve.memory import PeakRss
    from llmfast.serve.online import run_point
    from llmfast.serve.server import ServerSpec, VllmServer

    model_dir = group[0]["model_dir"]
    adapters = [item["adapter"] for item in group if item["adapter"]]  # checked once, in _check
    spec = ServerSpec(model=model_dir, served_name="model", loras=adapters, port=0)
    server = VllmServer(spec, log_path=out / f"server-{group[0]['name']}.log")
    print(f"bench: starting vLLM for {model_dir} ({', '.join(i['name'] for i in group)})", file=sys.stderr)
    server.start()
    try:
        server.wait_ready(recipe.server_timeout)
    except UserError as e:
        for item in group:
            item.update(points=[], status="failed", notes=[f"{item['name']}: server failed to start: {e}"])
        return
    try:
        args = _point_args(recipe)
        with PeakRss(server.proc.pid) as mem:  # type: ignore[union-attr]
            for item in group:
                served = item["name"] if item["lora"] else "model"
                item["points"] = []
                for conc in recipe.workload.max_concurrency:
                    pt = run_point(server.base_url, served, requests, _rate(recipe), conc, args,
                                   desc=f"{item['name']} c={conc}")
                    item["points"].append(pt)
                    print(f"bench: {item['name']} (vllm) c={conc}: {pt['output_throughput']:.1f} out tok/s, "
                          f"{pt['failed']} failed", file=sys.stderr)
                    if pt["status"] == "failed":
                        item.setdefault("notes", []).append(f"{item['name']} c={conc}: {pt['failure_cause']}")
                        if not server.alive:
                            break
        for item in group:
            item["peak_rss_gib"] = round(mem.peak_gib, 3)
            item["status"] = "failed" if any(p["status"] == "failed" for p in item["points"]) else "ok"
            if len(group) > 1:
                item.setdefault("notes", []).append(
                    f"{item['name']}: peak RSS is the server's, shared by {', '.join(i['name'] for i in group)}")
    finally:
        server.stop()


def _run_hf(recipe: "BenchRecipe", item: dict[str, Any], out: Path, label: str) -> dict[str, Any]:
    """The transformers engine in a child process, once per concurrency (the batch size unless one is fixed)."""
    w = recipe.workload
    points, peak = [], 0.0
    done: dict[int, dict[str, Any]] = {}  # batch size -> point: a fixed batch size runs once
    for conc in w.max_concurrency:
        batch = w.hf_batch_size or conc
        if batch in done:
            points.append({**done[batch], "max_concurrency": conc})
            continue
        with tempfile.TemporaryDirectory() as tmp:
            res_path = Path(tmp) / "result.json"
            cmd = [sys.executable, "-m", "llmfast.cli", "bench", "offline", str(item["model_dir"]), "--engine", "hf",
                   "--num-prompts", str(w.num_prompts), "--random-input-len", str(w.input_len),
                   "--random-output-len", str(w.output_len), "--seed", str(w.seed),
                   "--batch-size", str(batch),
                   "--metric-percentiles", ",".join(str(p) for p in w.percentiles), "--output", str(res_path)]
            if w.ignore_eos:
                cmd.append("--ignore-eos")
            if item["lora"]:
                cmd += ["--lora", str(item["lora"])]
            if item["cfg"].quantization:
                cmd += ["--quantization", item["cfg"].quantization]
            print(f"bench: {label} (hf) batch {batch} ...", file=sys.stderr)
            with open(out / f"hf-{label}-c{conc}.log", "w") as log:
                code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
            if code != 0 or not res_path.is_file():
                tail = (out / f"hf-{label}-c{conc}.log").read_text(errors="replace").strip().splitlines()[-1:]
                pt = {"max_concurrency": conc, "batch_size": batch, "status": "failed",
                      "failed": w.num_prompts,
                      "failure_cause": f"transformers engine exited with code {code}: {' '.join(tail)}",
                      "request_throughput": 0.0, "output_throughput": 0.0, "total_token_throughput": 0.0}
            else:
                pt = json.loads(res_path.read_text())
                pt["max_concurrency"] = conc
                peak = max(peak, pt.get("peak_rss_gib") or 0.0)
        points.append(pt)
        done[batch] = pt
    return {"points": points, "peak_rss_gib": round(peak, 3),
            "status": "failed" if any(p["status"] == "failed" for p in points) else "ok",
            "notes": [f"{label} c={p['max_concurrency']}: {p['failure_cause']}" for p in points
                      if p["status"] == "failed"]}


def _quality(recipe: "BenchRecipe", item: dict[str, Any], out: Path) -> dict[str, Any] | None:
    from llmfast.evaluate import run_eval
    from llmfast.recipe import EvalRecipe

    if recipe.quality is None:
        return None
    cfg = item["cfg"]
    er = EvalRecipe(model=str(item["model_dir"]), adapter=item["lora"], quantization=cfg.quantization,
                    eval=recipe.quality, output=out / f"quality-{item['name']}.json")
    print(f"bench: quality of {item['name']} ...", file=sys.stderr)
    res = run_eval(er)
    return {"perplexity": res["perplexity"], "tasks": res["tasks"]}


def run_bench(recipe: "BenchRecipe") -> Path:
    """Measure every variant; write report.md, throughput.png, latency.png and results.json; return report.md."""
    from llmfast.artifacts import atomic_dir, atomic_write_json, write_manifest
    from llmfast.models import load_tokenizer
    from llmfast.recipe import recipe_dict
    from llmfast.report import markdown, plots
    from llmfast.serve.machine import detect
    from llmfast.serve.loadgen import random_requests

    plan = _check(recipe)
    w = recipe.workload
    machine = detect()
    with atomic_dir(recipe.output, overwrite=True) as tmp:
        tokenizer = load_tokenizer(plan[0]["model_dir"])
        requests = random_requests(tokenizer, w.num_prompts, w.input_len, w.output_len, 0.0, w.seed)
        # A model alone gets a server of its own; its LoRA variants share another, with LoRA enabled. (vLLM's
        # LoRA layers slow every request on a LoRA-enabled server, the base model's too: 54 against 81 out
        # tok/s for the built-in model on this CPU, so measuring the base there would understate it.)
        groups: dict[tuple[str, bool], list[dict[str, Any]]] = {}
        for item in plan:
            if item["engine"] == "vllm":
                groups.setdefault((str(item["model_dir"]), item["lora"] is not None), []).append(item)
        for group in groups.values():
            _run_vllm_group(recipe, group, requests, tmp)
        for item in plan:
            if item["engine"] == "hf":
                item.update(_run_hf(recipe, item, tmp, item["name"]))
        variants: list[dict[str, Any]] = []
        comparisons = []
        vllm_items = [i for i in plan if i["engine"] == "vllm" and i.get("points")]
        baseline_for = vllm_items[:1] if recipe.baseline == "first" else vllm_items if recipe.baseline == "all" else []
        for item in plan:
            item["quality"] = _quality(recipe, item, tmp)
            variants.append(item)
            if item in baseline_for:
                base = {"cfg": item["cfg"], "name": f"{item['name']}", "model_dir": item["model_dir"],
                        "lora": item["lora"], "engine": "hf"}
                base.update(_run_hf(recipe, base, tmp, f"{item['name']}-baseline"))
                base["name"] = f"{item['name']} (transformers baseline)"
                base["quality"] = None
                variants.append(base)
                for pv, ph in zip(item["points"], base["points"]):
                    if ph.get("output_throughput"):
                        comparisons.append({"variant": item["name"], "max_concurrency": pv["max_concurrency"],
                                            "vllm_output_throughput": pv["output_throughput"],
                                            "hf_output_throughput": ph["output_throughput"],
                                            "hf_batch_size": ph["batch_size"],
                                            "ratio": pv["output_throughput"] / ph["output_throughput"]})
        results = {
            "name": Path(recipe.output).name,
            "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {len(machine.cores)} cores, "
                       f"{'CUDA' if machine.cuda else 'CPU only'}{', fast bf16' if machine.fast_bf16 else ''}",
            "workload": w.model_dump(mode="json"),
            "recipe": recipe_dict(recipe),
            "variants": [{k: (str(v) if isinstance(v, Path) else v) for k, v in item.items()
                          if k not in ("cfg", "adapter")} for item in variants],
            "comparisons": comparisons,
        }
        atomic_write_json(tmp / "results.json", results)
        (tmp / "report.md").write_text(markdown(results), encoding="utf-8")
        plots(results, tmp)
        write_manifest(tmp, stage="bench", parents=[str(i["model_dir"]) for i in plan], recipe=recipe_dict(recipe),
                       metrics={"comparisons": comparisons})
    return Path(recipe.output) / "report.md"
