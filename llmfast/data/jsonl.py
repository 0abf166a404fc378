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
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
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


def prompt_and_answer(row: dict[str, Any], path: str | Path) -> tuple[list[dict[str, str]], str]:
    """Split a chat row (last turn is the assistant's answer) or a prompt/completion row."""
    where = f"{path}:{row.get('_row', '?')}"
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2 or not all(isinstance(m, dict) for m in msgs):
            raise UserError(f"{where}: field 'messages' must be a list of at least two {{role, content}} objects")
        for i, m in enumerate(msgs):
            if "role" not in m or "content" not in m:
                raise UserError(f"{where}: messages[{i}] lacks field '{'role' if 'role' not in m else 'content'}'")
        if msgs[-1]["role"] != "assistant":
            raise UserError(f"{where}: the last message must be the assistant's answer (role 'assistant')")
        return [{"role": m["role"], "content": str(m["content"])} for m in msgs[:-1]], str(msgs[-1]["content"])
    if "prompt" in row:
        answer = row.get("completion", row.get("answer"))
        if answer is None:
            raise UserError(f"{where}: a prompt row needs field 'completion' (or 'answer')")
        return [{"role": "user", "content": str(row["prompt"])}], str(answer)
    raise UserError(f"{where}: missing field 'messages' (or 'prompt' and 'completion')")
