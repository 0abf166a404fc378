"""Reading data sets (JSON Lines, a .json array, a `datasets.save_to_disk` folder) with errors that name the file,
row and field. A row's `_row` is the line it starts on in the file (a folder's: its index), so every later error can
point at it."""

from __future__ import annotations

import io
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Iterator

from llmfast.data.text import check_bytes, check_characters, decode
from llmfast.errors import UserError

# Formats other tools export that are not JSON: read as JSON Lines they failed at row 1 ("not valid JSON" for a CSV,
# "not UTF-8" for Parquet). Each converts in one line; a table's cells are read as text (CSV's "3000" would become the
# number 3000, which a row refuses, and "NA" or "None" a null). Double quotes only: the code goes in single quotes.
_TEXT = "dtype=str, keep_default_na=False"
_CONVERT = {".parquet": "pd.read_parquet({p})", ".csv": f"pd.read_csv({{p}}, {_TEXT})",
            ".tsv": f'pd.read_csv({{p}}, sep="\\t", {_TEXT})', ".xlsx": f"pd.read_excel({{p}}, {_TEXT})",
            ".arrow": '__import__("datasets").Dataset.from_file({p}).to_pandas()'}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip")


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a data file (`read_jsonl`) or of a `datasets.save_to_disk` folder (its train split)."""
    path = Path(path)
    if not path.is_dir():
        return read_jsonl(path, folders=True)
    if "::" in str(path):  # fsspec, under load_from_disk, reads it as a chain of URLs: 'FileNotFoundError'
        raise UserError(f"{path}: a folder name holding '::', which datasets reads as a chain of URLs: rename it, "
                        "or link it under a name without '::'")
    try:
        from datasets import load_from_disk

        ds = load_from_disk(str(path))
    except Exception as e:
        raise UserError(f"{path}: not a dataset saved with datasets.save_to_disk ({type(e).__name__})") from None
    if hasattr(ds, "keys"):  # a DatasetDict: take its train split
        if "train" not in ds:
            raise UserError(f"{path}: a DatasetDict without a 'train' split (has {', '.join(ds.keys())})")
        ds = ds["train"]
    # the stored values, never decoded: an Image, Audio, Video or Pdf column decodes from a `path` the folder gives,
    # which datasets fetches (a URL: a request to wherever the data set's maker chose) or reads (any local file), and
    # whose failure was a traceback; a chat or text row is plain values, the same either way
    stored = (row for batch in ds.with_format("arrow").iter(batch_size=1024) for row in batch.to_pylist())
    rows = [dict(r, _row=i) for i, r in enumerate(stored)]
    if not rows:
        raise UserError(f"{path}: the data set is empty")
    return rows


def iter_rows(path: str | Path) -> Iterator[dict[str, Any]]:
    """`read_rows`' rows one at a time: a JSON Lines file is parsed a line at a time, so a pass over its rows
    (preflight's shape check) holds one row, not the file's; a problem is named when its row is reached."""
    if Path(path).is_dir():
        yield from read_rows(path)
    else:
        yield from iter_jsonl(path, folders=True)


def where(path: str | Path, row: int) -> str:
    """How an error names a row: the file's line, or a `datasets` folder's row index."""
    return f"{path} row {row}" if Path(path).is_dir() else f"{path}:{row}"


def read_jsonl(path: str | Path, *, folders: bool = False) -> list[dict[str, Any]]:
    """`iter_jsonl`'s rows, all read."""
    return list(iter_jsonl(path, folders=folders))


def iter_jsonl(path: str | Path, *, folders: bool = False) -> Iterator[dict[str, Any]]:
    """JSON Lines (one object a line), or, in a `.json` file that starts with `[`, one JSON array of objects (what
    LLaMA-Factory and `json.dump` write; `datasets`' to_json writes JSON Lines even to a .json file). `folders`:
    the caller reads `datasets` folders too (`read_rows`), as its errors then say. One row at a time (a .json file
    is parsed whole first)."""
    path = Path(path)
    if path.is_dir():  # eval's task files and bench's prompt files are files only
        raise UserError(f"data file {path} is a directory: give a JSON Lines file or a .json array")
    if not path.is_file():
        raise UserError(f"data file {path} not found")
    _check_extension(path, folders)
    try:
        f = path.open("rb")
    except OSError as e:
        raise UserError(f"data file {path} cannot be read ({e.strerror or e}): make it readable for this "
                        "user") from None
    empty = True
    with f:
        for row in _json_lines(path, f) if path.suffix.lower() != ".json" else _json_file(path, f.read()):
            empty = False
            yield row
    if empty:
        raise UserError(f"{path}: the data set is empty")


def _check_extension(path: Path, folders: bool) -> None:
    suffix = path.suffix.lower()
    if suffix in _COMPRESSED:
        raise UserError(f"data file {path} is compressed ({suffix}): decompress it to .jsonl first")
    if suffix in _CONVERT:
        out = path.with_suffix(".jsonl")
        code = (f"import pandas as pd; {_CONVERT[suffix].format(p=_literal(path))}.to_json({_literal(out)}, "
                'orient="records", lines=True, force_ascii=False)')
        read = "JSON Lines, a .json array or a datasets.save_to_disk folder" if folders else \
            "JSON Lines or a .json array"
        # this interpreter: it has pandas (a `datasets` dependency), where a `python` on PATH may not; quoted for a
        # POSIX shell, so that it pastes as it is whatever the path holds (quotes, $, a backtick)
        raise UserError(f"data file {path}: {suffix[1:]} files are not read ({read} are): convert it with "
                        f"{shlex.quote(sys.executable)} -c {shlex.quote(code)} and give {out}")


def _literal(path: Path) -> str:
    """`path` as a Python string literal in double quotes, every space but a lone one escaped: the error's line
    folds runs of whitespace into one space, which would change the path the command converts."""
    text = json.dumps(str(path), ensure_ascii=False)
    return re.sub(r"(?<= ) |[^\S ]", lambda m: f"\\u{ord(m.group()):04x}", text)


def _json_lines(path: Path, f: Any) -> Iterator[dict[str, Any]]:
    first = True
    for lineno, raw in enumerate(_lines(f), 1):
        check_bytes(raw, path, lineno, "row")  # a file in another encoding is refused at the row where it shows
        # a byte-order mark some editors write: at the file's start, or at a row's where such files were joined (cat)
        line = raw.decode("utf-8").removeprefix("\ufeff")
        if not line.strip():
            continue
        if first and line.lstrip().startswith("[") and path.suffix.lower() != ".json":
            raise UserError(f"{path}:{lineno}: a JSON array, but a {path.suffix or 'file without .json'} is read as "
                            "JSON Lines (one object a line): name the file .json, or write one row a line")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}): fix or remove the row") from None
        check_characters(row, f"{path}:{lineno}", line)
        first = False
        yield _object(row, path, lineno)


def _lines(f: Any) -> Any:
    """A binary file's lines as universal newlines count them: a lone CR (an old Mac editor's line end) ends a line
    too (raw CR is no part of a JSON row: inside a string it must be escaped)."""
    for raw in f:
        yield from raw.splitlines() if b"\r" in raw else (raw,)


def _json_file(path: Path, raw: bytes) -> list[dict[str, Any]]:
    """A .json file's rows: an array's, or JSON Lines'; a pretty-printed single object (a dict of splits, one row)
    is said to be one, not 'not valid JSON' at its first line."""
    first = raw.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if first == b"[":
        return _json_array(path, raw)
    try:
        return list(_json_lines(path, io.BytesIO(raw)))
    except UserError:
        try:
            whole = json.loads(raw.decode("utf-8-sig")) if first == b"{" else None
        except ValueError:
            whole = None
        if isinstance(whole, dict):
            raise UserError(f"{path}: one JSON object (fields {', '.join(map(repr, list(whole)[:5]))}), not rows: give "
                            "a JSON array of row objects, or JSON Lines (one row a line)") from None
        raise


def _json_array(path: Path, raw: bytes) -> list[dict[str, Any]]:
    """The array's objects, each with `_row` the line its `{` is on (a pretty-printed file's rows span lines)."""
    # lines as universal newlines count them (raw CR is no part of a JSON string: only whitespace between tokens)
    text = decode(raw, path).replace("\r\n", "\n").replace("\r", "\n")
    decoder = json.JSONDecoder()
    rows: list[dict[str, Any]] = []
    seen, line = 0, 1  # lines counted up to `seen`, so the whole count stays linear in the file

    def line_at(pos: int) -> int:
        nonlocal seen, line
        line += text.count("\n", seen, pos)
        seen = pos
        return line

    pos = _skip_space(text, text.index("[") + 1)
    try:
        while not (text.startswith("]", pos) and not rows):
            row, end = decoder.raw_decode(text, pos)
            check_characters(row, f"{path}:{line_at(pos)}", text[pos:end])
            rows.append(_object(row, path, line_at(pos)))
            pos = _skip_space(text, end)
            if text.startswith("]", pos):
                break
            if not text.startswith(",", pos):
                raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
            pos = _skip_space(text, pos + 1)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}): fix the array there") from None
    if text[pos + 1:].strip():
        raise UserError(f"{path}:{line_at(pos)}: text after the JSON array's closing ']': remove it")
    return rows


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _object(row: Any, path: Path, line: int) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise UserError(f"{path}:{line}: each row must be a JSON object, not {type(row).__name__}")
    row["_row"] = line
    return row
