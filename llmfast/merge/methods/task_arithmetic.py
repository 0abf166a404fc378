"""task_arithmetic, and the generalized task arithmetic that TIES, DARE and magnitude pruning build on.

Ilharco et al. 2023, "Editing Models with Task Arithmetic", https://arxiv.org/abs/2212.04089.

Semantics follow mergekit 0.1.5 so configs give the same model: the task-vector methods work on
delta = model - base, trim or drop each delta (`sparsify`), multiply it by its weight, optionally keep only
the entries whose sign agrees with the sign of the weighted sum (`consensus`, TIES's election by total
mass), add, optionally divide by the weight mass that agreed (`normalize`), multiply by `lambda` and add
the result to the base. The operations and their order are mergekit's, so float32 results agree bit for
bit: numpy's element-wise float32 operations round exactly as torch's. Every computation runs in
float32 (float64 stays float64).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from llmfast.merge.methods.base import MergeMethod, Param, TensorContext, float_work, register
from llmfast.merge.methods.sparsify import drop_at_random, kept_count, trim

if TYPE_CHECKING:
    import numpy as np

WEIGHT = Param("weight", per_input=True, help="scale of this model's task vector")
DENSITY = Param("density", default=1.0, per_input=True, low=0.0, high=1.0, help="fraction of the task vector kept")


def merge_wide(normalize: bool, rescale: bool) -> tuple[Param, ...]:
    """The merge-wide parameters every task-vector method takes, with this method's defaults."""
    return (Param("normalize", bool, normalize, help="divide by the weight mass (that agreed, with consensus)"),
            Param("rescale", bool, rescale, help="scale kept entries so each task vector keeps its L1 norm"),
            Param("lambda", default=1.0, help="scale of the summed task vectors"),
            Param("int8_mask", bool, False, help="accepted for mergekit configs; no effect on the result"))


class GeneralizedTaskArithmetic(MergeMethod):
    """Sparsify, weight, elect signs, add, normalize: subclasses pick `sparsify` and `consensus`."""

    sparsify: ClassVar[Literal["magnitude", "random"] | None] = None
    consensus: ClassVar[bool] = False

    @property
    def elementwise(self) -> bool:  # type: ignore[override]
        return self.sparsify is None and not self.consensus  # trims, drops and elections look at whole tensors

    def merge(self, base: "np.ndarray | None", inputs: list[Any], params: list[dict[str, Any]],
              shared: dict[str, Any], ctx: TensorContext) -> "np.ndarray":
        import numpy as np

        assert base is not None
        weighted: list[np.ndarray] = []
        weights: list[float] = []
        for i, (delta, p) in enumerate(zip(inputs, params)):
            if delta is None:  # a zero task vector (an adapter that does not touch this tensor)
                continue
            delta = float_work(delta)
            self._sparsify(delta, p.get("density", 1.0), bool(shared.get("rescale", False)), ctx, i)
            if p["weight"] != 1:  # x * 1 is x exactly: skip the pass
                np.multiply(delta, p["weight"], out=delta)
            weighted.append(delta)
            weights.append(p["weight"])
        return combine(self.consensus, weighted, weights, float_work(base), params, shared)

    def _sparsify(self, delta: "np.ndarray", density: float, rescale: bool, ctx: TensorContext, i: int) -> None:
        """Trim or drop entries of `delta` in place; count kept/nonzero entries into ctx.stats."""
        import numpy as np

        if self.sparsify is None or density >= 1:
            return
        values = delta.reshape(-1)
        nonzero = int(np.count_nonzero(values))
        before = _l1(values) if rescale else None
        if self.sparsify == "magnitude":
            trim(values, density, ctx.exact_ties, nonzero)
            kept = kept_count(nonzero, density, values.size)
        else:
            drop_at_random(values, density, ctx.seed, ctx.name, i)
            kept = int(np.count_nonzero(values))
        if ctx.stats is not None:
            ctx.stats["nonzero"] = ctx.stats.get("nonzero", 0) + nonzero
            ctx.stats["kept"] = ctx.stats.get("kept", 0) + kept
        if before is not None:
            after = _l1(values)
            if rescales(before, after):
                np.multiply(values, values.dtype.type(before / after), out=values)

    def coefficients(self, params: list[dict[str, Any]], shared: dict[str, Any],
                     is_base: list[bool]) -> list[float] | None:
        if self.sparsify is not None or self.consensus:
            return None
        norm = normalize_divisor(params) if shared["normalize"] else 1.0
        return [float(p["weight"]) / norm * shared["lambda"] for p in params]


def combine(consensus: bool, weighted: list["np.ndarray"], weights: list[float], work: "np.ndarray",
            params: list[dict[str, Any]], shared: dict[str, Any]) -> "np.ndarray":
    """The merge of the sparsified, weighted task vectors onto `work` (the base in float): add, elect signs
    (`consensus`), normalize, scale by lambda. Element-wise: a block of the inputs gives that block of the result.
    `weighted` may be changed in place."""
    import numpy as np

    if not weighted:
        return work
    if consensus:  # the election needs the weighted task vectors apart from their sum
        mixed = np.add(weighted[0], weighted[1]) if len(weighted) > 1 else weighted[0].copy()
        rest = weighted[2:]
    else:  # the sum may take the first task vector's memory
        mixed, rest = weighted[0], weighted[1:]
    for d in rest:
        np.add(mixed, d, out=mixed)
    divisor: Any = None
    if consensus:
        divisor = _elect_signs(mixed, weighted, weights)
    if shared["normalize"]:
        if divisor is None:
            divisor = normalize_divisor(params)
        np.divide(mixed, divisor, out=mixed)
    if shared["lambda"] != 1:
        np.multiply(mixed, shared["lambda"], out=mixed)
    return np.add(mixed, work, out=mixed)


def normalize_divisor(params: list[dict[str, Any]]) -> float:
    """What `normalize` divides by without a sign election: every model's weight, a zero task vector's too (mergekit
    divides by them all), or 1 where they sum to ~0."""
    total = sum(p["weight"] for p in params)
    return total if abs(total) >= 1e-8 else 1.0


def rescales(before: float, after: float) -> bool:
    """Whether a dropped task vector is scaled back to its L1 norm: mergekit leaves near-empty ones unscaled."""
    return before >= 1e-7 and after >= 1e-7


def _l1(values: "np.ndarray") -> float:
    """The L1 norm, summed in float64 (mergekit sums in float32; DARE's drop differs between the tools anyway)."""
    import numpy as np

    return float(np.abs(values).sum(dtype=np.float64))


# numpy's ufunc buffer (np.getbufsize()): a float32 array summed in float64 is cast and summed this many at a time
_SUM_CHUNK = 8192


class L1Sum:
    """`_l1` of a float32 array fed a block at a time, with its bits. numpy casts such a sum to float64 a buffer of
    8192 entries at a time, sums each buffer pairwise and adds the buffers' sums in order; here the same, with a
    partial buffer carried between blocks (blocks of any size). A different grouping would change the float64 sum
    and, rarely, the float32 rescale factor made from it (tested against `_l1`)."""

    def __init__(self) -> None:
        import numpy as np

        self.total = 0.0
        self._carry = np.empty(_SUM_CHUNK, dtype=np.float32)
        self._filled = 0

    def add(self, mag: "np.ndarray") -> None:
        """Add the magnitudes `mag` (a flat float32 array of nonnegative values: |x| already taken)."""
        import numpy as np

        at = 0
        if self._filled:
            at = min(_SUM_CHUNK - self._filled, mag.size)
            self._carry[self._filled: self._filled + at] = mag[:at]
            self._filled += at
            if self._filled < _SUM_CHUNK:
                return
            self.total += float(np.add.reduce(self._carry, dtype=np.float64))
            self._filled = 0
        whole = (mag.size - at) // _SUM_CHUNK * _SUM_CHUNK
        if whole:
            for part in mag[at: at + whole].reshape(-1, _SUM_CHUNK).sum(axis=1, dtype=np.float64).tolist():
                self.total += part  # in order: Python's float addition is float64's
        rest = mag[at + whole:]
        self._carry[: rest.size] = rest
        self._filled = rest.size

    def value(self) -> float:
        import numpy as np

        if self._filled:
            return self.total + float(np.add.reduce(self._carry[: self._filled], dtype=np.float64))
        return self.total


# Entries per block of the election: its ~10 passes then run over arrays that stay in the core's cache.
_BLOCK = 1 << 14


def _elect_signs(mixed: "np.ndarray", weighted: list["np.ndarray"], weights: list[float]) -> "np.ndarray":
    """TIES's election by total mass, in place: `mixed` becomes the sum of the entries agreeing with the sign of
    the weighted sum (0 counts as +); returns the weight mass that agreed per entry (1 where none did)."""
    import numpy as np

    m = mixed.reshape(-1)
    flat = [d.reshape(-1) for d in weighted]
    divisor = np.empty_like(m)
    majority = np.empty(min(_BLOCK, m.size), dtype=m.dtype)
    agree = np.empty_like(majority)
    for start in range(0, m.size, _BLOCK):
        stop = min(start + _BLOCK, m.size)
        mb, db = m[start:stop], divisor[start:stop]
        maj, agr = majority[: stop - start], agree[: stop - start]
        np.greater_equal(mb, 0, out=maj)
        maj *= 2
        maj -= 1  # +1 / -1
        mb.fill(0)
        db.fill(0)
        for d, w in zip(flat, weights):
            dv = d[start:stop]
            np.multiply(dv, maj, out=agr)
            np.greater(agr, 0, out=agr)  # 1 where the signs agree; a zero never does (mergekit: sign(0) = 0)
            dv *= agr
            mb += dv
            if w != 1:
                agr *= w
            db += agr
        db[db == 0] = 1
    return divisor.reshape(mixed.shape)


@register("task_arithmetic")
class TaskArithmetic(GeneralizedTaskArithmetic):
    paper = "Ilharco et al. 2023"
    params = (WEIGHT, *merge_wide(normalize=False, rescale=False))
