"""Chat templates that do not render a conversation's earlier turns as a prefix of the whole (Qwen3's drops the <think>
block of every reply before the last user turn): each assistant turn is an example of its own, the conversation up to
it as the template renders a conversation ending there, checked against the ids the template itself gives for the
truncated conversation; prefix-rendering templates encode the very bytes they did before."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import random
import re
from pathlib import Path
from typing import Any

import pytest

from llmfast.data.chat import IGNORE, encode_conversation, encode_messages, read_examples, rows_digest
from llmfast.errors import UserError
from llmfast.models import load_tokenizer

# Qwen3's template logic for the assistant's turn, without tools: a reply's "<think>...</think>" is split off its
# content; a reply after the last user turn is written with its think block (an empty one when it has none) where it is
# the last message or has reasoning, every earlier reply without it; the generation prompt opens the assistant's turn
# (and writes an empty think block where enable_thinking is false).
QWEN3_STYLE = """\
{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}
{%- set ns = namespace(last_query=messages|length - 1) %}
{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}{%- endfor %}
{%- for m in messages %}
  {%- if m.role == 'user' or (m.role == 'system' and not loop.first) %}
    {{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}
  {%- elif m.role == 'assistant' %}
    {%- set reply = m.content %}
    {%- set thought = '' %}
    {%- if '</think>' in reply %}
      {%- set thought = reply.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
      {%- set reply = reply.split('</think>')[-1].lstrip('\\n') %}
    {%- endif %}
    {%- if loop.index0 > ns.last_query and (loop.last or thought) %}
      {{- '<|im_start|>assistant\\n<think>\\n' + thought.strip('\\n') + '\\n</think>\\n\\n' + reply.lstrip('\\n') }}
    {%- else %}
      {{- '<|im_start|>assistant\\n' + reply }}
    {%- endif %}
    {{- '<|im_end|>\\n' }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
  {{- '<|im_start|>assistant\\n' }}
  {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}"""

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\n4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"},
        {"role": "user", "content": "And 4+4?"},
        {"role": "assistant", "content": "<think>Four and four.</think>8"}]


@pytest.fixture(scope="module")
def qwen3(tiny_dir: Path) -> Any:
    """The tiny model's ChatML tokenizer with Qwen3's template and its <think> tokens (added, not special)."""
    from tokenizers import AddedToken

    tok = load_tokenizer(tiny_dir)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    tok.chat_template = QWEN3_STYLE
    return tok


def _ids(encoded: Any) -> list[int]:
    return encoded["input_ids"] if not isinstance(encoded, list) else encoded  # a BatchEncoding in transformers 5


def test_each_reply_is_learned_after_the_conversation_the_template_renders_before_it(qwen3: Any) -> None:
    """One example per assistant turn: the ids apply_chat_template gives the conversation ending at that turn, the
    ids it gives the conversation before it with the generation prompt as context (what vLLM sends the model then),
    and the rest learned: the turn's think block (empty where it has none), its reply and its <|im_end|>."""
    whole = qwen3.apply_chat_template(CHAT, tokenize=False)
    assert "Two and two" not in whole and whole.count("<think>") == 1  # earlier replies lose their think block
    examples = encode_conversation(qwen3, CHAT, row=3, where="d.jsonl:3")
    turns = [i for i, m in enumerate(CHAT) if m["role"] == "assistant"]
    assert len(examples) == len(turns) and [e.part for e in examples] == [0, 1, 2]
    thoughts = ["Two and two.", "", "Four and four."]
    for ex, i, thought in zip(examples, turns, thoughts):
        prompt = _ids(qwen3.apply_chat_template(CHAT[:i], add_generation_prompt=True))
        assert ex.input_ids == _ids(qwen3.apply_chat_template(CHAT[: i + 1])) and ex.input_ids[: len(prompt)] == prompt
        assert ex.labels == [IGNORE] * len(prompt) + ex.input_ids[len(prompt):], i
        learned = qwen3.decode(ex.input_ids[len(prompt):])
        reply = re.sub(r"<think>.*</think>\s*", "", CHAT[i]["content"], flags=re.S)
        assert learned == f"<think>\n{thought}\n</think>\n\n{reply}<|im_end|>\n", i
        assert qwen3.decode(ex.input_ids[: len(prompt)]).count("<think>") == 0  # no earlier think block in context
    assert set(qwen3.convert_tokens_to_ids(["<think>", "</think>"])) <= set(examples[0].input_ids)  # added tokens
    # one example only where the template renders the conversation as prefixes: a single reply
    (one,) = encode_conversation(qwen3, CHAT[:3])
    assert one == encode_messages(qwen3, CHAT[:3]) and one.input_ids == _ids(qwen3.apply_chat_template(CHAT[:3]))
    with pytest.raises(UserError, match=r"^row 0: the chat template renders this conversation's earlier turns .* it "
                                        r"is 3 examples, one per assistant turn"):
        encode_messages(qwen3, CHAT)


def test_a_data_file_of_such_rows_trains_each_turn_and_says_what_it_costs(qwen3: Any, tmp_path: Path) -> None:
    """read_examples gives a split row's examples in order, under the row's place, and a line saying how many rows
    were split into how many examples, and their tokens against their whole conversations'; a TRL conversational row
    learns only its completion's turns (its prompt's replies are context); max_length applies to each example."""
    path = tmp_path / "d.jsonl"
    single = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (CHAT, single, CHAT[1:5])))
    got = read_examples(path, qwen3, 4096)
    assert [(e.where, e.part) for e in got.examples] == [
        (f"{path}:1", 0), (f"{path}:1", 1), (f"{path}:1", 2), (f"{path}:2", 0), (f"{path}:3", 0), (f"{path}:3", 1)]
    assert [(e.input_ids, e.labels) for e in got.examples[:3]] == \
        [(e.input_ids, e.labels) for e in encode_conversation(qwen3, CHAT)]
    lengths = [len(e) for e in got.examples]
    tokens, whole = sum(lengths[:3]) + sum(lengths[4:]), lengths[2] + lengths[5]
    assert got.warnings == [
        f"{path}: 2 multi-turn row(s) split into 5 examples, one per assistant turn, each the conversation up to it as "
        "the chat template renders it then (the template renders earlier turns otherwise once later ones follow, as "
        f"Qwen3's drops their <think> blocks): {tokens} tokens, {tokens / whole:.1f}x the {whole} of the whole "
        "conversations (rows 1, 3)"]
    trl = tmp_path / "trl.jsonl"  # the first reply is a worked example in the prompt: context, not an example
    trl.write_text(json.dumps({"prompt": CHAT[:4], "completion": CHAT[4:5]}) + "\n")
    (ex,) = read_examples(trl, qwen3, 4096).examples
    assert ex.input_ids == _ids(qwen3.apply_chat_template(CHAT[:5]))
    assert qwen3.decode([t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE]) == \
        "<think>\n\n</think>\n\n6<|im_end|>\n"
    # each example on its own: the turns whose prompt fills max_length are dropped, the longer rest cut
    cut = next(i for i, label in enumerate(got.examples[5].labels) if label != IGNORE) + 3  # into row 3's last reply
    short = read_examples(path, qwen3, cut)
    kept = [e for e in got.examples if set(e.labels[:cut]) != {IGNORE}]
    assert [(e.input_ids, e.labels) for e in short.examples] == [(e.input_ids[:cut], e.labels[:cut]) for e in kept]
    assert [e.where[-1] for e in got.examples if e not in kept] == ["1", "1"]  # named once
    assert [e.where[-1] for e in kept if len(e) > cut] == ["1", "3"] and short.warnings[1:] == [
        f"{path}: 2 example(s) longer than max_length {cut} were truncated (rows 1, 3)",
        f"{path}: 2 example(s) dropped: the prompt alone fills max_length {cut}, no answer left to learn (rows 1)"]


def test_a_rows_examples_are_held_out_together(qwen3: Any, tmp_path: Path) -> None:
    """eval_fraction holds out rows, not examples: a split row's later examples hold its earlier answers as context,
    so none of them is trained on while another is scored; the summary line counts rows and their examples."""
    from llmfast.finetune.data_setup import _count, row_groups, split_eval

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"messages": CHAT[: 3 + 2 * (k % 3)]}) + "\n" for k in range(12)))
    examples = read_examples(path, qwen3, 4096).examples
    assert [len(g) for g in row_groups(examples)] == [1, 2, 3] * 4 and len(examples) == 24
    for seed in range(5):
        train, held = split_eval(examples, 0.25, seed)
        assert {e.where for e in train}.isdisjoint({e.where for e in held}) and len({e.where for e in held}) == 3
        assert sorted(train + held, key=lambda e: (int(e.where.rsplit(":", 1)[1]), e.part)) == examples
    assert _count(examples) == "12 rows (24 examples)" and _count(examples[:1]) == "1 row"
    assert _count(examples[1:3], noun=False) == "1 (2 examples)"


def test_too_long_names_which_of_a_split_rows_examples(qwen3: Any, tmp_path: Path) -> None:
    """data.too_long: error on a split row names which of its examples is too long (each repeats the turns before
    it, so the row's first turns may fit where its last does not); a row of one example is named as before."""
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n")
    lengths = [len(e) for e in encode_conversation(qwen3, CHAT)]
    with pytest.raises(UserError, match=rf"^{path}:1: example 3 of its 3 \(one a reply\) has {lengths[2]} tokens, "
                                        rf"more than max_length {lengths[1]}: "):
        read_examples(path, qwen3, lengths[1], too_long="error")
    path.write_text(json.dumps({"messages": CHAT[:3]}) + "\n")
    with pytest.raises(UserError, match=rf"^{path}:1: example has {lengths[0]} tokens, more than max_length 4"):
        read_examples(path, qwen3, 4, too_long="error")


def test_calibration_takes_each_split_conversation_once(qwen3: Any, tmp_path: Path) -> None:
    """quantize's and sparsify's data.conversations: a row split by turn is calibrated on once, as the template
    renders the whole conversation (its last example), not on every turn's example, which repeats its earlier turns
    (tokens quadratic in the turns, and windows of the same system prompt and first turns over and over)."""
    from llmfast.calibration import conversation_windows

    path = tmp_path / "d.jsonl"
    single = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (CHAT, single, CHAT[1:5])))
    whole = [_ids(qwen3.apply_chat_template(m)) for m in (CHAT, single, CHAT[1:5])]
    got = conversation_windows(qwen3, [path], 1).flatten().tolist()  # windows of one token: every id
    assert any(got == [t for k in order for t in whole[k]] for order in itertools.permutations(range(3)))


PIECES = ["", " ", "\n", "\n\n", "3", " 42", "é", "日本語", "Hello", " world", "x  y", "<|im_end|>", "<think>", "</think>",
          ":)"]
PLAIN = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")


def _rows(seed: int, n: int) -> list[list[dict[str, str]]]:
    r = random.Random(seed)
    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": "".join(r.choices(PIECES, k=3))}] if r.random() < 0.3 else []
        for _ in range(r.randint(1, 8)):
            msgs += [{"role": "user", "content": "".join(r.choices(PIECES, k=r.randint(1, 5)))},
                     {"role": "assistant", "content": "".join(r.choices(PIECES, k=r.randint(0, 5)))}]
        out.append(msgs)
    return out


def test_prefix_rendering_templates_encode_the_bytes_they_did_before(builtin_dir: Path, tmp_path: Path) -> None:
    """SmolLM2's template (read off one encoding, prefixes.py) and one with no special token to cut at (every prefix
    in full), on awkward multi-turn rows as `messages` and as TRL conversational rows, whole and truncated: the ids,
    labels and warnings are those the encoding gave before templates like Qwen3's were split by turn (digests taken
    on that code, s54)."""
    tok = load_tokenizer(builtin_dir)
    plain = copy.deepcopy(tok)
    plain.chat_template = PLAIN
    rows = _rows(7, 30)
    a, b = tmp_path / "m.jsonl", tmp_path / "trl.jsonl"
    a.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    b.write_text("".join(json.dumps({"prompt": m[:-1], "completion": m[-1:]}) + "\n" for m in rows))
    got = [read_examples(p, t, max_length) for t in (tok, plain) for p in (a, b) for max_length in (4096, 90)]
    assert rows_digest(*[[g.examples] for g in got]) == \
        "9298f07aae43193392a62156b817e8601e8de5f039b7dd15d560ba51da584890"
    warnings = json.dumps([g.warnings for g in got]).replace(str(tmp_path), "TMP")
    assert hashlib.sha256(warnings.encode()).hexdigest() == \
        "7f134b37136f202420bb4376a7030f9490ffc8f107fe5c19282ce0008a01da0f"
    assert all(e.part == 0 for g in got for e in g.examples)


def test_a_long_split_row_is_encoded_a_group_of_examples_at_a_time(qwen3: Any, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A row split by turn is an example a reply, each the conversation up to it (tokens quadratic in the turns):
    their encodings were made in one tokenizer call and held at once (8 GB for one 800-turn row, s58); now rows a
    group of about _BATCH_CHARS characters at a time, with the same ids and labels (the template's own ids for the
    conversation ending at each reply). The template renders two texts a reply, each a text its example holds."""
    from llmfast.data import chat

    msgs = [CHAT[0]]
    for k in range(12):
        msgs += [{"role": "user", "content": f"Question {k}?"},
                 {"role": "assistant", "content": f"<think>Step {k}.</think>Answer {k}" if k % 3 else f"Answer {k}"}]
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": msgs}) + "\n")
    renders, calls = [], []
    render, read_off = chat.render_chat, chat.prefix_ids
    monkeypatch.setattr(chat, "render_chat", lambda tok, m, gen, where: renders.append(len(m)) or render(tok, m, gen,
                                                                                                          where))
    monkeypatch.setattr(chat, "prefix_ids", lambda tok, rows: calls.append([len(r[-1]) for r in rows]) or
                        read_off(tok, rows))
    monkeypatch.setattr(chat, "_BATCH_CHARS", 3 * 1000)  # a group: an example's last text counts thrice (_chars)
    got = read_examples(path, qwen3, 4096).examples
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    assert renders == [n for i in turns for n in (i, i + 1)]  # two a reply: before it (and its prompt), and with it
    assert len(calls) > 2 and [n for c in calls for n in c] == [len(qwen3.apply_chat_template(msgs[: i + 1],
                                                                                                tokenize=False))
                                                                 for i in turns]
    assert all(3 * sum(c[:-1]) < 3000 for c in calls)  # a group closes once it reaches _BATCH_CHARS
    assert len(got) == len(turns)
    for ex, i in zip(got, turns):
        prompt = _ids(qwen3.apply_chat_template(msgs[:i], add_generation_prompt=True))
        assert ex.input_ids == _ids(qwen3.apply_chat_template(msgs[: i + 1]))
        assert ex.labels == [IGNORE] * len(prompt) + ex.input_ids[len(prompt):], i
