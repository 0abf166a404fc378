"""What a merge method is: its parameters (with their own checks), how it merges one tensor, the registry.

A method is a `MergeMethod` subclass in its own module of this package, registered by name:

    @register("my_method")
    class MyMethod(MergeMethod):
        paper = "..."
        params = (Param("weight", per_input=True), Param("density", default=1.0, low=0.0, high=1.0, per_input=True))

        def merge(self, base, deltas, params, shared, ctx): ...

The package imports every module in it, so adding a method is adding a file. Parameters are declared,
not checked by name elsewhere: `Param.check` casts a value and enforces its range (mergekit's
`ConfigParameterDef` plays the same role). Tensors are numpy arrays: a merge of full models never
imports torch (its import alone took longer than merging the built-in model's tensors).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, TypeVar

from llmfast.registry import Registry
from llmfast.strict import FLOAT32_MAX  # the tensors are merged in float32

if TYPE_CHECKING:
    import numpy as np


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter of a method: its type, default (or REQUIRED), range, and scope.

    `per_input` parameters may differ per model (under a model's `parameters`, or top-level as the
    default for all); the others apply to the whole merge and live only under the top-level `parameters`.
    Both may still vary per tensor through mergekit's filters and gradients.
    """

    name: str
    kind: type = float  # float or bool
    default: Any = REQUIRED
    per_input: bool = False
    low: float | None = None
    high: float | None = None
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def check(self, value: Any) -> Any:
        """The value cast to this parameter's type; ValueError (one line, naming the parameter) when it is not one."""
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"parameter '{self.name}' must be true or false (got {value!r})")
            return value
        if isinstance(value, bool):
            raise ValueError(f"parameter '{self.name}' must be a number (got {value!r})")
        try:
            number = float(value)  # mergekit accepts '1e-3' written as a string
        except (TypeError, ValueError):
            raise ValueError(f"parameter '{self.name}' must be a number (got {value!r})") from None
        if not math.isfinite(number) or abs(number) > FLOAT32_MAX:  # it would fill the model with inf and NaN
            raise ValueError(f"parameter '{self.name}' must be a finite number (got {value!r})")
        if (self.low is not None and number < self.low) or (self.high is not None and number > self.high):
            raise ValueError(f"parameter '{self.name}' must be {_range(self.low, self.high)} (got {value!r})")
        return number


def _range(low: float | None, high: float | None) -> str:
    """The allowed range in words (a parameter may declare one bound only)."""
    if low is not None and high is not None:
        return f"between {low:g} and {high:g}"
    return f"at least {low:g}" if low is not None else f"at most {high:g}"


@dataclasses.dataclass
class TensorContext:
    """What a method may need beyond the values: the tensor's name, the merge's seed, statistics to fill.

    `exact_ties`: break ties at a trim threshold exactly as mergekit's sort does (float32 merges, where its
    outputs are ours bit for bit); otherwise by position, which costs nothing.
    """

    name: str = ""
    seed: int = 0
    stats: dict[str, Any] | None = None
    exact_ties: bool = True


class MergeMethod:
    """One merge method. Subclasses set the class attributes and implement `merge`."""

    name: ClassVar[str] = ""  # set by @register
    paper: ClassVar[str] = ""
    # "raw": `merge` gets whole weights; "delta": task vectors (model - base), None for a zero one.
    domain: ClassVar[Literal["raw", "delta"]] = "delta"
    needs_base: ClassVar[bool] = True
    params: ClassVar[tuple[Param, ...]] = ()
    # True when any block of entries merges to that block of the whole result (no threshold, norm or
    # random stream over the tensor): the merge then runs block by block in cache.
    elementwise: ClassVar[bool] = False

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def shared_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.per_input)

    @property
    def per_input_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.per_input)

    def merge(self, base: "np.ndarray | None", inputs: list[Any], params: list[dict[str, Any]],
              shared: dict[str, Any], ctx: TensorContext) -> "np.ndarray":
        """The merged tensor as a numpy array, in float32 (float64 stays float64); the caller casts to the output dtype.

        `inputs` are whole weights (domain "raw": read-only arrays, possibly views of the files) or task
        vectors (domain "delta", None for a zero one). A task vector is a fresh float array made for this
        call: a method may change it in place. `base` is read-only.
        """
        raise NotImplementedError

    def coefficients(self, params: list[dict[str, Any]], shared: dict[str, Any],
                     is_base: list[bool]) -> list[float] | None:
        """c_i with merged = base + sum(c_i * delta_i), or None when the method is not linear in the task vectors.

        LoRA adapters merged by a linear method can be written as one adapter with their ranks concatenated.
        """
        return None


def _method_problem(name: str, method: MergeMethod) -> str | None:
    """What keeps a registered method from working (Registry's check): the line says what to write instead."""
    cls = type(method)
    if not isinstance(method, MergeMethod):
        return "not a MergeMethod subclass"
    if cls.merge is MergeMethod.merge:
        return "it does not implement merge(self, base, inputs, params, shared, ctx)"
    if cls.domain not in ("raw", "delta"):
        return f"domain must be 'raw' or 'delta' (got {cls.domain!r})"
    names = [getattr(p, "name", None) for p in cls.params]
    if not all(isinstance(p, Param) for p in cls.params) or len(set(names)) < len(names):
        return "params must be a tuple of Param(...) with different names"
    for p in cls.params:
        if p.kind not in (float, bool):
            return f"parameter '{p.name}': kind must be float or bool (got {p.kind!r})"
        try:
            p.required or p.check(p.default)
        except ValueError as e:
            return f"its default does not pass its own declaration: {e}"
    return None


M = TypeVar("M", bound=type[MergeMethod])
METHODS = Registry[MergeMethod]("merge_method", check=_method_problem)


def register(name: str) -> Callable[[M], M]:
    """Class decorator: register one instance of the class under `name` (the name users write in a config)."""

    def add(cls: M) -> M:
        cls.name = name
        METHODS.add(name, cls())
        return cls

    return add


def float_work(t: "np.ndarray") -> "np.ndarray":
    """`t` in the precision merges compute in: float32, or float64 when it is float64 (no copy when it already is)."""
    import numpy as np

    return t if t.dtype in (np.float32, np.float64) else t.astype(np.float32)
