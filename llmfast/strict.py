"""What every recipe schema adds to pydantic's lax parsing: a YAML boolean is not a number.

pydantic accepts `true` for an int or float field (it becomes 1), so `--set data.window=true` calibrated on windows
of one token and `--set quantization.iters=true` ran one step, both without a word (entries of a list of numbers
too: `max_concurrency: [true]`). The schemas' bases (recipe.py's StrictModel, the sparsity and quantization
methods' settings) run `no_bool_numbers` before validating, which hands such a value on as the text `true`/`false`:
the field then refuses it in its own words, blamed on the key and line.
A whole number given for a path (`--set output=2024`) is taken as that folder's name.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field

# A seed every library the kit seeds takes: numpy's legacy seeding (transformers' set_seed, which AutoRound calls)
# takes 0 to 2**32 - 1, and torch.manual_seed overflows beyond 2**64 (both were tracebacks, from a recipe's seed).
SEED_MAX = 2**32 - 1
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]

# The largest count (a LoRA rank, samples to write) that torch's sizes and C loops take: past it 1e30 overflowed
# them (tracebacks), and at it the out-of-memory line already speaks.
COUNT_MAX = 2**31 - 1

# The training here runs in float32: below its smallest normal number a learning rate (AdamW, AutoRound's signed
# steps) or a clip norm (torch's coefficient max_norm / (norm + 1e-6)) rounds every update to nothing, and 1e-300
# wrote the untrained model with exit 0; past its largest, inf.
FLOAT32_TINY = 1.1754943508222875e-38
FLOAT32_MAX = 3.4028234663852886e38


def _applicable(what: str) -> Any:
    def check(value: float) -> float:
        if not value >= FLOAT32_TINY:
            raise ValueError(f"must be at least {FLOAT32_TINY:.3g} (float32's smallest normal number: {what} rounds "
                             "every update to nothing and no weight changes)")
        return value

    return AfterValidator(check)


def _finite_in_float32(value: float) -> float:
    # 1e300 passed as a rate: float32 made it inf, and the run stopped at its first step, after loading the model and
    # writing its output folder, where this key's line says it before anything runs
    if value > FLOAT32_MAX:
        raise ValueError(f"must be at most {FLOAT32_MAX:.4g} (float32's largest number: a larger rate is inf)")
    return value


LearningRate = Annotated[float, _applicable("a smaller rate"), AfterValidator(_finite_in_float32)]
ClipNorm = Annotated[float, _applicable("clipping to a smaller norm")]


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


def _items(annotation: Any) -> Any:
    """The element annotation of a list field (list[int], Annotated[list[...], ...], Optional), else None."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _items(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        found = [i for i in (_items(a) for a in typing.get_args(annotation)) if i is not None]
        return found[0] if found else None
    return typing.get_args(annotation)[0] if origin is list and typing.get_args(annotation) else None


def _fixed(value: Any, annotation: Any) -> Any:
    """`value` as the field should see it: a boolean for a number as text, a whole number for a path as text."""
    kinds = _kinds(annotation)
    if isinstance(value, bool) and bool not in kinds and kinds & {int, float}:
        return str(value).lower()
    if type(value) is int and Path in kinds and not kinds & {int, float}:
        return str(value)
    items = _items(annotation)
    if isinstance(value, list) and items is not None:
        return [_fixed(v, items) for v in value]
    return value


def no_bool_numbers(cls: Any, data: Any) -> Any:
    """A model's before-validator (see the module's docstring); list fields' entries too."""
    if not isinstance(data, dict):
        return data
    fixed = None
    for name, field in cls.model_fields.items():
        key = field.alias or name
        if data.get(key) is None:
            continue
        value = _fixed(data[key], field.annotation)
        if value != data[key] or type(value) is not type(data[key]):  # a new list equal to the old one: unchanged
            fixed = fixed if fixed is not None else dict(data)
            fixed[key] = value
    return data if fixed is None else fixed
