"""The bench report: one Markdown table per run and PNG plots, next to the results JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmfast.provenance import describe


def _f(v: Any, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def _conc(pt: dict[str, Any]) -> str:
    b = pt.get("batch_size")
    return f"{pt['max_concurrency']} (batch {b})" if b and b != pt["max_concurrency"] else str(pt["max_concurrency"])


# The runner's label for its transformers-baseline rows: a variant's own name cannot hold a space or a parenthesis
# (the bench recipe's pattern), so a variant the user names "baseline" stays a variant.
BASELINE_SUFFIX = " (transformers baseline)"


def is_baseline(v: dict[str, Any]) -> bool:
    return v["name"].endswith(BASELINE_SUFFIX)


def markdown(results: dict[str, Any], images: list[str] | None = None) -> str:
    """Speed, memory and quality of every variant at every load level, then vLLM against transformers; linking the
    plots named in `images` (what `plots` wrote; default: every plot the results call for)."""
    w = results["workload"]
    hf_batch = f"batch size {w['hf_batch_size']}" if w.get("hf_batch_size") else "with the concurrency as batch size"
    lines = [
        f"# Bench report: {results['name']}",
        "",
        # what made these numbers, once, so two reports (months, machines apart) are told apart at a glance
        *([f"Measured with {describe(results['provenance'])}.", ""] if results.get("provenance") else []),
        f"{results['date']} on {results['machine']}. Workload: {w['num_prompts']} prompts of {w['input_len']} random "
        f"tokens, {w['output_len']} output tokens{' (ignore_eos)' if w['ignore_eos'] else ''}, request rate "
        f"{w['request_rate']}; concurrency {', '.join(map(str, w['max_concurrency']))}. vLLM variants are measured "
        "through its OpenAI server with streaming requests; `hf` rows are transformers `generate` (static batches) "
        f"in a process of its own, {hf_batch}."
        + (" `hf-sparse` rows are the same loop with llmfast's sparse MLP: batch-1 decode computes only the nonzero "
           "rows/columns, larger batches run the same zeros dense." if any(v["engine"] == "hf-sparse"
                                                                           for v in results["variants"]) else ""),
        "",
    ]
    quality_keys = _task_names(results)
    lines += _summary(results, quality_keys)
    lines += _compression(results)
    lines += ["## Every load level", ""]
    head = ["variant", "engine", "conc.", "req/s", "out tok/s", "total tok/s", "TTFT p50 ms", "TPOT p50 ms",
            "E2EL p99 ms", "failed", "peak RSS GiB", "ppl", *[f"{k} acc" for k in quality_keys]]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in results["variants"]:
        q = v.get("quality") or {}
        ppl = (q.get("perplexity") or {}).get("ppl")
        accs = [(q.get("tasks") or {}).get(k, {}).get("accuracy") for k in quality_keys]
        for i, pt in enumerate(v["points"]):
            first = i == 0
            lines.append("| " + " | ".join([
                v["name"] if first else "", engine_label(v) if first else "", _conc(pt),
                _f(pt["request_throughput"], ".2f"), _f(pt["output_throughput"]), _f(pt["total_token_throughput"]),
                _f(pt.get("median_ttft_ms")), _f(pt.get("median_tpot_ms")), _f(pt.get("p99_e2el_ms")),
                str(pt["failed"]), _f(v.get("peak_rss_gib"), ".2f") if first else "",
                _f(ppl, ".3f") if first else "", *[(_f(a * 100, ".0f") + "%" if a is not None else "-") if first else ""
                                                    for a in accs]]) + " |")
    if results.get("comparisons"):
        lines += ["", "## vLLM against transformers on the same prompts", "",
                  "| variant | vLLM concurrency | vLLM out tok/s | transformers batch | transformers out tok/s | ratio |",
                  "|---|---|---|---|---|---|"]
        for c in results["comparisons"]:
            lines.append(f"| {c['variant']} | {c['max_concurrency']} | {c['vllm_output_throughput']:.1f} | "
                         f"{c.get('hf_batch_size', c['max_concurrency'])} | "
                         f"{c['hf_output_throughput']:.1f} | **{c['ratio']:.2f}x** |")
    notes = [n for v in results["variants"] for n in v.get("notes", [])]
    if notes:
        lines += ["", "Notes:", *[f"- {n}" for n in notes]]
    captions = {"frontier.png": "quality against speed and size", "accuracy.png": "accuracy per task",
                "throughput.png": "throughput", "latency.png": "latency", "loss.png": "fine-tuning loss"}
    wanted = images if images is not None else plot_names(results)
    lines.append("")
    for name, caption in captions.items():
        if name in wanted:
            lines += [f"![{caption}]({name})", ""]
    return "\n".join(lines)


def plot_names(results: dict[str, Any]) -> list[str]:
    """The plots `plots` writes for these results: frontier.png only with perplexities, accuracy.png only with task
    accuracies, loss.png only with the training logs of a variant's adapters."""
    names = ["throughput.png", "latency.png"]
    if _frontier_rows(results):
        names.append("frontier.png")
    if _task_names(results) and _accuracy_rows(results):
        names.append("accuracy.png")
    if any(v.get("training_logs") for v in results["variants"]):
        names.append("loss.png")
    return names


def _task_names(results: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for v in results["variants"]:
        for k in (v.get("quality") or {}).get("tasks", {}):
            if k not in names:
                names.append(k)
    return names


def _point(v: dict[str, Any], concurrency: int) -> dict[str, Any]:
    """The variant's point at this concurrency; {} when it has none (its server stopped before it): the variant's own
    lowest or highest point stood under the column of another concurrency."""
    return next((p for p in v.get("points") or [] if p["max_concurrency"] == concurrency), {})


def _levels(rows: list[dict[str, Any]]) -> tuple[int, int]:
    """The lowest and highest concurrency measured among these rows (1, 1 when none was)."""
    levels = [p["max_concurrency"] for v in rows for p in v.get("points") or []]
    return (min(levels), max(levels)) if levels else (1, 1)


def _made_by(v: dict[str, Any]) -> str:
    chain = v.get("lineage") or []
    if not chain:
        return "-"
    first = chain[0]
    # A finetune's adapter is named after its run folder: "lora-dates/adapter", not "adapter".
    names = [f"{Path(p).parent.name}/adapter" if Path(p).name == "adapter" else Path(p).name for p in first["parents"]]
    parents = ", ".join(names[:3]) or "-"
    return f"{first['stage']} of {parents}"


def _mib(n: Any) -> str:
    return "-" if not n else f"{n / 2**20:.1f}"


def _summary(results: dict[str, Any], tasks: list[str]) -> list[str]:
    """One row per variant: quality, speed at the lowest and highest concurrency, size, where it came from."""
    rows = [v for v in results["variants"] if not is_baseline(v)]
    if not rows:
        return []
    low, high = _levels(rows)
    levels = {"low": low, "high": high} if high != low else {"low": low}  # one speed column for a one-level sweep
    head = ["variant", "engine", "made by", "ppl", *[f"{t} acc" for t in tasks],
            *[f"out tok/s c={c}" for c in levels.values()], f"TTFT p50 ms c={low}",
            f"TPOT p50 ms c={low}", "linear weights MiB", "files MiB", "peak RSS GiB"]
    out = ["## Variants", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in rows:
        q = v.get("quality") or {}
        a = _point(v, low)
        size = v.get("size") or {}
        accs = [(q.get("tasks") or {}).get(t, {}).get("accuracy") for t in tasks]
        out.append("| " + " | ".join([
            v["name"], engine_label(v), _made_by(v), _f((q.get("perplexity") or {}).get("ppl"), ".2f"),
            *[_f(x * 100, ".0f") + "%" if x is not None else "-" for x in accs],
            *[_f(_point(v, c).get("output_throughput")) for c in levels.values()], _f(a.get("median_ttft_ms")),
            _f(a.get("median_tpot_ms")), _mib(size.get("linear_weight_bytes")), _mib(size.get("file_bytes")),
            _f(v.get("peak_rss_gib"), ".2f")]) + " |")
    return out + ["", "Linear weights: the bytes of the decoder layers' linear maps as stored (quantized parts "
                  "included); a variant quantized while loading (e.g. `nf4`) shows its full-precision files.", ""]


def engine_label(v: dict[str, Any]) -> str:
    """The engine as the report shows it: `vllm tp2 pp2` for a server split over workers."""
    sizes = [f"{k}{v.get(key, 1)}" for k, key in (("tp", "tensor_parallel_size"), ("pp", "pipeline_parallel_size"))
             if v.get(key, 1) > 1]
    return " ".join([v["engine"], *sizes])


def _pct(x: Any) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def _compression(results: dict[str, Any]) -> list[str]:
    """What made each compressed variant: held-out MLP sparsity, predictor quality, cost; training curves."""
    rows = [v for v in results["variants"] if v.get("compression") and not is_baseline(v)]
    if not rows:
        return []
    head = ["variant", "made by", "MLP sparsity (held-out)", "predictor recall", "precision", "predicted active",
            "training tokens", "wall s", "peak memory GiB", "data"]
    out = ["## How each compressed variant was made", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in rows:
        c, p = v["compression"], v["compression"].get("predictors") or {}
        out.append("| " + " | ".join([
            v["name"], f"{c['stage']} {c.get('method') or ''}".strip(), _pct(c.get("mlp_sparsity")),
            _pct(p.get("recall")), _pct(p.get("precision")), _pct(p.get("predicted_active")),
            "-" if c.get("train_tokens") is None else f"{c['train_tokens']:,}", _f(c.get("wall_seconds")),
            _f(c.get("peak_memory_gib"), ".2f"),
            "-" if not c.get("data") else (f"text + {c['conversations_share']:.0%} chats" if c.get(
                "conversations_share") else "text")]) + " |")
    out += ["", "MLP sparsity: exact zeros entering the down projections on the held-out text (never calibrated or "
            "trained on), mean over layers; predictor numbers (Deja Vu) likewise, with the predictors applied. Data: "
            "what it calibrated or trained on (chats: `data.conversations`, that share of the windows).", ""]
    for v in rows:
        curve = v["compression"].get("curve") or []
        if not curve:
            continue
        out += [f"### Training curve of {v['name']} (held-out)", "",
                "| step | tokens | MLP sparsity | KL to source | perplexity | source perplexity |", "|---|---|---|---|---|---|"]
        out += [f"| {e['step']} | {e['tokens']:,} | {_pct(e.get('heldout_sparsity'))} | {_f(e.get('heldout_kl'), '.4f')} "
                f"| {_f(e.get('heldout_ppl'), '.2f')} | {_f(e.get('teacher_heldout_ppl'), '.2f')} |" for e in curve]
        out += ["", "Perplexity inside each held-out window (no context across windows): for comparing points of the "
                "curve, not with the ppl column above.", ""]
    return out


def plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """throughput.png (output tokens/s against concurrency) and latency.png (E2EL percentiles per variant)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in results["variants"]:
        xs = [p["max_concurrency"] for p in v["points"]]
        ax.plot(xs, [p["output_throughput"] for p in v["points"]], marker="o", label=f"{v['name']} ({engine_label(v)})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("max concurrency (transformers: batch size)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Throughput against concurrency")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir / "throughput.png", plt))

    pcts = results["workload"]["percentiles"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    measured = [v for v in results["variants"] if v["points"]]  # a server that never started has none: see its notes
    names = [f"{v['name']}\n({engine_label(v)}, c={v['points'][-1]['max_concurrency']})" for v in measured]
    width = 0.8 / max(1, len(pcts))
    for j, p in enumerate(pcts):
        word = str(int(p)) if int(p) == p else str(p)
        ys = [v["points"][-1].get(f"p{word}_e2el_ms", 0) / 1000 for v in measured]
        ax.bar([i + j * width for i in range(len(names))], ys, width, label=f"p{word}")
    ax.set_xticks([i + width * (len(pcts) - 1) / 2 for i in range(len(names))], names, fontsize=8)
    ax.set_ylabel("end-to-end latency (s)")
    ax.set_title("Latency percentiles at the highest concurrency")
    ax.legend()
    paths.append(_save(fig, out_dir / "latency.png", plt))
    paths += _frontier_plot(results, out_dir, plt) + _accuracy_plot(results, out_dir, plt) + _loss_plot(results,
                                                                                                         out_dir, plt)
    return paths


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both axes (x larger is better, y smaller is better), by x."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] <= p[1] and q != p for q in points)]
    return sorted(front)


def _frontier_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for v in results["variants"] if not is_baseline(v) and (v.get("quality") or {}).get("perplexity")]


def _accuracy_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for v in results["variants"] if not is_baseline(v) and v.get("quality")]


def _frontier_plot(results: dict[str, Any], out_dir: Path, plt: Any) -> list[Path]:
    rows = _frontier_rows(results)
    if not rows:
        return []
    low = _levels([v for v in results["variants"] if not is_baseline(v)])[0]  # the summary table's
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, xkey, xlabel in ((axes[0], "speed", f"output tokens/s at concurrency {low} (higher is better)"),
                             (axes[1], "size", "linear weights, MiB (lower is better)")):
        pts = []
        for v in rows:
            ppl = v["quality"]["perplexity"]["ppl"]
            x = (_point(v, low).get("output_throughput") if xkey == "speed"
                 else (v.get("size") or {}).get("linear_weight_bytes", 0) / 2**20)
            if not x:
                continue
            pts.append((x if xkey == "speed" else -x, ppl))
            ax.scatter([x], [ppl])
            ax.annotate(f"{v['name']} ({engine_label(v)})", (x, ppl), fontsize=8, xytext=(4, 4), textcoords="offset points")
        front = _pareto(pts)
        if len(front) > 1:
            ax.plot([abs(x) for x, _ in front], [y for _, y in front], "k--", alpha=0.5, label="Pareto front")
            ax.legend(fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity (lower is better)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    fig.suptitle("Quality against speed and size")
    return [_save(fig, out_dir / "frontier.png", plt)]


def _accuracy_plot(results: dict[str, Any], out_dir: Path, plt: Any) -> list[Path]:
    tasks = _task_names(results)
    rows = _accuracy_rows(results)
    if not tasks or not rows:
        return []
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows) * len(tasks) / 2), 4.5))
    width = 0.8 / len(rows)
    for j, v in enumerate(rows):
        accs = [100 * ((v["quality"].get("tasks") or {}).get(t, {}).get("accuracy") or 0) for t in tasks]
        ax.bar([i + j * width for i in range(len(tasks))], accs, width, label=v["name"])
    ax.set_xticks([i + width * (len(rows) - 1) / 2 for i in range(len(tasks))], tasks)
    ax.set_ylabel("exact-match accuracy, %")
    ax.set_ylim(0, 100)
    ax.set_title("Task accuracy per variant")
    ax.legend(fontsize=8)
    return [_save(fig, out_dir / "accuracy.png", plt)]


def _loss_plot(results: dict[str, Any], out_dir: Path, plt: Any) -> list[Path]:
    logs: dict[str, list[dict[str, Any]]] = {}
    for v in results["variants"]:
        logs.update(v.get("training_logs") or {})
    if not logs:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in sorted(logs.items()):
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker=".", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("Fine-tuning loss of the adapters behind the variants")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return [_save(fig, out_dir / "loss.png", plt)]
