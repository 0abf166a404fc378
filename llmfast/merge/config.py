"""The merge config (mergekit's YAML format, for the methods llmfast implements) and the checks made before any work.

A mergekit config such as

    merge_method: ties
    base_model: builtin:smollm2-135m
    models:
      - model: runs/lora-dates/merged
        parameters: {weight: 1.0, density: 0.5}
      - model: runs/lora-units/adapter      # a PEFT LoRA adapter on the same base
        parameters:
          weight: [{filter: mlp, value: 0.7}, {value: 1.0}]   # per-tensor-name filter, first match wins
          density: 0.5
    parameters: {normalize: true}
    dtype: float32

is read as is. Parameter values follow mergekit: a scalar; a list of numbers (a gradient interpolated
over the layer index); `{filter: SUBSTRING, value: ...}` or a list of them, the first whose filter is a
substring of the tensor name (or is missing or `*`) wins. A model's own `parameters` beat the top-level
ones; merge-wide parameters (normalize, lambda, rescale, int8_mask) live only at the top level.

`plan_merge` resolves every model, reads only safetensors headers and small JSON files, and refuses,
with one line and before anything is written: a different architecture or tensor shape, a different
vocabulary (unless `tokenizer_source: base`), an adapter trained on another base, an unknown method or
parameter, a missing path.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import Field, field_validator

from llmfast.errors import UserError
from llmfast.recipe import StrictModel, apply_overrides, parse_overrides, read_yaml, validate

Scalar = Union[bool, int, float, str]


class ConditionalParameter(StrictModel):
    value: Union[Scalar, list[Scalar]]
    filter: str | None = None


ParameterSetting = Union[Scalar, list[Scalar], ConditionalParameter, list[ConditionalParameter]]


class InputModel(StrictModel):
    model: str
    parameters: dict[str, ParameterSetting] | None = None


DTypeName = Literal["float32", "bfloat16", "float16", "torch.float32", "torch.bfloat16", "torch.float16"]


class MergeConfig(StrictModel):
    """mergekit's `MergeConfiguration`, restricted to `models:` merges (no slices, modules or tokenizer surgery)."""

    merge_method: str
    base_model: str | None = None
    models: list[InputModel] = Field(min_length=1)
    parameters: dict[str, ParameterSetting] | None = None
    dtype: DTypeName | None = None
    out_dtype: DTypeName | None = None
    tokenizer_source: str | None = None  # null (same vocabulary required) or "base" (use the base's)
    # mergekit keys llmfast does not implement: accepted only when empty, so the error names them.
    slices: Any = None
    modules: Any = None
    tokenizer: Any = None
    chat_template: Any = None

    @field_validator("slices", "modules", "tokenizer", "chat_template")
    @classmethod
    def _unsupported(cls, v: Any) -> Any:
        if v:
            raise ValueError("not supported by llmfast merge: list whole models under 'models:' instead")
        return v

    @field_validator("tokenizer_source")
    @classmethod
    def _tokenizer_source(cls, v: str | None) -> str | None:
        if v not in (None, "base"):
            raise ValueError("only 'base' (use the base model's tokenizer) or null (all models must share one "
                             "vocabulary) are supported; vocabulary union/permutation is not")
        return v


# ---------------------------------------------------------------- parameters
def _layer_t(tensor_name: str, num_layers: int) -> float:
    """mergekit's gradient position: layer i of L is i/(L-1); tensors outside the layers are at 0."""
    m = re.search(r"\.layers\.(\d+)\.", tensor_name)
    if not m or num_layers <= 1:
        return 0.0 if not m else 1.0
    return int(m.group(1)) / (num_layers - 1)


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """One parameter's value for one tensor (None: no filter matched, fall through to the next scope)."""
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
                return setting[int(t * (len(setting) - 1))]
            # A gradient: linear interpolation between neighbouring entries.
            pos = t * (len(setting) - 1)
            i0 = int(pos)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = pos - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        for cond in setting:
            if cond.filter is None or cond.filter == "*" or cond.filter in tensor_name:
                return evaluate_setting(cond.value, tensor_name, t)
    return None


def _cast(name: str, kind: type, value: Any) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"parameter '{name}' must be true or false (got {value!r})")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            return float(value)  # mergekit accepts '1e-3' written as a string
        except (TypeError, ValueError):
            raise ValueError(f"parameter '{name}' must be a number (got {value!r})") from None
    return float(value)


# ---------------------------------------------------------------- plan
@dataclasses.dataclass
class Source:
    """One input of the merge: a full model directory or a LoRA adapter on the base."""

    spec: str
    kind: Literal["model", "adapter"]
    path: Path
    parameters: dict[str, Any] | None
    is_base: bool = False
    adapter: Any = None  # adapters.LoraAdapter for kind == "adapter"


@dataclasses.dataclass
class MergePlan:
    config: MergeConfig
    config_path: str
    method: Any  # methods.MergeMethod
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

    @property
    def adapters_only(self) -> bool:
        return all(s.kind == "adapter" for s in self.inputs if not s.is_base)


def load_config(path: str | Path, overrides: list[str] | None = None) -> tuple[MergeConfig, dict[tuple, int]]:
    data, lines = read_yaml(Path(path))
    parsed = parse_overrides(overrides)
    apply_overrides(data, parsed)
    return validate(data, MergeConfig, str(path), lines, {tuple(k) for k, _ in parsed}), lines


def _where(config_path: str, lines: dict[tuple, int], *loc: Any) -> str:
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return f"{config_path}:{lines[loc[:n]]}"
    return config_path


def _resolve_source(spec: str, where: str) -> tuple[Literal["model", "adapter"], Path, str | None]:
    """(kind, path, base spec for `base+adapter` syntax) of one model reference."""
    from llmfast.models import resolve_model

    base_spec = None
    if "+" in spec and not Path(spec).exists():
        # mergekit's `model+lora` reference: an adapter applied to a model.
        base_spec, spec = spec.rsplit("+", 1)
    p = Path(spec).expanduser()
    if p.is_dir() and (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
        return "adapter", p, base_spec
    if base_spec is not None:
        raise UserError(f"{where}: '{base_spec}+{spec}': the part after '+' must be a LoRA adapter directory")
    try:
        return "model", resolve_model(spec), None
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def _model_config(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text(encoding="utf-8"))


_ARCH_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")


def _check_architecture(ref: Path, other: Path, where: str) -> None:
    a, b = _model_config(ref), _model_config(other)
    if (a.get("architectures") or [None])[0] != (b.get("architectures") or [None])[0]:
        raise UserError(f"{where}: {other} is a {(b.get('architectures') or ['?'])[0]}, but {ref} is a "
                        f"{(a.get('architectures') or ['?'])[0]}: only models of one architecture can be merged")
    for key in _ARCH_KEYS:
        if a.get(key) != b.get(key):
            raise UserError(f"{where}: {other} has {key}={b.get(key)} but {ref} has {key}={a.get(key)}: "
                            "merged models must share one architecture and shape")


def _tokenizer_vocab(path: Path) -> str | None:
    """A digest of the vocabulary (tokens, ids, added tokens), or None when the directory has no tokenizer.json."""
    f = path / "tokenizer.json"
    if not f.is_file():
        return None
    tok = json.loads(f.read_text(encoding="utf-8"))
    vocab = (tok.get("model") or {}).get("vocab")
    added = sorted((a.get("id"), a.get("content")) for a in tok.get("added_tokens") or [])
    return hashlib.sha256(json.dumps([vocab, added], sort_keys=True).encode()).hexdigest()


def _check_vocab(ref: Path, other: Path, where: str, policy: str | None) -> None:
    if policy == "base":
        return
    va, vb = _tokenizer_vocab(ref), _tokenizer_vocab(other)
    if va is not None and vb is not None and va != vb:
        raise UserError(f"{where}: {other} has a different tokenizer vocabulary from {ref}: embedding rows would "
                        "mean different tokens; set 'tokenizer_source: base' to merge anyway with the base's tokenizer")


def plan_merge(config_path: str | Path, overrides: list[str] | None = None, seed: int | None = None) -> MergePlan:
    """Read and check everything; return the plan. Nothing is written and no tensor is read."""
    from llmfast.merge import adapters as adapters_mod
    from llmfast.merge import io as mio
    from llmfast.merge.methods import METHODS

    config_path = str(config_path)
    cfg, lines = load_config(config_path, overrides)
    method = METHODS.get(cfg.merge_method)
    if method is None:
        hint = difflib.get_close_matches(cfg.merge_method, list(METHODS), n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise UserError(f"{_where(config_path, lines, 'merge_method')}: unknown merge_method "
                        f"'{cfg.merge_method}'{suggestion}: choose one of {', '.join(METHODS)}")

    # Every reference resolved up front: a missing path fails before any work.
    base: Source | None = None
    if cfg.base_model is not None:
        kind, path, _ = _resolve_source(cfg.base_model, f"{_where(config_path, lines, 'base_model')}: base_model")
        if kind != "model":
            raise UserError(f"{_where(config_path, lines, 'base_model')}: base_model {cfg.base_model} is a LoRA "
                            "adapter; the base must be a full model")
        base = Source(cfg.base_model, "model", path, None, is_base=True)
    elif method.needs_base:
        raise UserError(f"{config_path}: merge_method '{method.name}' needs a base_model (task vectors are "
                        "differences from it)")

    inputs: list[Source] = []
    for i, m in enumerate(cfg.models):
        where = f"{_where(config_path, lines, 'models', i, 'model')}: models[{i}]"
        kind, path, plus_base = _resolve_source(m.model, where)
        params = dict(m.parameters or {})
        if kind == "model" and base is not None and path.resolve() == base.path.resolve():
            inputs.append(Source(m.model, "model", path, params, is_base=True))
            continue
        src = Source(m.model, kind, path, params)
        if kind == "adapter":
            if base is None:
                raise UserError(f"{where}: {path} is a LoRA adapter: set base_model to the model it was trained on")
            if plus_base is not None:
                pk, pb, _ = _resolve_source(plus_base, where)
                if pb.resolve() != base.path.resolve():
                    raise UserError(f"{where}: '{m.model}' applies the adapter to {plus_base}, which is not "
                                    f"base_model {cfg.base_model}: task vectors must share the base")
            src.adapter = adapters_mod.LoraAdapter.open(path)
            adapters_mod.check_adapter_base(src.adapter, base.path, cfg.base_model or "", where)
        inputs.append(src)

    base_in_models = any(s.is_base for s in inputs)
    if not method.needs_base and base is not None and not base_in_models:
        # mergekit adds a base_model that is not among the models as one more input of a linear merge.
        inputs.append(Source(cfg.base_model or "", "model", base.path, None, is_base=True))
    if method.needs_base:
        inputs = [s for s in inputs if not s.is_base]  # its task vector is zero
        if not inputs:
            raise UserError(f"{config_path}: every model is the base_model: nothing to merge")
    if any(s.kind == "adapter" for s in inputs) and not method.needs_base and not base_in_models and base is None:
        raise UserError(f"{config_path}: LoRA adapters need a base_model")

    # Architecture, shapes and vocabulary, from config.json and safetensors headers only.
    reference = base.path if base is not None else inputs[0].path
    ref_tensors = mio.tensor_index(reference)
    for i, src in enumerate(inputs):
        where = f"{_where(config_path, lines, 'models', i, 'model')}: models[{i}]" if i < len(cfg.models) else \
            f"{_where(config_path, lines, 'base_model')}: base_model"
        if src.kind == "adapter":
            adapters_mod.check_adapter_shapes(src.adapter, ref_tensors, where)
            continue
        if src.path.resolve() == reference.resolve():
            continue
        _check_architecture(reference, src.path, where)
        _check_vocab(reference, src.path, where, cfg.tokenizer_source)
        other = mio.tensor_index(src.path)
        missing = [n for n in ref_tensors if n not in other]
        extra = [n for n in other if n not in ref_tensors]
        if missing or extra:
            what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which {reference} lacks"
            raise UserError(f"{where}: {src.path} {what} ({len(missing)} missing, {len(extra)} extra tensors): "
                            "the models' tensors must match one for one")
        for name, (shape, _dt, _f) in ref_tensors.items():
            if other[name][0] != shape:
                raise UserError(f"{where}: tensor {name} has shape {list(other[name][0])} in {src.path} but "
                                f"{list(shape)} in {reference}: merged models must have the same shapes")

    num_layers = int(_model_config(reference).get("num_hidden_layers") or 0)
    tensors = [(n, shape, dt) for n, (shape, dt, _f) in mio.ordered(ref_tensors).items()]
    out_dtype = (cfg.out_dtype or cfg.dtype or mio.model_dtype(reference, ref_tensors)).removeprefix("torch.")

    # Parameters: every one validated and resolved for every tensor now, so a missing weight or a
    # misspelled parameter fails before the first tensor is read.
    allowed = set(method.shared) | set(method.per_input)
    for scope, params, loc in [("top-level", cfg.parameters or {}, ("parameters",))] + [
        (f"models[{i}]", m.parameters or {}, ("models", i, "parameters")) for i, m in enumerate(cfg.models)
    ]:
        for key in params:
            if key not in allowed:
                hint = difflib.get_close_matches(key, sorted(allowed), n=1)
                suggestion = f" (did you mean '{hint[0]}'?)" if hint else f" (it takes: {', '.join(sorted(allowed))})"
                raise UserError(f"{_where(config_path, lines, *loc, key)}: merge_method '{method.name}' has no "
                                f"parameter '{key}'{suggestion}")
            if scope != "top-level" and key in method.shared:
                raise UserError(f"{_where(config_path, lines, *loc, key)}: '{key}' applies to the whole merge: put "
                                "it under the top-level 'parameters'")
    shared = _resolve_shared(method, cfg, config_path, lines, "", 0.0)
    shared_by_tensor = {n: _resolve_shared(method, cfg, config_path, lines, n, _layer_t(n, num_layers))
                        for n, _s, _d in tensors}
    per_input = []
    for i, src in enumerate(inputs):
        table: dict[str, dict[str, Any]] = {}
        for name, _shape, _dt in tensors:
            t = _layer_t(name, num_layers)
            values = {}
            for key, (kind, default) in method.per_input.items():
                value = None
                for scope in (src.parameters, cfg.parameters):
                    if scope and key in scope:
                        value = evaluate_setting(scope[key], name, t)
                        if value is not None:
                            break
                if value is None:
                    if default is REQUIRED:
                        who = "base_model" if src.is_base else f"models[{i}] ({src.spec})"
                        raise UserError(f"{config_path}: {who} has no '{key}' for tensor {name}: merge_method "
                                        f"'{method.name}' needs one for every input (set it in the model's or the "
                                        "top-level parameters)")
                    value = default
                try:
                    values[key] = _cast(key, kind, value)
                except ValueError as e:
                    raise UserError(f"{config_path}: models[{i}]: {e}") from None
                if key == "density" and not 0.0 <= values[key] <= 1.0:
                    raise UserError(f"{config_path}: models[{i}]: density must be between 0 and 1 "
                                    f"(got {values[key]} for {name})")
            table[name] = values
        per_input.append(table)
    return MergePlan(config=cfg, config_path=config_path, method=method, base=base, inputs=inputs, tensors=tensors,
                     reference=reference, num_layers=num_layers, out_dtype=out_dtype, shared=shared,
                     per_input=per_input, seed=0 if seed is None else seed, shared_by_tensor=shared_by_tensor)


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


def _resolve_shared(method: Any, cfg: MergeConfig, config_path: str, lines: dict, name: str,
                    t: float) -> dict[str, Any]:
    shared = {}
    for key, (kind, default) in method.shared.items():
        value = evaluate_setting(cfg.parameters[key], name, t) if cfg.parameters and key in cfg.parameters else None
        try:
            shared[key] = _cast(key, kind, default if value is None else value)
        except ValueError as e:
            raise UserError(f"{_where(config_path, lines, 'parameters', key)}: {e}") from None
    return shared
