"""Cheap checks of a model or adapter directory before anything loads it: JSON configs and safetensors headers.

A broken config.json or a truncated download otherwise surfaces deep inside transformers, PEFT or vLLM
as a traceback, often after minutes of work. These checks read only the config files and the first
bytes of each safetensors file (an 8-byte header length, then a JSON header naming every tensor's byte
range), so they take milliseconds whatever the model's size, and import neither torch nor transformers (but
for a folder that names its own code, `refuse_model_code`).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any

from llmfast.adapter_options import PROMPT_TYPES as _PROMPT_TYPES  # PEFT types that add virtual tokens
from llmfast.errors import UserError

# A safetensors header is a few hundred bytes per tensor; 100 MB is the library's own limit.
_MAX_HEADER = 100_000_000
INDEX = "model.safetensors.index.json"


def read_json_file(path: Path, what: str, fix: str) -> Any:
    """A JSON file's content, or a one-line error naming the file, what is wrong, and `fix`."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}): {fix}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the {what} ({e.strerror or e}): {fix}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: the {what} is not valid JSON ({e.msg} at line {e.lineno}): {fix}") from None


def describe_model_dir(path: Path) -> dict[str, Any]:
    """Architecture facts from a model directory's config.json (the one reader of them): the architecture
    name and the shapes merges, adapters and listings compare; an unreadable config is a one-line error."""
    cfg = read_json_file(Path(path) / "config.json", "model config", f"re-create the model in {path}")
    if not isinstance(cfg, dict):
        raise UserError(f"{Path(path) / 'config.json'}: the model config is not a JSON object: re-create the model")
    archs = cfg.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise UserError(f"{Path(path) / 'config.json'}: architectures must be a list of class names (e.g. "
                        f"[\"LlamaForCausalLM\"]), not {archs!r}: fix the config or re-create the model")
    return {
        "architecture": (archs or ["?"])[0],
        "layers": cfg.get("num_hidden_layers"),
        "hidden": cfg.get("hidden_size"),
        "vocab": cfg.get("vocab_size"),
        "dtype": cfg.get("dtype") or cfg.get("torch_dtype"),
        "config": cfg,
    }


def safetensors_header(path: Path, fix: str) -> dict[str, Any]:
    """The header of a safetensors file, checked against the file's size (a truncated file is refused)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{path}: {size} bytes, too short for a safetensors file (truncated?): {fix}")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise UserError(f"{path}: not a safetensors file, or truncated (header of {n} bytes in a file "
                                f"of {size}): {fix}")
            raw = f.read(n)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e}): {fix}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path}: corrupt safetensors header (not JSON): {fix}") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt safetensors header (not a JSON object): {fix}")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise UserError(f"{path}: corrupt safetensors header (tensor {name} has no valid data_offsets): {fix}")
        end = max(end, offsets[1])
    data = size - 8 - n
    if end > data:
        raise UserError(f"{path}: truncated: its tensors need {end} bytes of data, the file has {data}: {fix}")
    if end < data:
        raise UserError(f"{path}: {data - end} bytes after the last tensor (corrupt or not safetensors): {fix}")
    return header


def stored_shapes(path: Path, fix: str) -> dict[str, list[int]]:
    """name -> shape of the model weights in the folder `path`, from the safetensors headers of model.safetensors or
    of the files its index names (not an artifact's other files: thresholds, predictors)."""
    return {k: v.get("shape") for f in model_weight_files(path, fix) for k, v in safetensors_header(f, fix).items()
            if k != "__metadata__"}


# safetensors' floating-point tags: (torch's name, bytes per element)
FLOAT_TAGS = {"F64": ("float64", 8), "F32": ("float32", 4), "BF16": ("bfloat16", 2), "F16": ("float16", 2)}


def stored_floats(path: Path, fix: str) -> dict[str, int]:
    """dtype name -> elements of the model weights (model_weight_files) stored in it, floating-point tensors only."""
    counts: dict[str, int] = {}
    for f in model_weight_files(path, fix):
        for k, v in safetensors_header(f, fix).items():
            if k != "__metadata__" and v.get("dtype") in FLOAT_TAGS:
                name = FLOAT_TAGS[v["dtype"]][0]
                counts[name] = counts.get(name, 0) + math.prod(int(n) for n in v.get("shape") or [])
    return counts


def widened_note(source: Path, out: Path, key: str) -> str | None:
    """A note where `out`, made from `source` by a verb whose `key` (a recipe key or a flag) names the dtype it
    writes, stores its full-precision tensors in a wider dtype than most of the source's: a bfloat16 model quantized
    or ReLU-fied with the default float32 doubles what it leaves unquantized (embeddings, head, norms) or all of it;
    else None."""
    sizes = {name: size for name, size in FLOAT_TAGS.values()}
    src, made = stored_floats(source, "re-create the model"), stored_floats(out, "re-create the output")
    if not src or not made:
        return None
    was, now = max(src, key=lambda d: src[d]), max(made, key=lambda d: made[d])
    if sizes[now] <= sizes[was]:
        return None
    mib = lambda d: round(made[now] * sizes[d] / 2**20, 1)  # noqa: E731
    keep = f"{key} {was}" if key.startswith("--") else f"set {key}: {was}"  # a flag, or a recipe key
    return (f"llmfast: note: {out} stores its full-precision tensors in {now} ({key}), {source}'s are {was}: "
            f"{mib(now)} MiB where {was} would take {mib(was)} MiB; {keep} keeps them as stored")


class MissingShards(UserError):
    """An index that names files not beside it: an interrupted download (`offline` fetches such a copy again)."""


def model_weight_files(path: Path, fix: str) -> list[Path]:
    """The files transformers loads the weights from: model.safetensors, or those its index names (not an
    artifact's other safetensors files: thresholds, predictors); [] for neither. model.safetensors wins over an index
    beside it, as in transformers (a folder re-saved with another shard size may keep both)."""
    single = path / "model.safetensors"
    return [single] if single.is_file() else _index_files(path, fix) if (path / INDEX).is_file() else []


def weight_files(path: Path, fix: str) -> list[Path]:
    """Those an index names, else every safetensors file (thresholds too): fingerprints before 2026-12-06 01:05."""
    return _index_files(path, fix) if (path / INDEX).is_file() else sorted(path.glob("*.safetensors"))


def _index_files(path: Path, fix: str) -> list[Path]:
    # sorted and each once, as transformers reads the shards; MissingShards where one is not there
    data = read_json_file(path / INDEX, "safetensors index", fix)
    wmap = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise UserError(f"{path / INDEX}: no 'weight_map' of tensor names to files: {fix}")
    files = sorted({str(v) for v in wmap.values()})
    if missing := [f for f in files if not (path / f).is_file()]:
        raise MissingShards(f"{path / INDEX}: names {len(missing)} missing file(s) ({', '.join(missing[:3])}): {fix}")
    return [path / f for f in files]


def check_model_dir(path: str | os.PathLike[str]) -> Path:
    """Check a Hugging Face model directory without loading it: config.json is a JSON object with a
    `model_type`, and every safetensors weight file is complete. Returns the path; raises a one-line UserError.

    Directories with only pickle weights (pytorch_model.bin) are left to the loader, which refuses them.
    """
    path = Path(path)
    fix = f"re-download or re-create the model in {path}"
    _no_dangling_links(path, fix)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{path} is not a Hugging Face model directory (no config.json)")
    cfg = read_json_file(cfg_path, "model config", fix)
    if not isinstance(cfg, dict):
        raise UserError(f"{cfg_path}: the model config must be a JSON object, not {type(cfg).__name__}: {fix}")
    if not isinstance(cfg.get("model_type"), str) or not cfg["model_type"]:
        raise UserError(f"{cfg_path}: no 'model_type' (e.g. \"llama\"): transformers cannot tell the "
                        f"architecture: {fix}")
    refuse_model_code(path, cfg)
    generation = path / "generation_config.json"
    if generation.is_file() and os.access(generation, os.R_OK):  # an unreadable one: loading.from_pretrained names it
        # transformers goes on with defaults (another end-of-turn token, other sampling) after a log line
        if not isinstance(read_json_file(generation, "generation config", f"fix or delete it ({fix})"), dict):
            raise UserError(f"{generation}: the generation config is not a JSON object: fix or delete it ({fix})")
    # an index's shards too beside model.safetensors: vLLM reads the index, and refuses one that names missing files
    for f in dict.fromkeys([*model_weight_files(path, fix), *weight_files(path, fix)]):
        safetensors_header(f, fix)
    return path


def _no_dangling_links(path: Path, fix: str) -> None:
    # a hub cache's snapshot is links into blobs/ (fine); one whose blob is gone read as 'no config.json' or 'No such
    # file' for a file `ls` shows. Only the files a model is loaded from: a dead link to a README is no matter.
    dead = sorted(p for p in path.iterdir() if p.is_symlink() and not p.exists()
                  and (p.suffix in (".json", ".safetensors", ".jinja") or p.name in VOCABULARY_FILES)) \
        if path.is_dir() else []
    if dead:
        more = f" ({len(dead) - 1} more such)" if len(dead) > 1 else ""
        raise UserError(f"{dead[0]} is a symbolic link to {os.readlink(dead[0])}, which does not exist{more}: restore "
                        f"what it points to, or {fix}")


def refuse_model_code(path: Path, cfg: dict[str, Any]) -> None:
    """A Hub model that ships its own Python code (`auto_map` in config.json or tokenizer_config.json, what
    `trust_remote_code=True` would import) for a class transformers does not have: transformers would ask on the
    terminal whether to run it, and run it on a 'y'. llmfast never runs a model's own code, so it is one line here,
    before anything loads. An `auto_map` beside a model_type (or tokenizer class) transformers knows is left alone:
    transformers then loads its own class and imports nothing from the folder."""
    found = []
    if isinstance(cfg.get("auto_map"), dict):
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        if cfg.get("model_type") not in CONFIG_MAPPING_NAMES:
            found.append(f"config.json (model_type {cfg.get('model_type')!r})")
    try:
        tok = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none, or broken: the tokenizer's loader names it
        tok = None
    if isinstance(tok, dict) and tok.get("auto_map"):
        from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

        name = tok.get("tokenizer_class")
        if not isinstance(name, str) or not any(tokenizer_class_from_name(n) for n in (name, name.removesuffix("Fast"))):
            found.append(f"tokenizer_config.json (tokenizer_class {name!r})")
    if found:
        raise UserError(f"{path}: its {' and '.join(found)} names the model's own Python code (auto_map, for "
                        "trust_remote_code), and llmfast does not run a model's own code: use a copy of the model "
                        "saved with classes transformers has (its own model_type and tokenizer_class)")


# a tokenizer's vocabulary, in the files transformers builds one from (fast, SentencePiece, GPT-2's, WordPiece's)
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def has_tokenizer(directory: Path) -> bool:
    """Whether a folder holds a tokenizer of its own (an adapter saved with the one it was trained with): a
    vocabulary, not a tokenizer_config.json alone (some adapters carry only that one), which no tokenizer loads from."""
    return any((directory / name).is_file() for name in VOCABULARY_FILES)


def chat_template_text(folder: Path) -> object:
    """The chat template a tokenizer folder renders chats with, as transformers reads it (chat_template.jinja first,
    else tokenizer_config.json's `chat_template`, its `default` where it names several), None where it has none or
    it cannot be read."""
    jinja = folder / "chat_template.jinja"
    try:
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        if (folder / "tokenizer_config.json").is_file():
            cfg = read_json_file(folder / "tokenizer_config.json", "tokenizer config", "restore it")
            found = cfg.get("chat_template") if isinstance(cfg, dict) else None
            if isinstance(found, list):  # named templates (transformers 4's way): the default is the one rendered
                found = next((t.get("template") for t in found if isinstance(t, dict) and t.get("name") == "default"),
                             None)
            return found
    except (OSError, UnicodeDecodeError, UserError):
        return None
    return None


def tokenizer_token(folder: Path, key: str) -> str | None:
    """The special token a tokenizer folder names for `key` (`pad_token`, `eos_token`; tokenizer_config.json, else
    special_tokens_map.json, as a string or an added-token object), or None."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            token = json.loads((folder / name).read_text(encoding="utf-8")).get(key)
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            continue
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str):
            return token
    return None


def check_adapter_dir(path: str | os.PathLike[str]) -> Path:
    """Check a PEFT adapter directory: adapter_config.json is a JSON object naming its PEFT type, and
    adapter_model.safetensors (when present) is complete. Returns the path; raises a one-line UserError."""
    path = Path(path)
    fix = f"re-create or re-download the adapter in {path}"
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file() and (path / "recipe.json").is_file() and (path / "train_log.jsonl").exists():
        raise UserError(f"{path} is a finetune run that has no adapter yet (stopped before its end?): `llmfast finetune "
                        "RECIPE --resume` continues it (from its last checkpoint, or from the start without one)")
    if not cfg_path.is_file():
        raise UserError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
    cfg = read_json_file(cfg_path, "adapter config", fix)
    if not isinstance(cfg, dict):
        raise UserError(f"{cfg_path}: the adapter config must be a JSON object, not {type(cfg).__name__}: {fix}")
    if "peft_type" not in cfg and "r" not in cfg:
        raise UserError(f"{cfg_path}: neither 'peft_type' nor 'r': not a PEFT LoRA adapter config: {fix}")
    _check_adapter_kind(cfg, cfg_path)
    refuse_model_code(path, {})  # a tokenizer saved with the adapter may name its own code (export loads it)
    for key in ("r", "lora_alpha"):  # what PEFT computes the scaling from: a wrong type fails deep inside it
        value = cfg.get(key)
        if key in cfg and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise UserError(f"{cfg_path}: '{key}' must be a positive number, not {value!r}: {fix}")
    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        names = set(safetensors_header(weights, fix)) - {"__metadata__"}
        _check_adapter_tensors(cfg, names, weights)
        for name in sorted(names):  # a LoRA matrix without its partner: PEFT would keep the partner's random init
            for one, other in (("lora_A", "lora_B"), ("lora_B", "lora_A"), ("lora_embedding_A", "lora_embedding_B"),
                               ("lora_embedding_B", "lora_embedding_A")):
                # PEFT names a linear's matrices `...lora_A.weight`, an embedding's `...lora_embedding_A` (no suffix);
                # `...lora_B.bias` (lora_bias) has no lora_A partner
                partner = re.sub(rf"\.{one}(?=(\.[^.]+)?\.weight$|$)", f".{other}", name)
                if partner != name and partner not in names:
                    raise UserError(f"{weights}: {name} has no {other} beside it: the file is incomplete; {fix}")
    elif (path / "adapter_model.bin").is_file():
        raise UserError(f"{path}: its weights are a pickle file (adapter_model.bin), which llmfast does not load (a "
                        "pickle can run code): in a trusted environment load it with PEFT and save it with "
                        "save_pretrained(DIR, safe_serialization=True), then use DIR")
    else:  # PEFT would look for it on the hub instead, and fail there with a traceback
        raise UserError(f"{path}: no adapter_model.safetensors: the adapter's weights are missing; {fix}")
    return path


def _check_adapter_kind(cfg: dict[str, Any], cfg_path: Path) -> None:
    """Adapters other tools save that PEFT would load onto a causal LM as something else: virtual-token types, and
    adapters trained for another task's head (PEFT drops the head it cannot find, and runs the rest)."""
    peft_type = cfg.get("peft_type")
    if isinstance(peft_type, str) and peft_type.upper() in _PROMPT_TYPES:
        raise UserError(f"{cfg_path}: peft_type {peft_type} adds learned virtual tokens to each prompt instead of "
                        "changing weights, which llmfast does not run: use a LoRA adapter (or merge it into the "
                        "model's weights with PEFT yourself)")
    task = cfg.get("task_type")
    if task is not None and str(task).upper() != "CAUSAL_LM":
        raise UserError(f"{cfg_path}: task_type {task}: the adapter was trained for another task than causal "
                        "language modelling (PEFT would drop that task's head and run the rest): use an adapter "
                        "trained with task_type CAUSAL_LM")


def _check_adapter_tensors(cfg: dict[str, Any], names: set[str], weights: Path) -> None:
    """Tensors that only a config option makes PEFT load: with the option off in the config PEFT skips them with a
    warning and runs another adapter than the one trained (DoRA's magnitudes, LoRA-B biases)."""
    for suffix, key in (("lora_magnitude_vector", "use_dora"), ("lora_B.bias", "lora_bias")):
        found = sorted(n for n in names if re.search(rf"\.{re.escape(suffix)}(\.|$)", n))
        if found and not cfg.get(key):
            raise UserError(f"{weights}: holds {found[0]} ({len(found)} such) but adapter_config.json has no "
                            f"'{key}: true', so PEFT would skip them: set {key} to true in "
                            f"{weights.parent / 'adapter_config.json'} if the adapter was trained so, or re-create it")


def weights_fingerprint(path: str | os.PathLike[str], sample: int = 4096) -> str:
    """A digest of a model folder's safetensors weights that tells other weights apart without reading them all:
    every tensor's name, dtype and shape, and its first `sample` stored bytes (a norm whole), over the files
    transformers loads (`model_weight_files`), and config.json (but for the keys that say how it was written). A
    copy or a move of the folder keeps it, however the weights are sharded; a re-trained or re-saved model of the
    same shapes changes it. One small read a tensor: milliseconds for the built-in model."""
    h = _tensors_digest(Path(path), model_weight_files, sample)
    h.update(_config_digest(Path(path) / "config.json"))  # the same weights under another activation or rope differ
    return h.hexdigest()[:32]


def same_weights(path: str | os.PathLike[str], recorded: Any, current: str | None = None) -> bool:
    """Whether the fingerprint a manifest, mark or base.json recorded is that of the weights at `path` now
    (`current`: their `weights_fingerprint`, if known), also as llmfast wrote it from 2026-12-05 23:57 to 2026-12-06
    01:05: over every safetensors file of the folder (thresholds too), then over the model's only, without
    config.json. Those older fingerprints are of the same weights, and are not refused as other ones."""
    if not isinstance(recorded, str):
        return False
    if recorded == (current or weights_fingerprint(path)):
        return True
    return any(recorded == _tensors_digest(Path(path), files, 4096).hexdigest()[:32]
               for files in (weight_files, model_weight_files))


def _tensors_digest(path: Path, files: Any, sample: int) -> Any:
    import hashlib

    fix = f"re-create the model in {path}"
    found: dict[str, bytes] = {}
    for f in files(path, fix):
        header = safetensors_header(f, fix)
        try:
            with f.open("rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                for name, info in header.items():
                    if name == "__metadata__":
                        continue
                    begin, end = info["data_offsets"]
                    fh.seek(8 + n + begin)
                    head = fh.read(min(sample, end - begin))
                    found[name] = found.get(name, b"") + f"{info.get('dtype')}:{info.get('shape')}:".encode() + head
        except OSError as e:
            raise UserError(f"{f}: cannot read ({e.strerror or e}): {fix}") from None
    h = hashlib.sha256()
    for name in sorted(found):
        h.update(name.encode() + b"\0" + found[name] + b"\0")
    return h


# Keys of config.json that name how a file was written, not the model: left out of the fingerprint.
_WRITTEN_BY = {"transformers_version", "_name_or_path", "dtype", "torch_dtype"}


def _config_digest(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError:  # none, or unreadable: the loader names it
        return b""
    try:
        cfg = json.loads(raw)
    except ValueError:
        return raw
    if isinstance(cfg, dict):
        cfg = {k: v for k, v in cfg.items() if k not in _WRITTEN_BY}
    return json.dumps(cfg, sort_keys=True).encode()


def older_relufy(directory: str | os.PathLike[str], manifest: dict[str, Any]) -> dict[str, Any]:
    """`{"sparsity": ...}` for the manifest of an export, merge or quantize artifact that an llmfast before
    2026-12-06 wrote from a relufy model without recording it (sparse/derived.py's `carried_sparsity` does now), so
    that serve's check, the hf-sparse engine and reports take it for the relufy model it is, as they do a new one:
    found when its config.json has a ReLU MLP and its sources' manifests (parents, an adapter's base) lead to a
    relufy artifact; empty otherwise (another artifact, or sources moved away: then it reads as before)."""
    if "sparsity" in manifest or manifest.get("stage") not in ("export", "merge", "quantize"):
        return {}
    try:
        cfg = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(cfg, dict) or "relu" not in (cfg.get("hidden_act"), cfg.get("hidden_activation")):
        return {}
    todo, seen = [manifest], set()
    while todo and len(seen) < 16:  # a lineage of a few stages; a cycle of hand-edited parents ends here too
        m = todo.pop(0)
        spec = m.get("sparsity")
        if isinstance(spec, dict) and spec.get("method") == "relufy":
            return {"sparsity": {"method": "relufy", "config": spec.get("config") or {}}}  # no fingerprint: not checked
        sources = [*(m.get("parents") or []), m.get("base_model_path")] if spec is None else []
        for source in (s for s in sources if isinstance(s, str) and s not in seen):
            seen.add(source)
            try:
                found = json.loads((Path(source) / "llmfast.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(found, dict):
                todo.append(found)
    return {}
