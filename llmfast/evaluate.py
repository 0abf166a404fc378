"""Evaluation: perplexity on held-out text and exact-match accuracy on task test sets.

Perplexity uses overlapping windows (each token scored once, with up to `context - stride` tokens of
left context carried over), the usual way for texts longer than the context. Task accuracy decodes
greedily through the model's own chat template, in left-padded batches, and scores each answer with
the task's exact check (llmfast.data.tasks).
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from llmfast.artifacts import check_writable_parent
from llmfast.calibration import text_token_ids
from llmfast.data.chat import check_ids_fit, prompt_and_answer, render_chat
from llmfast.data.jsonl import read_jsonl
from llmfast.data.shapes import ShapeCheck
from llmfast.data.tasks import TASKS, check
from llmfast.data.text import read_text
from llmfast.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from llmfast.recipe import EvalRecipe


def perplexity(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    text: str,
    context: int = 1024,
    stride: int = 512,
    max_tokens: int | None = None,
    ids: list[int] | None = None,
) -> dict[str, Any]:
    """Perplexity of `text` in windows of `context` tokens, `stride` apart, each token scored once; `ids`: the
    text's `text_token_ids` where the caller has them already (a book takes seconds to tokenize)."""
    import torch
    import torch.nn.functional as F

    if stride > context:
        raise UserError(f"perplexity: stride ({stride}) must not exceed context ({context})")
    ids = torch.tensor(text_token_ids(tokenizer, text) if ids is None else ids, dtype=torch.long)  # BOS where added
    if max_tokens:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise UserError("perplexity: the text has fewer than 2 tokens")
    total_nll, scored, prev_end = 0.0, 0, 0
    starts = list(range(0, len(ids) - 1, stride))
    with torch.inference_mode():
        for begin in tqdm(starts, desc="perplexity", unit="window", leave=False):
            end = min(begin + context, len(ids))
            window = ids[begin:end].unsqueeze(0).to(model.device)
            logits = model(window).logits[0, :-1].float()
            targets = window[0, 1:].to(logits.device)
            nll = F.cross_entropy(logits, targets, reduction="none")
            # Score only tokens after the previous window's end, so each is counted once.
            new = end - max(prev_end, begin + 1)
            total_nll += nll[-new:].sum().item()
            scored += new
            prev_end = end
            if end == len(ids):
                break
    mean = total_nll / scored
    # NaN (or a perplexity past float64, exp(709)) is no result and not JSON: the model computes inf/NaN
    if not mean < math.log(sys.float_info.max):
        raise UserError(f"perplexity: the model's mean loss is {mean} nats per token (its logits are inf or NaN): its "
                        "weights or adapter overflow in this dtype; evaluate it in float32 (eval.dtype) or check the "
                        "model and adapter for inf/NaN; nothing was written")
    return {"tokens": scored, "nll": mean, "ppl": math.exp(mean), "context": context, "stride": stride}


def generate_answers(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    prompts: list[list[dict[str, str]]],
    max_new_tokens: int = 48,
    batch_size: int = 16,
    desc: str = "generate",
) -> list[str]:
    """Greedy completions of chat prompts, in the order given."""
    import torch

    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    # where vLLM stops a request: generation_config's ids and the tokenizer's EOS (a Llama 3 fixed by its eos_token)
    stops = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops = sorted({*(stops if isinstance(stops, list) else [stops]), tokenizer.eos_token_id} - {None})
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
    outputs: list[str] = [""] * len(texts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        bar = tqdm(total=len(texts), desc=desc, unit="ex", leave=False)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                out = model.generate(
                    **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=stops or None,
                )
            new = out[:, batch.input_ids.shape[1] :]
            for i, seq in zip(idx, new):
                outputs[i] = tokenizer.decode(seq, skip_special_tokens=True).strip()
            bar.update(len(idx))
        bar.close()
    finally:
        tokenizer.padding_side = side
    return outputs


def task_accuracy(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    name: str,
    path: str | Path,
    limit: int | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 16,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rows = read_jsonl(path)[:limit] if limit else read_jsonl(path)
    pairs = [prompt_and_answer(r, path) for r in rows]
    t0 = time.perf_counter()
    preds = generate_answers(model, tokenizer, [p for p, _ in pairs], max_new_tokens, batch_size, desc=name)
    records = []
    for row, (prompt, answer), pred in zip(rows, pairs, preds):
        task = row.get("task", name)
        records.append({"task": name, "row": row["_row"], "prompt": prompt[-1]["content"], "answer": answer,
                        "prediction": pred, "correct": check(task, pred, answer)})
    correct = sum(r["correct"] for r in records)
    summary = {"path": str(path), "n": len(records), "correct": correct, "accuracy": correct / len(records),
               "seconds": round(time.perf_counter() - t0, 2)}
    return summary, records


def run_eval(recipe: "EvalRecipe") -> dict[str, Any]:
    """Evaluate the recipe's model; write results JSON and predictions JSONL; return the results."""
    import json

    from llmfast.models import adapter_dir, check_adapter_dir, resolve_model

    cfg = recipe.eval
    if cfg.perplexity is None and not cfg.tasks:
        raise UserError("eval: nothing to do: give eval.perplexity and/or eval.tasks")
    # Everything a user can get wrong is found here, before torch is imported and the model loads.
    out = Path(recipe.output)
    pred_path = check_results_paths(out)
    text = read_text(cfg.perplexity.text, "perplexity text") if cfg.perplexity is not None else ""
    if cfg.perplexity is not None and cfg.perplexity.stride > cfg.perplexity.context:
        raise UserError(f"eval.perplexity.stride ({cfg.perplexity.stride}) must not exceed eval.perplexity.context "
                        f"({cfg.perplexity.context}): lower the stride")
    for ts in cfg.tasks:
        shapes = ShapeCheck()  # one row shape per file, as finetune's data
        for r in read_jsonl(ts.path)[: ts.limit]:
            shapes(r, f"{ts.path}:{r['_row']}")
            prompt_and_answer(r, ts.path)
            _check_row_task(r, ts.name, ts.path)
    if recipe.adapter is not None:
        check_adapter_dir(adapter_dir(recipe.adapter))
    t0 = time.perf_counter()
    path = resolve_model(recipe.model)
    if cfg.perplexity is not None:
        from llmfast.loading import check_positions

        check_positions(path, cfg.perplexity.context, "eval.perplexity.context")

    from llmfast import __version__
    from llmfast.artifacts import atomic_write_json, atomic_write_text
    from llmfast.models import effective_quantization, load_model
    from llmfast.provenance import provenance
    from llmfast.recipe import recipe_dict

    tokenizer = _eval_tokenizer(path, adapter_dir(recipe.adapter) if recipe.adapter is not None else None)
    text_ids = _check_tokens(cfg, tokenizer, path, text)
    model = load_model(path, dtype=cfg.dtype, adapter=recipe.adapter, quantization=recipe.quantization)
    quantization = effective_quantization(path, recipe.adapter, recipe.quantization)
    load_s = time.perf_counter() - t0
    results: dict[str, Any] = {
        "model": recipe.model,
        "model_path": str(path),
        "adapter": str(recipe.adapter) if recipe.adapter else None,
        "quantization": quantization.manifest() if quantization is not None else None,  # as it ran
        "dtype": cfg.dtype,
        "llmfast_version": __version__,  # is_eval_results knows the file by it, also one from before provenance
        "provenance": provenance(),  # version and commit, libraries, CPU and threads (it ran on the CPU)
        "recipe": recipe_dict(recipe),
        "perplexity": None,
        "tasks": {},
        "load_seconds": round(load_s, 2),
    }
    if cfg.perplexity is not None:
        p = cfg.perplexity
        t1 = time.perf_counter()
        results["perplexity"] = {"text": str(p.text),
                                 **perplexity(model, tokenizer, text, p.context, p.stride, p.max_tokens, text_ids),
                                 "seconds": round(time.perf_counter() - t1, 2)}
    predictions: list[dict[str, Any]] = []
    for ts in cfg.tasks:
        summary, records = task_accuracy(model, tokenizer, ts.name, ts.path, ts.limit, cfg.max_new_tokens,
                                         cfg.batch_size)
        results["tasks"][ts.name] = summary
        predictions.extend(records)
    results["seconds"] = round(time.perf_counter() - t0, 2)
    results["predictions"] = str(pred_path)
    atomic_write_text(pred_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in predictions))
    atomic_write_json(out, results)
    return results


def _eval_tokenizer(path: Path, adapter: Path | None) -> "PreTrainedTokenizerBase":
    """The tokenizer a model (and its adapter folder, if any) is prompted with. An adapter's own tokenizer is the
    template and tokens it was trained with (export merges with it too). One saved with its chat template but no
    vocabulary (tokenizer_config.json alone, or chat_template.jinja) gets the base's tokens and its own template:
    the one it was trained with, as `serve --lora` judges it too (serve/lora.py refuses it where the base's differs,
    since vLLM renders every adapter's chats with the served model's)."""
    from llmfast.modelfiles import chat_template_text, has_tokenizer
    from llmfast.models import check_chat_template_file, load_tokenizer

    if adapter is not None and has_tokenizer(adapter):
        return load_tokenizer(adapter)
    tokenizer = load_tokenizer(path)
    if adapter is not None:
        check_chat_template_file(adapter)  # a byte-order mark, as load_tokenizer refuses one
        if isinstance(own := chat_template_text(adapter), str):
            tokenizer.chat_template = own
    return tokenizer


def _check_row_task(row: dict[str, Any], name: str, path: Path) -> None:
    """A row's `task` picks its checker. In a set named after a built-in task, a row naming another task (or a typo
    of one) would be scored by another check (exact match for JSON answers) and counted in this set's accuracy:
    most likely the wrong file was given. A set of another name may mix built-in tasks' rows on purpose."""
    task = row.get("task", name)
    if name in TASKS and task != name:
        kind = f"task {task}'s check" if task in TASKS else "exact match"
        raise UserError(f"{path}:{row.get('_row', '?')}: the row's task is {task!r} in eval.tasks' set {name!r}: it "
                        f"would be scored by {kind}, not {name}'s: give the set's own file, fix the row's task, "
                        "or give the set another name to mix tasks")


def _check_tokens(cfg: Any, tokenizer: Any, path: Path, text: str) -> list[int] | None:
    """What the tokenizer can tell before the model loads: a chat template for the tasks (one that refuses no row),
    no token the model has no embedding row for, and enough tokens of text to score; returns the text's ids."""
    from llmfast.modelfiles import describe_model_dir

    if cfg.tasks and not getattr(tokenizer, "chat_template", None):  # the tasks' prompts are chats
        raise UserError(f"{path}: its tokenizer has no chat template, which eval.tasks needs (each task row is a "
                        "chat): use an instruct model, give it a template (docs/finetune.md, 'A base model'), or "
                        "leave out eval.tasks")
    from llmfast.loading import positions

    vocab, limit = describe_model_dir(path)["vocab"], positions(path)
    for ts in cfg.tasks:
        for r in read_jsonl(ts.path)[: ts.limit]:
            where = f"{ts.path}:{r.get('_row', '?')}"
            prompt = render_chat(tokenizer, prompt_and_answer(r, ts.path)[0], True, where)
            ids = tokenizer(prompt, add_special_tokens=False).input_ids
            check_ids_fit(ids, vocab, where)
            # a learned position table fails mid-generation past its end (IndexError); a rotary model generates on
            # (and usually stops at its end-of-turn token long before max_new_tokens), so only its prompt must fit
            longest = len(ids) + (0 if limit is None or limit.rotary else cfg.max_new_tokens)
            if limit is not None and longest > limit.limit:
                said = "" if limit.rotary else f" and eval.max_new_tokens ({cfg.max_new_tokens})"
                raise UserError(f"{where}: its prompt of {len(ids)} tokens{said} go beyond the {limit.limit} positions "
                                f"of {path}: shorten the row{'' if limit.rotary else ' or lower eval.max_new_tokens'}")
    if cfg.perplexity is not None:
        p = cfg.perplexity
        ids = text_token_ids(tokenizer, text)
        check_ids_fit(ids[: p.max_tokens] if p.max_tokens else ids, vocab, str(p.text))
        if min(len(ids), p.max_tokens or len(ids)) < 2:
            raise UserError(f"eval.perplexity: {p.text} has {len(ids)} token(s)" + (
                f" and max_tokens is {p.max_tokens}" if p.max_tokens and p.max_tokens < len(ids) else "")
                + ": at least 2 are needed to score")
        return ids
    return None


def is_eval_results(path: Path) -> bool:
    """Whether `path` is a results JSON that `llmfast eval` wrote (only those are ever replaced)."""
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and {"llmfast_version", "model", "tasks", "predictions"} <= data.keys()


def check_results_paths(out: Path) -> Path:
    """Refuse a results path that would replace a file llmfast eval did not write; return the predictions path.

    Re-running an eval replaces its own earlier results JSON and the predictions JSONL beside it; any other
    existing file (the user's data, a recipe, another tool's JSON) is refused, as is a directory.
    """
    pred = out.with_name(out.stem + ".predictions.jsonl")
    for p in (out, pred):
        if p.is_dir():
            raise UserError(f"output {p} is a directory: give a file path for the results, e.g. {p}/results.json")
        if p.is_symlink():  # the results replace the link itself, not what it points to
            raise UserError(f"output {p} is a symbolic link (to {os.readlink(p)}): give the path of the file "
                            "itself, or another path")
    check_writable_parent(out)
    if out.exists() and not (out.is_file() and is_eval_results(out)):
        raise UserError(f"output {out} exists and is not a results file written by llmfast eval: it is left as it "
                        "is; choose another --output")
    if pred.exists() and not _is_predictions(pred):
        raise UserError(f"{pred} exists and is not the predictions of an earlier llmfast eval: it is left as it "
                        "is; choose another --output")
    return pred


_RECORD_KEYS = {"task", "row", "prompt", "answer", "prediction", "correct"}


def _is_predictions(path: Path) -> bool:
    """Whether `path` is a predictions JSONL that `llmfast eval` wrote (its first row is one of our records).

    Recognised by content, not through the results JSON: a run killed between writing the two files leaves
    predictions without results, and re-running the same command must still work.
    """
    import json

    try:
        with path.open(encoding="utf-8") as f:
            first = f.readline()
        row = json.loads(first) if first.strip() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(row, dict) and (not first.strip() or set(row) == _RECORD_KEYS)


def format_table(results: dict[str, Any]) -> str:
    rows = [("metric", "value", "n", "seconds")]
    p = results.get("perplexity")
    if p:
        rows.append(("perplexity", f"{p['ppl']:.3f}", str(p["tokens"]), f"{p['seconds']:.1f}"))
    for name, t in results["tasks"].items():
        rows.append((f"{name} accuracy", f"{t['accuracy']:.1%}", str(t["n"]), f"{t['seconds']:.1f}"))
    rows.append(("total (incl. load)", "", "", f"{results['seconds']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return f"model: {results['model']} ({results['dtype']})\n" + "\n".join(lines)
