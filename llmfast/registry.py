"""Named extension points: merge methods, quantizers, sparsifiers, bench engines, optimizers.

A technique is one module that registers itself under the name a user writes in a recipe or on the
command line:

    METHODS = Registry[MergeMethod]("merge method")

    @METHODS.register("ties")
    class Ties(MergeMethod): ...

`get(name)` answers an unknown name with one `UserError` line that lists the known names and suggests
the closest one; `names()` feeds error messages and the `--help` texts that list names. Registries hold light
objects: a module that registers must not import torch at import time, so listing names stays instant.

A contributor's mistake in a registering module (a name taken twice, a missing method its registry's `check`
asks for, a heavy library imported at module level) is one `UserError` line naming the module's file, raised
as it registers: the CLI prints that line instead of a traceback from deep inside the first verb that uses it.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Generic, Iterator, TypeVar

from llmfast.errors import UserError

T = TypeVar("T")

# Libraries whose import takes seconds (or starts threads): never imported at a registering module's top level.
HEAVY = frozenset({"torch", "transformers", "peft", "vllm", "bitsandbytes", "accelerate", "triton", "datasets",
                   "numpy"})
_ROOT = Path(__file__).resolve().parent.parent  # the folder holding the llmfast package


def _origin(obj: Any) -> tuple[str, str]:
    """The module and qualified name that define `obj` (a class or function), or its class (an instance)."""
    owner = obj if isinstance(obj, type) or callable(obj) and hasattr(obj, "__qualname__") else type(obj)
    return getattr(owner, "__module__", "?"), getattr(owner, "__qualname__", type(obj).__name__)


def source_file(obj: Any) -> str:
    """The file that defines `obj`, relative to the package's folder where it lies below it (for messages)."""
    module = sys.modules.get(_origin(obj)[0])
    file = getattr(module, "__file__", None)
    if not file:
        return _origin(obj)[0]
    path = Path(file).resolve()
    return str(path.relative_to(_ROOT)) if path.is_relative_to(_ROOT) else str(path)


def heavy_import(obj: Any) -> str | None:
    """A heavy library the module defining `obj` has imported at its top level so far (as a module, or a class or
    function taken from one), as the line says it; None when it has none."""
    module = sys.modules.get(_origin(obj)[0])
    for name, value in vars(module).items() if module is not None else ():
        source = value.__name__ if isinstance(value, ModuleType) else getattr(value, "__module__", None)
        if isinstance(source, str) and source.split(".")[0] in HEAVY:
            return f"`{name}` ({source})"
    return None


def class_problem(name: str, cls: Any, base: type, config_base: type,
                  implements: tuple[tuple[str, str], ...] = ()) -> str | None:
    """What keeps a class registered under `name` from working, for registries of classes with a settings schema
    (quantizers, sparsifiers): a subclass of `base`, overriding each of `implements` ((attribute, its signature)),
    whose Config subclasses `config_base`, and named `name`; a class without `name` gets it."""
    if not (isinstance(cls, type) and issubclass(cls, base)):
        return f"register a {base.__name__} subclass (the class, not an instance)"
    for attr, signature in implements:
        if getattr(cls, attr) is getattr(base, attr):
            return f"it does not implement {signature}"
    if not (isinstance(cls.Config, type) and issubclass(cls.Config, config_base)):
        return f"its Config must subclass {config_base.__name__} (it refuses unknown keys)"
    if getattr(cls, "name", name) != name:
        return f"its name is '{cls.name}': register it under that name, or set name = '{name}'"
    cls.name = name
    return None


def did_you_mean(name: str, known: list[str]) -> str:
    """' (did you mean 'x'?)' for the closest known name, or '' when none is close."""
    hint = difflib.get_close_matches(str(name), known, n=1)
    return f" (did you mean '{hint[0]}'?)" if hint else ""


class Registry(Generic[T]):
    """Names to objects of one kind, filled by `@register(name)` in the modules that define them."""

    def __init__(self, kind: str, check: Callable[[str, T], str | None] | None = None) -> None:
        """`check(name, obj)`: what is wrong with an object registered here (a missing method), or None."""
        self.kind = kind
        self._check = check
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under `name` (a second object of that name is a bug)."""

        def add(obj: T) -> T:
            self.add(name, obj)
            return obj

        return add

    def add(self, name: str, obj: T) -> None:
        """Register `obj` as `name`; a mistake in the registering module is one UserError line naming its file."""
        where = source_file(obj)
        old = self._items.get(name)
        if old is not None and old is not obj:
            first, second = sorted([(source_file(old), _origin(old)[1]), (where, _origin(obj)[1])])
            raise UserError(f"{self.kind} '{name}' is registered twice, by {first[1]} in {first[0]} and by "
                            f"{second[1]} in {second[0]}: give one of them another name")
        # Only the package's own modules: a user's script or notebook registering a method may import what it likes.
        if where.startswith("llmfast/") and (heavy := heavy_import(obj)):
            raise UserError(f"{where} imports {heavy} at import time: import it inside the functions that use it, "
                            "so that listing names (`--help`, recipe errors) stays instant")
        if self._check is not None and (problem := self._check(name, obj)):
            raise UserError(f"{where}: {self.kind} '{name}' ({_origin(obj)[1]}): {problem}")
        self._items[name] = obj

    def get(self, name: str, where: str = "") -> T:
        """The object named `name`; an unknown name is a one-line error. `where` prefixes it (file:line, key)."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            prefix = f"{where}: " if where else ""
            raise UserError(f"{prefix}unknown {self.kind} '{name}'{did_you_mean(str(name), self.names())}; "
                            f"choose from {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(sorted(self._items.items()))

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._items
        except TypeError:  # a list or mapping where a recipe wants a name (`method: [w4]`): not one of ours
            return False

    def __len__(self) -> int:
        return len(self._items)
