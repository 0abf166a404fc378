"""Decoding the text files a user gives (recipes, data, task and prompt files, calibration and evaluation text) the
way an editor on any machine may have saved them: a UTF-8 byte-order mark (Windows Notepad's) is dropped, as Python's
`utf-8-sig` does; anything that is not UTF-8 text (Latin-1, UTF-16, a binary file) is one line naming the file, the
line and the byte, and saying to save the file as UTF-8. Also where llmfast's own copies of the checkout's eval/ files
are, in a checkout or installed (`shipped_file`)."""

from __future__ import annotations

import importlib.resources
import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

from llmfast.errors import UserError

# Byte-order marks of the encodings a file saved as "Unicode" comes in (UTF-32's first: it starts with UTF-16's).
_WIDE = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
         (b"\xfe\xff", "UTF-16"))
# A JSON escape of a UTF-16 surrogate: the only way a JSON row holds one (raw UTF-8 cannot encode it).
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def check_bytes(raw: bytes, path: str | Path, line: int = 1, unit: str = "line") -> None:
    """Refuse bytes that are not UTF-8 text: a UTF-16/UTF-32 file (a byte-order mark, or the NUL bytes its ASCII
    characters carry), a NUL byte (a binary file), bytes another encoding wrote (Latin-1's `café`). `raw` starts at
    line `line` of `path` (a whole file, or one line of it: `unit` 'row' for a JSON Lines row)."""
    if line == 1:
        for mark, name in _WIDE:
            if raw.startswith(mark):
                raise UserError(f"{path}:1: {name} text (it starts with the byte-order mark "
                                f"{mark.hex(' ').upper()}): save the file as UTF-8")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise UserError(f"{_at(raw, nul, path, line)}: a NUL byte ({_byte(raw, nul, unit)}): a binary file, or "
                        "UTF-16/UTF-32 text: save the file as UTF-8 text")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{_at(raw, e.start, path, line)}: not UTF-8 text ({_byte(raw, e.start, unit)}): save the "
                        "file as UTF-8") from None


def _at(raw: bytes, pos: int, path: str | Path, line: int) -> str:
    """'FILE:LINE' of byte `pos` of `raw`, which starts at line `line`; lines end as `read_text` ends them (LF, CR LF
    or a lone CR: counting LF alone named line 1 for any line of a file saved with CRs)."""
    return f"{path}:{line + len((raw[:pos] + b'.').splitlines()) - 1}"


def _byte(raw: bytes, pos: int, unit: str) -> str:
    """Which byte of its line `pos` is, counted from 1 as an editor's columns are."""
    start = max(raw.rfind(b"\n", 0, pos), raw.rfind(b"\r", 0, pos))  # -1 on the first line
    return f"byte {pos - start} of the {unit}"


def decode(raw: bytes, path: str | Path) -> str:
    """A whole file's bytes as text, a UTF-8 byte-order mark dropped; not UTF-8 text is refused (`check_bytes`).
    Line ends are left as they are (YAML and JSON read CR LF and CR as line breaks themselves)."""
    check_bytes(raw, path)
    return raw.decode("utf-8").removeprefix("\ufeff")


def read_text(path: str | Path, what: str) -> str:
    """A text file as Python's universal newlines read it (CR LF and a lone CR are each one line break), through
    `decode`; `what` names the file in the errors of a missing or unreadable one ('calibration text')."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{what} {path} not found: give an existing UTF-8 text file") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a folder: give a UTF-8 text file") from None
    except OSError as e:
        raise UserError(f"{what} {path} cannot be read ({e.strerror or e}): make it readable for this user") from None
    return decode(raw, path).replace("\r\n", "\n").replace("\r", "\n")


def check_characters(value: Any, where: str, raw: str | None = None) -> None:
    """A JSON value whose escapes made a lone UTF-16 surrogate ("\\ud800"): not a character, so no tokenizer or
    UTF-8 writer takes it (a TypeError deep in the tokenizer). `raw`, the JSON text, is searched for such an escape
    first, so that a row without one is not walked."""
    if raw is not None and not _ESCAPED_SURROGATE.search(raw):
        return
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        escape = f"\\u{ord(e.object[e.start]):04x}"
        raise UserError(f"{where}: the escape {escape} is a lone UTF-16 surrogate, not a character: fix it (an emoji "
                        "is a pair of them, e.g. \\ud83d\\ude00) or remove it") from None


def shipped_file(name: str | Path) -> Path | None:
    """llmfast's own copy of `name`, a relative path under eval/ as a checkout names it (eval/text/persuasion.txt):
    in an installed llmfast, package data read through the package (pyproject's llmfast.eval); in a checkout (on
    PYTHONPATH, or an editable install), the checkout's file. None for any other path or a file not shipped."""
    parts = PurePosixPath(Path(name).as_posix()).parts
    if len(parts) < 2 or parts[0] != "eval" or ".." in parts:
        return None
    package = Path(str(importlib.resources.files("llmfast")))  # a folder: llmfast is never imported from a zip
    for path in (package.joinpath(*parts), package.parent.joinpath(*parts)):
        if path.is_file():
            return path
    return None


def shipped_hint(path: str | Path) -> str:
    """What to do about a recipe's relative `path` that is not found from the working directory but that llmfast
    ships (an installed llmfast, run outside the checkout, with a recipe copied from recipes/): '' otherwise."""
    ours = None if Path(path).is_absolute() else shipped_file(path)
    return f"; llmfast ships this file as {ours}: give that path, or copy it here" if ours else ""
