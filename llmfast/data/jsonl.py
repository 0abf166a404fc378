"""Reading JSONL data sets with errors that name the file, row and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmfast.errors import UserError


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} not found")
    rows = []
    try:
        f = path.open("rb")
    except OSError as e:
        raise UserError(f"data file {path} cannot be read ({e.strerror or e}): make it readable for this "
                        "user") from None
    # Bytes, decoded line by line: a file in another encoding is refused at the row where it shows.
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1} of the row): "
                                "save the file as UTF-8") from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}): fix or remove the row") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: each row must be a JSON object, not {type(row).__name__}")
            row["_row"] = lineno
            rows.append(row)
    if not rows:
        raise UserError(f"{path}: the data set is empty")
    return rows
