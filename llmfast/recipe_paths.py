"""The path fields of recipes: inputs that must exist and be readable (a file, or a file or a folder), outputs with
`~` expanded as a shell does, and results files that must not name a folder."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field

from llmfast.artifacts import MAX_OUTPUT_NAME


# What one name of a path may hold: Linux's NAME_MAX (255 bytes); a longer one was a traceback (File name too long)
# from the first stat() of the path, deep in a verb. The whole path's limit (PATH_MAX) is the file system's to say.
NAME_MAX = 255


def _a_name(value: Any) -> Any:
    """A before-validator of every path field: '' was read as Path('.'), the working folder (`data.train: ''` took
    the folder as the data, `output: ''` wrote into it); a name longer than a file system takes was a traceback."""
    if isinstance(value, str) and not value.strip():
        raise ValueError("an empty name: give a file or folder name")
    # os.fsencode: a name in another encoding (Latin-1 on disk) reaches Python with surrogates, which str.encode
    # refuses; its bytes on disk are what the file system counts
    parts = Path(value).parts if isinstance(value, (str, Path)) else ()
    long = max((len(os.fsencode(n)) for n in parts), default=0)
    if long > NAME_MAX:
        raise ValueError(f"a name in this path is {long} bytes: a file system takes at most {NAME_MAX} per name")
    return value


def _must_exist(kind: str) -> Any:
    """A validator: the path exists (as a file, for kind 'file'), relative to the working directory."""

    def check(p: Path) -> Path:
        p = p.expanduser()
        if kind == "file" and p.is_dir():
            raise ValueError(f"{p} is a folder: give a file")
        if kind == "file" and p.exists() and not p.is_file():
            raise ValueError(f"{p} is not a regular file (a pipe or a device): give a file")
        if not (p.is_file() if kind == "file" else p.exists()):
            from llmfast.data.text import shipped_hint  # eval/... of a recipe copied from recipes/, run elsewhere

            raise ValueError(f"{kind + ' ' if kind else ''}not found: {p} "
                             f"(paths are relative to the directory you run llmfast from){shipped_hint(p)}")
        # Checked here so the error blames the recipe's line, not a traceback from deep inside the verb.
        # a folder's files are opened by name, which needs only its X bit
        if not os.access(p, os.X_OK if p.is_dir() else os.R_OK):
            raise ValueError(f"{p}: no permission to read it: make it readable for this user (chmod) or give a copy")
        return p

    return AfterValidator(check)


ExistingFile = Annotated[Path, BeforeValidator(_a_name), _must_exist("file")]
# Where a verb writes: `~` is the user's home, as in a shell (every file of the run goes there, not to a `./~`).
OutputPath = Annotated[Path, BeforeValidator(_a_name), AfterValidator(lambda p: p.expanduser())]


def _a_file(value: Any) -> Any:
    # Path() drops a trailing slash: `--output results/` wrote a file named `results`
    if isinstance(value, str) and value.endswith(("/", os.sep)):
        raise ValueError(f"{value} names a folder: give a file path for the results, e.g. {value}results.json")
    return value


def _results_name(p: Path) -> Path:
    # eval writes NAME's predictions beside it (STEM.predictions.jsonl), each through a temporary .NAME.tmp-PID-…:
    # a name of 222-255 bytes passed the file system's limit, then failed on those after the whole run
    size = len(os.fsencode(p.name))
    if size > MAX_OUTPUT_NAME:
        raise ValueError(f"its name is {size} bytes, and files named after it are written beside "
                         f"it (STEM.predictions.jsonl, .NAME.tmp-…): give a name of at most {MAX_OUTPUT_NAME} bytes")
    return p.expanduser()


ResultsPath = Annotated[Path, BeforeValidator(_a_name), BeforeValidator(_a_file), AfterValidator(_results_name)]
ExistingPath = Annotated[Path, BeforeValidator(_a_name), _must_exist("")]  # a file or a directory
# A model: builtin:NAME, a folder, a .gguf or a hub id, resolved later (models.py); '' was the working folder
ModelName = Annotated[str, BeforeValidator(_a_name)]


def _file_name_part(value: str) -> str:
    # a bench variant's name is part of its log and quality file names in the output folder (hf-NAME-cN.log,
    # quality-NAME.predictions.jsonl): no '/', '..', '', NUL or newline reaches a path, and the longest of them fits
    # the file system's 255 bytes (a 250-byte name ran, then every point failed on its log: File name too long)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
        raise ValueError("it names files in the output folder: use letters, digits, '.', '_' or '-', starting with a "
                         "letter or digit")
    if len(value.encode()) > MAX_OUTPUT_NAME:
        raise ValueError(f"{len(value.encode())} bytes, and it names files in the output folder: give a name of at "
                         f"most {MAX_OUTPUT_NAME} bytes")
    return value


FileNamePart = Annotated[str, AfterValidator(_file_name_part)]


def _a_list_not_commas(value: Any) -> Any:
    # LLaMA-Factory's `dataset: a,b` names two; here that is one file's name, not found: say how to write two
    if isinstance(value, str) and "," in value and not Path(value).expanduser().exists():
        listed = ", ".join(p.strip() for p in value.split(","))
        raise ValueError(f"not found: {value}: several files are a YAML list, [{listed}] (in --set too)")
    return value


# One file or folder of rows, or a list of them read in turn (finetune's data.train / data.eval)
Paths = Annotated[ExistingPath | Annotated[list[ExistingPath], Field(min_length=1)],
                  BeforeValidator(_a_list_not_commas)]


def one_or_list(value: Any) -> Any:
    """A before-validator: one path given where a list of them is taken."""
    return [value] if isinstance(value, (str, Path)) else value


def paths_of(value: Path | list[Path] | None) -> list[Path]:
    """The paths a `Paths` value names, in order."""
    return [] if value is None else list(value) if isinstance(value, list) else [value]
