"""`llmfast bench run RECIPE`: every variant measured the same way, one report.

Each variant runs on the engine the recipe names, or with `engine: auto` on the first engine its
quantization method allows here (llmfast.quant decides: vLLM for plain weights, transformers for
bitsandbytes 4-bit). vLLM variants are served (engines/vllm_server.py: a server per model, one more for its
LoRA variants) and loaded at every concurrency of the sweep by the load generator; transformers variants
run static batches. The transformers engine is also the baseline: it runs the first (or every) vLLM variant
on the same prompts, so each report states vLLM's throughput against plain `generate`. Quality comes from
`llmfast eval` on each variant. Everything lands atomically in the output directory.
"""

from __future__ import annotations

import math
import platform
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmfast.errors import UserError

if TYPE_CHECKING:
    from llmfast.bench.engines import Engine, Variant
    from llmfast.bench.workload import Request
    from llmfast.recipe import BenchRecipe, VariantConfig, WorkloadConfig


@dataclass
class Measured:
    """A variant on its engine: one result per concurrency of the sweep, memory, quality, what went wrong."""

    variant: "Variant"
    engine: str  # the registered engine's name, as the report shows it: vllm, hf, hf-sparse, ...
    label: str
    parallel: tuple[int, int] = (1, 1)  # vLLM's tensor and pipeline parallel sizes: one server's workers
    points: list[dict[str, Any]] = field(default_factory=list)
    peak_rss_gib: float = 0.0
    notes: list[str] = field(default_factory=list)
    quality: dict[str, Any] | None = None

    @property
    def status(self) -> str:
        return "failed" if not self.points or any(p["status"] == "failed" for p in self.points) else "ok"

    def to_json(self) -> dict[str, Any]:
        from llmfast.bench.engines.base import quantization_ran
        from llmfast.bench.lineage import compression, lineage, model_size, training_logs

        v = self.variant
        chain = lineage(v.model_dir)
        return {"name": self.label, "model_dir": str(v.model_dir), "lora": str(v.lora.path) if v.lora else None,
                "quantization": quantization_ran(v, self.engine), "sparsity": v.sparsity, "engine": self.engine,
                "tensor_parallel_size": self.parallel[0], "pipeline_parallel_size": self.parallel[1],
                "points": self.points, "peak_rss_gib": self.peak_rss_gib, "status": self.status, "notes": self.notes,
                "quality": self.quality, "size": model_size(v.model_dir), "lineage": chain,
                "training_logs": training_logs(chain), "compression": compression(Path(v.model_dir))}


def choose_engine(v: "Variant", wanted: str) -> "Engine":
    """The engine the recipe names (if it can run the variant), or the first one allowed that can."""
    from llmfast.bench.engines import ENGINES

    if wanted != "auto":
        engine = ENGINES.get(wanted, f"variant '{v.name}': engine")
        reason = engine.can_run(v)
        if reason:
            raise UserError(f"variant '{v.name}': {reason}: use engine: hf or auto")
        return engine
    for family in v.families:
        if family in ENGINES and ENGINES.get(family).can_run(v) is None:
            return ENGINES.get(family)
    raise UserError(f"variant '{v.name}': no bench engine can run it here")


def plan(recipe: "BenchRecipe") -> list[tuple["Variant", "Engine", "VariantConfig"]]:
    """Resolve every model and adapter and choose engines before anything starts; a bad variant is one line."""
    from llmfast.bench.engines import resolve_variant

    names = [v.name for v in recipe.variants]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"variants: names must differ ({', '.join(dup)} repeated)")
    from llmfast.loading import check_positions
    from llmfast.serve.machine import detect

    w, machine = recipe.workload, detect()
    cores = None if machine.cuda else len(machine.cores)  # what parallel sizes a vLLM server may take here
    out = []
    for cfg in recipe.variants:
        try:
            v = resolve_variant(cfg.name, cfg.model, str(cfg.lora) if cfg.lora else None, cfg.quantization)
            check_positions(v.model_dir, w.input_len + w.output_len, "workload.input_len + workload.output_len")
            if recipe.quality is not None and recipe.quality.perplexity is not None:
                check_positions(v.model_dir, recipe.quality.perplexity.context, "quality.perplexity.context")
        except UserError as e:
            raise UserError(f"variant '{cfg.name}': {e}") from None
        engine = choose_engine(v, cfg.engine)
        _check_parallel(cfg, v, engine, cores)
        out.append((v, engine, cfg))
    return out


def _check_parallel(cfg: "VariantConfig", v: "Variant", engine: "Engine", cores: int | None) -> None:
    """Parallel sizes split a vLLM server over workers; a transformers engine runs on one device, and vLLM takes
    only sizes the model and this machine (`cores`: None on CUDA) allow (serve/parallel.py)."""
    from llmfast.serve.parallel import check_parallel
    from llmfast.serve.vllm_flags import uncompiled

    keys = ("tensor_parallel_size", "pipeline_parallel_size")
    given = [k for k in keys if getattr(cfg, k) > 1]
    if given and engine.family != "vllm":
        raise UserError(f"variant '{cfg.name}': {' and '.join(given)} split a vLLM server, but this variant runs on "
                        f"{engine.name} (one device): remove {' and '.join(given)}, or measure it on vLLM")
    try:
        check_parallel(v.model_dir, cfg.tensor_parallel_size, cfg.pipeline_parallel_size, cores, keys,
                       eager="lora" if v.lora else uncompiled([]))  # LoRA, or compiling off in the environment
    except UserError as e:
        raise UserError(f"variant '{cfg.name}': {e}") from None


def _rate(w: "WorkloadConfig") -> float:
    return math.inf if w.request_rate == "inf" else float(w.request_rate)


def _measure_vllm(recipe: "BenchRecipe", group: list[Measured], requests: list["Request"], out: Path) -> None:
    """One server for a model (or its LoRA variants); every variant through every concurrency."""
    from llmfast.bench.engines import ENGINES
    from llmfast.bench.online import run_point
    from llmfast.memory import PeakRss

    w = recipe.workload
    names = ", ".join(m.label for m in group)
    print(f"bench: starting vLLM for {group[0].variant.model_dir} ({names})", file=sys.stderr)
    served = ENGINES.get("vllm").server([m.variant for m in group], out / f"server-{group[0].label}.log",  # type: ignore[attr-defined]
                                        timeout=recipe.server_timeout, parallel=group[0].parallel)
    try:
        served.start()
    except UserError as e:
        for m in group:
            m.notes.append(f"{m.label}: server failed to start: {e}")
        return
    try:
        with PeakRss(served.pid) as mem:
            for m in group:
                for conc in w.max_concurrency:
                    pt = run_point(served.base_url, served.served_name(m.variant), requests, request_rate=_rate(w),
                                   max_concurrency=conc, ignore_eos=w.ignore_eos, seed=w.seed,
                                   extra_body={"temperature": 0.0},  # greedy, like the transformers baseline
                                   percentiles=list(w.percentiles), metrics=["ttft", "tpot", "itl", "e2el"],
                                   label="llmfast-bench", desc=f"{m.label} c={conc}",
                                   num_warmups=w.warmup_batches * conc)
                    m.points.append(pt)
                    print(f"bench: {m.label} (vllm) c={conc}: {pt['output_throughput']:.1f} out tok/s, "
                          f"{pt['failed']} failed", file=sys.stderr)
                    if pt["status"] == "failed":
                        m.notes.append(f"{m.label} c={conc}: {pt['failure_cause']}")
                        if not served.server.alive:
                            break
        for m in group:
            m.peak_rss_gib = round(mem.peak_gib, 3)
            if len(group) > 1:
                m.notes.append(f"{m.label}: peak RSS is the server's, shared by {names}")
    finally:
        served.stop()


def hf_point(variant: "Variant", requests: list["Request"], batch_size: int, ignore_eos: bool, dtype: str,
             percentiles: list[float], log: Path, engine: str = "hf") -> dict[str, Any]:
    """One run of a transformers engine (hf, hf-sparse), summarised; meant to run in a process of its own (see
    `_measure_hf`)."""
    from llmfast.bench.engines import ENGINES
    from llmfast.bench.logs import engine_output
    from llmfast.bench.metrics import compute_metrics
    from llmfast.memory import PeakRss

    with engine_output(log), PeakRss() as mem:
        results, duration = ENGINES.get(engine).generate(variant, requests, dtype=dtype,  # type: ignore[attr-defined]
                                                         batch_size=batch_size, ignore_eos=ignore_eos)
    summary = compute_metrics(results, duration, percentiles, ["ttft", "tpot", "itl", "e2el"])
    return {**summary, "batch_size": batch_size, "peak_rss_gib": round(mem.peak_gib, 3),
            "status": "ok" if summary["failed"] == 0 else "failed"}


def _measure_hf(recipe: "BenchRecipe", m: Measured, requests: list["Request"], out: Path) -> None:
    """The transformers engine once per concurrency (the batch size, unless the workload fixes one).

    Each run is a fresh process (spawned, calling `hf_point`), so the peak RSS it reports is its own and not
    that of the models loaded before it in this process."""
    import concurrent.futures as cf
    import multiprocessing

    from llmfast.serve.machine import default_dtype

    w = recipe.workload
    # the prompts' text, which the engine encodes with the variant's own tokenizer as vLLM's server does: the ids were
    # made by the first variant's tokenizer and mean other text to another model, or none (an IndexError)
    requests = [replace(r, prompt_ids=None) for r in requests]
    done: dict[int, dict[str, Any]] = {}  # batch size -> point: a fixed batch size runs once
    for conc in w.max_concurrency:
        batch = w.hf_batch_size or conc
        if batch not in done:
            log = out / f"hf-{m.label}-c{conc}.log"
            print(f"bench: {m.label} ({m.engine}) batch {batch} ...", file=sys.stderr)
            try:
                with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                    done[batch] = pool.submit(hf_point, m.variant, requests, batch, w.ignore_eos, default_dtype(),
                                              list(w.percentiles), log, m.engine).result()
            except Exception as e:  # noqa: BLE001 - a failed engine run is a failed point with its cause
                done[batch] = {"batch_size": batch, "status": "failed", "failed": w.num_prompts, "completed": 0,
                               "failure_cause": f"transformers engine failed: {type(e).__name__}: {e} (log: {log})",
                               "request_throughput": 0.0, "output_throughput": 0.0, "total_token_throughput": 0.0}
                m.notes.append(f"{m.label} c={conc}: {done[batch]['failure_cause']}")
        m.points.append({**done[batch], "max_concurrency": conc})
    m.peak_rss_gib = round(max(p.get("peak_rss_gib") or 0.0 for p in m.points), 3)


def _quality(recipe: "BenchRecipe", m: Measured, cfg: "VariantConfig", out: Path) -> dict[str, Any] | None:
    from llmfast.evaluate import run_eval
    from llmfast.recipe import EvalRecipe

    if recipe.quality is None:
        return None
    er = EvalRecipe(model=str(m.variant.model_dir), adapter=m.variant.lora.path if m.variant.lora else None,
                    quantization=cfg.quantization, eval=recipe.quality, output=out / f"quality-{m.label}.json")
    print(f"bench: quality of {m.label} ...", file=sys.stderr)
    res = run_eval(er)
    return {"perplexity": res["perplexity"], "tasks": res["tasks"]}


def _comparisons(v: Measured, base: Measured) -> list[dict[str, Any]]:
    return [{"variant": v.label, "max_concurrency": pv["max_concurrency"],
             "vllm_output_throughput": pv["output_throughput"], "hf_output_throughput": ph["output_throughput"],
             "hf_batch_size": ph["batch_size"], "ratio": pv["output_throughput"] / ph["output_throughput"]}
            for pv, ph in zip(v.points, base.points) if ph.get("output_throughput")]


def _rows(recipe: "BenchRecipe", measured: list[Measured], cfgs: list["VariantConfig"], baseline_for: list[Measured],
          requests: list["Request"], out: Path) -> tuple[list[Measured], list[dict[str, Any]]]:
    """The report's rows (each variant, then its transformers baseline if it has one) and the comparisons.

    Variants of the same weights (one model at two parallel sizes, or on two engines) have the same quality and the
    same transformers baseline: each is measured once, by the first variant that needs it."""
    from llmfast.bench.report import BASELINE_SUFFIX

    rows: list[Measured] = []
    comparisons: list[dict[str, Any]] = []
    done: dict[tuple[str, ...], tuple[Measured, Measured | None]] = {}  # weights -> first variant, baseline run
    for m, cfg in zip(measured, cfgs):
        lora = str(m.variant.lora.path) if m.variant.lora else ""
        same = (str(m.variant.model_dir), lora, repr(cfg.quantization))
        first, first_base = done.get(same, (None, None))
        m.quality = first.quality if first is not None else _quality(recipe, m, cfg, out)
        if first is not None and m.quality is not None:
            m.notes.append(f"{m.label}: quality measured once for the same weights, as {first.label}")
        rows.append(m)
        base = first_base
        if m in baseline_for:
            if base is None:
                base = Measured(m.variant, "hf", f"{m.label}-baseline")
                _measure_hf(recipe, base, requests, out)
            else:
                base = replace(base, points=[dict(p) for p in base.points],
                               notes=[f"the same transformers run as {base.label}'s (the same weights)"])
            base.label = f"{m.label}{BASELINE_SUFFIX}"
            rows.append(base)
            comparisons += _comparisons(m, base)
        # the first baseline run of these weights, also when an earlier variant of them had none (a failed server, a
        # transformers variant): a later one reuses it
        done[same] = (first if first is not None else m, first_base if first_base is not None else base)
    return rows, comparisons


def _libraries(measured: list[Measured]) -> list[str]:
    """The libraries the variants ran on, in this process or in others (servers, spawned transformers runs)."""
    used = ["torch", "transformers"]  # transformers: every quality run and baseline, and the hf engines
    if any(m.engine == "vllm" for m in measured):
        used.append("vllm")
    if any(m.variant.lora for m in measured):
        used.append("peft")
    return used


def run_bench(recipe: "BenchRecipe", overwrite: bool = False) -> Path:
    """Measure every variant; write report.md, the plots and results.json into the recipe's output (an existing one
    only with `overwrite`, never a variant's model or adapter, checked before anything runs); return report.md."""
    from llmfast.artifacts import atomic_dir, atomic_write_json, check_output, write_manifest
    from llmfast.bench.engines import ENGINES
    from llmfast.bench.report import markdown, plots
    from llmfast.bench.workload import random_requests
    from llmfast.models import load_tokenizer
    from llmfast.provenance import provenance, utc_now
    from llmfast.recipe import recipe_dict
    from llmfast.serve.machine import detect

    planned = plan(recipe)
    inputs = [p for v, _, _ in planned for p in (v.model_dir, v.lora.path if v.lora else None)]
    check_output(recipe.output, overwrite, inputs)  # before minutes of measuring, not after
    w = recipe.workload
    machine = detect()
    with atomic_dir(recipe.output, overwrite=overwrite, inputs=inputs, guard=True) as tmp:
        requests = random_requests(load_tokenizer(planned[0][0].model_dir), w.num_prompts, w.input_len, w.output_len,
                                   0.0, w.seed)
        measured = [Measured(v, engine.name, v.name, (cfg.tensor_parallel_size, cfg.pipeline_parallel_size))
                    for v, engine, cfg in planned]
        for m in measured:  # the report says plainly which variants vLLM could not serve, and why
            reason = ENGINES.get("vllm").can_run(m.variant) if m.engine != "vllm" else None
            if reason:
                how = getattr(ENGINES.get(m.engine), "label", "transformers")  # hf-sparse: with llmfast's sparse MLP
                m.notes.append(f"{m.label}: not served by vLLM here ({reason}); measured with {how}")
        groups: dict[tuple[str, bool, tuple[int, int]], list[Measured]] = {}
        for m in measured:  # one server per model, its LoRA variants and its parallel sizes
            if m.engine == "vllm":
                groups.setdefault((str(m.variant.model_dir), m.variant.lora is not None, m.parallel), []).append(m)
        for group in groups.values():
            _measure_vllm(recipe, group, requests, tmp)
        for m in measured:
            if m.engine != "vllm":  # hf, hf-sparse: transformers in a process of its own
                _measure_hf(recipe, m, requests, tmp)
        vllm_done = [m for m in measured if m.engine == "vllm" and m.points]
        baseline_for = {"first": vllm_done[:1], "all": vllm_done}.get(recipe.baseline, [])
        rows, comparisons = _rows(recipe, measured, [cfg for _, _, cfg in planned], baseline_for, requests, tmp)
        results = {
            "name": Path(recipe.output).name,
            "date": utc_now(),
            "machine": f"{platform.machine()}, {len(machine.cores)} cores, "
                       f"{'CUDA' if machine.cuda else 'CPU only'}{', fast bf16' if machine.fast_bf16 else ''}",
            "workload": w.model_dump(mode="json"),
            "recipe": recipe_dict(recipe),
            "variants": [m.to_json() for m in rows],
            "comparisons": comparisons,
            # vLLM ran in its servers, transformers in processes of their own: their versions are read, not imported
            "provenance": provenance(used=_libraries(measured)),
        }
        atomic_write_json(tmp / "results.json", results)
        images = [p.name for p in plots(results, tmp)]
        (tmp / "report.md").write_text(markdown(results, images), encoding="utf-8")
        write_manifest(tmp, stage="bench", parents=[str(v.model_dir) for v, _, _ in planned],
                       recipe=recipe_dict(recipe), metrics={"comparisons": comparisons})
    return Path(recipe.output) / "report.md"
