"""Calibration and training text that never overlaps what `llmfast eval` scores.

`llmfast eval` measures perplexity on the first `max_tokens` tokens of its text (16,384 by default). A method
that calibrates (quantizers, sparsity thresholds) or trains on text (distillation) takes its tokens from
after `skip_tokens` of the same text, so the evaluation never sees tokens the model was fitted to.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmfast.data.text import read_text
from llmfast.errors import UserError

if TYPE_CHECKING:
    import torch

EVAL_TOKENS = 16384  # the default perplexity span of `llmfast eval` (recipe.PerplexityConfig.max_tokens)


def text_token_ids(tokenizer: Any, text: str) -> list[int]:
    """A text's token ids as eval scores and methods calibrate on them: after the BOS where the tokenizer's own call
    adds one (Llama's, Gemma's: their models are trained with it, and transformers' perplexity recipe and lm-eval's
    rolling windows start with it), and no EOS (a tokenizer set to add one would end the book with it)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    bos, first = tokenizer.bos_token_id, tokenizer("a").input_ids[:1]
    adds = bos is not None and first == [bos] != tokenizer("a", add_special_tokens=False).input_ids[:1]
    return [bos, *ids] if adds else ids


def text_ids(tokenizer: Any, path: str | Path) -> "torch.Tensor":
    """The whole text as 1-D token ids (`text_token_ids`); a missing or undecodable file is one line."""
    import torch

    path = Path(path)
    # read and encoded as eval reads its perplexity text, so that the tokens skipped for it are the ones it scores
    text = read_text(path, "calibration text")
    if not text.strip():
        raise UserError(f"calibration text {path} is empty: give a text with content")
    return torch.tensor(text_token_ids(tokenizer, text), dtype=torch.long)


def windows(ids: "torch.Tensor", window: int, what: str) -> "torch.Tensor":
    """`ids` cut into full rows of `window` tokens (a short tail is dropped)."""
    n = ids.numel() // window
    if n == 0:
        raise UserError(f"{what}: {ids.numel()} tokens make no full window of {window} tokens: "
                        "give more tokens or a smaller window")
    return ids[: n * window].reshape(n, window)


def after_eval_span(ids: "torch.Tensor", skip: int, tokens: int, source: str, what: str) -> "torch.Tensor":
    """`tokens` ids starting after the first `skip` (the evaluated span); too short a text is one line."""
    if ids.numel() < skip + tokens:
        raise UserError(f"{source} has {ids.numel()} tokens with this tokenizer; {what} needs {skip + tokens} "
                        f"({skip} skipped for the evaluation + {tokens}): lower them or give a longer text")
    return ids[skip: skip + tokens]


def split_text(ids: "torch.Tensor", skip: int, calibration: int, heldout: int, window: int,
               source: str) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """(the text after the evaluated span, calibration windows from its start, held-out windows).

    Everything a method calibrates or trains on comes from after `skip` tokens; the held-out windows, on which
    a method's effect is measured, are the first `heldout` tokens, inside the span `llmfast eval` scores.
    """
    train = ids[skip:]
    calib = after_eval_span(ids, skip, calibration, source, "data.skip_tokens + data.calibration_tokens")
    return train, windows(calib, window, "data.calibration_tokens"), windows(ids[:heldout], window,
                                                                            "data.heldout_tokens")


def used_data(stage: str, metrics: dict[str, Any]) -> bool:
    """Whether the method that made an artifact fitted it to its `data:` windows, from its manifest metrics: every
    sparsify method does; a quantizer when it trained (QAT) or tuned its rounding (w4 `iters`), not when it rounds
    to nearest) or trained its scales (w4 `scale_steps`)."""
    return stage == "sparsify" or bool(metrics.get("train_tokens") or metrics.get("scale_train_tokens") or (
        metrics.get("calibration_windows") and metrics.get("iters")))


def conversation_windows(tokenizer: Any, paths: list[Path], window: int, seed: int = 0) -> "torch.Tensor":
    """Every conversation of the chat JSONL files (finetune's format), rendered through the model's chat template
    exactly as `finetune` encodes it, in a seeded order, concatenated and cut into windows of `window` tokens. A row
    `finetune` splits into one example per assistant turn (Qwen3's template) is taken once, as its last example
    renders the whole conversation: every example would repeat its earlier turns, quadratic in the turns.

    A fine-tuned model's skill lives in how it continues its prompts: calibrating or distilling it on book text
    alone keeps the language model and loses the skill (BENCHMARKS.md, the relufy and W4 rows of the merge).
    """
    import random

    import torch

    from llmfast.data.chat import read_examples

    examples = []
    for path in paths:
        try:
            found = read_examples(path, tokenizer, max_length=1 << 30).examples  # nothing is truncated
        except UserError as e:
            message = str(e)
            raise UserError(message if message.startswith(str(path)) else f"data.conversations ({path}): {message}"
                            ) from None
        # a row split by turn (data.chat._chat_plans) once: its last example, the whole conversation as rendered
        examples.extend(e for e, after in zip(found, [*found[1:], None]) if not (after is not None and after.part))
    random.Random(seed).shuffle(examples)
    ids = torch.tensor([t for ex in examples for t in ex.input_ids], dtype=torch.long)
    return windows(ids, window, "data.conversations (" + ", ".join(map(str, paths)) + ")")


def interleave(text_rows: "torch.Tensor", conversations: "torch.Tensor", count: int) -> "torch.Tensor":
    """`text_rows` (in their order) with `count` conversation windows (repeated in order when there are fewer)
    spread evenly among them, so that any prefix (AutoRound's nsamples, a run's first steps) holds both kinds in
    about the share of the whole."""
    import torch

    take = conversations[torch.arange(count) % len(conversations)]
    n = len(text_rows)
    position = torch.cat([(torch.arange(n) + 0.5) / n, (torch.arange(count) + 0.5) / count])
    return torch.cat([text_rows, take])[torch.argsort(position, stable=True)]


def _check_fits(count: int, n: int, window: int, share: float) -> None:
    """Refuse a share so near 1 that the training rows' token ids alone outgrow this machine's memory
    (0.9999999999999999 asked for 10^19 windows: an OverflowError traceback; one slightly lower, terabytes)."""
    import os

    need = (count + n) * window * 8  # int64 token ids
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > total:
        raise UserError(f"data.conversations_share: {share} asks for {count} conversation windows beside the {n} "
                        f"text windows ({need / 2**30:.3g} GiB of token ids, more than this machine's "
                        f"{total / 2**30:.3g} GiB of memory): lower data.conversations_share")


def with_conversations(text_rows: "torch.Tensor", data: Any, conversations: "torch.Tensor | None", *, add: bool
                       ) -> tuple["torch.Tensor", dict[str, Any] | None]:
    """The windows a method calibrates or trains on, with `conversations` (`conversation_windows` of
    `data.conversations`; None: none given) making `data.conversations_share` of them: in place of text windows
    (`add=False`: a calibration set keeps its size, `data.calibration_tokens`), or on top of all of them
    (`add=True`: training rows, where the text is all the text after the evaluated span). Returns the rows and
    what went in (for the artifact's manifest); without conversations the text rows and None."""
    if conversations is None:
        return text_rows, None
    share, n = data.conversations_share, len(text_rows)
    if add:
        count = max(1, round(share * n / (1 - share)))
        _check_fits(count, n, text_rows.shape[1], share)
    else:
        if n < 2:
            raise UserError(f"data.conversations: data.calibration_tokens make {n} window of data.window tokens; "
                            "mixing in conversations needs at least 2: raise data.calibration_tokens")
        count = min(max(1, round(share * n)), n - 1)
    rows = interleave(text_rows if add else text_rows[: n - count], conversations, count)
    info = {"paths": [str(p) for p in data.conversations], "share": share, "windows": count,
            "share_used": round(count / len(rows), 4), "available_windows": len(conversations),
            "epochs": round(count / len(conversations), 3)}
    return rows, info
