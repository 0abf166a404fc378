"""Where a served chat reply stops: the token a model's chat template ends the assistant's turn with, which finetune
teaches every reply to end with (llmfast.data.chat labels it), against the ids vLLM stops a request at.

A template whose turns end with a token that is neither the tokenizer's EOS nor in generation_config.json's
eos_token_id (a base model's ChatML template, as Qwen2.5's base models ship: turns end with <|im_end|>, eos_token and
generation_config are <|endoftext|>) trains replies that end there, and vLLM (and transformers' generate) go on
past it, writing the next user turn themselves, until max_tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from llmfast.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def turn_end(tokenizer: "PreTrainedTokenizerBase") -> int | None:
    """The first added token finetune learns after a reply's text (its end of turn), or None: no chat template, a
    template that refuses a plain user/assistant exchange, or one that ends the turn with text alone. After the text:
    a template may open the reply with added tokens of its own (Qwen3's `<think>\n\n</think>\n\n`), which are
    learned too but are not where the reply ends."""
    from llmfast.data.chat import IGNORE, encode_messages

    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        ex = encode_messages(tokenizer, _PROBE)
    except UserError:
        return None
    learned = [t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE]
    reply = _PROBE[-1]["content"]
    end = next((k for k in range(1, len(learned) + 1) if reply in tokenizer.decode(learned[:k])), None)
    if end is None:  # a template that does not write the reply's text as given
        return None
    added = set(tokenizer.added_tokens_decoder) | set(tokenizer.all_special_ids)
    return next((t for t in learned[end:] if t in added), None)


def stop_ids(model_dir: Path, tokenizer: "PreTrainedTokenizerBase") -> set[int]:
    """The ids vLLM stops a request at (vllm/v1/engine/input_processor.py): the tokenizer's EOS and the model's
    generation config's eos_token_id, read from generation_config.json, else from config.json as transformers'
    GenerationConfig.from_model_config does."""
    return ({tokenizer.eos_token_id} - {None}) | set(_configured_eos(model_dir))


def _configured_eos(model_dir: Path) -> list[int]:
    """The model's eos_token_id as a list: generation_config.json's, else config.json's."""
    from llmfast.modelfiles import read_json_file

    gen = model_dir / "generation_config.json"
    cfg = read_json_file(gen if gen.is_file() else model_dir / "config.json", "model config", "restore it")
    eos = cfg.get("eos_token_id") if isinstance(cfg, dict) else None
    return [eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)]


def unstopped_note(model_dir: Path, tokenizer: "PreTrainedTokenizerBase") -> str | None:
    """A note where the template's end of turn is not an id vLLM stops at; else None."""
    end = turn_end(tokenizer)
    stops = stop_ids(model_dir, tokenizer)
    if end is None or end in stops:
        return None
    name = tokenizer.convert_ids_to_tokens(end)
    return (f"llmfast: note: {model_dir}'s chat template ends a reply with {name} (id {end}), which vLLM does not "
            f"stop at (only at {', '.join(map(str, sorted(stops))) or 'no id'}: the tokenizer's eos_token and "
            f"generation_config.json's eos_token_id): a reply fine-tuned on that template runs on to max_tokens; add "
            f"{end} to eos_token_id in {model_dir / 'generation_config.json'}")


def add_turn_end_stop(model_dir: Path, tokenizer: "PreTrainedTokenizerBase") -> int | None:
    """For an artifact being written (export's merged model): add the template's end of turn to its
    generation_config.json's eos_token_id where vLLM would not stop there, so the replies it was fine-tuned to end
    stop, in vLLM and in transformers' generate (eval). Returns the id added, or None."""
    import json

    from llmfast.modelfiles import read_json_file

    end = turn_end(tokenizer)
    if end is None or end in stop_ids(model_dir, tokenizer):
        return None
    path = model_dir / "generation_config.json"
    gen = read_json_file(path, "generation config", "restore it") if path.is_file() else {}
    path.write_text(json.dumps({**gen, "eos_token_id": [*_configured_eos(model_dir), end]}, indent=2) + "\n",
                    encoding="utf-8")
    return end


def given_template(extra: list[str]) -> str | None:
    """The chat template given to vLLM after -- (`--chat-template`: a file, read, or the template itself, as vLLM
    takes it), or None. Read by vLLM's own parser (serve/vllm_flags.py): `--chat_template`, `--chat-template=X` and
    a --config file's `chat-template` too."""
    from llmfast.serve.vllm_flags import given

    engine = given(extra)
    value = engine.chat_template if engine is not None else None
    if not isinstance(value, str):
        return None
    try:
        return Path(value).read_text(encoding="utf-8") if Path(value).is_file() else value
    except (OSError, UnicodeDecodeError):  # a template too long for a file name; an unreadable file: vLLM's
        return value


def _eos_written_in_template(model_dir: Path, template: str | None) -> bool:
    """The common case, read from the files alone: the template writes the tokenizer's EOS token itself (SmolLM2's
    and Llama 3 Instruct's end every turn with it), so its replies stop where vLLM stops. Skips the note's ~4 s of
    importing transformers and rendering before vLLM starts; anything else takes the full check."""
    from llmfast.modelfiles import chat_template_text, tokenizer_token

    text = template if template is not None else chat_template_text(model_dir)
    eos = tokenizer_token(model_dir, "eos_token")
    return bool(eos) and isinstance(text, str) and eos in text


def served_note(model_dir: Path, template: str | None = None) -> str | None:
    """`unstopped_note` for `llmfast serve`: chat replies (the model's own, and every adapter's) would not stop at
    their end of turn, under the folder's chat template or `template` (vLLM's --chat-template). A tokenizer
    transformers cannot load is left to vLLM's own error."""
    from llmfast.models import load_tokenizer

    if _eos_written_in_template(model_dir, template):
        return None
    try:
        tokenizer = load_tokenizer(model_dir)
        if template is not None:
            tokenizer.chat_template = template
        return unstopped_note(model_dir, tokenizer)
    except Exception:  # noqa: BLE001 - an advisory note never stops a serve: an odd template is vLLM's to judge
        return None
