"""What a bench engine is: a name, the label reports show, and whether it can run a variant here.

A variant is one model as a user benchmarks it (a base model, with a LoRA adapter, quantized); each engine
says why it cannot run one (`can_run` returns the reason) instead of the runner knowing every engine's
limits. Engines that generate in this process (`OfflineEngine`) are given every request at time 0 and report
the per-request timings `bench.metrics` summarises (from time 0 for vLLM's engine, which schedules them all; from
its batch's start for transformers' static batches); the vLLM server engine is driven by the load generator.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmfast.registry import Registry

if TYPE_CHECKING:
    from llmfast.bench.metrics import RequestResult
    from llmfast.bench.workload import Request
    from llmfast.serve.lora import ServedLora


@dataclass(frozen=True)
class Variant:
    """One thing to measure: a resolved model directory, an optional checked adapter, an optional quantization
    (as a recipe gives it: a word such as nf4, or the quantization package's spec)."""

    name: str
    model_dir: Path
    lora: "ServedLora | None" = None
    quantization: Any = None
    sparsity: str | None = None  # the sparsification method of a `llmfast sparsify` artifact

    @property
    def families(self) -> tuple[str, ...]:
        """Engine families that can run this variant here, preferred first."""
        return engine_families(self.quantization, self.sparsity, vllm_runs_sparse(self.model_dir, self.sparsity))

    @property
    def format_word(self) -> str | None:
        """What makes the variant special, as reports write it (its quantization or sparsity method)."""
        return getattr(self.quantization, "method", None) or self.quantization_word or self.sparsity

    @property
    def quantization_word(self) -> str | None:
        """The quantization as reports and command lines write it."""
        q = self.quantization
        if q is None or isinstance(q, str):
            return q
        return str(q.as_arg()) if hasattr(q, "as_arg") else str(q)


def quantization_ran(variant: Variant, family: str) -> str | None:
    """The quantization an engine family ran `variant` with, as reports write it: transformers puts a QLoRA adapter
    on the 4-bit base it records (vLLM serves it on the full-precision base)."""
    if family == "vllm" or variant.quantization is not None or variant.lora is None:
        return variant.quantization_word
    from llmfast.models import adapter_base_quantization

    spec = adapter_base_quantization(variant.lora.path)
    return str(spec.as_arg()) if spec is not None else None


def resolve_variant(name: str, model: str, lora: str | None, quantization: Any) -> Variant:
    """A checked Variant: the model resolved, the adapter checked, the quantization the artifact records when
    none is given."""
    from llmfast.models import resolve_model
    from llmfast.quant import manifest_quantization, parse_quantization
    from llmfast.serve.lora import check_lora

    from llmfast.artifacts import read_manifest

    model_dir = resolve_model(model)
    # what vLLM alone cannot serve is left to the engines' can_run: transformers runs any LoRA
    adapter = check_lora(name, lora, base=model_dir, for_vllm=False) if lora else None
    manifest = read_manifest(model_dir)
    quant = parse_quantization(quantization) if quantization else manifest_quantization(manifest, model_dir)
    sparsity = ((manifest or {}).get("sparsity") or {}).get("method")
    return Variant(name=name, model_dir=model_dir, lora=adapter, quantization=quant, sparsity=sparsity)


# Sparsification methods whose artifacts vLLM runs as they are: relufy writes whole ReLU Llama weights, served
# through our vLLM plugin (llmfast/serve/vllm_plugin.py).
VLLM_SPARSITY = frozenset({"relufy"})


def vllm_runs_sparse(model_dir: Path, sparsity: str | None) -> bool:
    """Whether vLLM serves this sparse artifact as it is: a relufy artifact whose config.json names our plugin's
    ReLU Llama. A relufied Qwen2 or Gemma keeps its own architecture, whose vLLM class refuses a ReLU MLP."""
    from llmfast.errors import UserError
    from llmfast.modelfiles import describe_model_dir
    from llmfast.serve.vllm_plugin import ARCHITECTURE

    if sparsity not in VLLM_SPARSITY:
        return False
    try:
        return ARCHITECTURE in (describe_model_dir(Path(model_dir))["config"].get("architectures") or [])
    except UserError:  # an unreadable config: the loaders name it
        return False


def vllm_architecture_refusal(model_dir: Path, extra_args: list[str] | None = None) -> str | None:
    """Why vLLM would not run the model transformers does, or None: vLLM picks its class from config.json's
    `architectures` alone, and without one takes the bare model (LlamaModel: no head) where transformers loads the
    model_type's causal LM; a name it has no class for fails only deep in its start (serve/vllm_archs.py).
    `extra_args`: the vLLM flags given after `--` (some choose the class themselves)."""
    from llmfast.errors import UserError
    from llmfast.modelfiles import describe_model_dir
    from llmfast.serve.vllm_archs import unserved_architecture
    from llmfast.serve.vllm_plugin import ARCHITECTURE

    try:
        config = describe_model_dir(Path(model_dir))["config"]
    except UserError:  # an unreadable config: the loaders name it
        return None
    if not config.get("architectures"):
        return ("its config.json names no `architectures`, from which vLLM picks the model's class (it would run "
                "the bare model, without its head): add the class, e.g. \"architectures\": [\"LlamaForCausalLM\"]")
    arch = unserved_architecture(config, extra_args)
    if arch == ARCHITECTURE:  # ours: vLLM has it through our plugin, which it would not load
        return (f"its config.json names llmfast's ReLU Llama ({arch}), which vLLM serves through llmfast's plugin, "
                "and vLLM would not load that plugin: install llmfast (`pip install -e .` in its checkout registers "
                "it), and leave VLLM_PLUGINS unset or list llmfast_relu_llama in it")
    if arch:
        return (f"its config.json names the architecture {arch}, for which this vLLM has no model class: run it on "
                "transformers (`bench run` measures it there, `bench offline --engine hf`), or use a vLLM that has "
                "that class")
    return None


def engine_families(quantization: Any, sparsity: str | None = None, vllm_sparse: bool | None = None
                    ) -> tuple[str, ...]:
    """Engine families ("vllm", "hf") that can run a model with this quantization, preferred first; the
    quantization method decides (llmfast.quant). Other sparse artifacts run on transformers only: vLLM would
    serve their dense weights (TEAL/CATS thresholds are applied by llmfast's loader); so do relufy artifacts that
    vLLM cannot load (`vllm_sparse` False: see `vllm_runs_sparse`; None: by the method alone). Artifacts the
    sparse runtime runs get "hf-sparse" (transformers + llmfast's sparse MLP) just before "hf", which stays
    available for the dense-with-zeros comparison."""
    from llmfast.quant import engines_for
    from llmfast.sparse.runtime import RUNTIME_METHODS

    families = tuple(engines_for(quantization))
    if sparsity and (sparsity not in VLLM_SPARSITY or vllm_sparse is False):
        families = tuple(f for f in families if f == "hf")
    if sparsity in RUNTIME_METHODS and quantization is None:
        families = tuple(g for f in families for g in (("hf-sparse", f) if f == "hf" else (f,)))
    return families


FAMILIES = ("vllm", "hf", "hf-sparse")


class Engine(ABC):
    name: str  # the registry name
    family: str  # "vllm", "hf" or "hf-sparse": what reports show; quantization methods name vllm and hf

    def __new__(cls, *args: Any, **kwargs: Any) -> "Engine":
        # Python's own refusal of a class with a method left abstract is a traceback at the module's last line.
        if missing := sorted(getattr(cls, "__abstractmethods__", ())):
            from llmfast.errors import UserError
            from llmfast.registry import source_file

            raise UserError(f"{source_file(cls)}: bench engine {cls.__qualname__} does not implement "
                            f"{', '.join(missing)} (see {source_file(Engine)})")
        return super().__new__(cls)

    def can_run(self, variant: Variant) -> str | None:
        """None when this engine can run `variant` here, else the reason in a few words."""
        if self.family not in variant.families:
            return (f"{variant.format_word} weights cannot run on the {self.family} engine here "
                    f"(it runs on: {', '.join(variant.families)})")
        if self.family == "vllm" and variant.lora is not None and variant.lora.vllm_refusal:
            return variant.lora.vllm_refusal
        if self.family == "vllm" and (why := vllm_architecture_refusal(variant.model_dir)):
            return why
        return None


class OfflineEngine(Engine):
    """Generates in this process: all requests given at time 0, per-request timings back."""

    @abstractmethod
    def generate(self, variant: Variant, requests: list["Request"], *, dtype: str, batch_size: int,
                 ignore_eos: bool) -> tuple[list["RequestResult"], float]:
        """Results in request order and the wall duration in seconds."""


def _engine_problem(name: str, engine: Engine) -> str | None:
    """What keeps a registered engine from working (Registry's check)."""
    if not isinstance(engine, Engine):
        return "register an instance of an Engine subclass: ENGINES.add(NAME, MyEngine())"
    if getattr(engine, "name", None) != name:
        return f"its name is {getattr(engine, 'name', None)!r}: set name = '{name}'"
    if getattr(engine, "family", None) not in FAMILIES:
        return f"its family must be one of {', '.join(FAMILIES)} (got {getattr(engine, 'family', None)!r})"
    return None


ENGINES: Registry[Engine] = Registry("bench engine", check=_engine_problem)
