"""Lazy tensor IO: read one tensor at a time from safetensors, stream merged tensors into sharded files.

A merge reads a tensor as a numpy array mapped onto its byte range of the file (`read_array`, the range
from the header, which is checked against the file's size first): the pages come straight from the page
cache, populated in one call, with no copy and no page faults on fresh memory, which made copying reads
4-5x slower than the mapping. The mapping lives as long as the array, so a merge maps the few tensors it
is combining, never a whole model. `get` still gives a torch tensor of one's own (a copy) to the code
that wants one. bfloat16 has no numpy type: it is widened to float32 on read and rounded to nearest even
on write, bit for bit as torch does. Nothing here imports torch unless `get` is called or a torch tensor
is written, so a merge of full models never pays torch's import. Writing needs no buffering either: every output tensor's name, shape and dtype are known
before the first is computed, so each shard's safetensors header is written first and each tensor's
bytes are appended as it is produced. More than one shard gets `model.safetensors.index.json`, like
`save_pretrained`.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from llmfast.direct_write import DirectFile, open_for_writing
from llmfast.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    import torch

# safetensors dtype tags <-> torch dtype names, with their sizes
_ST_DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "BF16": ("bfloat16", 2), "F16": ("float16", 2),
              "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
              "BOOL": ("bool", 1)}
_TAG = {name: tag for tag, (name, _) in _ST_DTYPES.items()}
# How each tag is held in numpy: bfloat16 as its raw bits (widened to float32 by `read_array`).
_NP_STORED = {"F64": "float64", "F32": "float32", "BF16": "uint16", "F16": "float16", "I64": "int64", "I32": "int32",
              "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}

# Files copied from the reference model next to the merged weights.
COPY_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model",
              "added_tokens.json")


def weight_files(model_dir: Path) -> list[Path]:
    """The files transformers loads (`model_weight_files`), or why a merge cannot read this folder."""
    from llmfast.modelfiles import model_weight_files

    if files := model_weight_files(model_dir, f"re-create the model in {model_dir}"):
        return files
    if any(model_dir.glob("*.bin")):
        raise UserError(f"{model_dir} has only PyTorch .bin weights: merging reads safetensors lazily; "
                        "re-save the model with save_pretrained(safe_serialization=True)")
    raise UserError(f"{model_dir} has no model.safetensors (or index): not a model directory llmfast can merge")


def _entries(file: Path) -> dict[str, tuple[tuple[int, ...], str, int, int]]:
    """name -> (shape, dtype tag, first byte, end byte) in `file`, from its header (checked against its size)."""
    from llmfast.modelfiles import safetensors_header

    header = safetensors_header(file, f"re-create or re-download {file.parent}")
    with file.open("rb") as f:
        start = 8 + int.from_bytes(f.read(8), "little")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in _ST_DTYPES:
            raise UserError(f"{file}: tensor {name} has dtype {info.get('dtype')}, which merging does not read "
                            f"(it reads {', '.join(_ST_DTYPES)})")
        a, b = info["data_offsets"]
        shape = tuple(int(d) for d in info.get("shape", []))
        if numel(shape) * _ST_DTYPES[info["dtype"]][1] != b - a:
            raise UserError(f"{file}: corrupt safetensors header (tensor {name}: shape {list(shape)} does not fit "
                            f"its {b - a} bytes): re-create or re-download {file.parent}")
        out[name] = (shape, info["dtype"], start + a, start + b)
    return out


def tensor_index(model_dir: Path) -> dict[str, tuple[tuple[int, ...], str, Path]]:
    """name -> (shape, safetensors dtype tag, file), from the headers only."""
    return {name: (shape, tag, f) for name, (shape, tag, f, _a, _b) in _locations(Path(model_dir)).items()}


def _locations(model_dir: Path) -> dict[str, tuple[tuple[int, ...], str, Path, int, int]]:
    out: dict[str, tuple[tuple[int, ...], str, Path, int, int]] = {}
    for f in weight_files(model_dir):
        for name, (shape, tag, a, b) in _entries(f).items():
            out[name] = (shape, tag, f, a, b)
    _drop_tied_head(model_dir, out)
    return out


def _drop_tied_head(model_dir: Path, where: dict[str, tuple[tuple[int, ...], str, Path, int, int]]) -> None:
    """A tied head (tie_word_embeddings) that the files store too, as some tools save it: dropped, as transformers ties
    them, so the model merges with one that stores the embeddings only; other values are refused (vLLM ties them)."""
    head = where.get("lm_head.weight")
    embed = [n for n, w in where.items() if n.endswith(("embed_tokens.weight", ".wte.weight")) and head
             and w[:2] == head[:2]]
    from llmfast.loading import ties_word_embeddings

    if not embed or head is None or not ties_word_embeddings(model_dir):  # Gemma's config ties without the key
        return
    (*_, f1, a1, b1), (*_, f2, a2, _b2) = where[embed[0]], head
    with f1.open("rb") as x, f2.open("rb") as y:
        x.seek(a1), y.seek(a2)
        if any(x.read(min(1 << 24, b1 - a)) != y.read(min(1 << 24, b1 - a)) for a in range(a1, b1, 1 << 24)):
            raise UserError(f"{model_dir}: its config.json ties lm_head.weight to {embed[0]} (tie_word_embeddings), but "
                            "the weights store them with different values: set tie_word_embeddings to false if the "
                            "stored head is meant, or drop it from the weights")
    del where["lm_head.weight"]


def model_dtype(model_dir: Path, index: dict[str, tuple[tuple[int, ...], str, Path]]) -> str:
    """The dtype most of the model's floating-point weights have."""
    counts: dict[str, int] = {}
    for shape, tag, _ in index.values():
        if tag in ("F32", "BF16", "F16", "F64"):
            counts[tag] = counts.get(tag, 0) + numel(shape)
    tag = max(counts, key=lambda k: counts[k]) if counts else "F32"
    name = _ST_DTYPES[tag][0]
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def _natural_key(name: str) -> tuple[Any, ...]:
    # embeddings first, then layers by number, then the rest (final norm, head): a readable shard order.
    m = re.search(r"\.layers\.(\d+)\.", name)
    if m:
        return (1, int(m.group(1)), name)
    return (0 if "embed" in name else 2, 0, name)


def ordered(index: dict[str, Any]) -> dict[str, Any]:
    return {k: index[k] for k in sorted(index, key=_natural_key)}


class TensorReader:
    """One model's tensors, read lazily one at a time.

    `read_array` maps the tensor's bytes (what merges use); `get` copies them into a torch tensor of the
    caller's own, to change in place (`os.preadv`, which releases the GIL).
    """

    def __init__(self, model_dir: Path) -> None:
        self.dir = Path(model_dir)
        self._where = _locations(self.dir)
        self.index = {name: (shape, tag, f) for name, (shape, tag, f, _a, _b) in self._where.items()}

    def get(self, name: str) -> "torch.Tensor":
        import torch

        shape, tag, file, start, end = self._where[name]
        t = torch.empty(shape, dtype=getattr(torch, _ST_DTYPES[tag][0]))
        if end > start:
            buf = memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")
            fd = os.open(file, os.O_RDONLY)
            try:
                done = 0
                while done < len(buf):  # one call reads at most ~2 GiB on Linux
                    got = os.preadv(fd, [buf[done:]], start + done)
                    if got <= 0:
                        raise UserError(f"{file}: ended while reading tensor {name} (truncated since it was checked?)")
                    done += got
            finally:
                os.close(fd)
        return t

    def read_array(self, name: str) -> "np.ndarray":
        """The tensor as a numpy array, read-only, mapped onto the file; bfloat16 comes widened to float32 (a copy)."""
        return stored_values(*self.stored_array(name))

    def stored_array(self, name: str) -> "tuple[np.ndarray, str]":
        """(the tensor as stored, mapped read-only onto the file: bfloat16 as uint16 bits; its safetensors tag)."""
        import numpy as np

        shape, tag, file, start, end = self._where[name]
        stored = np.dtype(_NP_STORED[tag])
        raw = _map_range(file, start, end, stored, name).reshape(shape) if end > start else np.zeros(shape, stored)
        return raw, tag


def stored_values(raw: "np.ndarray", tag: str, block: slice | None = None) -> "np.ndarray":
    """A stored array (or a `block` of its flattened entries) as numbers: bfloat16 bits widened to float32."""
    if block is not None:
        raw = raw.reshape(-1)[block]
    return bf16_bits_to_float32(raw) if tag == "BF16" else raw


def stored_dtype(dtype: str) -> "np.dtype":
    """The numpy dtype that holds a torch dtype name's stored bytes (bfloat16: uint16)."""
    import numpy as np

    return np.dtype(np.uint16 if dtype == "bfloat16" else dtype)


def _map_range(file: Path, start: int, end: int, dtype: "np.dtype", name: str) -> "np.ndarray":
    """bytes [start, end) of `file` as a read-only array; unmapped when the last array over it is freed."""
    import numpy as np

    offset = start - start % mmap.ALLOCATIONGRANULARITY  # a mapping starts on a page boundary
    try:
        with open(file, "rb") as f:
            if hasattr(mmap, "MAP_SHARED"):  # POSIX: populate every page in one call (they are in the page cache)
                mapped = mmap.mmap(f.fileno(), end - offset, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                                   prot=mmap.PROT_READ, offset=offset)
            else:
                mapped = mmap.mmap(f.fileno(), end - offset, access=mmap.ACCESS_READ, offset=offset)
    except (OSError, ValueError) as e:  # ValueError: the file is shorter than the header said
        raise UserError(f"{file}: cannot read tensor {name} ({e}): was the file truncated or replaced since "
                        "it was checked? Re-create it") from None
    return np.frombuffer(mapped, dtype=dtype, count=(end - start) // dtype.itemsize, offset=start - offset)


def bf16_bits_to_float32(bits: "np.ndarray") -> "np.ndarray":
    """bfloat16 values held as uint16 bits -> float32 (exact: the bits are the float32's upper half)."""
    import numpy as np

    return np.left_shift(bits, 16, dtype=np.uint32).view(np.float32)


_BLOCK = 1 << 14  # entries converted at a time: the conversion's passes stay in the core's cache (2x faster)


def float32_to_bf16_bits(values: "np.ndarray") -> "np.ndarray":
    """float32 -> bfloat16 bits, rounded to nearest even like torch's `.to(torch.bfloat16)`; a NaN stays a NaN (0x7FC0)."""
    import numpy as np

    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    bits = flat.view(np.uint32)
    out = np.empty(flat.size, dtype=np.uint16)
    work = np.empty(min(_BLOCK, flat.size), dtype=np.uint32)
    for start in range(0, flat.size, _BLOCK):
        stop = min(start + _BLOCK, flat.size)
        b, w = bits[start:stop], work[: stop - start]
        np.right_shift(b, 16, out=w)
        np.bitwise_and(w, 1, out=w)
        w += 0x7FFF
        w += b  # wraps only for NaNs with the sign bit set, which are replaced below
        np.right_shift(w, 16, out=w)
        np.copyto(out[start:stop], w, casting="unsafe")
        nan = np.isnan(flat[start:stop])
        if nan.any():
            out[start:stop][nan] = 0x7FC0
    return out.reshape(np.shape(values))


def round_to(values: "np.ndarray", dtype: str) -> "np.ndarray":
    """`values` rounded to `dtype` ("float32", "bfloat16", "float16") and back to float (float64 stays when asked)."""
    import numpy as np

    dtype = dtype.removeprefix("torch.")
    if dtype == "bfloat16":
        return bf16_bits_to_float32(float32_to_bf16_bits(values))
    if values.dtype == np.dtype(dtype):
        return values
    rounded = values.astype(dtype)
    return rounded if rounded.dtype in (np.float32, np.float64) else rounded.astype(np.float32)


def stored_bytes(values: "np.ndarray", dtype: str, name: str = "") -> "np.ndarray":
    """`values` as a C-contiguous array of `dtype` (a torch dtype name), as safetensors stores it; a finite value
    float16 cannot hold (beyond +-65504: it would become inf, and the model NaN) is a one-line error naming `name`."""
    import numpy as np

    if dtype == "bfloat16":
        return float32_to_bf16_bits(values)
    if dtype != "float16":
        return np.ascontiguousarray(values, dtype=np.dtype(dtype))
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(values, dtype=np.float16)
    if not np.isfinite(out).all():
        beyond = np.isfinite(values) & ~np.isfinite(out)
        if beyond.any():
            raise UserError(f"{name or 'a tensor'}: holds {float(np.abs(values[beyond]).max()):.6g}, beyond float16's "
                            "range (+-65504): write it in bfloat16 or float32 (out_dtype, --dtype)")
    return out


def refuse_non_finite(name: str, data: "np.ndarray", dtype: str) -> None:
    """A float tensor about to be written (in its stored form: bfloat16 as bits) that holds inf or NaN is a one-line
    error: weights or lambda near float32's limit overflow the sum, and the model would compute NaN."""
    import numpy as np

    if dtype not in ("bfloat16", "float32", "float16", "float64"):
        return
    flat, step = data.reshape(-1), 1 << 20  # a chunk at a time: a whole embedding's masks would be 1-3 B/entry
    # bfloat16: an all-ones exponent is inf or NaN
    if any(bool(((flat[at: at + step].view(np.uint16) & 0x7F80) == 0x7F80).any()) if dtype == "bfloat16"
           else not bool(np.isfinite(flat[at: at + step]).all()) for at in range(0, flat.size, step)):
        raise UserError(f"{name}: holds inf or NaN once merged: a weight, lambda or input value is too large for "
                        "float32 (+-3.4e38) or an input holds inf/NaN; lower the parameters (or check the inputs)")


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def parse_size(text: str) -> int:
    """K, M, G, T are powers of 1024 (a trailing B or iB allowed); a bare B is a billion bytes, as mergekit reads its
    own default '5B' (not 5 bytes: a shard per tensor)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])I?B?|(B)?)\s*", str(text).upper())
    if not m:
        raise UserError(f"--out-shard-size '{text}' not understood: write a positive size, e.g. 500M or 5G")
    unit = 10**9 if m.group(3) else {None: 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2)]
    size = int(float(m.group(1)) * unit)
    if size <= 0:
        raise UserError(f"--out-shard-size '{text}': the shard size must be positive, e.g. 500M or 5G")
    return size


class ShardedWriter:
    """Stream tensors, in a fixed order known up front, into safetensors shards of at most `max_bytes`."""

    def __init__(self, out_dir: Path, layout: list[tuple[str, tuple[int, ...], str]], max_bytes: int,
                 prefix: str = "model", metadata: dict[str, str] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.metadata = {"format": "pt", **(metadata or {})}
        shards: list[list[tuple[str, tuple[int, ...], str, int]]] = [[]]
        size = 0
        for name, shape, dtype in layout:
            nbytes = numel(shape) * _size_of(dtype)
            if shards[-1] and size + nbytes > max_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, shape, dtype, nbytes))
            size += nbytes
        self.shards = shards
        n = len(shards)
        self.files = [f"{prefix}.safetensors"] if n == 1 else \
            [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.where = {t[0]: i for i, shard in enumerate(shards) for t in shard}
        self.expected = [t for shard in shards for t in shard]
        self._next = 0
        self._fh: BinaryIO | DirectFile | None = None
        self._shard = -1
        self.total_bytes = sum(t[3] for t in self.expected)

    def write(self, name: str, tensor: "np.ndarray | torch.Tensor", stored: bool = False) -> None:
        """Append the next tensor; `stored`: it is already in the planned dtype's stored form (`stored_dtype`)."""
        import numpy as np

        exp_name, shape, dtype, nbytes = self.expected[self._next]
        if name != exp_name:
            raise RuntimeError(f"tensor {name} written out of order (expected {exp_name})")
        if stored:
            if tensor.dtype != stored_dtype(dtype):
                raise RuntimeError(f"tensor {name} is stored as {tensor.dtype}, planned {dtype}")
            data = np.ascontiguousarray(tensor)
        elif isinstance(tensor, np.ndarray):
            data = stored_bytes(tensor, dtype, name)
        else:  # a torch tensor (adapter outputs, scripts)
            import torch

            data = tensor.to(getattr(torch, dtype)).contiguous().reshape(-1)
            if dtype == "float16" and not bool(data.isfinite().all()) and bool(tensor.isfinite().all()):
                stored_bytes(tensor.float().numpy(), dtype, name)  # float16's range error, naming the value
            data = (data.view(torch.int16) if dtype == "bfloat16" else data).numpy()
        refuse_non_finite(name, data, dtype)
        if tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"tensor {name} has shape {tuple(tensor.shape)}, planned {shape}")
        shard = self.where[name]
        if shard != self._shard:
            self._open(shard)
        assert self._fh is not None
        self._fh.write(data.reshape(-1).view(np.uint8).data)
        self._next += 1
        if self._next == len(self.expected) or self.where[self.expected[self._next][0]] != shard:
            self._fh.close()
            self._fh = None

    def _open(self, shard: int) -> None:
        if self._fh is not None:
            self._fh.close()
        header: dict[str, Any] = {"__metadata__": self.metadata}
        offset = 0
        for name, shape, dtype, nbytes in self.shards[shard]:
            header[name] = {"dtype": _TAG[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self._fh = open_for_writing(self.out_dir / self.files[shard])  # past the page cache: see direct_write
        self._fh.write(len(raw).to_bytes(8, "little"))
        self._fh.write(raw)
        self._shard = shard

    def finish(self) -> list[str]:
        if self._next != len(self.expected):
            raise RuntimeError(f"only {self._next} of {len(self.expected)} tensors were written")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {name: self.files[i] for name, i in self.where.items()}}
            (self.out_dir / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return self.files

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _size_of(dtype: str) -> int:
    for name, size in _ST_DTYPES.values():
        if name == dtype:
            return size
    raise ValueError(f"unsupported dtype {dtype}")


def st_dtype_name(tag: str) -> str:
    return _ST_DTYPES[tag][0]


def check_model_files(src: Path) -> None:
    """The files `copy_model_files` (and an adapter output) take from `src` are readable, and its chat template has
    no byte-order mark (the next verb would refuse the copy): checked with the inputs, before the merge's work."""
    from llmfast.models import check_chat_template_file

    for f in (src / name for name in ("config.json", *COPY_FILES)):
        if f.is_file() and not os.access(f, os.R_OK):
            raise UserError(f"{f}: no permission to read it (the output takes it from {src}): make it readable for "
                            "this user")
    check_chat_template_file(src)


def copy_model_files(src: Path, dst: Path, out_dtype: str) -> None:
    """config.json (with the output dtype) and the tokenizer/generation files of `src`."""
    cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    cfg["dtype"] = out_dtype
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = out_dtype
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    for name in COPY_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
