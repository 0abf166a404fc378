"""A full-precision base's stored tensors read again by name, for a 16-bit export of a base stored in a wider or
mixed dtype, so that the model is never held whole in float32 (a 7B: 28 GB beside the 14 GB it writes).

The base loads in the dtype most of its tensors are stored in: transformers then maps those without reading them
(only the pages read are held) and converts the rest. Each weight is then read from its file on its own and
rounded to the dtype it is written in, those the export keeps in float32 left in it; a layer the adapter changes
is read again in float32 when its merge comes (`widen`) and rounded once merged. The same bytes as the base loaded
whole in float32, merged and rounded: each weight is its stored value rounded once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class StoredTensors:
    """The base's tensors by stored name, each read on its own from its safetensors file."""

    def __init__(self, base: Path) -> None:
        from llmfast.modelfiles import FLOAT_TAGS, model_weight_files, safetensors_header

        fix = f"re-create the model in {base}"
        self._where = {name: (f, list(info.get("shape") or []), FLOAT_TAGS.get(info.get("dtype"), ("", 0))[0])
                       for f in model_weight_files(base, fix)
                       for name, info in safetensors_header(f, fix).items() if name != "__metadata__"}

    def shape(self, name: str) -> list[int] | None:
        found = self._where.get(name)
        return None if found is None else found[1]

    def dtype(self, name: str) -> str:
        """The torch name of the dtype `name` is stored in ('' for one not stored or not floating-point)."""
        found = self._where.get(name)
        return "" if found is None else found[2]

    def float32(self, name: str, loaded: Any) -> Any:
        """`name` as stored, widened to float32 (exact from every stored float dtype). `loaded` is the model's
        parameter: an embedding grown to an adapter's added tokens keeps its new rows (the adapter's saved module
        replaces them) below the stored ones."""
        import torch
        from safetensors import safe_open

        path = self._where[name][0]
        try:  # not mapped: read into this tensor alone
            opened = safe_open(str(path), framework="pt", backend="pread")
        except TypeError:  # safetensors before 0.8 (pyproject allows 0.4.3) has no backend: mapped, this tensor's pages
            opened = safe_open(str(path), framework="pt")
        with opened as st:
            stored = st.get_tensor(name).to(torch.float32)
        if tuple(stored.shape) == tuple(loaded.shape):
            return stored
        if stored.dim() == loaded.dim() and stored.shape[1:] == loaded.shape[1:] and stored.shape[0] < loaded.shape[0]:
            grown = loaded.detach().to(torch.float32)
            grown[: stored.shape[0]] = stored
            return grown
        raise RuntimeError(f"{name}: stored as {list(stored.shape)}, loaded as {list(loaded.shape)}")


def rereadable(base: Path) -> StoredTensors | None:
    """The base's stored tensors where each floating-point parameter of its model is stored under its name with its
    shape, and the model saves no floating-point buffer (that one would be written in the dtype loaded); else None,
    and the base loads whole in float32. Judged on the model's modules on the meta device: transformers renames or
    fuses some checkpoints' tensors as it loads them, which cannot be read again by name."""
    from llmfast.loading import meta_skeleton

    stored = StoredTensors(base)
    model = meta_skeleton(base)
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    if any(t.is_floating_point() for n, t in model.state_dict().items() if n not in params):
        return None
    if any(p.is_floating_point() and stored.shape(n) != list(p.shape) for n, p in model.named_parameters()):
        return None
    return stored


def loading_dtype(counts: dict[str, int]) -> str:
    """The dtype the base loads in: the one most of its elements are stored in (`counts`, by dtype), which
    transformers maps without reading; float32 for a base stored mostly in another (float64)."""
    most = max(counts, key=lambda d: counts[d]) if counts else "float32"
    return most if most in ("float32", "bfloat16", "float16") else "float32"


def round_loaded(model: Any, stored: StoredTensors, want: Any) -> None:
    """Each floating-point parameter of `model` in the dtype it is written in (`want(name)`), read from its file on
    its own where the load did not leave it so (converted as it loaded, or to be rounded): one tensor at a time in
    float32, never the model. One loaded as stored in that dtype stays as transformers mapped it."""
    for name, p in model.named_parameters():
        if p.is_floating_point():
            target = want(name)
            if not (p.dtype == target and str(target).removeprefix("torch.") == stored.dtype(name)):
                p.data = stored.float32(name, p).to(target)


def widen(p: Any, name: str, stored: StoredTensors | None) -> Any:
    """Parameter `name` in float32 for its merge: its stored value where the base loaded rounded (`stored`), else
    the loaded one widened (exact: it loaded as stored). Returns the tensor it replaced, for `rounded_into`; None for
    one already in float32, left as it is (a layer widened before the adapter loaded its saved base weight into it).
    """
    import torch

    if p.dtype == torch.float32:
        return None
    narrow = p.data
    p.data = stored.float32(name, p) if stored is not None else p.data.float()
    return narrow


def rounded_into(merged: Any, dtype: Any, narrow: Any) -> Any:
    """`merged` rounded to `dtype`, written into the tensor it was widened from (`narrow`) where that one fits: a
    new one for each layer, with the float32 one freed, left the allocator a hole per layer that the next did not
    fill (the built-in model's all-linear export held 150 MB more by its last layer)."""
    if narrow is None or narrow.dtype != dtype or narrow.shape != merged.shape:
        return merged.to(dtype)
    return narrow.copy_(merged)
