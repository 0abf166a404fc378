"""What a chain checks of each stage's `with:` before its first stage runs (and what `--dry-run` reports): the
section against its verb's own schema (an unknown or misspelled key, a value of the wrong type, a file that is
not there), a sparsify method's settings, a merge method and its parameter names, and every model named outright
(not `${STAGE}`). A typo in the last stage used to be found only when its turn came, after every stage before it
had run (hours of fine-tuning on a real model). What depends on a parent's output (a path under `${NAME}`, a
model a stage makes) is left to the verb when it runs, as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from llmfast.errors import UserError

PENDING = "${"  # a value holding a reference to a stage's output, which may not exist yet


def _pending(err: Any) -> bool:
    """A pydantic error about a value that names a parent stage's output (its file is made by that stage); never an
    unknown or missing key, whatever its value."""
    value = err.get("input")
    return err["type"] not in ("extra_forbidden", "missing") and isinstance(value, str) and PENDING in value


# What the chain decides for every stage: a flag that set it sent an eval's results outside the run folder (the stage
# then ran again on every `llmfast run`) or swapped the model `with:` names.
OWNED_FLAGS = ("--output", "--out", "--model", "--resume", "--overwrite")


def with_flags(section: dict[str, Any], flags: list[str]) -> dict[str, Any]:
    """`section` with the stage's `--set KEY=VALUE` flags applied, as the verb will apply them to its recipe; a flag
    the chain sets itself is a one-line error."""
    from llmfast.overrides import apply_overrides, parse_overrides

    for f in flags:
        if f.split("=", 1)[0] in OWNED_FLAGS:
            raise UserError(f"flags: {f.split('=', 1)[0]} is the chain's to set (a stage writes RUN/NAME, its model is "
                            "`with: model`, resuming and replacing follow the plan): leave it out")
    pairs = [f[len("--set="):] for f in flags if f.startswith("--set=")]
    pairs += [flags[i + 1] for i, f in enumerate(flags[:-1]) if f == "--set"]
    if not pairs:
        return section
    import copy

    data = copy.deepcopy(section)
    from llmfast.quant import quantization_mapping

    apply_overrides(data, parse_overrides(pairs), {"quantization": quantization_mapping})
    return data


def _known(value: Any) -> bool:
    return isinstance(value, str) and PENDING not in value


def _check_models(specs: list[tuple[str, Any]]) -> None:
    from llmfast.models import check_model_spec

    for key, spec in specs:
        if _known(spec):
            try:
                check_model_spec(spec)
            except UserError as e:
                raise UserError(f"with.{key}: {e}") from None


def _schema_check(schema: Callable[[dict[str, Any]], Any], output: Callable[[dict[str, Any]], dict[str, Any]],
                  models: Callable[[dict[str, Any]], list[tuple[str, Any]]]) -> Callable[[dict[str, Any]], None]:
    """A stage type's check: its section (with the keys the stage adds, `output`) against `schema(section)`, then
    the models it names."""
    def check(section: dict[str, Any]) -> None:
        from llmfast.recipe import check_known

        check_known({**section, **output(section)}, schema(section), "with", _pending)
        _check_models(models(section))

    return check


def _model(section: dict[str, Any]) -> list[tuple[str, Any]]:
    return [("model", section.get("model"))]


def _placeholder_output(section: dict[str, Any]) -> dict[str, Any]:
    return {"output": "llmfast-chain-stage"}  # the stage's own folder; any valid path stands for it here


def _recipe(name: str) -> Callable[[dict[str, Any]], Any]:
    def schema(section: dict[str, Any]) -> Any:
        import llmfast.recipe as recipes

        return getattr(recipes, name)
    return schema


def _sparsify_schema(section: dict[str, Any]) -> Any:
    """The method's own settings schema when the method exists; the generic one otherwise (it names the method)."""
    import llmfast.sparse  # noqa: F401  (registers the methods)
    from llmfast.recipe import SparsifyRecipe
    from llmfast.sparse.base import SPARSIFIERS
    from llmfast.sparse.run import method_schema

    spec = section.get("sparsify")
    name = spec.get("method") if isinstance(spec, dict) else None
    if isinstance(name, str):
        return method_schema(SPARSIFIERS.get(name, where="with.sparsify.method")())
    return SparsifyRecipe


def _bench_models(section: dict[str, Any]) -> list[tuple[str, Any]]:
    variants = section.get("variants")
    return [(f"variants.{i}.model", v.get("model")) for i, v in enumerate(variants or []) if isinstance(v, dict)]


def _check_merge(section: dict[str, Any]) -> None:
    from pydantic import ValidationError

    from llmfast.merge.config import Locator, MergeConfig, check_parameter_names
    from llmfast.merge.methods import METHODS
    from llmfast.recipe import check_known

    check_known(section, MergeConfig, "with", _pending)
    try:
        cfg = MergeConfig.model_validate(section)
    except ValidationError:  # only errors about a parent's output are left: the merge itself says the rest
        cfg = None
    if cfg is not None and _known(cfg.merge_method):
        check_parameter_names(METHODS.get(cfg.merge_method, "with: merge_method"), cfg, Locator("with", {}))
    models = [("base_model", section.get("base_model"))] if section.get("base_model") else []
    _check_models(models + [(f"models.{i}.model", m.get("model")) for i, m in enumerate(section.get("models") or [])
                            if isinstance(m, dict)])


CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "finetune": _schema_check(_recipe("FinetuneRecipe"), _placeholder_output, _model),
    "quantize": _schema_check(_recipe("QuantizeRecipe"), _placeholder_output, _model),
    "sparsify": _schema_check(_sparsify_schema, _placeholder_output, _model),
    "eval": _schema_check(_recipe("EvalRecipe"), lambda s: {"output": str(Path("llmfast-chain-stage") / "r.json")},
                          _model),
    "bench": _schema_check(_recipe("BenchRecipe"), _placeholder_output, _bench_models),
    "merge": _check_merge,
}
