"""PEFT adapter config options, and what each verb that takes an adapter does with each: one table.

Three verbs judge an adapter's adapter_config.json before anything loads: `serve` (vLLM's own check,
vllm/lora/peft_helper.py, refuses what it cannot serve only after a minute of start-up: serve/lora.py), `merge` (an
adapter input is its task vector scale * B @ A: merge/adapters.py) and `export` (PEFT merges the adapter into its
base: finetune/export.py). Each reads its refusals here, in this order; the first option a config sets that the verb
refuses is its one line.

A verdict is one of:
- fine: the verb passes the option on (to PEFT or vLLM) without a judgement of its own;
- handled: the verb's code applies the option itself (merge's per-module rank and alpha, say);
- refused: the verb refuses it; `text` is the message, formatted with `value` (what the config sets), `listed`
  (a list's items joined), `path` (the adapter folder), `cfg_path` (its adapter_config.json) and `name` (serve's
  name for the adapter);
- common: refused for every verb by modelfiles.check_adapter_dir, which each runs (serve after its own refusals);
  `text` is what its line says.
Serve ends a refusal with where the adapter can run instead: merged by `export` where export takes the option,
else on transformers (eval, bench --engine hf).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

VERBS = ("serve", "merge", "export")
EXPORT_INSTEAD = "export it with `llmfast export` and merge the full model instead"
UNMERGED = "use it unmerged (eval, bench --engine hf)"
# PEFT types that prepend learned virtual tokens instead of changing weights (modelfiles.check_adapter_dir's)
PROMPT_TYPES = ("PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "ADAPTION_PROMPT", "CPT")
# init_lora_weights kinds that start from the base weights: PEFT subtracts that start from the base when it loads
# the adapter too, so B @ A alone is not what the adapter changed (PEFT matches them by prefix: pissa_niter_4)
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
# kinds PEFT starts from random or from the weights' directions without changing the base: plain LoRA once trained
# (LoRA-GA changes the base only while it trains, with its gradients; PEFT loads it as a plain LoRA)
PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")

Kind = Literal["fine", "handled", "refused", "common"]


@dataclass(frozen=True)
class Verdict:
    kind: Kind
    text: str


def fine(why: str) -> Verdict:
    return Verdict("fine", why)


def handled(how: str) -> Verdict:
    return Verdict("handled", how)


def refused(message: str) -> Verdict:
    return Verdict("refused", message)


def common(says: str) -> Verdict:
    return Verdict("common", says)


@dataclass(frozen=True)
class AdapterOption:
    name: str
    key: str  # the adapter_config.json key
    example: dict[str, Any]  # a config fragment that sets the option (the table's test writes it)
    found: Callable[[dict[str, Any]], Any]  # what a config sets it to; falsy when the config does not set it
    serve: Verdict
    merge: Verdict
    export: Verdict

    def verdict(self, verb: str) -> Verdict:
        return getattr(self, verb)


def _key(key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda cfg: cfg.get(key)


def _peft_type(prompt: bool) -> Callable[[dict[str, Any]], Any]:
    def found(cfg: dict[str, Any]) -> Any:
        kind = cfg.get("peft_type", "LORA")
        # `or repr`: a peft_type null or "" is no LoRA either (a falsy value would read as not set)
        return (kind or repr(kind)) if kind != "LORA" and (str(kind).upper() in PROMPT_TYPES) == prompt else None
    return found


def _saved(cfg: dict[str, Any]) -> list[Any]:
    """modules_to_save but a classifier's head (PEFT adds `classifier` and `score` for SEQ_CLS; a causal LM has
    neither, so nothing of them is saved)."""
    saved = cfg.get("modules_to_save") or []
    return [m for m in (saved if isinstance(saved, list) else [saved]) if m not in ("classifier", "score")]


def _init(kinds: tuple[str, ...] | None) -> Callable[[dict[str, Any]], Any]:
    """init_lora_weights of one of `kinds` (by prefix, as PEFT matches them); None: a kind PEFT does not know."""
    def found(cfg: dict[str, Any]) -> Any:
        init = cfg.get("init_lora_weights", True)
        if not isinstance(init, str):
            return None
        low = init.lower()
        if kinds is None:
            return init if not low.startswith(BASE_CHANGING_INITS) and low not in PLAIN_INITS else None
        return init if low.startswith(kinds) else None
    return found


def _plain_init(cfg: dict[str, Any]) -> Any:
    init = cfg.get("init_lora_weights", True)
    return repr(init) if isinstance(init, bool) or (isinstance(init, str) and init.lower() in PLAIN_INITS) else None


_SERVE_HAS = "LoRA '{name}' has %s, which vLLM cannot serve"
_NOT_TASK_VECTOR = "{cfg_path}: %s: %s, so B @ A is not its task vector: it cannot be merged; " + UNMERGED
_CHANGES_BASE = refused("{cfg_path}: init_lora_weights {value!r} changes the base weights when PEFT loads the "
                        "adapter, so its B @ A is not its task vector: export it with `llmfast export` and merge the "
                        "full model, or convert it to a plain LoRA with PEFT's "
                        "path_initial_model_for_weight_conversion")
_AS_PEFT = fine("PEFT applies it as it trained")
_PEFT_MERGES = fine("PEFT merges it into the base (merge_and_unload)")

OPTIONS: tuple[AdapterOption, ...] = (
    AdapterOption(
        "prompt-learning peft_type", "peft_type", {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4},
        _peft_type(prompt=True),
        serve=refused("LoRA '{name}': {cfg_path} is a {value} adapter; vLLM serves LoRA only"),
        merge=common("adds learned virtual tokens to each prompt instead of changing weights"),
        export=common("adds learned virtual tokens to each prompt instead of changing weights")),
    AdapterOption(
        "other peft_type", "peft_type", {"peft_type": "IA3"}, _peft_type(prompt=False),
        serve=refused("LoRA '{name}': {cfg_path} is a {value} adapter; vLLM serves LoRA only"),
        merge=refused("{path}: a {value} adapter; only LoRA adapters can be merged"),
        export=_PEFT_MERGES),
    AdapterOption(
        "task_type other than CAUSAL_LM", "task_type", {"task_type": "SEQ_CLS"},
        lambda cfg: cfg.get("task_type") if cfg.get("task_type") is not None and str(
            cfg.get("task_type")).upper() != "CAUSAL_LM" else None,
        serve=common("the adapter was trained for another task than causal language modelling"),
        merge=common("the adapter was trained for another task than causal language modelling"),
        export=common("the adapter was trained for another task than causal language modelling")),
    AdapterOption(
        "use_dora", "use_dora", {"use_dora": True}, _key("use_dora"),
        serve=refused("LoRA '{name}' is a DoRA adapter, which vLLM cannot serve"),
        merge=refused("{path}: a DoRA adapter: its magnitude vector is not a task vector B@A; " + EXPORT_INSTEAD),
        export=_PEFT_MERGES),
    AdapterOption(
        "modules_to_save", "modules_to_save", {"modules_to_save": ["lm_head"]}, _saved,
        serve=refused(_SERVE_HAS % "modules_to_save {value}"),
        merge=refused("{path}: the adapter also saves whole modules ({listed}); " + EXPORT_INSTEAD),
        export=_PEFT_MERGES),
    AdapterOption(
        "bias", "bias", {"bias": "all"}, lambda cfg: cfg.get("bias") if cfg.get("bias") not in ("none", None) else None,
        serve=refused(_SERVE_HAS % "bias {value!r}"),
        merge=refused("{path}: the adapter trains biases; " + EXPORT_INSTEAD),
        export=_PEFT_MERGES),
    AdapterOption(
        "lora_bias", "lora_bias", {"lora_bias": True}, _key("lora_bias"),
        serve=refused(_SERVE_HAS % "lora_bias"),
        merge=refused("{path}: the adapter trains biases; " + EXPORT_INSTEAD),
        export=handled("export refuses it on a base layer without a bias, which PEFT cannot merge it into "
                       "(_check_merge_fits)")),
    *(AdapterOption(
        f"init_lora_weights {kind}", "init_lora_weights", {"init_lora_weights": kind}, _init((kind,)),
        serve=refused(_SERVE_HAS % "init_lora_weights {value!r}"), merge=_CHANGES_BASE, export=_PEFT_MERGES)
      for kind in BASE_CHANGING_INITS),
    AdapterOption(
        "init_lora_weights of a kind PEFT does not know", "init_lora_weights", {"init_lora_weights": "spectral"},
        _init(None),
        serve=refused(_SERVE_HAS % "init_lora_weights {value!r}"),
        merge=fine("B and A are read as a plain LoRA's (PEFT itself refuses the kind when it loads the adapter)"),
        export=fine("PEFT refuses the kind when it loads the adapter (one line naming the adapter)")),
    AdapterOption(
        "init_lora_weights true/false or a plain kind", "init_lora_weights", {"init_lora_weights": "gaussian"},
        _plain_init, serve=_AS_PEFT, merge=_AS_PEFT, export=_PEFT_MERGES),
    AdapterOption(
        "trainable_token_indices", "trainable_token_indices", {"trainable_token_indices": [1, 2]},
        _key("trainable_token_indices"),
        serve=refused(_SERVE_HAS % "trainable_token_indices"),
        merge=handled("its trainable token rows are refused as tensors other than LoRA matrices (LoraAdapter.open)"),
        export=_PEFT_MERGES),
    AdapterOption(
        "layer_replication", "layer_replication", {"layer_replication": [[0, 2], [1, 2]]}, _key("layer_replication"),
        serve=refused(_SERVE_HAS % "layer_replication"),
        merge=refused(_NOT_TASK_VECTOR % ("layer_replication",
                                          "the adapter stacks copies of layers the base model has once")),
        export=refused("{cfg_path}: layer_replication {value}: the adapter stacks copies of layers that share their "
                       "base weights, so it cannot be merged into one weight a layer: " + UNMERGED)),
    AdapterOption(
        "alora_invocation_tokens", "alora_invocation_tokens", {"alora_invocation_tokens": [5, 9]},
        _key("alora_invocation_tokens"),
        serve=refused(_SERVE_HAS % "alora_invocation_tokens"),
        merge=refused(_NOT_TASK_VECTOR % ("alora_invocation_tokens",
                                          "an activated LoRA changes only the tokens after its invocation")),
        export=refused("{cfg_path}: alora_invocation_tokens: an activated LoRA applies only after its invocation "
                       "tokens, which a merged model cannot: " + UNMERGED)),
    AdapterOption(
        "use_qalora", "use_qalora", {"use_qalora": True}, _key("use_qalora"),
        serve=refused(_SERVE_HAS % "use_qalora"),
        merge=refused(_NOT_TASK_VECTOR % ("use_qalora", "QALoRA's A reads pooled groups of inputs")),
        export=_PEFT_MERGES),
    AdapterOption(
        "use_bdlora", "use_bdlora", {"use_bdlora": True}, _key("use_bdlora"),
        serve=refused(_SERVE_HAS % "use_bdlora"),
        # merge read the blocks as whole matrices and refused them as of another base (found 2026-12-07)
        merge=refused("{cfg_path}: use_bdlora: BD-LoRA stores its block-diagonal A or B as their blocks, not as the "
                      "matrices of B @ A; " + EXPORT_INSTEAD),
        export=_PEFT_MERGES),
    AdapterOption(
        "rank_pattern / alpha_pattern", "rank_pattern", {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"q_proj": 4}},
        lambda cfg: cfg.get("rank_pattern") or cfg.get("alpha_pattern"),
        serve=handled("every rank is checked and vLLM reserves the largest (check_lora)"),
        merge=handled("each module's rank from its matrices, its alpha by PEFT's pattern match (LoraAdapter.open)"),
        export=_PEFT_MERGES),
    AdapterOption(
        "use_rslora", "use_rslora", {"use_rslora": True}, _key("use_rslora"),
        serve=fine("vLLM scales by alpha / sqrt(r) as PEFT does"),
        merge=handled("the scale is alpha / sqrt(r) (LoraAdapter.open)"), export=_PEFT_MERGES),
    AdapterOption(
        "fan_in_fan_out", "fan_in_fan_out", {"fan_in_fan_out": True}, _key("fan_in_fan_out"),
        serve=fine("vLLM lays out each layer's LoRA by its own layers"),
        merge=handled("each delta is transposed by the base layer's type (a Conv1D), as PEFT does, not by the flag"),
        export=_PEFT_MERGES),
)


@dataclass(frozen=True)
class Refusal:
    option: AdapterOption
    value: Any
    cfg: dict[str, Any]  # the whole config: another option it sets may be one export refuses

    def message(self, verb: str, **where: Any) -> str:
        """The verb's one line, `where` naming the adapter (path, cfg_path, name)."""
        value = self.value
        listed = ", ".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
        return self.option.verdict(verb).text.format(value=value, listed=listed, **where)

    def exportable(self) -> bool:
        """Whether `llmfast export` merges this adapter (serve's way round for vLLM's refusal): export takes this
        option, and refuses no other the config sets (modules_to_save with layer_replication, say)."""
        return self.option.export.kind not in ("refused", "common") and refusal(self.cfg, "export") is None


def refusal(cfg: dict[str, Any], verb: str) -> Refusal | None:
    """The first option `cfg` sets that `verb` refuses itself (in the table's order), or None."""
    if verb not in VERBS:
        raise ValueError(f"unknown verb {verb!r}: one of {', '.join(VERBS)}")
    for option in OPTIONS:
        if option.verdict(verb).kind == "refused":
            value = option.found(cfg)
            if value:
                return Refusal(option, value, cfg)
    return None
