"""argparse types for numbers that must be positive: a 0 or a negative is the flag's one-line usage error, not a value
passed on (vLLM got `--max-model-len -5`) or dropped (`--tensor-parallel-size 0` ran on one device)."""

from __future__ import annotations

import argparse
import math
from typing import Callable


def positive(kind: type) -> Callable[[str], float]:
    """The converter of `kind` (int or float) that refuses 0, negatives, NaN and inf."""
    def convert(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{text!r}: give a positive number")
        return value
    convert.__name__ = kind.__name__  # argparse names the type in its messages
    return convert


def finite(text: str) -> float:
    """A float that is a number: NaN and inf were sent on (`--temperature nan` went out as JSON NaN)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number")
    return value


finite.__name__ = "float"  # argparse names the type in its messages
