"""A fine-tuning run's encoded rows, kept in its folder so that `--resume` need not read and tokenize the data again
(minutes for a million rows, each time a run is resumed).

`OUTPUT/encoded/` holds the training and held-out examples (data.chat.Encoded) as .npy arrays (never pickle: read
with allow_pickle=False) and `meta.json`, which says what they were encoded from (`input_key`): a digest of each data
file's bytes, of the tokenizer's files, and the settings that shape the examples. Written through a temporary sibling
renamed into place, as checkpoints are. A resume takes them only if that key is the same; the trainer then checks
their rows digest against base.json as it checks freshly encoded rows. The library versions are left out of the key
on purpose: the saved rows are those the run started on, which is what a resume must train on.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

import numpy as np

from llmfast.artifacts import atomic_dir
from llmfast.data.chat import Encoded
from llmfast.data.jsonl import where as row_where
from llmfast.finetune.run_files import ENCODED
from llmfast.recipe import FinetuneRecipe
from llmfast.recipe_paths import paths_of

CACHE = ENCODED  # the folder's name in the run's output
FORMAT = 1
# Files of a model folder that are its weights, not its tokenizer's (the rest is hashed: config.json included, for
# the vocabulary size the rows were checked against)
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx")
_CHUNK = 1 << 14  # examples read back at a time: a chunk's ids are copied once, not the whole file's


@dataclass
class Cached:
    train: list[Encoded]
    eval: list[Encoded]
    said: str  # the trainer's "llmfast: data: ..." line
    warnings: list[str]


def _hash_file(h: Any, path: Path) -> None:
    with path.open("rb") as f:
        h.update(hashlib.file_digest(f, "sha256").digest())  # streamed: a data file may be gigabytes


def files_digest(path: Path, skip: tuple[str, ...] = ()) -> str:
    """sha256 over a file's bytes, or over a folder's files (a `datasets` folder's, recursively), each named by its
    path inside the folder so that a renamed file counts; files ending in `skip` left out."""
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(q for q in path.rglob("*") if q.is_file() and not q.name.endswith(skip)):
            h.update(p.relative_to(path).as_posix().encode() + b"\0")
            _hash_file(h, p)
    else:
        _hash_file(h, path)
    return h.hexdigest()


def tokenizer_digest(model_path: Path) -> str:
    """The model folder's files but its weights: the tokenizer's, whichever of them transformers reads (tokenizer.json,
    tokenizer_config.json, a chat_template.jinja, additional_chat_templates/...), and config.json."""
    return files_digest(model_path, _WEIGHTS)


def input_key(recipe: FinetuneRecipe, model_path: Path, vocab: int | None) -> dict[str, Any]:
    """What the examples are encoded from: the data files (their paths name the rows: FILE:LINE), the tokenizer, and
    the settings that shape them or split them. JSON values only, so a key read back from meta.json compares equal."""
    dc = recipe.data
    return {"format": FORMAT,
            "train": [[str(p), files_digest(Path(p))] for p in paths_of(dc.train)],
            "eval": [[str(p), files_digest(Path(p))] for p in paths_of(dc.eval)],
            "tokenizer": tokenizer_digest(Path(model_path)),
            "settings": {"max_length": dc.max_length, "too_long": dc.too_long, "eval_fraction": dc.eval_fraction,
                         "seed": recipe.train.seed, "vocab": vocab}}


def sources(key: dict[str, Any]) -> list[str]:
    return [p for p, _ in key["train"]] + [p for p, _ in key["eval"]]


def _write_npy(f: BinaryIO, total: int, chunks: Iterator[bytes]) -> None:
    """An int32 .npy of `total` values, written from `chunks` without holding them all."""
    np.lib.format.write_array_header_1_0(f, {"descr": "<i4", "fortran_order": False, "shape": (total,)})
    for c in chunks:
        f.write(c)


def save(out: Path, key: dict[str, Any], train: Sequence[Encoded], held: Sequence[Encoded], said: str,
         warnings: list[str]) -> None:
    """Write OUTPUT/encoded (replacing one there: its key was another)."""
    examples = [*train, *held]
    index = table(examples, sources(key))[:, :3]  # FORMAT 1 keeps no part: a resume has its rows split already
    total = int(index[:, 0].sum())
    meta = {"key": key, "train": len(train), "eval": len(held), "tokens": total, "said": said, "warnings": warnings}
    with atomic_dir(out / CACHE, overwrite=True) as tmp:
        for name, which in (("ids.npy", 0), ("labels.npy", 1)):
            with (tmp / name).open("wb") as f:
                _write_npy(f, total, (e.buffers()[which].tobytes() for e in examples))
        np.save(tmp / "examples.npy", np.ascontiguousarray(index), allow_pickle=False)
        (tmp / "meta.json").write_text(json.dumps(meta), encoding="utf-8")


def table(examples: Sequence[Encoded], sources: list[str]) -> np.ndarray:
    """Each example's length, row, source (its data file, by the place errors name it by) and part."""
    prefixes = {p: i for i, p in enumerate(_prefixes(sources))}
    return np.array([(len(e), e.row, prefixes[e.where[: -len(str(e.row))]], e.part) for e in examples],
                    dtype="<i8").reshape(-1, 4)


def from_arrays(table: np.ndarray, ids: np.ndarray, labels: np.ndarray, sources: list[str]) -> list[Encoded]:
    """Examples from their `table` (`save` keeps no parts) and their ids and labels one after another; a chunk's
    ids at a time are copied, so mapped arrays are read once."""
    prefixes = _prefixes(sources)
    starts = np.concatenate(([0], np.cumsum(table[:, 0]))).tolist()
    rows_of, src_of = table[:, 1].tolist(), table[:, 2].tolist()
    parts = table[:, 3].tolist() if table.shape[1] > 3 else [0] * len(table)
    examples: list[Encoded] = []
    for c in range(0, len(table), _CHUNK):
        end = min(c + _CHUNK, len(table))
        a = starts[c]
        chunk_ids, chunk_labels = array("i"), array("i")
        chunk_ids.frombytes(ids[a : starts[end]].tobytes())
        chunk_labels.frombytes(labels[a : starts[end]].tobytes())
        for i in range(c, end):
            s, e = starts[i] - a, starts[i + 1] - a
            row = rows_of[i]
            examples.append(Encoded(chunk_ids[s:e], chunk_labels[s:e], row, f"{prefixes[src_of[i]]}{row}", parts[i]))
    return examples


def _prefixes(sources: list[str]) -> list[str]:
    """data.jsonl.where's form (`FILE:ROW`, `DIR row ROW`) as a prefix each file's rows add their number to: asked
    once a file (it looks at the disk), not once a row."""
    return [row_where(p, 0)[:-1] for p in sources]


class Damaged(Exception):
    """OUTPUT/encoded cannot be what `save` wrote (truncated, edited): the caller encodes the data again."""


def load(out: Path, key: dict[str, Any]) -> Cached | None:
    """The saved examples if they were encoded from `key`'s inputs; None if there are none or theirs were others.
    Raises Damaged (one line) for files that are not what `save` writes; nothing in them is unpickled."""
    d = out / CACHE
    if not d.is_dir():
        return None
    try:
        meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise Damaged(f"{d / 'meta.json'}: {type(e).__name__}") from None
    if not isinstance(meta, dict) or "key" not in meta:
        raise Damaged(f"{d / 'meta.json'}: not what llmfast writes there")
    if meta["key"] != key:
        return None
    try:
        return _read(d, meta, sources(key))
    except (KeyError, TypeError, ValueError) as e:  # meta.json's counts missing, or not numbers
        raise Damaged(f"{d / 'meta.json'}: {type(e).__name__}") from None


def _array(path: Path, dtype: str, mapped: bool = False) -> np.ndarray:
    """A .npy array of `dtype`, never unpickled; numpy's own message is left out (it suggests loading it unsafely)."""
    try:
        a = np.load(path, mmap_mode="r" if mapped else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise Damaged(f"{path}: not a .npy array llmfast wrote ({type(e).__name__}: cut short, edited or pickled)"
                      ) from None
    if not isinstance(a, np.ndarray) or a.dtype != np.dtype(dtype):
        raise Damaged(f"{path}: not a .npy array of {np.dtype(dtype)}")
    return a


def _read(d: Path, meta: dict[str, Any], sources: list[str]) -> Cached:
    # mapped, not read: a chunk's ids at a time are copied into the examples; and a header that claims more than the
    # file holds is refused by the mapping (read, a damaged shape allocated it first: terabytes, a MemoryError)
    ids, labels = _array(d / "ids.npy", "<i4", True), _array(d / "labels.npy", "<i4", True)
    table = _array(d / "examples.npy", "<i8", True)
    n_train, n_eval = meta["train"], meta["eval"]
    if ids.ndim != 1 or labels.shape != ids.shape:
        raise Damaged(f"{d}: ids of shape {list(ids.shape)} and labels of {list(labels.shape)}, not of one length")
    if not (type(n_train) is int and type(n_eval) is int and min(n_train, n_eval) >= 0
            and table.shape == (n_train + n_eval, 3)):
        raise Damaged(f"{d / 'examples.npy'}: of shape {list(table.shape)}, not [{n_train} + {n_eval}, 3]")
    lengths, src = table[:, 0], table[:, 2]
    if (lengths < 0).any() or int(lengths.sum()) != len(ids) or (src < 0).any() or (src >= len(sources)).any():
        raise Damaged(f"{d / 'examples.npy'}: the examples' lengths or files do not fit the ids")
    examples = from_arrays(table, ids, labels, sources)
    said, warnings = meta["said"], meta["warnings"]
    if not (isinstance(said, str) and isinstance(warnings, list) and all(isinstance(w, str) for w in warnings)):
        raise Damaged(f"{d / 'meta.json'}: its said and warnings are not text")
    return Cached(examples[:n_train], examples[n_train:], said, warnings)
