"""Prompt sets for the benchmarks, in vLLM's dataset vocabulary: random, custom (JSONL), sharegpt.

Random prompts are random non-special tokens whose text re-encodes to exactly the sampled number of
tokens, so the server counts what we meant to send; `prefix_len` shared tokens start every prompt (vLLM's
--random-prefix-len, for prefix caching). Files are read locally only: nothing here reaches the hub.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmfast.errors import UserError

DATASETS = ("random", "custom", "sharegpt")
MAX_PROMPTS = 1_000_000


@dataclass
class Request:
    prompt: str
    prompt_len: int
    output_len: int
    prompt_ids: list[int] | None = None  # for offline engines that take token ids


def _sizes(rng: np.random.Generator, n: int, mean: int, ratio: float, low: int) -> list[int]:
    lo, hi = max(low, math.floor(mean * (1 - ratio))), max(low, math.ceil(mean * (1 + ratio)))
    return [int(x) for x in rng.integers(lo, hi + 1, size=n)]


def _exact_text(tokenizer: Any, allowed: np.ndarray, rng: np.random.Generator, n: int) -> tuple[str, list[int]]:
    """A text of random tokens that encodes back to exactly n tokens (when 20 tries allow)."""
    ids = allowed[rng.integers(0, len(allowed), size=n)].tolist()
    text = tokenizer.decode(ids)
    for _ in range(20):
        ids2 = tokenizer.encode(text, add_special_tokens=False)
        if len(ids2) == n:
            break
        # Decoding and re-encoding can merge neighbours; converge on a text that encodes to n tokens.
        ids = (ids2 + allowed[rng.integers(0, len(allowed), size=n)].tolist())[:n]
        text = tokenizer.decode(ids)
    return text, tokenizer.encode(text, add_special_tokens=False)


def random_requests(tokenizer: Any, num: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                    seed: int = 0, prefix_len: int = 0) -> list[Request]:
    """`num` prompts of about `input_len` random tokens (after `prefix_len` shared ones) and output lengths."""
    if input_len < 1 or output_len < 1 or num < 1:
        raise UserError(f"--input-len/--random-input-len ({input_len}), --output-len/--random-output-len ({output_len}) "
                        f"and --num-prompts ({num}) must be at least 1")
    if num > MAX_PROMPTS:  # all made in memory first: 2**63 was numpy's traceback, 10**9 an endless build
        raise UserError(f"--num-prompts {num}: at most {MAX_PROMPTS:,} random prompts")
    if prefix_len < 0:
        raise UserError(f"--random-prefix-len {prefix_len}: must be 0 or more")
    if not 0 <= range_ratio < 1:
        raise UserError(f"--random-range-ratio {range_ratio}: must be in [0, 1)")
    rng = np.random.default_rng(seed)
    allowed = _stable_tokens(tokenizer)
    # as vLLM's random prompts: the tokenizer's special tokens (a BOS, for a Llama) count towards input_len, and go
    # before the text as vLLM's server puts them before a text prompt
    special = len(tokenizer.encode("a")) - len(tokenizer.encode("a", add_special_tokens=False))
    prefix = _exact_text(tokenizer, allowed, rng, prefix_len)[0] if prefix_len else ""
    ins, outs = _sizes(rng, num, input_len, range_ratio, 1), _sizes(rng, num, output_len, range_ratio, 1)
    requests = []
    for n_in, n_out in zip(ins, outs):
        text, ids = _exact_text(tokenizer, allowed, rng, max(1, n_in - special))
        text = prefix + text
        if prefix or special:
            ids = tokenizer.encode(text)
        requests.append(Request(prompt=text, prompt_len=len(ids), output_len=n_out, prompt_ids=ids))
    return requests


def _stable_tokens(tokenizer: Any) -> np.ndarray:
    """Non-special tokens that decode to whole characters and encode back to themselves alone.

    Byte-level pieces of a multi-byte character decode to U+FFFD and never come back; leaving them out lets
    random prompts keep their exact token count.
    """
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids])
    back = tokenizer(texts, add_special_tokens=False)["input_ids"]
    keep = [i for i, t, b in zip(ids, texts, back) if b == [i] and "\ufffd" not in t]
    if len(keep) < 100:
        raise UserError("the tokenizer has too few round-trip-stable tokens to build random prompts: "
                        "use --dataset-name custom with a prompt file")
    return np.array(keep)


def jsonl_requests(path: str | Path, tokenizer: Any, output_len: int, num: int | None = None) -> list[Request]:
    """Rows {"prompt": str, "output_len": int (optional)} from a JSONL file; bad rows name their line."""
    from llmfast.data.jsonl import read_jsonl

    rows = read_jsonl(path)
    if not rows:
        raise UserError(f"{path}: no prompts (the file is empty)")
    requests = []
    for row in rows[:num] if num else rows:
        line = row.get("_row", "?")
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise UserError(f"{path}:{line}: needs a non-empty string field 'prompt'")
        n_out = row.get("output_len", output_len)
        if not isinstance(n_out, int) or isinstance(n_out, bool) or n_out < 1:
            raise UserError(f"{path}:{line}: 'output_len' must be a positive integer (got {n_out!r})")
        ids = tokenizer.encode(prompt)  # with a BOS where the tokenizer adds one, as vLLM's server encodes a prompt
        requests.append(Request(prompt=prompt, prompt_len=len(ids), output_len=n_out, prompt_ids=ids))
    return requests


def sharegpt_requests(path: str | Path, tokenizer: Any, num: int, output_len: int | None = None,
                      seed: int = 0, shuffle: bool = True) -> list[Request]:
    """vLLM's ShareGPT sampling: the first human turn as the prompt, the reply's token count as the output
    length (or `output_len`), conversations shuffled by `seed`; pairs under 4 tokens, prompts over 1024
    tokens and pairs over 2048 are skipped, as vLLM does."""
    from llmfast.data.text import check_characters, decode

    try:
        text = decode(Path(path).read_bytes(), path)  # a byte-order mark dropped; not UTF-8 text: file:line
        data = json.loads(text)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--dataset-path {path}: not a readable ShareGPT JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(data, list):
        raise UserError(f"--dataset-path {path}: a ShareGPT file is a JSON list of {{\"conversations\": [...]}}")
    pairs = [(i, c["conversations"][0].get("value"), c["conversations"][1].get("value")) for i, c in enumerate(data)
             if isinstance(c, dict) and isinstance(c.get("conversations"), list) and len(c["conversations"]) >= 2
             and all(isinstance(t, dict) for t in c["conversations"][:2])]
    pairs = [(i, p, r) for i, p, r in pairs if isinstance(p, str) and isinstance(r, str)]
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(pairs))
        pairs = [pairs[int(i)] for i in order]
    requests = []
    for i, prompt, reply in pairs:
        check_characters([prompt, reply], f"--dataset-path {path}: conversation {i}")
        # counted as vLLM's ShareGPT sampling counts (`tokenizer(text).input_ids`, a BOS where the tokenizer adds one,
        # the reply's too), so that the same conversations are kept; the prompt as vLLM's server encodes it
        ids = tokenizer.encode(prompt)
        n_out = output_len or len(tokenizer.encode(reply))
        too_short = len(ids) < 4 or (output_len is None and n_out < 4)  # a fixed length is the user's choice
        if too_short or len(ids) > 1024 or len(ids) + n_out > 2048:
            continue
        requests.append(Request(prompt=prompt, prompt_len=len(ids), output_len=n_out, prompt_ids=ids))
        if len(requests) == num:
            break
    if not requests:
        raise UserError(f"--dataset-path {path}: no usable conversations (a human turn and a reply of 4 or more tokens)")
    return requests


def build_requests(tokenizer: Any, *, dataset_name: str = "random", dataset_path: str | None = None,
                   num_prompts: int = 1000, input_len: int = 1024, output_len: int = 128, range_ratio: float = 0.0,
                   prefix_len: int = 0, custom_output_len: int = 256, sharegpt_output_len: int | None = None,
                   seed: int = 0, shuffle: bool = True) -> list[Request]:
    """The requests of a benchmark from vLLM's dataset flags (their names without dashes)."""
    if num_prompts < 1:
        raise UserError("--num-prompts must be at least 1")
    if seed < 0:  # numpy's generators refuse it with a traceback
        raise UserError(f"--seed {seed}: must be 0 or more")
    if dataset_name == "custom" and custom_output_len < 1:
        raise UserError(f"--custom-output-len {custom_output_len}: must be at least 1")
    if dataset_name == "sharegpt" and sharegpt_output_len is not None and sharegpt_output_len < 1:
        raise UserError(f"--sharegpt-output-len {sharegpt_output_len}: must be at least 1 (leave it out for the "
                        "replies' lengths)")
    if dataset_name == "random":
        return random_requests(tokenizer, num_prompts, input_len, output_len, range_ratio, seed, prefix_len)
    if dataset_name not in DATASETS:
        raise UserError(f"--dataset-name {dataset_name}: choose from {', '.join(DATASETS)}")
    if not dataset_path:
        raise UserError(f"--dataset-name {dataset_name} needs --dataset-path FILE")
    if not Path(dataset_path).is_file():
        raise UserError(f"--dataset-path {dataset_path}: file not found")
    if dataset_name == "custom":
        return jsonl_requests(dataset_path, tokenizer, custom_output_len, num_prompts)
    return sharegpt_requests(dataset_path, tokenizer, num_prompts, sharegpt_output_len, seed, shuffle)
