"""Chat examples to token ids with loss only on the assistant's turns.

Each assistant turn's span is found by rendering the conversation through the model's own chat template
twice, up to the turn with the generation prompt and up to the end of the turn, so the labels cover
exactly what the model would have to generate (answer and end-of-turn token) whatever the template.
Each piece's ids are those that follow the ids before it in the whole text's encoding (`_continuation`):
the ids trained on are the ids labelled, and those the model sees and generates at inference. The texts' encodings
are read off one encoding of the row's last text (prefixes.py) where the tokenizer allows, so a row costs time
linear in its length, not in the sum of its prefixes'.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Sequence

from llmfast.data.examples import IGNORE, Encoded
from llmfast.data.jsonl import iter_rows, read_rows
from llmfast.data.jsonl import where as row_where
from llmfast.data.prefixes import PrefixIds, backend_encodes, prefix_ids
from llmfast.data.shapes import SHAPES, Chat, ShapeCheck, must_be_text, to_chat
from llmfast.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def rows_digest(*groups: Sequence[Sequence[Encoded]]) -> str:
    """A digest of the examples' ids and labels, bin by bin (a run's training and held-out rows): what `--resume`
    compares, since a data file edited in place (or read by another encoding) trains the rest on other rows."""
    import hashlib

    h = hashlib.sha256()
    for group in groups:
        for bin_ in group:
            for e in bin_:
                h.update(len(e).to_bytes(8, "little") + e._ids.tobytes() + e._labels.tobytes())
            h.update(b"|")
        h.update(b"#")
    return h.hexdigest()


def to_messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    """A chat row of any shape (shapes.py) as {role, content} messages."""
    return to_chat(row, where).messages


def check_rows(path: str | Path) -> str:
    """Read a data file and check every row's shape (no tokenizer needed): the first problem, named; else the shape
    (shapes.SHAPES' description) its rows have. A row at a time: a JSON Lines file is never held whole."""
    shape = "messages"
    for _row, _where, shape, _content in _read_rows(path, iter_rows(path)):
        pass
    return SHAPES[shape]


def _read_rows(path: str | Path, rows: "list[dict[str, Any]] | Iterator[dict[str, Any]] | None" = None
               ) -> "Iterator[tuple[dict[str, Any], str, str, str | Chat]]":
    """Each row of a data set (one shape in all, shapes.py) with where it is, its shape and what it holds: a `text`
    row's text, another's conversation; the first problem is named. `rows`: the data set's, read already (a list is
    emptied as it is walked, so a row read is not held twice), or read as they are walked (`iter_rows`)."""
    check = ShapeCheck()
    rows = read_rows(path) if rows is None else rows
    for r in _emptied(rows) if isinstance(rows, list) else rows:
        where = row_where(path, r["_row"])
        shape = check(r, where)
        yield r, where, shape, _text(r, where) if shape == "text" else to_chat(r, where, shape)


def _emptied(rows: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The rows in order, each dropped from the list as it is given out."""
    rows.reverse()
    while rows:
        yield rows.pop()


def prompt_and_answer(row: dict[str, Any], path: str | Path) -> tuple[list[dict[str, str]], str]:
    """For evaluation: the conversation up to the last turn, and that turn (the assistant's) as the answer."""
    where = f"{path}:{row.get('_row', '?')}"
    if not isinstance(row.get("task", ""), str):  # it picks the checker by name: a list or object was a TypeError
        raise UserError(f"{where}: field 'task' must be a task name (a string), not {type(row['task']).__name__}")
    msgs = to_messages(row, where)
    if msgs[-1]["role"] != "assistant":
        raise UserError(f"{where}: the last message must be the assistant's answer (role 'assistant')")
    if len(msgs) < 2:
        raise UserError(f"{where}: only the answer: a task row needs the question before it (a user message)")
    return msgs[:-1], msgs[-1]["content"]


def render_chat(tokenizer: "PreTrainedTokenizerBase", msgs: list[dict[str, str]], gen: bool, where: str) -> str:
    """The chat template applied to `msgs`; a template that refuses them (Gemma's and Mistral's raise on a system
    turn, or on roles that do not alternate) is one line naming the row `where`."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) if msgs else ""
    except TemplateError as e:
        raise UserError(f"{where}: the model's chat template refuses this row ({e}): change the row (e.g. fold a "
                        "system turn into the first user turn) or the template") from None


def check_ids_fit(ids: "Sequence[int]", vocab: int | None, where: str) -> None:
    """A token id the model has no embedding row for (a tokenizer given tokens the model was not resized for) is one
    line naming where it came from, not an IndexError from inside the embedding."""
    if vocab and ids and max(ids) >= vocab:
        raise UserError(f"{where}: token id {max(ids)} is beyond the model's {vocab} embedding rows (config.json "
                        "vocab_size): its tokenizer has tokens the model has no rows for; resize the model's "
                        "embeddings, or use the model's own tokenizer")


def encode_messages(tokenizer: "PreTrainedTokenizerBase", messages: list[dict[str, str]], row: int = 0,
                    where: str = "", learn_from: int = 0) -> Encoded:
    """Token ids of the conversation with labels on its assistant turns from message `learn_from` on (the ones
    before are context, as a TRL prompt's example answers). A conversation the template renders as more than one
    example (`encode_conversation`) is refused."""
    (example,) = _one(encode_conversation(tokenizer, messages, row, where, learn_from), where or f"row {row}")
    return example


def encode_conversation(tokenizer: "PreTrainedTokenizerBase", messages: list[dict[str, str]], row: int = 0,
                        where: str = "", learn_from: int = 0) -> list[Encoded]:
    """The conversation's examples (`_chat_plans`): one, or one per assistant turn where the template renders the
    earlier turns otherwise once later ones follow."""
    plans = _chat_plans(tokenizer, messages, row, where, learn_from)
    wholes = _encodings(tokenizer, plans)
    return [_assemble(tokenizer, plan, next(wholes), row, part) for part, plan in enumerate(plans)]


def _one(examples: list[Any], where: str) -> list[Any]:
    if len(examples) != 1:
        raise UserError(f"{where}: the chat template renders this conversation's earlier turns otherwise once later "
                        f"turns follow (as Qwen3's drops their <think> blocks): it is {len(examples)} examples, one "
                        "per assistant turn (encode_conversation), not one")
    return examples


def _chat_texts(tokenizer: "PreTrainedTokenizerBase", messages: list[dict[str, str]], row: int, where: str,
                learn_from: int) -> list[tuple[str, bool]]:
    """The renderings a one-example conversation is encoded from (`_chat_plans`); refused where it is several."""
    (plan,) = _one(_chat_plans(tokenizer, messages, row, where, learn_from), where or f"row {row}")
    return plan


def _chat_plans(tokenizer: "PreTrainedTokenizerBase", messages: list[dict[str, str]], row: int, where: str,
                learn_from: int) -> list[list[tuple[str, bool]]]:
    """The renderings each of the conversation's examples is encoded from, each with whether its new tokens are
    learned: for each assistant turn, the conversation before it with the generation prompt (context), then up to
    the turn's end (learned). One example where each rendering is a prefix of the next (ChatML's, Llama's). Where a
    turn renders otherwise once later turns follow (Qwen3's drops every earlier reply's <think> block), one example
    per learned turn, the conversation up to it as the template renders it then: what a served model is sent there
    (the Qwen team's advice), in tokens quadratic in the turns (`read_examples` says how many)."""
    if not getattr(tokenizer, "chat_template", None):
        named = getattr(tokenizer, "name_or_path", "") or "the model"  # its folder, where it was loaded from one
        raise UserError(f"{named}: its tokenizer has no chat template, which chat rows need: use an instruct model, "
                        "give it a template (docs/finetune.md, 'A base model'), or write the rows as `text`")
    named = where or f"row {row}"
    pairs: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < learn_from:
            continue
        prompt = render_chat(tokenizer, messages[:i], True, named)
        upto = render_chat(tokenizer, messages[: i + 1], False, named)
        if not upto.startswith(prompt):  # no example of any shape tells the reply from its prompt
            raise UserError(f"{named}: the chat template does not render conversations as prefixes of each other: "
                            f"message {i} (the assistant's) is not rendered after the generation prompt the template "
                            "writes for it, so its reply cannot be told apart; completion-only labels need a template "
                            "like ChatML")
        pairs.append((prompt, upto))
    if all(prompt.startswith(before) for (prompt, _), (_, before) in zip(pairs[1:], pairs)):
        return [[text for prompt, upto in pairs for text in ((prompt, False), (upto, True))]]
    return [[(prompt, False), (upto, True)] for prompt, upto in pairs]


def _assemble(tokenizer: "PreTrainedTokenizerBase", texts: list[tuple[str, bool]],
              whole: "PrefixIds | dict[str, list[int]]", row: int, part: int = 0) -> Encoded:
    """The example from its renderings (`_chat_plans`) and their encodings (`_encodings`: read off the last text's, or
    by text)."""
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for k, (text, learn) in enumerate(texts):
        if isinstance(whole, PrefixIds):
            piece = _continuation(tokenizer, text, done, ids, prefixes=(whole, k))
        else:
            piece = _continuation(tokenizer, text, done, ids, whole.get(text))
        ids.extend(piece)
        labels.extend(piece if learn else [IGNORE] * len(piece))
        done = text
    return Encoded(ids, labels, row, part=part)


def _encode_all(tokenizer: "PreTrainedTokenizerBase", texts: list[str]) -> dict[str, list[int]]:
    """Each distinct text's ids, in one call: a fast tokenizer encodes a list on its threads, as it encodes each."""
    distinct = list(dict.fromkeys(texts))
    return dict(zip(distinct, tokenizer(distinct, add_special_tokens=False).input_ids)) if distinct else {}


def _continuation(tokenizer: "PreTrainedTokenizerBase", text: str, done: str, ids: list[int],
                  whole: list[int] | None = None, prefixes: "tuple[PrefixIds, int] | None" = None) -> list[int]:
    """The ids that follow `ids` (the encoding of `done`, a prefix of `text`): those of the whole `text` after `ids`,
    as a prompt encoded whole and the tokens generated after it are, where the whole text's encoding (`whole`, else
    encoded here) starts with `ids`; else (a token merging across the cut, as " 3" of a prompt ending in a space)
    the rest encoded alone, as a prompt is encoded before the model answers it. Encoding each piece alone would start
    every piece of a SentencePiece tokenizer (Llama 2's, Mistral's) with a word boundary: "▁4" trained for the "4"
    after `[/INST]`. `prefixes`: the row's encodings and this text's number, read off its last text's (prefixes.py)
    rather than `whole`: the same ids, in time linear in the row's length."""
    if text == done:
        return []
    if prefixes is not None:
        piece = prefixes[0].after(prefixes[1], ids)
        if piece is not None:
            return piece
    else:
        if whole is None:
            whole = tokenizer(text, add_special_tokens=False).input_ids
        if whole[: len(ids)] == ids:
            return whole[len(ids):]
    return tokenizer(text[len(done):], add_special_tokens=False).input_ids


_BATCH = 256  # rows whose texts are tokenized in one call
# ... and at most about this many characters of them: a chat row's texts are its prefixes, one pair a turn, so a
# long conversation's are quadratic in its length (256 rows of 50 turns held 6.5 GB of ids at once), where they are
# encoded in full (not read off the last text's, `_encodings`). A row over it alone is encoded text by text, as each
# row was before batching.
_BATCH_CHARS = 1 << 20


def _encoded(tokenizer: "PreTrainedTokenizerBase", items: Iterator[tuple[dict[str, Any], str, str, "str | Chat"]]
             ) -> Iterator[tuple[dict[str, Any], str, str, list[Encoded]]]:
    """Each row (`_read_rows`) encoded, in order, a batch of rows tokenized at a time: its examples (one, or one per
    assistant turn: `_chat_plans`). A row that is refused before it is tokenized (its shape, its template) is raised
    once the rows before it are given out: the first problem in the file is the one named, as when each row was
    encoded in turn."""
    batch: list[tuple[dict[str, Any], str, str, Any]] = []
    chars = 0
    linear = backend_encodes(tokenizer)
    while True:
        try:
            r, where, shape, content = next(items)
            plan = content if isinstance(content, str) else \
                _chat_plans(tokenizer, content.messages, r["_row"], where, content.learn_from)
        except StopIteration:
            break
        except UserError:
            yield from _encode_batch(tokenizer, batch)
            raise
        batch.append((r, where, shape, plan))
        chars += _chars(plan) if isinstance(plan, str) else sum(_chars(p, linear) for p in plan)
        if len(batch) == _BATCH or chars >= _BATCH_CHARS:
            yield from _encode_batch(tokenizer, batch)
            batch, chars = [], 0
    yield from _encode_batch(tokenizer, batch)


def _chars(plan: "str | list[tuple[str, bool]]", linear: bool = False) -> int:
    """The characters a row's encoding tokenizes: its text, its last text and windows at most twice as long
    (`linear`: prefixes.prefix_ids encodes a row with more in full, by `_encodings`' groups), or all its texts."""
    if isinstance(plan, str):
        return len(plan)
    if linear:
        return 3 * len(plan[-1][0]) if plan else 0
    return sum(len(t) for t, _ in plan)


def _encode_batch(tokenizer: "PreTrainedTokenizerBase", batch: list[tuple[dict[str, Any], str, str, Any]]
                  ) -> Iterator[tuple[dict[str, Any], str, str, list[Encoded]]]:
    texts = [plan for *_, plan in batch if isinstance(plan, str)]  # a data set's rows are all `text` rows, or none
    if texts:
        for (r, where, shape, _), ids in zip(batch, tokenizer(texts).input_ids):
            yield r, where, shape, [encode_text(tokenizer, "", r["_row"], ids)]
        return
    wholes = _encodings(tokenizer, [plan for *_, plans in batch for plan in plans])
    for r, where, shape, plans in batch:
        yield r, where, shape, [_assemble(tokenizer, plan, next(wholes), r["_row"], part)
                                for part, plan in enumerate(plans)]


def _encodings(tokenizer: "PreTrainedTokenizerBase", plans: list[list[tuple[str, bool]]]
               ) -> "Iterator[PrefixIds | dict[str, list[int]]]":
    """Each row's texts' encodings, in order, rows taken a group of about _BATCH_CHARS characters at a time (`_chars`)
    so that their encodings are not all held at once: a row split by turn is hundreds of examples (tokenized together,
    one 800-turn row held 8 GB). Each read off one encoding of its last text where the tokenizer allows (prefixes.py),
    else each text's in full (`_full`)."""
    linear = backend_encodes(tokenizer)
    for group in _groups([_chars(plan, linear) for plan in plans]):
        part = [plans[k] for k in group]
        got = prefix_ids(tokenizer, [[t for t, _ in plan] for plan in part]) if linear else [None] * len(part)
        full = _full(tokenizer, [plan for plan, ids in zip(part, got) if ids is None])
        yield from (ids if ids is not None else next(full) for ids in got)


def _full(tokenizer: "PreTrainedTokenizerBase", plans: list[list[tuple[str, bool]]]) -> Iterator[dict[str, list[int]]]:
    """Each row's texts' encodings in full, rows tokenized together up to _BATCH_CHARS characters of their texts, a
    group held at once (a row over it alone is encoded text by text, by `_continuation`)."""
    sizes = [_chars(plan) for plan in plans]
    for group in _groups(sizes):
        whole = _encode_all(tokenizer, [t for k in group if sizes[k] <= _BATCH_CHARS for t, _ in plans[k]])
        yield from (whole for _ in group)


def _groups(sizes: list[int]) -> Iterator[list[int]]:
    """The indices of `sizes` in order, in groups closed once their sizes reach _BATCH_CHARS."""
    group: list[int] = []
    chars = 0
    for k, size in enumerate(sizes):
        group.append(k)
        chars += size
        if chars >= _BATCH_CHARS:
            yield group
            group, chars = [], 0
    if group:
        yield group


def _progress(total: int, path: Path, show: bool) -> Any:
    """A bar of rows encoded, shown once encoding has taken 2 s (a small data set prints nothing); TQDM_DISABLE and
    the CLI's repaint interval for a log file apply (tqdm's environment defaults)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=f"encoding {path.name}", unit="row", delay=2, **({} if show else {"disable": True}))


@dataclass
class Examples:
    examples: list[Encoded]
    warnings: list[str]
    shape: str  # what its rows are: SHAPES' description


def read_examples(
    path: str | Path,
    tokenizer: "PreTrainedTokenizerBase",
    max_length: int,
    too_long: Literal["truncate", "error"] = "truncate",
    vocab: int | None = None,
    progress: bool = False,
) -> Examples:
    """Read and encode a data file or a local `datasets` directory, of any one row shape (shapes.py); returns
    examples, warnings and the shape.

    With `too_long="truncate"` an example longer than `max_length` keeps its first `max_length` tokens; one
    whose prompt alone fills `max_length` (no answer token left to learn from) is dropped, with a warning
    naming its row, rather than failing the whole data set. `"error"` refuses the first long example.
    `progress`: a bar on stderr while its rows are encoded (minutes for a million rows). A chat row the template
    renders as one example per assistant turn (`_chat_plans`) gives them all, in order, and a line says what it costs.
    """
    path = Path(path)
    examples, warnings, truncated, dropped, shape = [], [], [], [], "messages"
    split: list[tuple[int, list[int]]] = []  # the rows split by turn: each one's number and its examples' lengths
    rows = read_rows(path)
    with _progress(len(rows), path, progress) as bar:
        for r, where, shape, exs in _encoded(tokenizer, _read_rows(path, rows)):
            bar.update()
            if len(exs) > 1:
                split.append((r["_row"], [len(ex) for ex in exs]))
            for ex in exs:
                ex.where = where
                check_ids_fit(ex._ids, vocab, where)
                if len(ex) > max_length:
                    if too_long == "error":
                        which = f"example {ex.part + 1} of its {len(exs)} (one a reply)" if len(exs) > 1 else "example"
                        raise UserError(f"{where}: {which} has {len(ex)} tokens, more than max_length {max_length}: "
                                        "raise max_length, shorten it, or set data.too_long: truncate")
                    ex = ex.truncated(max_length)
                    if ex.target_tokens == 0:
                        dropped.append(r["_row"])
                        continue
                    truncated.append(r["_row"])
                examples.append(ex)
    if split:
        warnings.append(_split_note(path, split))
    if truncated:
        warnings.append(f"{path}: {len(truncated)} example(s) longer than max_length {max_length} were truncated "
                        f"({_rows(truncated)})")
    if dropped:
        warnings.append(f"{path}: {len(dropped)} example(s) dropped: the prompt alone fills max_length {max_length}, "
                        f"no answer left to learn ({_rows(dropped)})")
    if not examples:
        raise UserError(f"{path}: every example's prompt fills max_length {max_length}: raise data.max_length")
    return Examples(examples, warnings, SHAPES[shape])


def _rows(numbers: list[int]) -> str:
    numbers = list(dict.fromkeys(numbers))  # a row split by turn is named once
    return f"rows {', '.join(map(str, numbers[:5]))}{', ...' if len(numbers) > 5 else ''}"


def _split_note(path: Path, split: list[tuple[int, list[int]]]) -> str:
    """What splitting rows by turn costs: their examples' tokens against their whole conversations' (the longest
    example of each), quadratic in the turns."""
    tokens, whole = sum(sum(lengths) for _, lengths in split), sum(max(lengths) for _, lengths in split)
    return (f"{path}: {len(split)} multi-turn row(s) split into {sum(len(lengths) for _, lengths in split)} examples, "
            "one per assistant turn, each the conversation up to it as the chat template renders it then (the "
            "template renders earlier turns otherwise once later ones follow, as Qwen3's drops their <think> blocks): "
            f"{tokens} tokens, {tokens / whole:.1f}x the {whole} of the whole conversations "
            f"({_rows([row for row, _ in split])})")


def _text(row: dict[str, Any], where: str) -> str:
    must_be_text(row["text"], f"{where}: field 'text'")
    if not row["text"]:
        raise UserError(f"{where}: field 'text' is empty: drop the row")
    return row["text"]


def encode_text(tokenizer: "PreTrainedTokenizerBase", text: str, row: int = 0, ids: list[int] | None = None
                ) -> Encoded:
    """A plain text row, learned whole as TRL learns its language-modelling rows: the tokenizer's own special tokens
    (a BOS where it adds one), the end-of-sequence token after it, a label on every token after the first (the first
    has nothing before it to be predicted from). `ids`: the text's encoding, made already."""
    ids = tokenizer(text).input_ids if ids is None else ids
    eos = tokenizer.eos_token_id
    if eos is not None and ids[-1:] != [eos]:
        ids.append(eos)
    return Encoded(ids, [IGNORE, *ids[1:]], row)
