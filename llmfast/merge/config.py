"""The merge config: mergekit's YAML format (for the methods llmfast implements) and its parameter values.

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
ones; merge-wide parameters (a method's non-`per_input` ones) live only at the top level. Each value is
checked by the method's own `Param` declaration (type, range, required), never by its name here.

`llmfast.merge.plan` resolves the models and makes the checks done before any work.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from llmfast.errors import UserError
from llmfast.merge.methods.base import MergeMethod, Param
from llmfast.recipe import StrictModel, load_recipe_with_lines
from llmfast.recipe_paths import ModelName

Scalar = Union[bool, int, float, str]


class ConditionalParameter(StrictModel):
    value: Union[Scalar, list[Scalar]]
    filter: str | None = None


ParameterSetting = Union[Scalar, list[Scalar], ConditionalParameter, list[ConditionalParameter]]


def _no_empty_settings(params: Any) -> Any:
    """A parameter written `null` or `[]` is refused by name: pydantic's union reports the first of its members
    (`weight.bool: Input should be a valid boolean`), and an empty list fell through to the default (density 1)."""
    for key, value in (params or {}).items() if isinstance(params, dict) else ():
        if value is None or value == []:
            raise ValueError(f"'{key}' is {'null' if value is None else 'an empty list'}: give it a value (a list "
                             "spreads values over the layers), or leave the key out")
    return params


class InputModel(StrictModel):
    model: ModelName  # '' was the working folder; a name past 255 bytes a traceback
    parameters: dict[str, ParameterSetting] | None = None

    _settings = field_validator("parameters", mode="before")(_no_empty_settings)


DTypeName = Literal["float32", "bfloat16", "float16", "torch.float32", "torch.bfloat16", "torch.float16"]


class MergeConfig(StrictModel):
    """mergekit's `MergeConfiguration`, restricted to `models:` merges (no slices, modules or tokenizer surgery)."""

    merge_method: str
    base_model: ModelName | None = None
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

    _settings = field_validator("parameters", mode="before")(_no_empty_settings)

    @model_validator(mode="after")
    def _tokenizer_of_a_base(self) -> "MergeConfig":
        if self.tokenizer_source == "base" and not self.base_model:
            raise ValueError("tokenizer_source: base takes the base model's tokenizer, and this merge has no "
                             "base_model: name one, or leave tokenizer_source out")
        return self

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



# ---------------------------------------------------------------- parameter values
def layer_position(tensor_name: str, num_layers: int) -> float:
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


def load_config(path: str | Path, overrides: list[str] | None = None) -> tuple[MergeConfig, "Lines"]:
    """The validated config and the line of every key (recipe.py's loader: errors say file:line)."""
    return load_recipe_with_lines(path, MergeConfig, overrides)


Lines = dict[tuple[Any, ...], int]


class Locator:
    """`where(*key_path)`: 'config.yaml:LINE' of the deepest key on the path that the file has."""

    def __init__(self, config_path: str, lines: Lines) -> None:
        self.config_path = config_path
        self.lines = lines

    def __call__(self, *loc: Any) -> str:
        for n in range(len(loc), 0, -1):
            if loc[:n] in self.lines:
                return f"{self.config_path}:{self.lines[loc[:n]]}"
        return self.config_path


# ---------------------------------------------------------------- resolving values
def check_parameter_names(method: MergeMethod, cfg: MergeConfig, where: Locator) -> None:
    """Every key under any `parameters:` is one of the method's, and merge-wide ones sit at the top level."""
    allowed = sorted(p.name for p in method.params)
    scopes = [(("parameters",), cfg.parameters or {})] + [
        (("models", i, "parameters"), m.parameters or {}) for i, m in enumerate(cfg.models)]
    for loc, params in scopes:
        for key in params:
            param = method.param(key)
            if param is None:
                hint = difflib.get_close_matches(key, allowed, n=1)
                suggestion = f" (did you mean '{hint[0]}'?)" if hint else f" (it takes: {', '.join(allowed)})"
                raise UserError(f"{where(*loc, key)}: merge_method '{method.name}' has no parameter '{key}'"
                                f"{suggestion}")
            if loc[0] == "models" and not param.per_input:
                raise UserError(f"{where(*loc, key)}: '{key}' applies to the whole merge: put it under the "
                                "top-level 'parameters'")


def resolve_shared(method: MergeMethod, cfg: MergeConfig, where: Locator, tensor: str,
                   num_layers: int) -> dict[str, Any]:
    """The merge-wide parameter values for one tensor ('' for the values without a filter)."""
    t = layer_position(tensor, num_layers) if tensor else 0.0
    values = {}
    for p in method.shared_params:
        value = _lookup(p, [cfg.parameters], tensor, t)
        values[p.name] = _checked(p, value, where, ("parameters", p.name), "",
                                  f"merge_method '{method.name}' needs '{p.name}' under the top-level parameters")
    return values


def resolve_per_input(method: MergeMethod, cfg: MergeConfig, where: Locator, own: dict[str, Any] | None,
                      index: int | None, who: str, tensors: list[str], num_layers: int) -> dict[str, dict[str, Any]]:
    """One input's per-input parameter values for every tensor (own settings first, then the top level)."""
    table: dict[str, dict[str, Any]] = {}
    for tensor in tensors:
        t = layer_position(tensor, num_layers)
        values = {}
        for p in method.per_input_params:
            value = _lookup(p, [own, cfg.parameters], tensor, t)
            loc = ("models", index, "parameters", p.name) if own and p.name in own and index is not None \
                else ("parameters", p.name)
            values[p.name] = _checked(
                p, value, where, loc, f"{who}: ",
                f"{who} has no '{p.name}' for tensor {tensor}: merge_method '{method.name}' needs one for every "
                "input (set it in the model's or the top-level parameters)", tensor)
        table[tensor] = values
    return table


def _lookup(p: Param, scopes: list[dict[str, Any] | None], tensor: str, t: float) -> Any:
    for scope in scopes:
        if scope and p.name in scope:
            value = evaluate_setting(scope[p.name], tensor, t)
            if value is not None:
                return value
    return None


def _checked(p: Param, value: Any, where: Locator, loc: tuple[Any, ...], who: str, missing: str,
             tensor: str = "") -> Any:
    """`value` checked by its declaration; the default when no setting applies (an error when it is required)."""
    if value is None:
        if p.required:
            raise UserError(f"{where.config_path}: {missing}")
        return p.default
    try:
        return p.check(value)
    except ValueError as e:
        raise UserError(f"{where(*loc)}: {who}{e}{f' for {tensor}' if tensor else ''}") from None
