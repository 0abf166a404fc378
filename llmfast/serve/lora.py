"""LoRA adapters as vLLM serves them: a name, a checked PEFT directory and the rank vLLM must reserve.

vLLM loads adapters only after a minute of start-up; these checks refuse what it cannot serve (another PEFT
type, DoRA, a rank outside its buckets, an adapter trained on another architecture) before anything starts.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from llmfast import adapter_options
from llmfast.errors import UserError

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks


@dataclass(frozen=True)
class ServedLora:
    """A checked adapter, served under `name` from `path`; `rank` is its largest rank. `vllm_refusal` says why
    vLLM cannot serve it (a rank above its buckets, DoRA) when it was checked for transformers only."""

    name: str
    path: Path
    rank: int
    vllm_refusal: str | None = None


def parse_lora(spec: str) -> tuple[str, str]:
    """'name=path' -> (name, path); a bare path is named after its directory."""
    name, sep, path = spec.partition("=")
    if not sep:
        path = name
        name = Path(path.rstrip("/")).name
        if name == "adapter":  # a finetune run's adapter/: name it after the run
            name = Path(path.rstrip("/")).parent.name
    if not name or not path:
        raise UserError(f"--lora {spec!r}: expected NAME=PATH, e.g. --lora dates=runs/lora-dates/adapter")
    return name, path


def _architecture(model_dir: Path) -> tuple[object, ...]:
    """What must match between an adapter's base and the served model; () when unreadable."""
    from llmfast.modelfiles import describe_model_dir

    try:
        d = describe_model_dir(model_dir)
    except (OSError, ValueError, UserError):
        return ()
    return (d["architecture"], d["hidden"], d["layers"], d["vocab"])


def check_lora(name: str, path: str | os.PathLike[str], base: Path | None = None,
               for_vllm: bool = True, template_given: bool = False) -> ServedLora:
    """Check an adapter before vLLM loads it: a PEFT LoRA directory, a rank vLLM serves, no DoRA. With
    `for_vllm` False (transformers runs it) what only vLLM refuses is recorded in `vllm_refusal` instead.
    `template_given`: vLLM is given its own --chat-template, which it renders every chat with (the base's is not)."""
    from llmfast.models import adapter_dir

    p = adapter_dir(path)
    cfg_path = p / "adapter_config.json"
    if not cfg_path.is_file():
        raise UserError(f"LoRA '{name}': {p} is not a PEFT adapter directory (no adapter_config.json)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"LoRA '{name}': {cfg_path}: the adapter config must be a JSON object, not "
                        f"{type(cfg).__name__}")
    found = adapter_options.refusal(cfg, "serve")  # the table's first option vLLM refuses
    if found is not None and found.option.key == "peft_type":  # not a LoRA: no rank to check, for either engine
        raise UserError(found.message("serve", name=name, cfg_path=cfg_path))
    patterns = cfg.get("rank_pattern") or {}
    raw = [cfg.get("r", 0), *(patterns.values() if isinstance(patterns, dict) else [patterns])]
    if any(isinstance(r, bool) or not isinstance(r, int) for r in raw):
        raise UserError(f"LoRA '{name}': {cfg_path}: r and rank_pattern's values must be whole numbers (got "
                        f"{', '.join(repr(r) for r in raw)}): re-create the adapter")
    ranks = [int(r) for r in raw]
    if min(ranks) < 1:
        raise UserError(f"LoRA '{name}': rank {min(ranks)} in {cfg_path}: ranks are at least 1; re-create the adapter")
    refusal, fix = None, "merge it with `llmfast export` and serve the merged model"
    if max(ranks) > VLLM_LORA_RANKS[-1]:
        refusal = f"LoRA '{name}' has rank {max(ranks)}, above vLLM's {VLLM_LORA_RANKS[-1]}"
        fix += ", or retrain with a smaller r"
    elif found is not None:
        refusal = found.message("serve", name=name, cfg_path=cfg_path)
        fix = fix if found.exportable() else "run it on transformers (eval, bench --engine hf)"
    if refusal and for_vllm:
        raise UserError(f"{refusal} ({cfg_path}): {fix}")
    from llmfast.modelfiles import check_adapter_dir

    try:  # lora_alpha and the weights file (present, complete, A and B in pairs): one line each
        check_adapter_dir(p)
    except UserError as e:
        raise UserError(f"LoRA '{name}': {e}") from None
    if refusal is None:
        refusal = _head_lora(name, p)
        if refusal and for_vllm:  # not export: it refuses a head LoRA on a tied base (the embedding would change)
            raise UserError(f"{refusal} ({p}): run it on transformers (eval, bench --engine hf)")
    if refusal is None:
        refusal = _unreadable_tensors(name, p, base) or _other_tokenizer(name, p, base, template_given)
        if refusal and for_vllm:
            raise UserError(f"{refusal} ({p}): merge it with `llmfast export` and serve the merged model")
    if base is not None:
        want = cfg.get("base_model_name_or_path")
        if want and Path(want).is_dir() and Path(want).resolve() != base.resolve():
            a, b = _architecture(Path(want)), _architecture(base)
            if a != b:
                raise UserError(f"LoRA '{name}' was trained on {want} ({a}), not on the served model {base} ({b})")
        if not cfg.get("layer_replication"):  # PEFT stacks layers the base lacks (attach_adapter checks those)
            _refuse_unknown_modules(name, p, base)
    return ServedLora(name=name, path=p, rank=max(ranks), vllm_refusal=refusal)


def _head_lora(name: str, p: Path) -> str | None:
    """vLLM (0.32, CPU) loads a LoRA on lm_head and applies it to the adapter's own requests, but the served model's
    requests then get that head's delta as well (found s53 on the tiny Llama, tied and untied: the base's top
    logprobs 2.1 and 1.4 nats off, the head adapter's instead; other adapters' requests were right). PEFT saves one
    for `target_modules` naming lm_head and for an embedding LoRA with `ensure_weight_tying` (the tied head's LoRA).
    An embedding LoRA alone is served right: PEFT and vLLM both add its delta to the input embedding only, the tied
    head staying the base's."""
    from llmfast.modelfiles import safetensors_header

    head = sorted(k for k in safetensors_header(p / "adapter_model.safetensors", "")
                  if re.search(r"(^|\.)lm_head\.(lora_[AB]\.weight|lora_embedding_[AB])$", k))
    if head:
        return (f"LoRA '{name}' has a LoRA on lm_head ({head[0]}), which vLLM then applies to the base model's "
                "requests too")
    return None


def _refuse_unknown_modules(name: str, p: Path, base: Path) -> None:
    """vLLM (0.32: LoRAModelManager.activate_adapter) puts on each of the model's modules the adapter's matrices for
    it and skips the rest, as PEFT does: an adapter of a deeper model of the family (its extra layers) or with
    renamed modules would be served in part, or not at all. Each tensor's module must be one of `base`'s: by the
    names of its stored weights, then (for what those lack: a tied head) by its modules on the meta device, whose
    first build imports transformers' model code (seconds, kept out of a served adapter that fits)."""
    from llmfast.loading import meta_skeleton
    from llmfast.modelfiles import safetensors_header, stored_shapes
    from llmfast.models import unknown_adapter_tensors

    keys = set(safetensors_header(p / "adapter_model.safetensors", "")) - {"__metadata__"}
    stored = {".".join(parts[:i]) for parts in (n.split(".") for n in stored_shapes(base, "")) for i in
              range(len(parts))}
    unknown = unknown_adapter_tensors(keys, stored)
    if unknown:
        try:
            unknown = unknown_adapter_tensors(unknown, {n for n, _ in meta_skeleton(base).named_modules()})
        except UserError:  # a config transformers cannot build: the server's own checks name it
            return
    if unknown:
        raise UserError(f"LoRA '{name}': {p / 'adapter_model.safetensors'}: {len(unknown)} of its tensors match no "
                        f"module of the served model {base} ({', '.join(unknown[:2])}), which vLLM and PEFT skip, "
                        "serving the adapter in part (or not at all); it was trained on another model (more layers, "
                        "other module names): serve it with the base it was trained on, or re-create it")


def _unreadable_tensors(name: str, p: Path, base: Path | None) -> str | None:
    """vLLM reads LoRA matrices and skips the embedding and head PEFT saves beside an embedding LoRA; another tensor
    stops its load, as does a saved embedding of more rows than the served model's (tokens added in training)."""
    from llmfast.modelfiles import describe_model_dir, safetensors_header

    header = {k: v for k, v in safetensors_header(p / "adapter_model.safetensors", "").items() if k != "__metadata__"}
    other = sorted(k for k in header if not re.search(
        r"\.(lora_[AB]\.weight|lora_embedding_[AB]|(embed_tokens|lm_head)\.base_layer\.weight)$", k))
    if other:
        return f"LoRA '{name}' holds {other[0]} ({len(other)} tensors other than LoRA matrices), which vLLM cannot load"
    vocab = describe_model_dir(base)["vocab"] if base is not None and (base / "config.json").is_file() else None
    grown = sorted(k for k, v in header.items() if k.endswith(".base_layer.weight") and vocab is not None
                   and v.get("shape", [vocab])[0] != vocab)
    if grown:
        return (f"LoRA '{name}' saved {grown[0]} with {header[grown[0]]['shape'][0]} rows, not the served model's "
                f"{vocab} (tokens added in training), which vLLM cannot load")
    return None


def _added_tokens(folder: Path) -> dict[str, int]:
    """tokenizer.json's added tokens (special and not), by content; {} where it has none or cannot be read."""
    try:
        added = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens") or []
        return {t["content"]: t["id"] for t in added}
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, TypeError, KeyError):
        return {}


def _other_tokenizer(name: str, p: Path, base: Path | None, template_given: bool = False) -> str | None:
    """vLLM renders and tokenizes every adapter's requests with the served model's tokenizer and chat template, not
    the adapter's: an adapter saved with another template (a tool's `chat_template:` setting) or with tokens added
    in training would be served chats in a format it was not trained on, its new tokens split into pieces. An
    export keeps the adapter's tokenizer (finetune/export.py), so the merged model serves right. With vLLM's own
    --chat-template given, which template the adapter gets is the user's choice: only the tokens are compared."""
    from llmfast.modelfiles import chat_template_text, tokenizer_token

    if base is None:
        return None
    mine = None if template_given else chat_template_text(p)
    if mine and mine != chat_template_text(base):
        return (f"LoRA '{name}' was trained with another chat template than the served model {base} has, and vLLM "
                "formats every adapter's chats with the served model's")
    # a pad token added for training (a common script's `add_special_tokens({"pad_token": "[PAD]"})`) is in no
    # request: vLLM pads nothing, and no reply ends on it
    new = sorted((t, i) for t, i in set(_added_tokens(p).items()) - set(_added_tokens(base).items())
                 if t != tokenizer_token(p, "pad_token"))
    if new and (base / "tokenizer.json").is_file():
        return (f"LoRA '{name}' has tokens the served model's tokenizer lacks ({new[0][0]!r}, id {new[0][1]}; "
                f"{len(new)} in all), and vLLM tokenizes every adapter's requests with the served model's")
    return None


def max_lora_rank(adapters: list[ServedLora]) -> int:
    """The smallest rank bucket vLLM accepts that holds every adapter (a larger one wastes memory)."""
    need = max(a.rank for a in adapters)
    return next(r for r in VLLM_LORA_RANKS if r >= need)
