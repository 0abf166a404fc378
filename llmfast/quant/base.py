"""What every quantization method provides, the registry users name methods from, and the parsed setting.

A method is one module in `llmfast/quant/` that subclasses `Quantizer` and registers itself:

    @QUANTIZERS.register("bnb4")
    class Bnb4(Quantizer): ...

It owns everything about its format: the pydantic schema of its settings (`Config`), how a base is loaded
quantized for training (QLoRA today), how a model directory is quantized into an artifact, how such an
artifact is loaded, and which bench engines can serve it on this machine. The artifact's `llmfast.json`
records `{"quantization": {"method": NAME, "config": {...}}}`, so loaders and engines are chosen from the
artifact alone. Modules here import torch and the method's library inside functions only.

A recipe's `quantization:` is validated in two steps: the method is looked up (`method:`, default
`DEFAULT_METHOD`; or a bare method name, or one of a method's `shorthands`), then the
rest is validated by that method's own `Config`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, SerializeAsAny, ValidationError, model_validator

from llmfast.errors import UserError
from llmfast.registry import Registry, class_problem, did_you_mean
from llmfast.strict import no_bool_numbers

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# The method a `quantization:` mapping without `method:` means: the one recipes had before there were others.
DEFAULT_METHOD = "bnb4"


class QuantConfigBase(BaseModel):
    """A method's settings; unknown keys are errors (as in recipes)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), frozen=True, allow_inf_nan=False)
    _no_bool_numbers = model_validator(mode="before")(classmethod(no_bool_numbers))  # strict.py


class Quantizer:
    """One quantization method. Subclasses set `name`, `Config`, `paper` and override what they support."""

    name: ClassVar[str]
    Config: ClassVar[type[QuantConfigBase]] = QuantConfigBase
    paper: ClassVar[str] = ""
    # Bare words a recipe may write instead of a mapping, with the settings each stands for.
    shorthands: ClassVar[dict[str, dict[str, Any]]] = {}
    # Whether `dequantize_for_merge` can turn a model loaded in this format into plain layers (to export adapters).
    dequantizes: ClassVar[bool] = False
    # Whether `load` quantizes a full-precision model as it loads (a recipe's `quantization:` on a plain model);
    # otherwise it reads only artifacts `llmfast quantize` made in its format.
    quantizes_on_load: ClassVar[bool] = False
    # The `quant_method` names transformers' config.json gives checkpoints in this format (one made elsewhere).
    config_names: ClassVar[tuple[str, ...]] = ()
    # Bits a quantized weight takes at the least in the artifact (its scales not counted): for the up-front check
    # that the output fits its disk (`least_bytes`); None: no such check.
    weight_bits: ClassVar[int | None] = None

    def parse(self, raw: dict[str, Any]) -> QuantConfigBase:
        """Validate this method's settings (pydantic errors are turned into one line by `parse_quantization`)."""
        return self.Config.model_validate(raw)

    def training_load_kwargs(self, cfg: QuantConfigBase, dtype: str, device: str) -> dict[str, Any]:
        """`from_pretrained` keyword arguments that load a base quantized for adapter training."""
        raise UserError(f"quantization method {self.name} cannot train adapters on a quantized base")

    def load_for_training(self, path: Path, cfg: QuantConfigBase, dtype: str, device: str) -> Any:
        """The base at `path`, quantized as it loads (`training_load_kwargs`), for adapter training or merging."""
        from llmfast.loading import from_pretrained

        return from_pretrained(path, dtype, **self.training_load_kwargs(cfg, dtype, device))

    def load_kwargs(self, cfg: QuantConfigBase, dtype: str) -> dict[str, Any]:
        """`from_pretrained` keyword arguments that load a model in this format for inference."""
        raise UserError(f"quantization method {self.name} cannot load models")

    def quantize(self, model_dir: Path, cfg: QuantConfigBase, out_dir: Path, **kwargs: Any) -> dict[str, Any]:
        """Write the quantized model into `out_dir` (a temporary directory); return metrics. `kwargs` (llmfast/quant/
        run.py): tokenizer, dtype, rows (calibration windows), train_rows (all the training text's windows),
        heldout (windows from the evaluated span, to measure on), work_dir (checkpoints), resume."""
        raise UserError(f"quantization method {self.name} cannot quantize a model into an artifact yet")

    def engines(self, cfg: QuantConfigBase) -> tuple[str, ...]:
        """Bench engines that can run this format on this machine, preferred first."""
        return ("hf",)

    def cpu_serve_dtype(self, cfg: QuantConfigBase) -> str | None:
        """The dtype vLLM must run this format in on a CPU, when it cannot use the machine's default."""
        return None

    def trains(self, cfg: QuantConfigBase) -> bool:
        """Whether this run trains (keeps checkpoints in the work folder that `--resume` continues)."""
        return False

    def check_resume(self, cfg: QuantConfigBase, work: Path, source: Path) -> None:
        """What `--resume` can check in the work folder (against the `source` model's files) before any model loads
        (default: nothing): a damaged checkpoint is then the one line printed, not a line after transformers'
        progress bar."""

    def check(self, skeleton: Any, cfg: QuantConfigBase) -> None:
        """Refuse, with one line, a model this method cannot quantize; `skeleton` is the model on the meta
        device (shapes, no weights), so this runs before anything is loaded."""

    def load(self, path: Path, cfg: QuantConfigBase, dtype: str, **kwargs: Any) -> "PreTrainedModel":
        """Load an artifact in this format for inference (default: transformers with `load_kwargs`)."""
        from llmfast.loading import from_pretrained

        return from_pretrained(path, dtype, **self.load_kwargs(cfg, dtype), **kwargs)

    def dequantize_for_merge(self, model: "PreTrainedModel", dtype: str) -> None:
        """Turn a model loaded in this format into plain 16/32-bit layers in place (for exporting adapters)."""
        raise UserError(f"quantization method {self.name} cannot dequantize a model for merging")


def least_bytes(skeleton: Any, weight_bits: int) -> int:
    """The fewest bytes an artifact of `skeleton` (the model on the meta device) can take: its linear layers'
    weights (nn.Linear and Conv1D) at `weight_bits` each, everything else (embeddings, the head, norms) at 2 bytes
    (every method here keeps those in 16 or 32 bits). A floor, so a disk is never refused for a wrong guess."""
    import torch
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers, which bnb4 and w4 quantize too

    head = skeleton.get_output_embeddings()
    linear = {id(m.weight) for m in skeleton.modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head}
    return sum(p.numel() * weight_bits // 8 if id(p) in linear else p.numel() * 2 for p in skeleton.parameters())


def no_heldout_window(key: str, window: int) -> str:
    """The message for a held-out curve asked for (`key`) where data.heldout_tokens make no window to measure on."""
    return (f"{key}: data.heldout_tokens make no full window of data.window ({window}) tokens to measure the held-out "
            f"curve on: raise data.heldout_tokens to at least {window}, or remove {key}")


def _quantizer_problem(name: str, cls: type[Quantizer]) -> str | None:
    """What keeps a registered method from working (Registry's check)."""
    return class_problem(name, cls, Quantizer, QuantConfigBase)


QUANTIZERS: Registry[type[Quantizer]] = Registry("quantization method", check=_quantizer_problem)


class QuantSpec(BaseModel):
    """A validated `quantization:` setting: the method's name and its settings."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())

    method: str
    config: SerializeAsAny[QuantConfigBase]

    @property
    def quantizer(self) -> Quantizer:
        return QUANTIZERS.get(self.method)()

    def manifest(self) -> dict[str, Any]:
        """What an artifact's llmfast.json records; `parse_quantization` reads it back."""
        return {"method": self.method, "config": self.config.model_dump(mode="json")}

    def as_arg(self) -> str:
        """One command-line word that `parse_quantization` reads back (a shorthand where one fits, else JSON)."""
        q = QUANTIZERS.get(self.method)
        for word, preset in q.shorthands.items():
            if q.Config.model_validate(preset) == self.config:
                return word
        return json.dumps(self.manifest(), separators=(",", ":"))

    def engines(self) -> tuple[str, ...]:
        return self.quantizer.engines(self.config)


def _words() -> dict[str, tuple[str, dict[str, Any]]]:
    """Every bare word a recipe may write: method names (default settings) and their shorthands."""
    words: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, q in QUANTIZERS.items():
        words[name] = (name, {})
        for word, preset in q.shorthands.items():
            words[word] = (name, dict(preset))
    return words


def quantization_mapping(word: Any) -> Any:
    """A recipe's one-word `quantization: WORD` as the mapping it stands for (`nf4`: {method: bnb4, type: nf4}),
    so that `--set quantization.KEY=...` changes one setting of it; any other value as it is."""
    found = _words().get(word.strip()) if isinstance(word, str) else None
    return {"method": found[0], **found[1]} if found else word


def _spec(method: str, raw: dict[str, Any]) -> QuantSpec:
    q = QUANTIZERS.get(method)
    try:
        cfg = q().parse(raw)
    except ValidationError as e:
        err = min(e.errors(), key=lambda x: x["type"] != "extra_forbidden")
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            known = [f for f in q.Config.model_fields]
            hint = did_you_mean(key, known) or f" (known keys: method, {', '.join(known)})"
            raise ValueError(f"unknown key '{key}' for quantization method {method}{hint}") from None
        got = err.get("input")
        shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
        raise ValueError(f"{key}: {str(err['msg']).removeprefix('Value error, ')}{shown} "
                         f"(quantization method {method})") from None
    return QuantSpec(method=method, config=cfg)


def coerce_quantization(raw: Any) -> QuantSpec | None:
    """A recipe's `quantization:` value as a QuantSpec; raises ValueError (pydantic adds file and line)."""
    if raw is None or isinstance(raw, QuantSpec):
        return raw
    if isinstance(raw, str):
        text = raw.strip()
        if text.startswith("{"):  # the JSON word of QuantSpec.as_arg
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"not valid JSON: {e.msg}") from None
        else:
            words = _words()
            if text not in words:
                raise ValueError(f"unknown quantization method '{text}'{did_you_mean(text, list(words))}; "
                                 f"choose from {', '.join(sorted(words))}")
            method, preset = words[text]
            return _spec(method, preset)
    if not isinstance(raw, dict):
        raise ValueError("expected a method name (e.g. bnb4) or a mapping with 'method:' and its settings")
    rest = dict(raw)
    method = rest.pop("method", DEFAULT_METHOD)
    if method not in QUANTIZERS:
        raise ValueError(f"unknown quantization method '{method}'{did_you_mean(str(method), QUANTIZERS.names())}; "
                         f"choose from {', '.join(QUANTIZERS.names())}")
    if set(rest) == {"config"} and isinstance(rest["config"], dict):  # the manifest's form
        rest = rest["config"]
    return _spec(method, rest)


def parse_quantization(raw: Any, where: str = "quantization") -> QuantSpec | None:
    """`coerce_quantization` for callers outside a recipe: a problem is one UserError line prefixed by `where`."""
    try:
        return coerce_quantization(raw)
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None


def engines_for(quant: Any) -> tuple[str, ...]:
    """Bench engines that can run a model with this quantization (a QuantSpec, word, mapping or None)."""
    spec = parse_quantization(quant)
    return ("vllm", "hf") if spec is None else spec.engines()


def manifest_quantization(manifest: dict[str, Any] | None, folder: str | Path | None = None) -> QuantSpec | None:
    """The quantization an artifact's llmfast.json records, also in the form older versions wrote
    (`quantization: true` beside the recipe's `quantization: {type: ..., double_quant: ...}`); `folder`, the
    artifact's, is named in errors."""
    if not manifest:
        return None
    q = manifest.get("quantization")
    if q is True:
        q = (manifest.get("recipe") or {}).get("quantization") or {}
    if not q:
        return None
    where = Path(folder) / "llmfast.json" if folder is not None else "llmfast.json"
    return parse_quantization(q, where=f"{where}: quantization")


def refuse_conv1d(skeleton: Any, method: str) -> None:
    """GPT-2-style models keep their projections in Conv1D layers (weights stored inputs by outputs): w4 and
    bitnet write and read nn.Linear layers only (w4's artifact of one did not load back), so refuse up front."""
    from transformers.pytorch_utils import Conv1D

    if any(isinstance(m, Conv1D) for m in skeleton.modules()):
        arch = type(skeleton).__name__
        kind = getattr(getattr(skeleton, "config", None), "model_type", "?")
        raise UserError(f"{method}: {arch} ({kind}) keeps its projections in GPT-2's Conv1D layers, which {method} "
                        "does not quantize: it takes models of nn.Linear layers (Llama, Qwen2/3, Mistral, Gemma, "
                        "Phi-3); use bnb4 (nf4/fp4) for this one")
