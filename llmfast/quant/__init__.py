"""Quantization methods behind one registry (see quant/base.py); importing this package registers them all.

Light to import: each method imports torch and its library inside functions.
"""

from llmfast.quant import bitnet, bnb4, w4  # noqa: F401  (registers the methods)
from llmfast.quant.base import (
    DEFAULT_METHOD,
    QUANTIZERS,
    QuantConfigBase,
    Quantizer,
    QuantSpec,
    coerce_quantization,
    engines_for,
    manifest_quantization,
    parse_quantization,
)

__all__ = ["DEFAULT_METHOD", "QUANTIZERS", "QuantConfigBase", "Quantizer", "QuantSpec", "coerce_quantization",
           "engines_for", "manifest_quantization", "parse_quantization", "is_quantized_format"]


def is_quantized_format(word: str) -> bool:
    """Whether `word` names a quantized format (a method or one of its shorthands): not a dtype to merge into."""
    from llmfast.quant.base import _words

    return word.lower() in _words()
