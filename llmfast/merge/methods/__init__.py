"""Merge methods, one module per method (or family), each registering itself in `METHODS`.

Importing this package imports every module in it, so a new method is a new file here and nothing
else: its name appears in `llmfast merge --help`, config errors and the conformance test. See
`base.py` for the interface and docs/merge.md for an example.
"""

from __future__ import annotations

import importlib
import pkgutil

from llmfast.merge.methods.base import METHODS, MergeMethod, Param, TensorContext, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "MergeMethod", "Param", "TensorContext", "register"]
