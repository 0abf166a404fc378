"""Element-wise merges of full models in one C pass (`elementwise.c`), called through ctypes.

linear, task_arithmetic, dare_linear and dare_ties over float32 or bfloat16 tensors: the kernel reads each stored
entry once and writes the stored output, where the numpy path makes about ten passes (widen, subtract, weight, add,
divide, round back). Same bits as the numpy path, which stays for everything else (other methods, adapters, float16
and float64, a `dtype` cast that changes the inputs) and on machines without a C compiler. One exception, by
float64 rounding: DARE's rescale factor is the ratio of two L1 norms that the kernel sums in four fixed partial
sums and numpy sums pairwise; they round to different float32 factors about once in 10^8 tensors.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmfast.errors import UserError
from llmfast.merge.steps import stored_as
from llmfast.native import load_kernel

if TYPE_CHECKING:
    import numpy as np

    from llmfast.merge.plan import MergePlan

SOURCE = Path(__file__).with_name("elementwise.c")
MAX_INPUTS = 16  # elementwise.c
_TAGS = {"F32": 0, "BF16": 1}
_OUT = {"float32": 0, "bfloat16": 1}
_LINEAR, _TASK = 0, 1

_i32, _i64, _f32, _f64, _ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_float, ctypes.c_double, ctypes.c_void_p


class _Job(ctypes.Structure):
    _fields_ = [("n", _i64), ("mode", _i32), ("inputs", _i32), ("out_bf16", _i32), ("base_bf16", _i32),
                ("base", _ptr), ("inp", _ptr * MAX_INPUTS), ("in_bf16", _i32 * MAX_INPUTS),
                ("weight", _f32 * MAX_INPUTS), ("weigh", _i32 * MAX_INPUTS),
                ("keep", _ptr * MAX_INPUTS), ("scale", _f32 * MAX_INPUTS), ("rescale", _i32 * MAX_INPUTS),
                ("whole_skip", _i32 * MAX_INPUTS), ("block_skip", _i32), ("consensus", _i32), ("normalize", _i32),
                ("total", _f32), ("lambda_", _f32), ("apply_lambda", _i32),
                ("out", _ptr)]


class MergeKernel:
    def __init__(self, lib: ctypes.CDLL) -> None:
        lib.merge_job_size.restype = _i64
        if lib.merge_job_size() != ctypes.sizeof(_Job):
            raise RuntimeError("elementwise.c and native_merge.py disagree on the job's layout")
        self._merge = lib.merge_elementwise
        self._merge.restype, self._merge.argtypes = ctypes.c_int, [ctypes.POINTER(_Job)]
        self._mask = lib.dare_mask
        self._mask.restype = None
        self._mask.argtypes = [_ptr, _i32, _ptr, _i32, _i64, _ptr, ctypes.c_uint32, _ptr, ctypes.POINTER(_i64),
                               ctypes.POINTER(_i64), ctypes.POINTER(_f64), ctypes.POINTER(_f64)]
        self._any = lib.any_nonzero_delta
        self._any.restype, self._any.argtypes = ctypes.c_int, [_ptr, _i32, _ptr, _i32, _i64]

    def takes_plan(self, plan: "MergePlan") -> bool:
        """Whether this merge's method and output dtype are the kernel's (each tensor is checked by `takes`)."""
        from llmfast.merge.methods.linear import Linear
        from llmfast.merge.methods.task_arithmetic import GeneralizedTaskArithmetic

        method = plan.method
        family = isinstance(method, Linear) or (isinstance(method, GeneralizedTaskArithmetic)
                                                and method.sparsify in (None, "random"))
        return (family and plan.out_dtype in _OUT and 1 <= len(plan.inputs) <= MAX_INPUTS
                and all(s.kind == "model" for s in plan.inputs))

    @staticmethod
    def takes(plan: "MergePlan", mapped: tuple[Any, list[Any]]) -> bool:
        """Whether this tensor's stored inputs are the kernel's: float32 or bfloat16, not changed by a `dtype` cast."""
        base, stored = mapped
        arrays = ([base] if plan.method.domain == "delta" else []) + list(stored)
        # Aligned too: a file written by another tool may place a float32 tensor at an odd offset.
        if any(a is None or a[1] not in _TAGS or not (a[0].flags.c_contiguous and a[0].flags.aligned)
               for a in arrays):
            return False
        cast = plan.config.dtype
        return cast is None or all(stored_as(a[1], cast) for a in arrays)

    def merge(self, plan: "MergePlan", name: str, mapped: tuple[Any, list[Any]],
              out_dtype: str) -> "tuple[np.ndarray, dict[str, int]]":
        """(the merged tensor in `out_dtype`'s stored form, counts of nonzero and kept task-vector entries)."""
        import numpy as np

        from llmfast.merge.io import stored_dtype

        base, stored = mapped
        shape = stored[0][0].shape
        n = int(np.prod(shape, dtype=np.int64))
        out = np.empty(shape, dtype=stored_dtype(out_dtype))
        job = _Job(n=n, inputs=len(stored), out_bf16=_OUT[out_dtype], out=out.ctypes.data)
        for i, (array, tag) in enumerate(stored):
            job.inp[i], job.in_bf16[i] = array.ctypes.data, _TAGS[tag]
        params = [table[name] for table in plan.per_input]
        shared = plan.shared_for(name)
        counts: dict[str, int] = {}
        keep_alive: list[np.ndarray] = []
        try:
            if plan.method.domain == "raw":
                self._linear(job, params, shared)
            else:
                self._task(job, plan, name, base, stored, params, shared, counts, keep_alive)
        except ValueError as e:
            raise UserError(f"{plan.config_path}: tensor {name}: {e}") from None
        if self._merge(ctypes.byref(job)) != 0:
            raise RuntimeError(f"merge kernel refused tensor {name}")
        return out, counts

    @staticmethod
    def _linear(job: _Job, params: list[dict[str, Any]], shared: dict[str, Any]) -> None:
        from llmfast.merge.methods.linear import _total

        job.mode = _LINEAR
        weights = [float(p["weight"]) for p in params]
        for i, w in enumerate(weights):
            job.weight[i] = w
        job.normalize = bool(shared["normalize"])
        if job.normalize:
            job.total = _total(weights)

    def _task(self, job: _Job, plan: "MergePlan", name: str, base: Any, stored: list[Any],
              params: list[dict[str, Any]], shared: dict[str, Any], counts: dict[str, int],
              keep_alive: list[Any]) -> None:
        import numpy as np

        from llmfast.merge.methods.sparsify import drop_stream, keep_below
        from llmfast.merge.methods.task_arithmetic import normalize_divisor, rescales

        method = plan.method
        job.mode, job.base, job.base_bf16 = _TASK, base[0].ctypes.data, _TAGS[base[1]]
        job.consensus, job.normalize = bool(method.consensus), bool(shared["normalize"])
        job.lambda_, job.apply_lambda = shared["lambda"], shared["lambda"] != 1
        # the numpy path's divisor, computed by the same function (a zero task vector's weight counts)
        job.total = normalize_divisor(params)
        for i, p in enumerate(params):
            job.weight[i], job.weigh[i] = p["weight"], p["weight"] != 1
        if method.sparsify is None:  # task arithmetic: merged block by block, as the numpy path does
            job.block_skip = 1
            return
        # DARE decides per whole tensor: which task vectors are zero, which entries survive, the rescale factor.
        rescale = bool(shared.get("rescale", False))
        for i, ((array, tag), p) in enumerate(zip(stored, params)):
            if not self._any(base[0].ctypes.data, _TAGS[base[1]], array.ctypes.data, _TAGS[tag], job.n):
                job.whole_skip[i] = 1  # a zero task vector: skipped (and nothing drawn), as the numpy path does
                continue
            density = p.get("density", 1.0)
            if density >= 1:
                continue
            keep = np.empty((job.n + 7) // 8, dtype=np.uint8)
            keep_alive.append(keep)
            s = drop_stream(plan.seed, name, i).state["state"]
            state = np.array([s["state"] >> 64, s["state"] & (2**64 - 1), s["inc"] >> 64, s["inc"] & (2**64 - 1)],
                             dtype=np.uint64)
            nonzero, kept, before, after = _i64(), _i64(), _f64(), _f64()
            self._mask(base[0].ctypes.data, _TAGS[base[1]], array.ctypes.data, _TAGS[tag], job.n, state.ctypes.data,
                       keep_below(density), keep.ctypes.data, ctypes.byref(nonzero),
                       ctypes.byref(kept), ctypes.byref(before), ctypes.byref(after))
            job.keep[i] = keep.ctypes.data
            counts["nonzero"] = counts.get("nonzero", 0) + nonzero.value
            counts["kept"] = counts.get("kept", 0) + kept.value
            if rescale and rescales(before.value, after.value):
                job.scale[i], job.rescale[i] = float(np.float32(before.value / after.value)), 1


@lru_cache(maxsize=None)
def merge_kernel() -> MergeKernel | None:
    """The kernel built for this machine, or None where it cannot be built (the numpy path runs)."""
    # -fno-trapping-math lets the compiler vectorize the selects (agreement, masks); it changes no value, only
    # what may happen to floating-point exception flags, which nothing here reads. -fno-strict-aliasing: bfloat16
    # and float32 are converted through their bits.
    lib = load_kernel(SOURCE, ("-fno-trapping-math", "-fno-strict-aliasing"))
    return None if lib is None else MergeKernel(lib)
