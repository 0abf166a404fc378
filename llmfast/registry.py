"""Named extension points: merge methods, quantizers, sparsifiers, bench engines, optimizers.

A technique is one module that registers itself under the name a user writes in a recipe or on the
command line:

    METHODS = Registry[MergeMethod]("merge method")

    @METHODS.register("ties")
    class Ties(MergeMethod): ...

`get(name)` answers an unknown name with one `UserError` line that lists the known names and suggests
the closest one; `names()` feeds `--help` texts and error messages. Registries hold light objects: a
module that registers must not import torch at import time, so listing names stays instant.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from llmfast.errors import UserError

T = TypeVar("T")


def did_you_mean(name: str, known: list[str]) -> str:
    """' (did you mean 'x'?)' for the closest known name, or '' when none is close."""
    hint = difflib.get_close_matches(str(name), known, n=1)
    return f" (did you mean '{hint[0]}'?)" if hint else ""


class Registry(Generic[T]):
    """Names to objects of one kind, filled by `@register(name)` in the modules that define them."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under `name` (a second object of that name is a bug)."""

        def add(obj: T) -> T:
            self.add(name, obj)
            return obj

        return add

    def add(self, name: str, obj: T) -> None:
        if name in self._items and self._items[name] is not obj:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
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
