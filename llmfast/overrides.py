"""`--set KEY=VALUE`: every verb's overrides of its recipe. The value is parsed as YAML (`--set lr=2e-4` is a number,
`--set 'eval.tasks=[]'` a list); a dotted key walks mappings and list indices, creating mappings where missing."""

from __future__ import annotations

import json
import re
from typing import Any, Callable

import yaml

from llmfast.errors import UserError


def parse_overrides(pairs: list[str] | None) -> list[tuple[list[str], Any]]:
    out = []
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip() or any(not part for part in key.split(".")):
            raise UserError(f"--set {pair!r}: expected KEY=VALUE with a dotted key, e.g. --set eval.batch_size=8")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if re.search(r"(^|\s)#", raw) and "#" not in yaml.safe_dump(value):  # YAML took the rest for a comment
            raise UserError(f"--set {pair!r}: ' #' starts a comment in YAML, so the value would be {value!r}: quote "
                            f"it, e.g. --set '{key.strip()}=\"{raw.strip()}\"'")
        if isinstance(value, str) and re.search(r"[\r\n]", raw.strip()) and _folded(raw):
            # YAML folds a plain or quoted value's line break into a space: a path holding one named another folder
            raise UserError(f"--set {pair!r}: the value spans lines, which YAML folds into {value!r}: give it as a "
                            f"YAML string with the escape \\n, e.g. --set '{key.strip()}=\"first\\nsecond\"'")
        out.append((key.strip().split("."), value))
    return out


def _folded(raw: str) -> bool:
    """Whether YAML reads `raw` as a plain or quoted scalar (whose line breaks it folds), not a block one (`|`, `>`)."""
    try:
        node = yaml.compose(raw, Loader=yaml.SafeLoader)
    except yaml.YAMLError:  # not YAML: the value is the text as given
        return False
    return isinstance(node, yaml.ScalarNode) and node.style in (None, '"', "'")


def apply_overrides(data: dict[str, Any], overrides: list[tuple[list[str], Any]],
                    expand: dict[str, Callable[[Any], Any]] | None = None) -> set[tuple[str, ...]]:
    """Set each dotted key of `overrides` in `data`; returns the key paths set (a key with dots in it as one part,
    for blaming errors on the `--set`). `expand`: keys whose one-word form stands for a mapping (`quantization:
    nf4`, at any depth: a chain stage's too), turned into that mapping when a key inside it is set."""
    done = set()
    for keys, value in overrides:
        keys = _regroup(data, keys)
        done.add(tuple(keys))
        node: Any = data
        for i, key in enumerate(keys[:-1]):
            if expand and key in expand and isinstance(node, dict) and isinstance(node.get(key), str):
                node[key] = expand[key](node[key])
            node = _child(node, key, keys[: i + 1], create=True)
        last = keys[-1]
        if isinstance(node, list):
            node[_index(node, last, keys)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise UserError(f"--set {'.'.join(keys)}: '{'.'.join(keys[:-1])}' is not a mapping")
    return done


def _regroup(data: Any, keys: list[str]) -> list[str]:
    """A key with dots in it (a chain stage named `base.v1`): where a run of parts joined by dots names a key of the
    mapping, the longest such run is one key (`stages.base.v1.with.x`)."""
    out: list[str] = []
    node, i = data, 0
    while i < len(keys):
        part, i = keys[i], i + 1
        if isinstance(node, dict):  # the longest first: `base.v1` over a stage named `base`
            for j in range(len(keys), i - 1, -1):
                if ".".join(keys[i - 1: j]) in node:
                    part, i = ".".join(keys[i - 1: j]), j
                    break
        out.append(part)
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            node = None
    return out


def _index(node: list[Any], key: str, keys: list[str]) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise UserError(f"--set {'.'.join(keys)}: '{key}' is not an index of a list of {len(node)} items")
    return int(key)


def _child(node: Any, key: str, keys: list[str], create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, key, keys)]
    if not isinstance(node, dict):
        raise UserError(f"--set {'.'.join(keys)}: '{'.'.join(keys[:-1])}' is not a mapping")
    if key not in node or node[key] is None:
        node[key] = {}
    return node[key]


def flag_overrides(overrides: list[str], flags: dict[str, str | None]) -> list[str]:
    """`overrides` (--set KEY=VALUE), then each flag given (`--output X` as output=X), its value as text whatever YAML
    would make of it (a folder named 1.5, an output named 2024-01-03)."""
    return [*overrides, *(f"{k}={json.dumps(v)}" for k, v in flags.items() if v)]


def blamed_on_flags(e: UserError, flags: dict[str, str | None]) -> UserError:
    """`e` blaming the flag the user typed (`(--output)`), not the --set it became (`(--set output)`)."""
    said = str(e)
    for key, value in flags.items():
        if value:
            said = said.replace(f"(--set {key})", f"(--{key})")
    return UserError(said)
