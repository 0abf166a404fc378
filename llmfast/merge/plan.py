"""The merge plan: every model resolved and every check made before any tensor is read or anything written.

`plan_merge` reads the config, then only small JSON files and safetensors headers, and refuses with one
line: an unknown method or parameter, a parameter out of its range, a missing path, a broken config.json
or a truncated/corrupt safetensors file of any input, a different architecture, activation, relufy cut or
tensor shape, a different vocabulary (unless `tokenizer_source: base`), an adapter trained on another base.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from llmfast.errors import UserError
from llmfast.merge.config import (Locator, MergeConfig, check_parameter_names, load_config, resolve_per_input,
                                  resolve_shared)
from llmfast.merge.methods import METHODS, MergeMethod
from llmfast.modelfiles import describe_model_dir


@dataclasses.dataclass
class Source:
    """One input of the merge: a full model directory or a LoRA adapter on the base."""

    spec: str
    kind: Literal["model", "adapter"]
    path: Path
    parameters: dict[str, Any] | None
    is_base: bool = False
    adapter: Any = None  # adapters.LoraAdapter for kind == "adapter"
    index: int | None = None  # its position under `models:` (None: the base_model added as an input)

    def who(self) -> str:
        return "base_model" if self.index is None else f"models[{self.index}] ({self.spec})"


@dataclasses.dataclass
class MergePlan:
    config: MergeConfig
    config_path: str
    method: MergeMethod
    base: Source | None
    inputs: list[Source]  # in mergekit's order: the models, then the base when a method averages it in
    tensors: list[tuple[str, tuple[int, ...], str]]  # (name, shape, safetensors dtype) of the reference model
    reference: Path  # the model dir whose config, tokenizer and tensor names the output takes
    num_layers: int
    out_dtype: str  # float32 / bfloat16 / float16
    shared: dict[str, Any]  # merge-wide parameters without a filter; shared_for(name) gives a tensor's values
    per_input: list[dict[str, dict[str, Any]]]  # per input: tensor name -> resolved parameters
    seed: int = 0
    shared_by_tensor: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def shared_for(self, name: str) -> dict[str, Any]:
        return self.shared_by_tensor.get(name, self.shared)

    def computes_like_mergekit(self, name: str) -> bool:
        """Whether mergekit computes this tensor's task vectors as we do (float32 or float64 throughout).

        In bfloat16/float16 it subtracts in that dtype, rounding each task vector, where we subtract in
        float32 exactly: the magnitudes differ, so which entries tie at a trim threshold differs anyway.
        """
        if "_tags" not in self.__dict__:
            self.__dict__["_tags"] = {n: tag for n, _shape, tag in self.tensors}
        tags = self.__dict__["_tags"]
        cast = (self.config.dtype or "float32").removeprefix("torch.")
        return tags.get(name) in ("F32", "F64") and cast in ("float32", "float64")

    @property
    def adapters_only(self) -> bool:
        return all(s.kind == "adapter" for s in self.inputs if not s.is_base)

    def input_paths(self) -> list[Path]:
        """Every directory the merge reads (for refusing an output that is one of them)."""
        paths = [s.path for s in self.inputs] + ([self.base.path] if self.base is not None else [])
        return list(dict.fromkeys(paths))


def plan_merge(config_path: str | Path, overrides: list[str] | None = None, seed: int | None = None) -> MergePlan:
    """Read and check everything; return the plan. Nothing is written and no tensor is read."""
    from llmfast.merge import io as mio

    config_path = str(config_path)
    cfg, lines = load_config(config_path, overrides)
    where = Locator(config_path, lines)
    method = METHODS.get(cfg.merge_method, where("merge_method"))
    check_parameter_names(method, cfg, where)
    base = _resolve_base(cfg, method, where)
    inputs = _arrange(method, base, [_resolve_input(cfg, i, base, where) for i in range(len(cfg.models))],
                      config_path)
    reference = base.path if base is not None else inputs[0].path
    ref_tensors = mio.tensor_index(reference)
    mio.check_model_files(reference)
    for src in inputs:
        _check_input(src, reference, ref_tensors, cfg, where)
    layers = describe_model_dir(reference)["layers"]  # for the layer gradients of mergekit's settings
    if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 0):
        raise UserError(f"{Path(reference) / 'config.json'}: num_hidden_layers is {layers!r}, not a number of layers: "
                        "fix the config or re-create the model")
    num_layers = layers or 0
    tensors = [(n, shape, dt) for n, (shape, dt, _f) in mio.ordered(ref_tensors).items()]
    names = [n for n, _s, _d in tensors]
    per_input = [resolve_per_input(method, cfg, where, src.parameters, src.index, src.who(), names, num_layers)
                 for src in inputs]
    return MergePlan(
        config=cfg, config_path=config_path, method=method, base=base, inputs=inputs, tensors=tensors,
        reference=reference, num_layers=num_layers,
        out_dtype=(cfg.out_dtype or cfg.dtype or mio.model_dtype(reference, ref_tensors)).removeprefix("torch."),
        shared=resolve_shared(method, cfg, where, "", num_layers), per_input=per_input,
        seed=0 if seed is None else seed,
        shared_by_tensor={n: resolve_shared(method, cfg, where, n, num_layers) for n in names})


# ---------------------------------------------------------------- resolving the models
def _resolve_source(spec: str, where: str) -> tuple[Literal["model", "adapter"], Path, str | None]:
    """(kind, path, base spec for `base+adapter` syntax) of one model reference, its files checked."""
    from llmfast.modelfiles import check_adapter_dir
    from llmfast.models import resolve_model
    from llmfast.sources import check_source

    base_spec = None
    if "+" in spec and not Path(spec).exists():
        # mergekit's `model+lora` reference: an adapter applied to a model.
        base_spec, spec = spec.rsplit("+", 1)
    p = Path(spec).expanduser()
    try:
        if p.is_dir() and (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
            return "adapter", check_adapter_dir(p), base_spec
        if base_spec is not None:
            raise UserError(f"'{base_spec}+{spec}': the part after '+' must be a LoRA adapter directory")
        path = resolve_model(spec)
        check_source(path, spec, "merge")  # no packed integer codes averaged as numbers, no thresholds dropped
        return "model", path, None
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def _resolve_base(cfg: MergeConfig, method: MergeMethod, where: Locator) -> Source | None:
    if cfg.base_model is None:
        if method.needs_base:
            raise UserError(f"{where.config_path}: merge_method '{method.name}' needs a base_model (task vectors "
                            "are differences from it)")
        return None
    kind, path, _ = _resolve_source(cfg.base_model, f"{where('base_model')}: base_model")
    if kind != "model":
        raise UserError(f"{where('base_model')}: base_model {cfg.base_model} is a LoRA adapter; the base must be a "
                        "full model")
    return Source(cfg.base_model, "model", path, None, is_base=True)


def _resolve_input(cfg: MergeConfig, i: int, base: Source | None, where: Locator) -> Source:
    from llmfast.merge import adapters as adapters_mod

    m = cfg.models[i]
    at = f"{where('models', i, 'model')}: models[{i}]"
    kind, path, plus_base = _resolve_source(m.model, at)
    params = dict(m.parameters or {})
    if kind == "model":
        is_base = base is not None and path.resolve() == base.path.resolve()
        return Source(m.model, "model", path, params, is_base=is_base, index=i)
    if base is None:
        raise UserError(f"{at}: {path} is a LoRA adapter: set base_model to the model it was trained on")
    if plus_base is not None:
        _kind, plus_path, _ = _resolve_source(plus_base, at)
        if plus_path.resolve() != base.path.resolve():
            raise UserError(f"{at}: '{m.model}' applies the adapter to {plus_base}, which is not base_model "
                            f"{cfg.base_model}: task vectors must share the base")
    adapter = adapters_mod.LoraAdapter.open(path)
    adapters_mod.check_adapter_base(adapter, base.path, cfg.base_model or "", at)
    return Source(m.model, "adapter", path, params, adapter=adapter, index=i)


def _arrange(method: MergeMethod, base: Source | None, inputs: list[Source], config_path: str) -> list[Source]:
    """mergekit's inputs: a base not among the models joins an average; task-vector methods drop the base."""
    base_in_models = any(s.is_base for s in inputs)
    if not method.needs_base and base is not None and not base_in_models:
        inputs = inputs + [Source(base.spec, "model", base.path, None, is_base=True)]
    if method.needs_base:
        inputs = [s for s in inputs if not s.is_base]  # its task vector is zero
        if not inputs:
            raise UserError(f"{config_path}: every model is the base_model: nothing to merge")
    return inputs


# ---------------------------------------------------------------- checks
def _check_input(src: Source, reference: Path, ref_tensors: dict[str, Any], cfg: MergeConfig,
                 where: Locator) -> None:
    """Architecture, tensor names and shapes, vocabulary: from config.json and safetensors headers only."""
    from llmfast.merge import adapters as adapters_mod
    from llmfast.merge import io as mio

    at = f"{where('models', src.index, 'model')}: models[{src.index}]" if src.index is not None else \
        f"{where('base_model')}: base_model"
    if src.kind == "adapter":
        adapters_mod.check_adapter_shapes(src.adapter, ref_tensors, at)
        return
    if src.path.resolve() == reference.resolve():
        return
    _check_architecture(reference, src.path, at)
    _check_vocab(reference, src.path, at, cfg.tokenizer_source)
    other = mio.tensor_index(src.path)
    missing = [n for n in ref_tensors if n not in other]
    extra = [n for n in other if n not in ref_tensors]
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which {reference} lacks"
        raise UserError(f"{at}: {src.path} {what} ({len(missing)} missing, {len(extra)} extra tensors): "
                        "the models' tensors must match one for one")
    for name, (shape, _dt, _f) in ref_tensors.items():
        if other[name][0] != shape:
            raise UserError(f"{at}: tensor {name} has shape {list(other[name][0])} in {src.path} but "
                            f"{list(shape)} in {reference}: merged models must have the same shapes")


_ARCH_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "hidden_act")


def _check_architecture(ref: Path, other: Path, where: str) -> None:
    a, b = describe_model_dir(ref), describe_model_dir(other)
    if a["architecture"] != b["architecture"]:
        raise UserError(f"{where}: {other} is a {b['architecture']}, but {ref} is a {a['architecture']}: only "
                        "models of one architecture can be merged")
    for key in _ARCH_KEYS:
        mine, theirs = a["config"].get(key), b["config"].get(key)
        if key == "tie_word_embeddings" and mine != theirs:  # a key left out means the class default (Gemma ties)
            from llmfast.loading import ties_word_embeddings

            mine, theirs = ties_word_embeddings(ref), ties_word_embeddings(other)
        if mine != theirs:
            raise UserError(f"{where}: {other} has {key}={theirs} but {ref} has {key}={mine}: merged models must "
                            "share one architecture and shape")
    from llmfast.serve.vllm_plugin import RELU_THRESHOLDS_KEY as CUT

    # relufy's cut, calibrated on its model's weights: the merge would keep the reference's, or none, without a word
    if a["config"].get(CUT) != b["config"].get(CUT):
        raise UserError(f"{where}: {other} and {ref} differ in their ReLU cut ({CUT} in config.json, from relufy's "
                        "`target`), and the merge would keep one of them for weights it was not set on: merge relufy "
                        "models made without `target`, then cut the merge with relufy {steps: 0, target: T}")


def _tokenizer_vocab(path: Path) -> str | None:
    """A digest of the vocabulary (tokens, ids, added tokens), or None when the directory has no tokenizer.json."""
    from llmfast.modelfiles import read_json_file

    f = path / "tokenizer.json"
    if not f.is_file():
        return None
    fix = f"re-create the tokenizer files in {path}"
    tok = read_json_file(f, "tokenizer", fix)
    model = tok.get("model") if isinstance(tok, dict) else None
    added_tokens = tok.get("added_tokens") if isinstance(tok, dict) else None
    if not isinstance(model, (dict, type(None))) or not isinstance(added_tokens, (list, type(None))) or any(
            not isinstance(a, dict) for a in added_tokens or []):
        raise UserError(f"{f}: not a tokenizers file (its 'model' must be an object and 'added_tokens' a list of "
                        f"objects): {fix}")
    vocab = (model or {}).get("vocab")
    added = sorted((json.dumps(a.get("id")), json.dumps(a.get("content"))) for a in added_tokens or [])
    return hashlib.sha256(json.dumps([vocab, added], sort_keys=True).encode()).hexdigest()


def _same_bytes(a: Path, b: Path) -> bool:
    """Whether two files hold the same bytes (fine-tunes usually copy their base's tokenizer.json verbatim)."""
    try:
        if a.stat().st_size != b.stat().st_size:
            return False
        return a.read_bytes() == b.read_bytes()
    except OSError:
        return False


def _check_vocab(ref: Path, other: Path, where: str, policy: str | None) -> None:
    if policy == "base":
        return
    # Identical files need no parsing: digesting a 49k-entry vocabulary twice took a second per input.
    if _same_bytes(ref / "tokenizer.json", other / "tokenizer.json"):
        return
    va, vb = _tokenizer_vocab(ref), _tokenizer_vocab(other)
    if va is not None and vb is not None and va != vb:
        raise UserError(f"{where}: {other} has a different tokenizer vocabulary from {ref}: embedding rows would "
                        "mean different tokens; set 'tokenizer_source: base' to merge anyway with the base's tokenizer")
