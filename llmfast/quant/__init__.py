"""Quantization methods behind one registry (see quant/base.py); importing this package registers them all.

Light to import: each method imports torch and its library inside functions.
"""

from pathlib import Path

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
    quantization_mapping,
)

__all__ = ["DEFAULT_METHOD", "QUANTIZERS", "QuantConfigBase", "Quantizer", "QuantSpec", "coerce_quantization",
           "engines_for", "manifest_quantization", "parse_quantization", "quantization_mapping", "is_quantized_format",
           "already_quantized"]


def already_quantized(model_dir: Path) -> str | None:
    """The method a model directory is already quantized with (from llmfast.json or config.json), or None."""
    import json

    from llmfast.artifacts import read_manifest

    spec = manifest_quantization(read_manifest(model_dir), model_dir)
    if spec is not None:
        return spec.method
    try:
        qc = json.loads((model_dir / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(qc, dict):
        return None
    # transformers writes quant_method bitsandbytes (older ones none) for its 8-bit LLM.int8 checkpoints too, which
    # bnb4 (config name bitsandbytes) does not read: named apart, so that verbs taking bnb4 checkpoints refuse them
    if qc.get("load_in_8bit") is True and qc.get("load_in_4bit") is not True and qc.get("quant_method") in (
            "bitsandbytes", None):
        return "bitsandbytes 8-bit"
    return qc.get("quant_method")


def is_quantized_format(word: str) -> bool:
    """Whether `word` names a quantized format (a method or one of its shorthands): not a dtype to merge into."""
    from llmfast.quant.base import _words

    return word.lower() in _words()
