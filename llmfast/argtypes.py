"""argparse types for numbers that must be positive, or finite: a 0, a negative or a NaN is the flag's one-line usage
error, not a value passed on (vLLM got `--max-model-len -5`) or dropped (`--tensor-parallel-size 0` ran on one
device)."""

from __future__ import annotations

import argparse
import math
from typing import Callable


def _number(kind: type, text: str) -> float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None


def positive(kind: type) -> Callable[[str], float]:
    """The converter of `kind` (int or float) that refuses 0, negatives, NaN and inf."""
    def convert(text: str) -> float:
        value = _number(kind, text)
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{text!r}: give a positive number")
        return value
    convert.__name__ = kind.__name__  # argparse names the type in its messages
    return convert


def finite(text: str) -> float:
    """A float that is a number: NaN and inf were sent on (`--temperature nan` went out as JSON NaN)."""
    value = _number(float, text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number")
    return value


finite.__name__ = "float"  # argparse names the type in its messages
