"""What every activation-sparsity method provides, the registry users name methods from, and the shared helpers.

A method is one module in `llmfast/sparse/` that subclasses `Sparsifier` and registers itself:

    @SPARSIFIERS.register("teal")
    class Teal(ThresholdSparsifier): ...

It has its own pydantic settings (`Config`, validated under `sparsify.config` of a recipe), writes its
artifact into the temporary directory `llmfast sparsify` hands it (`sparsify`), and, when its artifact
needs more than transformers does on load, puts that back on a loaded model (`apply`). The artifact's
`llmfast.json` records `{"sparsity": {"method": NAME, "config": {...}}}`, so `models.load_model` finds the
method from the artifact alone. Modules here import torch inside functions only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator

from llmfast.errors import UserError
from llmfast.registry import Registry, class_problem
from llmfast.strict import no_bool_numbers

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class SparseConfigBase(BaseModel):
    """A method's settings; unknown keys are errors (as in recipes)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)
    _no_bool_numbers = model_validator(mode="before")(classmethod(no_bool_numbers))  # strict.py


@dataclasses.dataclass
class SparsifyJob:
    """Everything a method works from, checked and loaded before the output exists."""

    model_spec: str  # as the user wrote it (the manifest's parent)
    model_path: Path  # the resolved Hugging Face directory
    model: "PreTrainedModel"  # the original (dense) model, eval mode
    tokenizer: "PreTrainedTokenizerBase"
    dtype: str
    # (windows, window) ids a training method learns from: all the text after the evaluated span, plus
    # data.conversations when given (None for methods that do not train)
    train_rows: "torch.Tensor | None"
    calibration: "torch.Tensor"  # (windows, window) ids: the text's first calibration tokens after the span (+ chats)
    heldout: "torch.Tensor"  # (windows, window) ids from the evaluated span, never calibrated or trained on
    window: int
    work_dir: Path  # survives a kill: checkpoints and the training log (removed when the artifact is complete)
    resume: bool = False


class Sparsifier:
    """One sparsity method. Subclasses set `name`, `Config`, `paper` and implement `sparsify`."""

    name: ClassVar[str]
    Config: ClassVar[type[SparseConfigBase]] = SparseConfigBase
    paper: ClassVar[str] = ""
    trains: ClassVar[bool] = False  # True: it writes checkpoints and honours --resume
    # True: the artifact holds new weights (relufy's trained model); False: the source's files, hard-linked where
    # the file system allows (copied across file systems), and the method's own small files.
    rewrites_weights: ClassVar[bool] = False

    def sparsify(self, job: SparsifyJob, cfg: Any, out_dir: Path) -> dict[str, Any]:
        """Write the artifact's model files into `out_dir` (a temporary directory); return metrics."""
        raise NotImplementedError

    def check_resume(self, cfg: Any, work: Path, source: Path) -> None:
        """What `--resume` can check in the work folder (against the `source` model's files) before any model loads
        (default: nothing): a damaged checkpoint is then the one line printed, not a line after transformers'
        progress bar."""

    def apply(self, model: "PreTrainedModel", cfg: Any, artifact: Path) -> None:
        """Put what the artifact holds beyond the weights back on a freshly loaded model (default: nothing)."""


# The methods whose artifact may be made over a TEAL artifact of the attention sites alone, keeping its thresholds
# (`sparsity.attention` in llmfast.json; llmfast/sparse/stacked.py).
OVER_ATTENTION = ("dejavu",)


def _sparsifier_problem(name: str, cls: type[Sparsifier]) -> str | None:
    """What keeps a registered method from working (Registry's check)."""
    return class_problem(name, cls, Sparsifier, SparseConfigBase,
                         implements=(("sparsify", "sparsify(self, job, cfg, out_dir)"),))


# Holds the classes; callers instantiate the one they look up.
SPARSIFIERS: Registry[type[Sparsifier]] = Registry("sparsification method", check=_sparsifier_problem)


def modules_with(model: "PreTrainedModel", attrs: tuple[str, ...], where: str, missing: str) -> list[Any]:
    """The modules that have every one of `attrs`, in layer order; none is a one-line error: "ARCH has no MISSING"."""
    found = [m for m in model.modules() if all(hasattr(m, a) for a in attrs)]
    if not found:
        arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
        prefix = f"{where}: " if where else ""
        raise UserError(f"{prefix}{arch} has no {missing}")
    return found


def relu_mlps(model: "PreTrainedModel") -> bool:
    """Whether every gated MLP of `model` computes ReLU, read from the built modules: the config key that names
    the activation differs by architecture (Llama's `hidden_act`, Gemma2's `hidden_activation`, a multimodal
    Gemma3's under `text_config`)."""
    import torch

    return all(isinstance(activation(m), torch.nn.ReLU) for m in gated_mlps(model))


def mlp_activation_name(model: "PreTrainedModel") -> str:
    """The class of the first gated MLP's activation, for messages."""
    return type(activation(gated_mlps(model)[0])).__name__


LLAMA_MLP = ("gate_proj", "up_proj", "down_proj", "act_fn")


def gated_mlps(model: "PreTrainedModel", where: str = "") -> list[Any]:
    """The gated MLPs (`down(act(gate(x)) * up(x))`), in layer order, as they are: Llama style, or with gate and up
    fused in one `gate_up_proj` (Phi-3, GLM: fused.py). Hooks on an MLP's input, its activation (`activation`) and
    down_proj's input work on both; what reads gate and up apart (the sparse runtime) splits them first
    (`fused.split_fused_mlps`). None is a one-line error."""
    from llmfast.sparse.fused import is_fused_mlp

    found = [m for m in model.modules() if all(hasattr(m, a) for a in LLAMA_MLP) or is_fused_mlp(m)]
    return found or modules_with(model, LLAMA_MLP, where, "gated MLP (gate_proj/up_proj/down_proj with act_fn, or "
                                 "Phi-3/GLM's fused gate_up_proj): activation sparsity supports those models only")


def activation(mlp: Any) -> Any:
    """A gated MLP's activation module (act_fn; a fused MLP's activation_fn)."""
    return mlp.act_fn if hasattr(mlp, "act_fn") else mlp.activation_fn


def set_activation(mlp: Any, module: Any) -> None:
    setattr(mlp, "act_fn" if hasattr(mlp, "act_fn") else "activation_fn", module)


def artifact_sparsity(path: str | Path) -> tuple["Sparsifier", Any] | None:
    """The method and validated settings a `llmfast sparsify` artifact's manifest records, or None for another
    directory; a method or setting that is not valid is one line naming the file."""
    spec = sparsity_section(path)
    if not spec:
        return None
    import llmfast.sparse  # noqa: F401  (registers the methods)

    method = SPARSIFIERS.get(spec.get("method"), where=f"{Path(path) / 'llmfast.json'}: sparsity.method")()
    if spec.get("attention") and method.name not in OVER_ATTENTION:  # the runtime refuses it too (stacked.py)
        raise UserError(f"{Path(path) / 'llmfast.json'}: sparsity.attention is for {', '.join(OVER_ATTENTION)} "
                        f"artifacts (this one: {method.name}): rebuild it with `llmfast sparsify`")
    return method, manifest_config(method, spec, Path(path))


def sparsity_section(path: str | Path) -> dict[str, Any]:
    """The `sparsity` section of a directory's llmfast.json (empty for a model llmfast did not sparsify), once its
    weights are checked to be those the thresholds and predictors were made for: a threshold or Deja Vu artifact
    hard-links its source's weight files, so new weights written into the source's files (`cp` over them, which
    writes into the existing file; safetensors' own save makes a new file) change the artifact's too. Artifacts of
    earlier versions record no fingerprint and are not checked."""
    from llmfast.artifacts import read_manifest
    from llmfast.modelfiles import same_weights

    spec = (read_manifest(path) or {}).get("sparsity") or {}
    recorded = spec.get("weights") if isinstance(spec, dict) else None
    if isinstance(recorded, str) and not same_weights(path, recorded):
        raise UserError(f"{path}: its weights are not those it was made with (their files are often hard links to "
                        "the source model's: were other weights copied over the source's?): its sparsity no longer "
                        "fits them; make it again with `llmfast sparsify`")
    return spec


def apply_artifact_sparsity(model: "PreTrainedModel", path: str | Path,
                            sparsity: tuple["Sparsifier", Any] | None = None) -> None:
    """If `path` is a `llmfast sparsify` artifact, let its method finish loading `model` (models.load_model);
    `sparsity`: what `artifact_sparsity(path)` returned, if the caller has it already."""
    found = sparsity or artifact_sparsity(path)
    if found is not None:
        method, config = found
        method.apply(model, config, Path(path))


def manifest_config(method: "Sparsifier", spec: dict[str, Any], artifact: Path) -> Any:
    """The method's settings as an artifact's manifest records them (`spec`: its `sparsity`), validated; a value of
    the wrong type is one line naming the file."""
    from pydantic import ValidationError

    try:
        return method.Config.model_validate(spec.get("config") or {})  # type: ignore[attr-defined]
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ()))
        raise UserError(f"{artifact / 'llmfast.json'}: sparsity.config.{where}: {err.get('msg')}: rebuild the "
                        "artifact with `llmfast sparsify`") from None
