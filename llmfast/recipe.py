"""Recipes: YAML files validated by pydantic schemas, with errors that point at the file and line.

Every stage has a schema (a `StrictModel`: unknown keys are errors, with a did-you-mean). `load_recipe`
reads the YAML, applies `--set a.b=value` overrides (the value parsed as YAML, so `--set lr=2e-4` is a
float), validates, and turns the first problem into a one-line `UserError` such as

    recipes/eval.yaml:7: eval.batch_size: Input should be a valid integer (got 'eight')
"""

from __future__ import annotations

import datetime as _dt
import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, TypeVar

import yaml
from pydantic import model_validator
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError

from llmfast.bench.engine_names import run_engine_word
from llmfast.data.text import decode
from llmfast.errors import UserError
from llmfast.finetune.bounds import check_lora_scale, some_modules
from llmfast.overrides import apply_overrides, parse_overrides
from llmfast.quant import QuantSpec, coerce_quantization, quantization_mapping
from llmfast.recipe_paths import (ExistingFile, ExistingPath, FileNamePart, ModelName, OutputPath, Paths, ResultsPath,
                                  one_or_list, paths_of)
from llmfast.strict import COUNT_MAX, ClipNorm, LearningRate, Seed, no_bool_numbers
from llmfast.yaml_lines import RepeatedKey, line_index, yaml_error

T = TypeVar("T", bound=BaseModel)


class StrictModel(BaseModel):
    # no inf or NaN (a learning rate of .inf passed `gt=0` and trained a NaN adapter), no true for a number (strict.py)
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)
    _no_bool_numbers = model_validator(mode="before")(classmethod(no_bool_numbers))


DType = Literal["float32", "bfloat16", "float16"]
# A quantization method and its settings, checked in two steps by llmfast/quant: the method (`method:`, a
# method name or one of its shorthands), then its own schema. Written `null` or left out: none.
Quantization = Annotated[QuantSpec | None, BeforeValidator(coerce_quantization)]


# ---------------------------------------------------------------- eval
class PerplexityConfig(StrictModel):
    text: ExistingFile
    max_tokens: PositiveInt | None = 16384  # null: the whole text
    context: Annotated[int, Field(ge=2)] = 1024  # one token to predict from, one to score
    stride: PositiveInt = 512


class TaskSetConfig(StrictModel):
    name: str
    path: ExistingFile
    limit: PositiveInt | None = None


class EvalConfig(StrictModel):
    perplexity: PerplexityConfig | None = None
    tasks: list[TaskSetConfig] = []
    batch_size: PositiveInt = 16
    max_new_tokens: PositiveInt = 48
    dtype: DType = "float32"

    @model_validator(mode="after")
    def _names_differ(self) -> "EvalConfig":  # results are keyed by task name: a repeat would hide one
        names = [t.name for t in self.tasks]
        if dup := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"task names must differ ({', '.join(dup)} repeated)")
        return self


class EvalRecipe(StrictModel):
    model: ModelName
    adapter: ExistingPath | None = None  # a LoRA adapter applied on top of the model (unmerged)
    quantization: Quantization = None  # load the model quantized (llmfast/quant)
    eval: EvalConfig
    output: ResultsPath = Path("runs/eval/results.json")


# ---------------------------------------------------------------- finetune
class DataConfig(StrictModel):
    # .jsonl/.json rows of one shape (docs/finetune.md) or a datasets.save_to_disk dir; or a list, read in turn
    train: Paths
    eval: Paths | None = None  # held-out rows; without them `eval_fraction` of train is held out
    eval_fraction: float = Field(0.02, ge=0, lt=1)
    max_length: PositiveInt = 512
    too_long: Literal["truncate", "error"] = "truncate"
    packing: bool = True
    pack_length: PositiveInt | None = None  # tokens per packed row; null: max_length


class LoraConfig(StrictModel):
    r: Annotated[int, Field(ge=1, le=COUNT_MAX)] = 16  # past it torch's sizes overflow: 1e30 was a traceback
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Annotated[Literal["all-linear"] | Annotated[list[str], Field(min_length=1)],
                              BeforeValidator(some_modules)] = "all-linear"
    rslora: bool = False
    dora: bool = False
    _scale = model_validator(mode="after")(check_lora_scale)  # alpha/r within float32's normal range


def _known_optimizer(name: str) -> str:
    from llmfast.finetune.optimizers import optimizer_names
    from llmfast.registry import did_you_mean

    if name not in optimizer_names():
        raise ValueError(f"unknown optimizer '{name}'{did_you_mean(name, optimizer_names())}; "
                         f"choose from {', '.join(optimizer_names())}")
    return name


class TrainConfig(StrictModel):
    steps: PositiveInt | None = None  # optimizer steps, over `epochs` when both are given (`--set train.steps=N`)
    epochs: float = Field(1.0, gt=0)
    batch_size: PositiveInt = 8  # rows (packed bins, or examples without packing) per micro-batch
    grad_accum: PositiveInt = 1
    lr: LearningRate = 2e-4  # its own floor (strict.py), as relufy's, dejavu's and w4's rates
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_grad_norm: ClipNorm | None = 1.0  # null: no clipping
    optimizer: Annotated[str, AfterValidator(_known_optimizer)] = "auto"  # finetune/optimizers.py
    gradient_checkpointing: bool = False
    loss_chunk_size: PositiveInt = 1024  # positions per chunk of full-vocabulary logits (finetune/loss.py)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    seed: Seed = 0
    log_every: PositiveInt = 1
    eval_every: PositiveInt | None = None  # null: only at the end
    save_every: PositiveInt | None = None  # null: only the final adapter
    keep_checkpoints: PositiveInt = 2
    fsdp: bool = False  # several processes: shard the decoder layers (finetune/fsdp.py) instead of DDP copies


class FinetuneRecipe(StrictModel):
    model: ModelName
    data: DataConfig
    lora: LoraConfig = LoraConfig()
    quantization: Quantization = None  # QLoRA: train on a quantized base
    train: TrainConfig = TrainConfig()
    output: OutputPath
    export_merged: bool = False  # also write OUTPUT/merged, the full model with the adapter merged in

    def inputs(self) -> list[str | os.PathLike[str] | None]:
        """What the output must not be, hold or sit inside (artifacts.check_output): the data files, and the model
        when it is a local folder."""
        model = self.model if Path(self.model).expanduser().is_dir() else None
        return [*paths_of(self.data.train), *paths_of(self.data.eval), model]


# ---------------------------------------------------------------- bench
def _each_once(values: list[Any]) -> list[Any]:
    if len(set(values)) != len(values):
        raise ValueError(f"{values}: give each value once (two points would write the same logs)")
    return values


class WorkloadConfig(StrictModel):
    num_prompts: Annotated[int, Field(ge=1, le=1_000_000)] = 64  # made in memory first (bench/workload.py)
    input_len: PositiveInt = 128  # random-token prompts of this many tokens
    output_len: PositiveInt = 64
    ignore_eos: bool = True  # every request generates output_len tokens, so variants do equal work
    # a sweep; the transformers engine uses it as batch size
    # each once (a point's logs are named by it)
    max_concurrency: Annotated[list[PositiveInt], AfterValidator(_each_once)] = Field([1, 8, 64], min_length=1)
    hf_batch_size: PositiveInt | None = None  # a fixed transformers batch size instead of each concurrency
    request_rate: Annotated[float, Field(gt=0, allow_inf_nan=True)] | Literal["inf"] = "inf"  # .inf too, not NaN
    # one at least: [] drew an empty latency plot (matplotlib's warning), as `bench serve` refuses ''
    percentiles: list[Annotated[float, Field(gt=0, le=100)]] = Field([50, 90, 99], min_length=1)
    seed: NonNegativeInt = 0  # numpy's generators take any
    # vLLM only: before each load level, this many batches of `concurrency` requests that are not counted (a
    # fresh server's first requests are slower; as `vllm bench serve --num-warmups`).
    warmup_batches: NonNegativeInt = 1


class VariantConfig(StrictModel):
    name: FileNamePart
    model: ModelName
    lora: ExistingPath | None = None
    quantization: Quantization = None
    # a registered engine (bench/engine_names.py), or auto: vLLM unless it cannot load the variant here; hf-sparse (the
    # sparse MLP) for threshold and Deja Vu artifacts, ReLU-fied ones to vLLM through llmfast's plugin
    engine: Annotated[str, AfterValidator(run_engine_word)] = "auto"
    tensor_parallel_size: PositiveInt = 1  # vLLM only: one server split over this many x pipeline_parallel_size
    pipeline_parallel_size: PositiveInt = 1  # workers (devices; on a CPU, groups of cores: serve/parallel.py)


class BenchRecipe(StrictModel):
    variants: list[VariantConfig] = Field(min_length=1)
    workload: WorkloadConfig = WorkloadConfig()
    baseline: Literal["first", "all", "none"] = "first"  # transformers on the same prompts as vLLM variants
    quality: EvalConfig | None = None  # `llmfast eval` settings run on every variant
    server_timeout: PositiveInt = 600
    output: OutputPath = Path("runs/bench/report")

    @model_validator(mode="after")
    def _baseline_logs_apart(self) -> "BenchRecipe":  # variant X's baseline logs to hf-X-baseline-cN.log
        names = {v.name for v in self.variants}
        mixed = sorted(n for n in names if n.endswith("-baseline") and n[:-9] in names)
        if mixed and self.baseline != "none":
            raise ValueError(f"variant '{mixed[0]}' would log to the files of the transformers baseline of variant "
                             f"'{mixed[0][:-9]}' (hf-{mixed[0]}-cN.log): rename it, or set baseline: none")
        return self


# ---------------------------------------------------------------- sparsify
class CalibrationText(StrictModel):
    """Which tokens of the text are held out and which a method calibrates or trains on (llmfast/calibration.py)."""

    text: ExistingFile  # e.g. eval/text/persuasion.txt, the text `llmfast eval` scores the start of
    skip_tokens: int = Field(16384, ge=0)  # the evaluated span: calibration/training use only tokens after it
    calibration_tokens: PositiveInt = 8192  # calibrated on (one batch), from the start of the text after the span
    heldout_tokens: PositiveInt = 4096  # sparsity and KL measured on the first tokens (inside the span)
    window: PositiveInt = 512  # tokens per row
    # Chat JSONL files or `datasets` directories (finetune's format; a fine-tune's train split, never what eval
    # scores), one or a list: rendered through the model's chat template, they make `conversations_share` of the
    # calibration / training windows, the rest text (llmfast/calibration.py, with_conversations).
    conversations: Annotated[list[ExistingPath], BeforeValidator(one_or_list)] = []
    conversations_share: float = Field(0.5, gt=0, lt=1)

    @model_validator(mode="after")
    def _heldout_inside_span(self) -> "CalibrationText":
        if self.heldout_tokens > self.skip_tokens:
            given = "" if "heldout_tokens" in self.model_fields_set else ", its default"
            raise ValueError(f"heldout_tokens ({self.heldout_tokens}{given}) must not exceed skip_tokens "
                             f"({self.skip_tokens}): the held-out text would overlap the calibration text; set "
                             "heldout_tokens")
        return self


class SparsifyMethod(StrictModel):
    method: str  # a name in llmfast.sparse.SPARSIFIERS; `config` is then checked by the method's own schema
    config: dict[str, Any] = {}


class SparsifyRecipe(StrictModel):
    model: ModelName
    sparsify: SparsifyMethod
    data: CalibrationText
    dtype: DType = "float32"
    output: OutputPath


# ---------------------------------------------------------------- quantize
class QuantizeRecipe(StrictModel):
    model: ModelName  # a full-precision model: builtin:NAME, a directory (a merge, an export), a .gguf
    quantization: Quantization  # method and settings, checked by the method's own schema (llmfast/quant)
    data: CalibrationText | None = None  # calibration / training text, for methods that calibrate or train
    dtype: DType = "float32"
    output: OutputPath

    @model_validator(mode="after")
    def _has_method(self) -> "QuantizeRecipe":
        if self.quantization is None:
            raise ValueError("quantization: give a method, e.g. {method: bitnet}")
        return self


# ---------------------------------------------------------------- loading
def read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple[Any, ...], int]]:
    if path.is_dir():
        raise UserError(f"recipe {path} is a folder: give the recipe's YAML file")
    if not path.exists():  # a pipe is read as a file is (`llmfast eval <(envsubst < r.yaml)`)
        raise UserError(f"recipe {path} not found")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"recipe {path} cannot be read ({e.strerror or e}): make it readable for this user") from None
    text = decode(raw, path)  # a byte-order mark dropped; not UTF-8 text, a NUL byte: one line
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(yaml_error(e, path, text)) from None
    if data is None:
        raise UserError(f"{path}: the recipe is empty")
    if not isinstance(data, dict):
        raise UserError(f"{path}:1: a recipe is a mapping of keys, not a {type(data).__name__}")
    try:
        return data, line_index(node) if node is not None else {}
    except RepeatedKey as r:
        raise UserError(f"{path}:{r.again}: key '{'.'.join(str(k) for k in r.path)}' is given twice (first at line "
                        f"{r.first}): YAML would keep only the last; remove or rename one") from None
    except RecursionError:
        raise UserError(f"{path}: a YAML alias refers to its own anchor (a value that contains itself): remove "
                        "it") from None


def load_recipe(path: str | os.PathLike[str], schema: type[T], overrides: list[str] | None = None) -> T:
    """Read, override and validate a recipe; any problem becomes a one-line UserError."""
    return load_recipe_with_lines(path, schema, overrides)[0]


def load_recipe_with_lines(
    path: str | os.PathLike[str], schema: type[T], overrides: list[str] | None = None
) -> tuple[T, dict[tuple[Any, ...], int]]:
    """`load_recipe`, plus the line of every key path, for checks made after validation to blame file:line."""
    path = Path(path)
    data, lines = read_yaml(path)
    parsed = parse_overrides(overrides)
    overridden = apply_overrides(data, parsed, {"quantization": quantization_mapping})
    return validate(data, schema, str(path), lines, overridden), lines


def validate(data: dict[str, Any], schema: type[T], source: str, lines: dict[tuple[Any, ...], int] | None = None,
             overridden: set[tuple[str, ...]] | None = None) -> T:
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise UserError(_first(e.errors(), schema, data, source, lines or {}, overridden or set())) from None


def check_known(data: dict[str, Any], schema: type[BaseModel], source: str, ignore: Callable[[Any], bool]) -> None:
    """`validate` without a result, passing over the pydantic errors `ignore(error)` picks: a chain's check of a
    stage whose paths lie under a parent stage's output, which is not there yet."""
    try:
        schema.model_validate(data)
    except ValidationError as e:
        # a union's members first: a list member's pending `${...}` entries then leave nothing of the path member's
        errors = [err for err in _members_said(e.errors()) if not ignore(err)]
        if errors:
            raise UserError(_first(errors, schema, data, source, {}, set())) from None


def _first(errors: list[Any], schema: type[BaseModel], data: Any, source: str, lines: dict[tuple[Any, ...], int],
           overridden: set) -> str:
    # A misspelled key also shows up as a missing one; the misspelling is the useful report.
    return _describe(min(_members_said(errors), key=lambda err: err["type"] != "extra_forbidden"), schema, data,
                     source, lines, overridden)


def _members_said(errors: list[Any]) -> list[Any]:
    """What a union's members (one path or a list of paths) report, less those of the wrong kind: an error is left out
    where another lies inside the value (a list's entry: that member took the value's kind), and a wrong-kind error
    where another member's check of the value says what is wrong with it (a path not found). A literal's mismatch
    (`request_rate: [1]`: not 'inf') says no more than a wrong kind does."""
    locs = [(_strip_union_tags(tuple(e["loc"])), e["type"]) for e in errors]

    def outweighed(at: tuple[Any, ...], kind: str) -> bool:
        for a, other in locs:
            if a[:len(at)] != at:
                continue
            if len(a) > len(at):  # an error inside the value: its member took the value's kind
                return True
            if kind.endswith("_type") and not other.endswith("_type") and other != "literal_error":
                return True  # a wrong kind, where another member said what is wrong with the value itself
        return False

    return [e for e, (at, kind) in zip(errors, locs) if not outweighed(at, kind)]


def _describe(
    err: Any, schema: type[BaseModel], data: Any, source: str, lines: dict[tuple[Any, ...], int], overridden: set
) -> str:
    loc = _strip_union_tags(tuple(err["loc"]))
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    # An override wins over the file for blame.
    str_loc = tuple(str(p) for p in loc)
    # a section checked whole (quantization's settings) names the key in its message: an override of that key; or
    # a key only a --set wrote (`--set train.lr=1` on an eval recipe), whose parent's line would blame the file
    msg_text = str(err.get("msg"))
    inside = [k for k in overridden if str_loc and k[: len(str_loc)] == str_loc and (
        msg_text.removeprefix("Value error, ").startswith(f"{k[-1]}:") or f"'{k[-1]}'" in msg_text
        or not {loc, str_loc} & lines.keys())]
    # the --set as written: `--set 'eval.perplexity={...}'` for an error in eval.perplexity.text
    if hit := max((k for k in overridden if str_loc[: len(k)] == k), key=len, default=None):
        where = f"{source} (--set {'.'.join(hit)})"
    elif inside:
        where = f"{source} (--set {'.'.join(inside[0])})"
    else:
        # a key YAML read as a number (`5: 3`) is the text "5" in the line index
        line = next((lines[k[:n]] for n in range(len(loc), -1, -1) for k in (loc, str_loc) if k[:n] in lines), None)
        where = f"{source}:{line}" if line else source
    kind = err["type"]
    if kind == "extra_forbidden":
        known = _fields_at(schema, loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else f" (known keys: {', '.join(known)})"
        return f"{where}: unknown key '{dotted}'{suggestion}"
    if kind == "missing":
        return f"{where}: required key '{dotted}' is missing"
    msg = str(err["msg"]).removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    if kind == "too_short" and got == []:  # pydantic's "List should have at least 1 item after validation, not 0"
        least = (err.get("ctx") or {}).get("min_length", 1)
        msg = f"an empty list: give at least {least} {'entry' if least == 1 else 'entries'}"
    if kind == "path_type":  # pydantic's "Input is not a valid path for <class 'pathlib.Path'>"
        msg = "not a path: give a file or folder name"
        shown = " (got null)" if got is None else " (got a list)" if isinstance(got, list) else " (got a mapping)" \
            if isinstance(got, dict) else shown
    if kind in ("string_type", "path_type") and isinstance(got, (bool, int, float, _dt.date)):
        # YAML read `1.5`, `2024-01-03` or `yes` as a number, a date or a boolean: a folder of that name is quoted
        text = "yes" if got is True else "no" if got is False else str(got)
        shown += (f": quote it if it is a name, e.g. --set '{dotted}=\"{text}\"'" if "(--set " in where else
                  f": quote it in the YAML if it is a name ('{text}'; YAML reads yes/no/on/off as booleans)"
                  if isinstance(got, bool) else f": quote it in the YAML if it is a name ('{text}')")
    return f"{where}: {dotted}: {msg}{shown}"


def _strip_union_tags(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    # pydantic inserts the member type name ('PerplexityConfig', 'function-after[...]', 'constrained-float': a
    # number with bounds, 'bool' of merge's scalars) into union paths.
    return tuple(p for p in loc if not (isinstance(p, str) and (p[:1].isupper() or "[" in p or p in _SCALAR_TAGS
                                                                or p.startswith("constrained-"))))


_SCALAR_TAGS = {"bool", "int", "float", "str"}


def _fields_at(schema: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the sub-schema at `loc`, for did-you-mean hints."""
    import typing

    current: Any = schema
    keyed = False  # the part after a mapping field (a chain's stages) is one of its keys, not a field
    for part in loc:
        if isinstance(part, int) or keyed:
            keyed = False
            continue
        field = current.model_fields.get(part) if isinstance(current, type) else None
        if field is None:
            return []
        keyed = dict in {typing.get_origin(a) for a in (field.annotation, *typing.get_args(field.annotation))}
        current = _model_in(field.annotation)
        if current is None:
            return []
    return list(current.model_fields) if isinstance(current, type) and issubclass(current, BaseModel) else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def recipe_dict(recipe: BaseModel) -> dict[str, Any]:
    """The validated recipe as plain JSON data, for manifests and results."""
    return recipe.model_dump(mode="json")
