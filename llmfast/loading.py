"""Loading a transformers model the one way llmfast does: safetensors weights only, in a named dtype.

Below both `models` (which finds and prepares model directories) and `quant` (whose methods load their
formats), so neither imports the other for it. Imports torch and transformers inside functions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from llmfast.errors import UserError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedConfig, PreTrainedModel

DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    if name not in DTYPES:
        raise UserError(f"unknown dtype '{name}': use one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def refuse_pickle_weights(path: str | os.PathLike[str]) -> None:
    """A model directory without safetensors weights (model.safetensors or its index) is refused: pickle files
    (pytorch_model*.bin) are never loaded, since unpickling can run code, whatever other files lie beside them."""
    p = Path(path)
    if not p.is_dir() or (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file():
        return
    if any(p.glob("pytorch_model*.bin")):
        raise UserError(f"{p}: its weights are pickle files (pytorch_model.bin), which llmfast does not load (a pickle "
                        "can run code): in a trusted environment load it with transformers and save it with "
                        "save_pretrained(DIR, safe_serialization=True), then use DIR")
    raise UserError(f"{p}: no model.safetensors (nor model.safetensors.index.json): the model's weights are missing; "
                    "re-create or re-download the model")


def first_line(e: BaseException) -> str:
    """An exception's first line of text (for one-line errors wrapping a library's own)."""
    text = str(e).strip().splitlines()
    return text[0][:240] if text else type(e).__name__


POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


class Positions(NamedTuple):
    limit: int  # the declared positions, times a rope scaling factor (a linear-scaled Llama keeps the original)
    key: str  # the config.json key that declares them
    rotary: bool  # False: a learned table, which fails past its end with an IndexError
    scaled: bool


def positions(path: str | os.PathLike[str]) -> Positions | None:
    """The positions the model's config.json declares; None for a config that declares none (or cannot be read:
    its loader says so)."""
    import json

    try:
        cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    rotary = any("rope" in k or "rotary" in k for k in cfg)
    scaling = [s for s in (cfg.get("rope_scaling"), cfg.get("rope_parameters")) if isinstance(s, dict)]
    factor = max([float(s["factor"]) for s in scaling if isinstance(s.get("factor"), (int, float))] + [1.0])
    for name in POSITION_KEYS:
        limit = cfg.get(name)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            # Llama 3.1 and YaRN configs declare the extended length already, the original beside the factor
            found = [o for o in (cfg.get("original_max_position_embeddings"),
                                 *(s.get("original_max_position_embeddings") for s in scaling))
                     if isinstance(o, int) and not isinstance(o, bool) and o > 0]
            base = found[0] if found else limit
            scaled = max(limit, int(base * factor))
            return Positions(scaled, name, rotary, scaled != limit)
    return None


def check_positions(path: str | os.PathLike[str], length: int, key: str) -> None:
    """Refuse a window or context of `length` tokens beyond the positions the model's config.json declares:
    a learned position table fails on them mid-run with an index error, rotary ones give numbers the model was
    never trained for."""
    found = positions(path)
    if found is not None and length > found.limit:
        raise UserError(f"{key} is {length} tokens, beyond the {found.limit} positions of {path} (config.json "
                        f"{found.key}{', with its rope scaling' if found.scaled else ''}): set {key} to at most "
                        f"{found.limit}")


def _missing_package(path: str | os.PathLike[str], e: ImportError) -> UserError:
    """transformers' ImportError for a model: a package its config.json asks for (a quantization method's: hqq,
    optimum, torchao...) is missing or too old here. Its message names the package and how to install it; the
    files are not at fault."""
    method = _config_dict(Path(path)).get("quantization_config")
    method = method.get("quant_method") if isinstance(method, dict) else None
    asks = f"config.json's quantization_config (quant_method {method!r})" if isinstance(method, str) else "the model"
    name = f" ({e.name})" if isinstance(e, ModuleNotFoundError) and e.name else ""
    return UserError(f"{path}: transformers cannot load it here: {asks} needs a package{name} this environment lacks "
                     f"or has too old ({type(e).__name__}: {first_line(e)}): install what that names, then run again")


def _cannot_build(path: str | os.PathLike[str], e: Exception) -> UserError:
    if isinstance(e, ImportError):
        return _missing_package(path, e)
    return UserError(f"{Path(path) / 'config.json'}: transformers cannot build this model ({type(e).__name__}: "
                     f"{first_line(e)}): fix the config or re-create the model")


def no_model_code(path: str | os.PathLike[str]) -> None:
    """A folder whose config.json or tokenizer_config.json names its own Python code (auto_map) for a class
    transformers lacks is one line (modelfiles.refuse_model_code), checked by every loader here whoever calls it (a
    library user, a format's loader), not only by the CLI's check_model_dir: with trust_remote_code=False transformers
    says 'contains custom code which must be executed', and a loader that left it out (the ternary and w4 formats')
    asked on the terminal and imported the folder's .py on a 'y'."""
    from llmfast.modelfiles import refuse_model_code

    refuse_model_code(Path(path), _config_dict(Path(path)))


def auto_config(path: str | os.PathLike[str]) -> "PreTrainedConfig":
    """config.json as transformers reads it; a config it refuses (an unknown model_type, a field of the wrong type)
    is one line naming the directory."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except UserError:
        raise
    except Exception as e:  # transformers' own errors on a config a user can fix
        # without trust_remote_code transformers refuses a config that names its own code ('custom code'), importing
        # nothing: our one line for it is read here, so a config that loads is read once (check_weights_fit)
        no_model_code(path)
        raise _cannot_build(path, e) from None


def meta_skeleton(path: str | os.PathLike[str], config: "PreTrainedConfig | None" = None) -> "PreTrainedModel":
    """The model's modules on the meta device: every shape, no weights, nothing read but config.json (`config`:
    its auto_config, when read already)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = auto_config(path) if config is None else config
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except UserError:
        raise
    except Exception as e:  # transformers' own errors on a config a user can fix
        raise _cannot_build(path, e) from None


def check_weights_fit(path: str | os.PathLike[str]) -> None:
    """Before loading (and before transformers' progress bar): the safetensors headers against the config's
    modules on the meta device. A tensor whose shape differs from the config's, or, where the file names its
    tensors as the model does, one the config needs and the file lacks (transformers would fill it with random
    values), is one line. Quantized checkpoints keep other tensors and are left to their loaders."""
    from llmfast.modelfiles import stored_shapes

    p = Path(path)
    if not p.is_dir() or not (p / "config.json").is_file():
        return
    fix = "re-create the model, or fix its config.json"
    config = auto_config(p)  # config.json read once: as transformers reads it, for every check here
    cfg = config.to_dict()
    refuse_other_heads(p, cfg)
    if "quantization_config" in cfg:
        check_bnb_state(p, fix, cfg)
        return
    stored = stored_shapes(p, fix)
    skeleton = meta_skeleton(p, config)
    tensors = skeleton.state_dict(keep_vars=True)
    names: dict[int, list[str]] = {}  # tied parameters (a head sharing the embedding) are one tensor, stored once
    for name, t in tensors.items():
        names.setdefault(id(t), []).append(name)
    expected = {tuple(group): list(tensors[group[0]].shape) for group in names.values()}
    wrong = [(n, stored[n], shape) for group, shape in expected.items() for n in group
             if n in stored and stored[n] != shape]
    if wrong:
        n, got, want = wrong[0]
        raise UserError(f"{p}: tensor {n} has shape {got} in the weights, {want} by its config.json "
                        f"({len(wrong)} such): the config and the weights belong to different models; {fix}")
    check_tied_copies(p, [[n for n in g if n in stored] for g in expected], fix)
    known = set().union(*expected) if expected else set()
    if stored and len(known & set(stored)) >= 0.9 * len(stored):  # the file names tensors as the model does
        missing = sorted(g[0] for g in expected if not any(n in stored for n in g))
        if missing:
            raise UserError(f"{p}: {len(missing)} tensor(s) its config needs are not in the weights "
                            f"({', '.join(missing[:3])}): the file is incomplete or belongs to another model; {fix}")


# Classes whose checkpoints hold no language-model head (a classifier's `score`, or none at all): transformers loads
# them as a causal LM without a word, the embeddings standing in for the head when the config ties them.
_NOT_LM_HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMultipleChoice",
                 "ForMaskedLM", "ForRewardModel")


def _config_dict(path: Path) -> dict[str, Any]:
    """config.json as a dict; {} when it cannot be read or is not an object (the config's own check names it)."""
    import json

    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def ties_word_embeddings(path: Path) -> bool:
    """Whether transformers ties the model's head to its input embedding: config.json's tie_word_embeddings, or
    without that key its config class's default (Gemma's hub configs leave it out, and Gemma ties; Llama does not)."""
    cfg = _config_dict(path)
    if "tie_word_embeddings" in cfg:
        return cfg["tie_word_embeddings"] is True
    from transformers import AutoConfig

    try:
        return getattr(AutoConfig.from_pretrained(path, trust_remote_code=False), "tie_word_embeddings", False) is True
    except Exception:  # noqa: BLE001 - a config transformers refuses: its own check names it
        return False


def refuse_other_heads(path: Path, cfg: dict[str, Any] | None = None) -> None:
    """A classifier or reward model, or a bare `...Model` without a head, given where a causal LM is meant; `cfg`:
    its config.json when read already."""
    archs = (_config_dict(path) if cfg is None else cfg).get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else ""
    if arch.endswith(_NOT_LM_HEADS) or (arch.endswith("Model") and not arch.endswith("LMHeadModel")):
        raise UserError(f"{path}: config.json's architectures is {arch}, which has no language-model head "
                        "(transformers would load it as a causal LM all the same, with a stand-in head): use the "
                        "model's causal-LM checkpoint (a ...ForCausalLM)")


def check_tied_copies(path: Path, groups: list[list[str]], fix: str) -> None:
    """Tensors the config ties (tie_word_embeddings: lm_head and the embeddings) stored more than once must hold the
    same values: transformers then unties them with a warning and runs the stored head, vLLM ties them and runs the
    embeddings as the head, so eval and serve would measure two models."""
    from safetensors import safe_open

    from llmfast.modelfiles import model_weight_files

    groups = [g for g in groups if len(g) > 1]
    where: dict[str, Path] = {}
    for f in model_weight_files(path, fix) if groups else []:
        with safe_open(str(f), framework="pt") as st:
            where.update({n: f for n in st.keys()})
    for group in groups:
        if not all(_same_values(where[group[0]], group[0], where[n], n) for n in group[1:]):
            raise UserError(f"{path}: its config.json ties {' and '.join(group)} (tie_word_embeddings), but the weights "
                            "store them with different values (transformers would run them untied, vLLM tied): set "
                            "tie_word_embeddings to false in config.json if the stored head is meant, or drop it from "
                            "the weights")


def _same_values(f1: Path, n1: str, f2: Path, n2: str, rows: int = 1024) -> bool:
    """Whether two stored tensors hold the same values, read a block of rows at a time (a vocabulary-sized
    embedding is gigabytes)."""
    import torch
    from safetensors import safe_open

    with safe_open(str(f1), framework="pt") as a, safe_open(str(f2), framework="pt") as b:
        x, y = a.get_slice(n1), b.get_slice(n2)
        if x.get_shape() != y.get_shape():
            return False
        return all(torch.equal(x[i:i + rows].float(), y[i:i + rows].float()) for i in range(0, x.get_shape()[0], rows))


def check_bnb_state(path: Path, fix: str, cfg: dict[str, Any] | None = None) -> None:
    """A config.json whose quantization_config says bitsandbytes over weights that hold none of its quantization state
    (a config copied from a quantized model, or one edited by hand): transformers loads them without a word, and the
    first forward pass fails inside bitsandbytes. Other methods' loaders refuse such weights themselves. `cfg`: its
    config.json when read already."""
    from llmfast.modelfiles import stored_shapes

    qc = (_config_dict(path) if cfg is None else cfg).get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "bitsandbytes":
        return
    # 8-bit layers store `.SCB`, 4-bit ones `.weight.absmax` and `.weight.quant_state.bitsandbytes__*`
    if not any(n.endswith((".SCB", ".absmax")) or ".quant_state." in n for n in stored_shapes(path, fix)):
        raise UserError(f"{path}: config.json's quantization_config says bitsandbytes, but the weights hold no "
                        "bitsandbytes quantization state (they are full precision): remove quantization_config "
                        "from config.json to use them as they are, or re-create the quantized model")


def sentencepiece_missing(path: Path) -> str | None:
    """The refusal for a SentencePiece model alone (tokenizer.model, no tokenizer.json: Llama 2's, Mistral's way)
    where the packages transformers reads it with are not installed (vllm brings them, llmfast does not), else None.
    transformers warned in 5 lines, then refused with its last try's error ("`tiktoken` is required")."""
    import importlib.util

    def absent(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is None
        except (ImportError, ValueError):  # google (protobuf's namespace) missing, or a module set to None
            return True

    spm = path / "tokenizer.model"  # SentencePiece's protobuf starts with b"\n"; a tiktoken file there is text
    if not spm.is_file() or spm.read_bytes()[:1] != b"\n" or (path / "tokenizer.json").exists():
        return None
    missing = [pkg for pkg, module in (("sentencepiece", "sentencepiece"), ("protobuf", "google.protobuf"))
               if absent(module)]
    return (f"{path}: its tokenizer is a SentencePiece model alone (tokenizer.model, no tokenizer.json): transformers "
            f"reads it only with {' and '.join(missing)}: `pip install {' '.join(missing)}`") if missing else None


def from_pretrained(path: str | os.PathLike[str], dtype: str, **kwargs: Any) -> "PreTrainedModel":
    """`AutoModelForCausalLM.from_pretrained` for every loader in llmfast: safetensors weights only, and every
    tensor the config needs present with its shape (transformers would fill a missing one with random values and
    go on); what transformers refuses in a config or weights is one line naming the directory."""
    from transformers import AutoModelForCausalLM

    refuse_pickle_weights(path)
    no_model_code(path)
    generation = Path(path) / "generation_config.json"
    if generation.is_file() and not os.access(generation, os.R_OK):  # transformers goes on with its defaults
        raise UserError(f"{generation}: no permission to read it (transformers would go on with default generation "
                        "settings, and an artifact made from this model would keep those): make it readable for this "
                        "user")
    if "quantization_config" not in kwargs:
        check_weights_fit(path)
    # use_kernels: transformers 5.25 (not 5.19) kernelizes every model it loads unless told not to: on CUDA it swaps
    # norms, activations and rotary layers for kernels fetched from the hub, again at each train()/eval(). llmfast
    # runs offline and its results are checked against the torch layers, as every release up to 5.19 kept them.
    kwargs = {"use_kernels": False, **kwargs}
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype), use_safetensors=True,
                                                           output_loading_info=True, trust_remote_code=False, **kwargs)
    except UserError:
        raise
    except ImportError as e:  # a package the model needs, not its files
        raise _missing_package(path, e) from None
    except Exception as e:  # transformers' own errors on a config or weights a user can fix
        raise UserError(f"{path}: transformers cannot load this model ({type(e).__name__}: {first_line(e)}): "
                        "fix its config.json and weights, or re-create the model") from None
    quantized = "quantization_config" in kwargs or getattr(model.config, "quantization_config", None) is not None
    missing = sorted(info.get("missing_keys") or []) if not quantized else []
    mismatched = [str(m[0]) if isinstance(m, (tuple, list)) else str(m) for m in info.get("mismatched_keys") or []]
    if missing or mismatched:
        what = (f"{len(missing)} tensor(s) its config needs are missing ({', '.join(missing[:3])})" if missing
                else f"{len(mismatched)} tensor(s) have another shape than its config says "
                     f"({', '.join(mismatched[:3])})")
        raise UserError(f"{path}: {what}: the weights are incomplete or belong to another model; re-create the model")
    return model


def tied_modules(model: "PreTrainedModel") -> list[str]:
    """The names of the input embedding and the output head where they are one matrix (tie_word_embeddings): a LoRA
    on either changes both once merged, while PEFT applies it to the one module it targets. Else []."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or out is None or inp.weight is not out.weight:
        return []
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(m)] for m in (inp, out) if id(m) in names]


def resize_for_adapter(model: "PreTrainedModel", adapter: Path) -> None:
    """Grow the embedding (and an untied head) to the rows an adapter saved them with: tools that add tokens
    (Axolotl, Unsloth, LLaMA-Factory) resize the base, train, and save the whole modules (modules_to_save, or PEFT's
    saved embedding layers), which PEFT then cannot load onto the base's smaller ones. A head the adapter did not
    save while the embedding grew was trained with rows nobody kept: refused."""
    from llmfast.modelfiles import safetensors_header

    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None:
        return
    names = {id(m): n for n, m in model.named_modules()}
    stored = safetensors_header(adapter / "adapter_model.safetensors", "re-create the adapter")

    def saved_rows(module: Any) -> int | None:
        name = names.get(id(module))
        rows = [info["shape"][0] for key, info in stored.items() if key != "__metadata__" and name and
                key.removeprefix("base_model.model.") in (f"{name}.weight", f"{name}.base_layer.weight")]
        return rows[0] if rows else None

    vocab = inp.weight.shape[0]
    rows = saved_rows(inp)
    if rows is None or rows <= vocab:
        return
    tied = out is not None and out.weight is inp.weight
    if out is not None and not tied and saved_rows(out) != rows:
        raise UserError(f"{adapter}: the adapter saved {names.get(id(inp))} with {rows} rows (tokens added to the "
                        f"base's {vocab}) but not {names.get(id(out))} with as many, so the head's new rows are not "
                        "in it: re-create it with the head in modules_to_save")
    model.resize_token_embeddings(rows, mean_resizing=False)  # the adapter's saved modules fill every row


def save_tokenizer(tokenizer: Any, directory: str | os.PathLike[str]) -> None:
    """Save a tokenizer as the model shipped it: a pad token load_tokenizer chose is not written. Saved, it is a
    special token to whoever loads the artifact (transformers, vLLM): id 0's `!` of a tokenizer with neither pad nor
    EOS would be dropped from every decoded answer, and a Llama's tokenizer config would differ from its base's."""
    chosen = getattr(tokenizer, "llmfast_chosen_pad", None)
    if chosen is not None:
        tokenizer.pad_token = None
    try:
        tokenizer.save_pretrained(directory)
    finally:
        if chosen is not None:
            tokenizer.pad_token = chosen
