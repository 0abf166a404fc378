"""The row shapes other fine-tuning tools' data sets come in, each turned into one conversation.

A row's shape is read from its fields; a file holds one shape (a row of another is most likely a mistake: it is
refused naming the row). Every chat shape becomes a list of {role, content} messages and from there takes the one
path `messages` rows take (chat.py); plain `text` rows are tokens to learn whole, with no chat template.

- `messages`: [{role, content}], every assistant turn learned (OpenAI, TRL, Axolotl `chat_template`).
- `conversations`: ShareGPT's [{from, value}] (Axolotl, Unsloth, LLaMA-Factory); `from` human/user, gpt/assistant
  or system, and an optional row-level `system` (LLaMA-Factory's). Tool turns have no one rendering across chat
  templates, so they are refused, not guessed.
- `instruction`, optional `input`, `output`, optional `system` and `history` (Alpaca, LLaMA-Factory's form): the user
  turn is the instruction, then a newline and the input when there is one (LLaMA-Factory's join).
- `prompt`/`completion`: two strings (one user turn, one assistant turn), or TRL's conversational form, two lists of
  messages, where only the completion's assistant turns are learned.
- `text`: TRL's language-modelling rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from llmfast.errors import UserError

SHAPES = {
    "messages": "chat (messages)",
    "sharegpt": "ShareGPT (conversations)",
    "alpaca": "Alpaca (instruction/output)",
    "prompt_completion": "prompt/completion (strings)",
    "conversational": "prompt/completion (lists of messages)",
    "text": "plain text (text)",
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Chat:
    messages: list[dict[str, str]]
    learn_from: int = 0  # assistant turns before this message are context, not learned (TRL's prompt)


def row_shape(row: dict[str, Any], where: str) -> str:
    """The shape a row's fields say it is (a null field, as a `datasets` folder fills a column a row lacks, is
    absent)."""
    has = {k for k, v in row.items() if v is not None and not k.startswith("_")}
    if "messages" in has:
        return "messages"
    if "conversations" in has:
        return "sharegpt"
    if has & {"instruction", "output"}:
        return "alpaca"
    if has & {"chosen", "rejected"} and "completion" not in has:  # TRL's preference rows, with or without prompt
        raise UserError(f"{where}: a preference row (chosen/rejected, for DPO-style training): finetune learns "
                        "answers, not preferences: give the prompt and the chosen answer as prompt/completion")
    if has & {"prompt", "completion"}:
        return "conversational" if any(isinstance(row.get(k), list) for k in ("prompt", "completion")) else \
            "prompt_completion"
    if "text" in has:
        return "text"
    raise UserError(f"{where}: missing field 'messages' (or another row shape: 'conversations', 'instruction' and "
                    f"'output', 'prompt' and 'completion', or 'text'); the row has {_fields(has)}{_nulls(row)}")


class ShapeCheck:
    """One shape per data set: the first row's; a row of another is refused, naming both."""

    def __init__(self) -> None:
        self.shape: str | None = None

    def __call__(self, row: dict[str, Any], where: str) -> str:
        shape = row_shape(row, where)
        if self.shape is None:
            self.shape = shape
        elif shape != self.shape:
            raise UserError(f"{where}: a row of shape {SHAPES[shape]}, but the rows before it are "
                            f"{SHAPES[self.shape]}: a data set holds one shape: convert this row to theirs, or split "
                            "the file")
        return shape


def to_chat(row: dict[str, Any], where: str, shape: str | None = None) -> Chat:
    """The row's conversation (its shape read from its fields unless given)."""
    shape = shape or row_shape(row, where)
    if shape == "messages":
        return Chat(_turns(row, "messages", where, ("role", "content")))
    if shape == "sharegpt":
        return Chat(_sharegpt(row, where))
    if shape == "alpaca":
        return Chat(_alpaca(row, where))
    if shape == "prompt_completion":
        for field in ("prompt", "completion"):
            if field not in row:  # null is there, and refused as not a string
                raise UserError(f"{where}: missing field '{field}' (prompt/completion rows need both)")
            must_be_text(row[field], f"{where}: field '{field}'")
        return Chat([{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}])
    if shape == "conversational":
        return _conversational(row, where)
    raise UserError(f"{where}: missing field 'messages': a plain 'text' row has no question and answer, and this "
                    "needs chat rows ('messages', 'conversations', 'instruction'/'output' or 'prompt'/'completion')")


def must_be_text(value: Any, where: str) -> None:
    # str(5) or str(None) would train on "5" / "None" silently; a wrong type is a mistake in the data.
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        raise UserError(f"{where} must be a string, not {kind} ({json.dumps(value)[:40]}): quote it in the data")


def _fields(has: set[str]) -> str:
    return f"fields {', '.join(map(repr, sorted(has)[:8]))}" if has else "no fields"


def _nulls(row: dict[str, Any]) -> str:
    # a `datasets` folder's row whose one field is null read as having no fields at all
    nulls = sorted(k for k, v in row.items() if v is None and not k.startswith("_"))
    return f" and null {', '.join(map(repr, nulls[:8]))}" if nulls else ""


def _turns(row: dict[str, Any], field: str, where: str, keys: tuple[str, str], learn: bool = True
           ) -> list[dict[str, str]]:
    """`row[field]`'s turns as {role, content} messages (`keys`: the turn's names for them); `learn`: the list must
    hold an assistant turn."""
    turns = row.get(field)
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: field '{field}' must be a non-empty list of {{{', '.join(keys)}}} objects")
    out = []
    for i, m in enumerate(turns):
        if not isinstance(m, dict):
            raise UserError(f"{where}: {field}[{i}] must be an object with '{keys[0]}' and '{keys[1]}'")
        for key in keys:
            if key not in m:
                raise UserError(f"{where}: {field}[{i}] lacks field '{key}'{_other_names(m, keys)}")
            must_be_text(m[key], f"{where}: {field}[{i}].{key}")
        out.append({"role": m[keys[0]], "content": m[keys[1]]})
    if learn and not any(m["role"] == "assistant" for m in out):
        said = "a turn from 'gpt'" if keys[0] == "from" else "a message with role 'assistant'"
        raise UserError(f"{where}: no assistant turn to learn from in '{field}' ({said})")
    return out


def _other_names(turn: dict[str, Any], keys: tuple[str, str]) -> str:
    if keys == ("role", "content") and {"from", "value"} <= turn.keys():
        return " (from/value turns are ShareGPT's: they go under 'conversations')"
    if keys == ("from", "value") and {"role", "content"} <= turn.keys():
        return " (role/content turns go under 'messages')"
    return ""


def _sharegpt(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    turns = _turns(row, "conversations", where, ("from", "value"), learn=False)
    for i, m in enumerate(turns):
        role = SHAREGPT_ROLES.get(m["role"])
        if role is None:
            kind = "a tool turn" if m["role"] in ("tool", "function", "function_call", "observation") else "a speaker"
            raise UserError(f"{where}: conversations[{i}].from is {m['role']!r}, {kind} llmfast does not map to a chat "
                            "role (it maps human/user, gpt/assistant and system): write the row as 'messages' with "
                            "the roles the model's chat template takes, or drop it")
        m["role"] = role
    if not any(m["role"] == "assistant" for m in turns):
        raise UserError(f"{where}: no assistant turn to learn from in 'conversations' (a turn from 'gpt')")
    return _with_system(row, turns, where)


def _with_system(row: dict[str, Any], turns: list[dict[str, str]], where: str) -> list[dict[str, str]]:
    """A row-level `system` prompt (LLaMA-Factory's column) as the first turn."""
    if row.get("system") is None or row["system"] == "":
        return turns
    must_be_text(row["system"], f"{where}: field 'system'")
    if turns[0]["role"] == "system":
        raise UserError(f"{where}: two system prompts (field 'system' and a turn from 'system'): keep one")
    return [{"role": "system", "content": row["system"]}, *turns]


def _alpaca(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    for field in ("instruction", "output"):
        if field not in row:
            raise UserError(f"{where}: missing field '{field}' (Alpaca rows need 'instruction' and 'output'; "
                            "'input', 'system' and 'history' are optional)")
        must_be_text(row[field], f"{where}: field '{field}'")
    question = row["instruction"]
    if row.get("input") is not None:
        must_be_text(row["input"], f"{where}: field 'input'")
        question = "\n".join(part for part in (question, row["input"]) if part)
    history = row.get("history") or []
    if not isinstance(history, list):  # a number was a TypeError, a string or object iterated as pairs
        raise UserError(f"{where}: field 'history' must be a list of [instruction, answer] pairs, not "
                        f"{type(history).__name__}")
    turns = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise UserError(f"{where}: history[{i}] must be a [instruction, answer] pair of strings")
        for j, role in enumerate(("user", "assistant")):
            must_be_text(pair[j], f"{where}: history[{i}][{j}]")
            turns.append({"role": role, "content": pair[j]})
    turns += [{"role": "user", "content": question}, {"role": "assistant", "content": row["output"]}]
    return _with_system(row, turns, where)


def _conversational(row: dict[str, Any], where: str) -> Chat:
    for field in ("prompt", "completion"):
        if not isinstance(row.get(field), list):
            got = "missing" if row.get(field) is None else f"a {type(row[field]).__name__}"
            raise UserError(f"{where}: field '{field}' is {got}, but the other is a list of messages: TRL's "
                            "conversational rows give both as lists of {role, content}, plain rows both as strings")
    prompt = _turns(row, "prompt", where, ("role", "content"), learn=False)
    completion = _turns(row, "completion", where, ("role", "content"))
    return Chat(prompt + completion, learn_from=len(prompt))
