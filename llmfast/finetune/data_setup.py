"""A fine-tuning run's rows: its data files read and encoded (or, on `--resume`, the examples it saved when it started,
finetune/encoded_cache.py), the held-out ones split off, packed, and their digest, which base.json records."""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmfast.data.chat import Encoded, read_examples, rows_digest
from llmfast.data.packing import pack
from llmfast.errors import UserError, no_space
from llmfast.finetune import encoded_cache
from llmfast.finetune.checkpoint import recorded_rows
from llmfast.finetune.run_files import ENCODED, foreign_encoded
from llmfast.recipe import FinetuneRecipe
from llmfast.recipe_paths import paths_of


def note(acc: Any, line: str) -> None:
    # Warnings and progress notices go to stderr, once per run; stdout carries only the summary.
    if acc.is_main_process:
        print(line, file=sys.stderr, flush=True)


def split_eval(examples: list[Encoded], fraction: float, seed: int) -> tuple[list[Encoded], list[Encoded]]:
    """`fraction` of the rows held out. A row split into one example per assistant turn (data.chat._chat_plans) is
    held out whole or not at all: its later examples hold its earlier answers as context."""
    rows = row_groups(examples)
    if fraction <= 0 or len(rows) < 2:
        return examples, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(len(rows) * fraction)), len(rows) - 1)  # at least one row left to train on
    held = {i for k in order[:n_eval] for i in rows[k]}
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def row_groups(examples: list[Encoded]) -> list[list[int]]:
    """The examples' indices, row by row: a row's examples after its first (`part` > 0) follow it."""
    rows: list[list[int]] = []
    for i, e in enumerate(examples):
        last = examples[rows[-1][-1]] if rows else None
        if getattr(e, "part", 0) and last is not None and (last.where, last.row) == (e.where, e.row):
            rows[-1].append(i)
        else:
            rows.append([i])
    return rows


def _count(examples: list[Encoded], noun: bool = True) -> str:
    """How many rows (`noun`: "N rows"), and how many examples where rows were split by turn."""
    n = len(row_groups(examples))
    said = f"{n} row{'s' * (n != 1)}" if noun else str(n)
    return said + (f" ({len(examples)} examples)" if n != len(examples) else "")


def encode_data(recipe: FinetuneRecipe, tokenizer: Any, acc: Any,
                vocab: int | None) -> encoded_cache.Cached:
    """Train and held-out examples (each of data.train's / data.eval's files read in turn), their warnings, and a line
    saying what was read (shown once all is checked: a row shape read in a way the user did not mean is then seen
    before the steps go by)."""
    dc = recipe.data

    def read(value: Any) -> tuple[list[Encoded], list[str], str]:
        got = [(read_examples(p, tokenizer, dc.max_length, dc.too_long, vocab, acc.is_main_process), p)
               for p in paths_of(value)]
        return ([e for g, _ in got for e in g.examples], [w for g, _ in got for w in g.warnings],
                ", ".join(f"{_count(g.examples)} of {g.shape} from {p}" for g, p in got))

    train_ex, warnings, said = read(dc.train)
    if dc.eval is not None:
        eval_ex, more, held = read(dc.eval)
        warnings, said = warnings + more, f"{said}; held out: {held}"
    else:
        train_ex, eval_ex = split_eval(train_ex, dc.eval_fraction, recipe.train.seed)
        said = f"{said}; {_count(eval_ex, noun=False)} of them held out"
    return encoded_cache.Cached(train_ex, eval_ex, f"llmfast: data: {said}", warnings)


_SENT = 1 << 26  # values a broadcast carries at a time: 256 MiB of int32 ids on a GPU, whatever the data's size
_CHUNK = 512  # examples sent at a time; 4096 left process 0 ~30 MiB more RSS (its heap fragmented)


def shared_encoding(recipe: FinetuneRecipe, tokenizer: Any, acc: Any, vocab: int | None,
                    key: dict[str, Any]) -> encoded_cache.Cached:
    """`encode_data` in process 0 only, the others receiving its examples (the same, in the same order): a launch
    whose every process read and tokenized the data took N times the CPU time and memory at its start. Process 0's
    failure is sent too, before it is raised: the others stop with it rather than wait for examples that never come
    (torchrun stops them, but a launch of several nodes, or by hand, does not)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:  # one process
        return encode_data(recipe, tokenizer, acc, vocab)
    head: list[Any] = [None]
    sources = encoded_cache.sources(key)
    if acc.is_main_process:
        try:
            got = encode_data(recipe, tokenizer, acc, vocab)
            examples = [*got.train, *got.eval]
            table = encoded_cache.table(examples, sources)
        except Exception:
            dist.broadcast_object_list([{"failed": True}], src=0, device=acc.device)
            raise
        head = [{"failed": False, "train": len(got.train), "said": got.said, "warnings": got.warnings,
                 "examples": len(examples)}]
    dist.broadcast_object_list(head, src=0, device=acc.device)
    if head[0]["failed"]:
        raise UserError("process 0 stopped while encoding the data: its error says why")
    if not acc.is_main_process:
        examples, table = [], np.empty((head[0]["examples"], 4), "<i8")
    _broadcast(table.reshape(-1), acc.device)
    starts = np.concatenate(([0], np.cumsum(table[:, 0]))).tolist()
    for c in range(0, len(table), _CHUNK):  # a chunk of examples at a time: their ids are held twice, not all
        end = min(c + _CHUNK, len(table))
        ids, labels = np.empty(starts[end] - starts[c], "<i4"), np.empty(starts[end] - starts[c], "<i4")
        if acc.is_main_process:
            for e, a in zip(examples[c:end], starts[c:end]):
                a -= starts[c]
                ids[a : a + len(e)], labels[a : a + len(e)] = e.buffers()
        _broadcast(ids, acc.device)
        _broadcast(labels, acc.device)
        if not acc.is_main_process:
            examples.extend(encoded_cache.from_arrays(table[c:end], ids, labels, sources))
    n = head[0]["train"]
    return got if acc.is_main_process else \
        encoded_cache.Cached(examples[:n], examples[n:], head[0]["said"], head[0]["warnings"])


def _broadcast(flat: np.ndarray, device: Any) -> None:
    """Process 0's values of `flat` into every process's, a slice at a time (NCCL sends only GPU tensors)."""
    import torch
    import torch.distributed as dist

    for a in range(0, len(flat), _SENT):
        part = torch.from_numpy(flat[a : a + _SENT])  # a view: gloo on the CPU writes the received values in place
        sent = part.to(device)
        dist.broadcast(sent, src=0)
        if sent.data_ptr() != part.data_ptr():
            part.copy_(sent.cpu())


@dataclass
class RunData:
    rows: list[list[Encoded]]  # packed bins (or one example each)
    eval_rows: list[list[Encoded]]
    digest: str  # data.chat.rows_digest of both
    said: str
    key: dict[str, Any]  # encoded_cache.input_key
    unsaved: encoded_cache.Cached | None  # encoded here, to be saved into the run folder (`save_run_data`)


def run_data(recipe: FinetuneRecipe, tokenizer: Any, acc: Any, vocab: int | None, model_path: Path, out: Path,
             resume: bool) -> RunData:
    """The run's rows. Resumed, from OUTPUT/encoded when the data files, the tokenizer and the settings are those it
    was saved from and its rows are those base.json records; else (or when it is damaged: said in a line, not an
    error, since encoding again gives the rows it should have held) encoded from the data, as on a first start.
    Every process of a torchrun reads the saved examples itself; else process 0 alone encodes and sends the others
    its examples (`shared_encoding`: nothing may be written before the run is checked, so none go through a file)."""
    key = encoded_cache.input_key(recipe, model_path, vocab)  # before the files are read: a miss if they change
    got: encoded_cache.Cached | None = None
    theirs = foreign_encoded(out)  # none on a first start: the output is new or empty
    if theirs is not None:
        note(acc, f"llmfast: note: {theirs} holds files llmfast does not write there: left as it is, so the data is "
                  "encoded again and its rows not saved")
    elif resume:
        try:
            got = encoded_cache.load(out, key)
        except encoded_cache.Damaged as e:
            note(acc, f"llmfast: note: the saved encoded rows are damaged ({e}): encoding the data again")
    if got is not None:
        rows, eval_rows, digest = _packed(recipe, got)
        recorded = recorded_rows(out)  # none: a base.json of an earlier version (and no copy), or edited
        if recorded is not None and digest != recorded:  # edited by hand, or rotted: base.json's rows are the run's
            note(acc, f"llmfast: note: {out / ENCODED} holds other rows than the run started on "
                      f"({out / 'base.json'}): encoding the data again")
            got = None
    unsaved = None
    if got is None:
        got = unsaved = shared_encoding(recipe, tokenizer, acc, vocab, key)
        rows, eval_rows, digest = _packed(recipe, got)
    for w in got.warnings:
        note(acc, f"llmfast: warning: {w}")
    # said with the rest once all is checked: a resume refused is one line
    said = got.said if unsaved is not None else f"{got.said} (as encoded when the run started: {out / ENCODED})"
    return RunData(rows, eval_rows, digest, said, key, unsaved if theirs is None else None)

def _packed(recipe: FinetuneRecipe, got: encoded_cache.Cached) -> tuple[list[list[Encoded]], list[list[Encoded]], str]:
    dc = recipe.data
    pack_length = dc.pack_length or dc.max_length
    rows = pack(got.train, pack_length) if dc.packing else [[e] for e in got.train]
    eval_rows = pack(got.eval, pack_length) if dc.packing else [[e] for e in got.eval]
    return rows, eval_rows, rows_digest(rows, eval_rows)


def save_run_data(acc: Any, out: Path, data: RunData) -> None:
    """Process 0 saves the examples it encoded into OUTPUT/encoded, once the run is checked (every process first:
    one still reading the old folder would see it replaced). A disk without room for them is a note: they only spare
    a resume the encoding, and they are the most a run writes before its first checkpoint (8 bytes a token, where a
    LoRA checkpoint is megabytes), so the run goes on without them."""
    acc.wait_for_everyone()
    if acc.is_main_process and data.unsaved is not None:
        got = data.unsaved
        try:
            encoded_cache.save(out, data.key, got.train, got.eval, got.said, got.warnings)
        except (UserError, OSError) as e:  # a full disk: atomic_dir kept nothing of the folder
            if not no_space(e):
                raise
            size = 8 * sum(len(x) for x in (*got.train, *got.eval)) / 2**20
            note(acc, f"llmfast: note: no room on the disk for the encoded rows ({out / ENCODED}, {size:.1f} MiB): "
                      "training goes on without them; a --resume encodes the data again")
    data.unsaved = None
