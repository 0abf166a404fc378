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


@pytest.fixture
def small_disk(tmp_path: Path):
    """A folder on a fresh 64 KiB tmpfs, unmounted after the test (skipped where none can be mounted)."""
    import subprocess

    d = tmp_path / "disk"
    d.mkdir()
    try:
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64K", "tmpfs", str(d)], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command here: a small file system cannot be made")
    if p.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {p.stderr.strip()[:120]}")
    yield d
    subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_rows_that_do_not_fit_on_the_disk_are_a_note_and_the_run_goes_on(small_disk: Path, capsys) -> None:
    """The saved rows are only what spares a resume encoding the data again, and the biggest thing a run writes before
    its first checkpoint (8 bytes a token: gigabytes for a large data set, where a LoRA checkpoint is megabytes): on a
    disk without room for them the run trained no step ("no space left ... nothing of encoded was kept"). Now one note
    says so, nothing of them is left, and the run goes on (a resume encodes the data again)."""
    from llmfast.finetune.data_setup import RunData, save_run_data

    class Acc:  # one process
        is_main_process = True

        def wait_for_everyone(self) -> None:
            pass

    examples = [Encoded(range(50_000), range(50_000), i, f"{small_disk}/d.jsonl:{i}") for i in range(1, 3)]
    key = {"format": encoded_cache.FORMAT, "train": [[f"{small_disk}/d.jsonl", "0" * 64]], "eval": [],
           "tokenizer": "1" * 64, "settings": {}}
    data = RunData([[e] for e in examples], [], "digest", "said", key, encoded_cache.Cached(examples, [], "said", []))
    out = small_disk / "run"
    save_run_data(Acc(), out, data)
    assert data.unsaved is None and sorted(p.name for p in small_disk.rglob("*")) == ["run"]
    assert capsys.readouterr().err == (f"llmfast: note: no room on the disk for the encoded rows ({out / 'encoded'}, "
                                       "0.8 MiB): training goes on without them; a --resume encodes the data again\n")


class _Acc:  # one process
    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass


def test_an_encoded_folder_of_the_users_own_in_a_resumed_run_is_neither_read_nor_replaced(builtin_dir: Path,
                                                                                       tmp_path: Path,
                                                                                       capsys) -> None:
    """`encoded` is a plain word: a folder of that name in the output of a run started before llmfast kept its rows
    there, holding the user's own files, was taken for a damaged copy on `--resume` and replaced (the files gone).
    Now it is left as it is, said in one note, and the rows are encoded from the data and not saved."""
    from llmfast.finetune.data_setup import run_data, save_run_data
    from llmfast.models import load_tokenizer
    from llmfast.recipe import FinetuneRecipe

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {w}"},
                                                     {"role": "assistant", "content": w}]}) + "\n"
                            for w in ("alpha", "bravo", "charlie")))
    out = tmp_path / "run"
    (out / "encoded").mkdir(parents=True)
    (out / "encoded" / "notes.txt").write_text("mine")
    recipe = FinetuneRecipe.model_validate({"model": str(builtin_dir), "output": str(out),
                                            "data": {"train": str(data), "eval_fraction": 0}})
    got = run_data(recipe, load_tokenizer(builtin_dir), _Acc(), None, builtin_dir, out, resume=True)
    assert got.unsaved is None and len(got.rows) == 1 and got.said.endswith(f"3 rows of chat (messages) from {data}; "
                                                                             "0 of them held out")
    save_run_data(_Acc(), out, got)
    assert [p.name for p in (out / "encoded").iterdir()] == ["notes.txt"]
    assert (out / "encoded" / "notes.txt").read_text() == "mine"
    assert capsys.readouterr().err == (f"llmfast: note: {out / 'encoded'} holds files llmfast does not write there: "
                                       "left as it is, so the data is encoded again and its rows not saved\n")
