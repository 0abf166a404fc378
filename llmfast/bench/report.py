"""The bench report: one Markdown table per run and PNG plots, next to the results JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _f(v: Any, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def _conc(pt: dict[str, Any]) -> str:
    b = pt.get("batch_size")
    return f"{pt['max_concurrency']} (batch {b})" if b and b != pt["max_concurrency"] else str(pt["max_concurrency"])


def markdown(results: dict[str, Any]) -> str:
    """Speed, memory and quality of every variant at every load level, then vLLM against transformers."""
    w = results["workload"]
    hf_batch = f"batch size {w['hf_batch_size']}" if w.get("hf_batch_size") else "with the concurrency as batch size"
    lines = [
        f"# Bench report: {results['name']}",
        "",
        f"{results['date']} on {results['machine']}. Workload: {w['num_prompts']} prompts of {w['input_len']} random "
        f"tokens, {w['output_len']} output tokens{' (ignore_eos)' if w['ignore_eos'] else ''}, request rate "
        f"{w['request_rate']}; concurrency {', '.join(map(str, w['max_concurrency']))}. vLLM variants are measured "
        "through its OpenAI server with streaming requests; `hf` rows are transformers `generate` (static batches) "
        f"in a process of its own, {hf_batch}.",
        "",
    ]
    quality_keys: list[str] = []
    for v in results["variants"]:
        for k in (v.get("quality") or {}).get("tasks", {}):
            if k not in quality_keys:
                quality_keys.append(k)
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
                v["name"] if first else "", v["engine"] if first else "", _conc(pt),
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
    lines += ["", "![throughput](throughput.png)", "", "![latency](latency.png)", ""]
    return "\n".join(lines)


def plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """throughput.png (output tokens/s against concurrency) and latency.png (E2EL percentiles per variant)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in results["variants"]:
        xs = [p["max_concurrency"] for p in v["points"]]
        ax.plot(xs, [p["output_throughput"] for p in v["points"]], marker="o", label=f"{v['name']} ({v['engine']})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("max concurrency (transformers: batch size)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Throughput against concurrency")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "throughput.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    pcts = results["workload"]["percentiles"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = [f"{v['name']}\n({v['engine']}, c={v['points'][-1]['max_concurrency']})" for v in results["variants"]]
    width = 0.8 / max(1, len(pcts))
    for j, p in enumerate(pcts):
        word = str(int(p)) if int(p) == p else str(p)
        ys = [v["points"][-1].get(f"p{word}_e2el_ms", 0) / 1000 for v in results["variants"]]
        ax.bar([i + j * width for i in range(len(names))], ys, width, label=f"p{word}")
    ax.set_xticks([i + width * (len(pcts) - 1) / 2 for i in range(len(names))], names, fontsize=8)
    ax.set_ylabel("end-to-end latency (s)")
    ax.set_title("Latency percentiles at the highest concurrency")
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "latency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
