"""What every recipe schema adds to pydantic's lax parsing: a YAML boolean is not a number.

pydantic accepts `true` for an int or float field (it becomes 1), so `--set data.window=true` calibrated on windows
of one token and `--set quantization.iters=true` ran one step, both without a word. The schemas' bases (recipe.py's
StrictModel, the sparsity and quantization methods' settings) run `no_bool_numbers` before validating, which hands
such a value on as the text `true`/`false`: the field then refuses it in its own words, blamed on the key and line.
A whole number given for a path (`--set output=2024`) is taken as that folder's name.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any


def _kinds(annotation: Any) -> set[type]:
    """The plain types a field annotation accepts (through Annotated, unions, Optional)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _kinds(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_kinds(a) for a in typing.get_args(annotation)))
    if origin is typing.Literal:
        return {type(a) for a in typing.get_args(annotation)}
    return {annotation} if isinstance(annotation, type) else set()


def no_bool_numbers(cls: Any, data: Any) -> Any:
    """A model's before-validator (see the module's docstring)."""
    if not isinstance(data, dict):
        return data
    fixed = None
    for name, field in cls.model_fields.items():
        key = field.alias or name
        value = data.get(key)
        if value is None:
            continue
        kinds = _kinds(field.annotation)
        if isinstance(value, bool) and bool not in kinds and kinds & {int, float}:
            fixed = fixed if fixed is not None else dict(data)
            fixed[key] = str(value).lower()
        elif type(value) is int and Path in kinds and not kinds & {int, float}:
            fixed = fixed if fixed is not None else dict(data)
            fixed[key] = str(value)
    return data if fixed is None else fixed
