"""Which `architectures` vLLM has a class for, known without importing vLLM (its model registry costs ~7 s).

vLLM picks a model's class from config.json's `architectures` only when its server has started (~30 s on a CPU),
and an unknown name then fails deep inside the start. Its in-tree names are dict literals in the installed
vllm/model_executor/models/registry.py (architecture -> (module, class)), merged into `_VLLM_MODELS`: read here
with `ast`, never executed. Plugins add names only when vLLM runs them: ours (vllm_plugin.ARCHITECTURE) is known;
another installed `vllm.general_plugins` entry point may register any name, so with one the answer is "unknown".
Whatever cannot be read (vLLM absent, its source changed shape) is "unknown" too: the caller then leaves the
model to vLLM, as before.

vLLM also serves a name it lacks through its Transformers backend (`model_impl` auto) when transformers has that
class; and it maps a name's task suffix onto a known name (FooForSequenceClassification -> FooForCausalLM).
`unserved_architecture` follows those rules, so it refuses only names vLLM would refuse too. The backend would also
import the class config.json's `auto_map` names from the folder, but only under --trust-remote-code, which llmfast
never passes (vllm_flags.REMOTE_CODE): such a name is refused before the start, where vLLM failed after it.
"""

from __future__ import annotations

import ast
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

MERGED = "_VLLM_MODELS"  # registry.py's dict of every in-tree architecture
# vLLM's task suffixes, in its order (vllm/config/model.py _SUFFIX_TO_DEFAULTS): a name ending in one is also looked
# up with each of the others in its place
SUFFIXES = ("ForCausalLM", "ForConditionalGeneration", "ChatModel", "LMHeadModel", "ForTextEncoding", "EmbeddingModel",
            "ForSequenceClassification", "ForTokenClassification", "ForAudioClassification", "ForImageClassification",
            "ForVideoClassification", "ClassificationModel", "ForRewardModeling", "RewardModel", "Model")


def registry_source() -> Path | None:
    """The installed vLLM's registry.py, found without importing vLLM (find_spec of a submodule would import its
    parent packages: vLLM itself)."""
    from importlib.util import find_spec

    try:
        spec = find_spec("vllm")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model_executor" / "models" / "registry.py"
    return path if path.is_file() else None


def _dict_keys(node: ast.expr, named: dict[str, ast.expr]) -> set[str]:
    """The string keys of a dict literal, following `**OTHER` into the module's other dicts; ValueError for any
    other shape (a comprehension spreads names already listed, and is skipped)."""
    if not isinstance(node, ast.Dict):
        raise ValueError(f"not a dict literal: {ast.dump(node)[:60]}")
    keys: set[str] = set()
    for key, value in zip(node.keys, node.values):
        if key is None:  # **spread
            if isinstance(value, ast.Name):
                keys |= _dict_keys(named[value.id], named)
            elif not isinstance(value, ast.DictComp):
                keys |= _dict_keys(value, named)
        elif isinstance(key, ast.Constant) and isinstance(key.value, str):
            keys.add(key.value)
        else:
            raise ValueError("a key that is not a string literal")
    return keys


def in_tree_architectures(source: Path) -> frozenset[str]:
    """The architecture names of vLLM's `_VLLM_MODELS` in `source`; ValueError/KeyError/SyntaxError if its shape
    changed."""
    tree = ast.parse(source.read_text(encoding="utf-8"))
    named: dict[str, ast.expr] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            named[stmt.targets[0].id] = stmt.value
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            named[stmt.target.id] = stmt.value
    names = frozenset(_dict_keys(named[MERGED], named))
    if "LlamaForCausalLM" not in names:  # read something, but not the registry we know
        raise ValueError(f"{source}: {MERGED} has no LlamaForCausalLM")
    return names


def _loaded(name: str) -> bool:
    """Whether vLLM runs the general plugin `name`: all of them, or only those VLLM_PLUGINS lists when it is set."""
    given = os.environ.get("VLLM_PLUGINS")
    return given is None or name in [p.strip() for p in given.split(",")]


def plugin_architectures() -> frozenset[str] | None:
    """The names the plugins vLLM would load register: ours, or None when another plugin (one that is not vLLM's
    own) would load, since it may register any name."""
    from importlib.metadata import entry_points

    from llmfast.serve.vllm_plugin import ARCHITECTURE, register

    ours = f"{register.__module__}:{register.__name__}"
    names: set[str] = set()
    for ep in entry_points(group="vllm.general_plugins"):
        if not _loaded(ep.name) or ep.value.startswith("vllm."):  # vLLM's own: LoRA resolvers, no models
            continue
        if ep.value != ours:
            return None
        names.add(ARCHITECTURE)
    return frozenset(names)


@lru_cache(maxsize=1)
def vllm_architectures() -> frozenset[str] | None:
    """Every architecture the installed vLLM (with its plugins) has a class for, or None when it cannot be known."""
    source = registry_source()
    if source is None:
        return None
    try:
        in_tree = in_tree_architectures(source)
    except (OSError, SyntaxError, ValueError, KeyError, RecursionError):
        return None
    plugins = plugin_architectures()
    return None if plugins is None else in_tree | plugins


def _known(arch: str, known: frozenset[str]) -> bool:
    """vLLM's lookup of one name: itself, or (for the first task suffix it ends with) any suffix in its place."""
    if arch in known:
        return True
    suffix = next((s for s in SUFFIXES if arch.endswith(s)), None)
    return suffix is not None and any(arch.replace(suffix, other) in known for other in SUFFIXES)


def _in_transformers(arch: str) -> bool:
    """Whether transformers has a class by that name (vLLM's Transformers backend may then serve it), looked up in
    transformers' lazy index without importing the class."""
    import transformers

    index = getattr(transformers, "_class_to_module", None)
    return arch in index if isinstance(index, dict) else hasattr(transformers, arch)


def unserved_architecture(config: dict[str, Any], extra_args: list[str] | None = None) -> str | None:
    """The architecture of `config` (a config.json) vLLM has no class for, or None when vLLM has one, or may.
    `extra_args`: vLLM's flags; one that chooses the class itself (vllm_flags.class_flag, as vLLM's parser reads
    it) leaves the choice to vLLM."""
    from llmfast.serve.vllm_flags import class_flag, given

    named = config.get("architectures")
    if not isinstance(named, list) or not named or not all(isinstance(a, str) for a in named):
        return None  # no names (the caller's own refusal) or a shape the loaders name
    if class_flag(given(extra_args or [])):
        return None
    known = vllm_architectures()
    if known is None or any(_known(a, known) for a in named) or _in_transformers(named[0]):
        return None
    return named[0]
