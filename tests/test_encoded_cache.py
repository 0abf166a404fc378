"""finetune/encoded_cache.py on its own: what a damaged saved copy of a run's rows is taken for (finetune's tests run
it through `--resume`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llmfast.data.chat import Encoded
from llmfast.finetune import encoded_cache


def _saved(tmp_path: Path) -> tuple[dict, list[Encoded], list[Encoded]]:
    data = tmp_path / "d.jsonl"  # only named (FILE:LINE), never read
    key = {"format": encoded_cache.FORMAT, "train": [[str(data), "0" * 64]], "eval": [], "tokenizer": "1" * 64,
           "settings": {"max_length": 8}}
    train = [Encoded([1, 2, 3], [-100, 2, 3], 1, f"{data}:1"), Encoded([4, 5], [4, 5], 2, f"{data}:2")]
    held = [Encoded([6], [6], 3, f"{data}:3")]
    encoded_cache.save(tmp_path, key, train, held, "llmfast: data: 3 rows", ["a warning"])
    back = encoded_cache.load(tmp_path, key)
    assert back is not None and (back.train, back.eval, back.said, back.warnings) == (
        train, held, "llmfast: data: 3 rows", ["a warning"])
    return key, train, held


def test_an_examples_table_whose_header_claims_more_rows_than_it_holds_is_damaged(tmp_path: Path) -> None:
    """examples.npy's header edited (a flipped bit) to a shape of 10^11 rows: read, numpy allocated it first (2 TiB,
    a MemoryError: the run stopped with "out of memory" instead of one note and the data encoded again)."""
    key, _, _ = _saved(tmp_path)
    path = tmp_path / "encoded" / "examples.npy"
    table = np.load(path, allow_pickle=False)
    with path.open("wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False, "shape": (10**11, 3)})
        f.write(table.tobytes())
    with pytest.raises(encoded_cache.Damaged, match=r"examples\.npy: not a \.npy array llmfast wrote \(ValueError"):
        encoded_cache.load(tmp_path, key)


def test_counts_of_train_and_held_out_rows_that_are_not_both_whole_numbers_are_damaged(tmp_path: Path) -> None:
    """meta.json's counts edited to -1 and 4 (their sum still the table's 3 rows): the split was taken as one
    training row and one held out, other rows than saved."""
    key, _, _ = _saved(tmp_path)
    meta_path = tmp_path / "encoded" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "train": -1, "eval": 4}))
    with pytest.raises(encoded_cache.Damaged, match=r"examples\.npy: of shape \[3, 3\], not \[-1 \+ 4, 3\]"):
        encoded_cache.load(tmp_path, key)
