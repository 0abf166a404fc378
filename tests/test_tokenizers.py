"""Tokenizers shipped as other families ship theirs (llmfast.testing.FAMILIES), checked against what transformers itself
does with them: Llama 3's (a BOS the tokenizer adds and the template writes, no pad token, turns that end with
<|eot_id|> while eos_token is <|end_of_text|>, both in generation_config.json) and Gemma's (a template that raises)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from llmfast.data.chat import IGNORE, encode_messages, encode_text, read_examples
from llmfast.data.packing import collate
from llmfast.errors import UserError
from llmfast.models import load_tokenizer
from llmfast.testing import build_family_model, script_greedy

CHAT = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"}]


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    llama3 = build_family_model(root / "llama3", "llama3")
    return {"llama3": llama3, "gemma": build_family_model(root / "gemma", "gemma", like=llama3)}


def _ids(encoded: object) -> list[int]:
    return encoded["input_ids"] if not isinstance(encoded, list) else encoded  # a BatchEncoding in transformers 5


@pytest.mark.parametrize("family", ["llama3", "gemma"])
def test_chat_rows_and_prompts_are_transformers_own(families: dict[str, Path], family: str) -> None:
    """Training rows and eval prompts are the ids apply_chat_template gives (one BOS: the template's, not the
    tokenizer's again), and the labels end each answer with the turn's end token, which is not eos_token."""
    from transformers import AutoTokenizer

    raw, tok = AutoTokenizer.from_pretrained(families[family]), load_tokenizer(families[family])
    ex = encode_messages(tok, CHAT)
    assert ex.input_ids == _ids(raw.apply_chat_template(CHAT))
    assert ex.input_ids.count(tok.bos_token_id) == 1
    end = "<|eot_id|>" if family == "llama3" else "<end_of_turn>"
    learned = [t for t, label in zip(tok.convert_ids_to_tokens(ex.input_ids), ex.labels) if label != IGNORE]
    assert [t for t in learned if t.startswith("<")] == [end, end] and tok.eos_token != end
    from llmfast.data.chat import render_chat

    prompt = render_chat(tok, CHAT[:1], True, "row 1")
    assert tok(prompt, add_special_tokens=False).input_ids == _ids(raw.apply_chat_template(CHAT[:1],
                                                                                         add_generation_prompt=True))


def test_pad_is_eos_keeps_the_stop_learned(families: dict[str, Path]) -> None:
    """Llama 3 has no pad token: pad = eos. Padding is masked by position, not by id, so the EOS that ends a text row
    (the same id as the padding after it) keeps its label."""
    tok = load_tokenizer(families["llama3"])
    assert tok.pad_token_id == tok.eos_token_id
    text, chat = encode_text(tok, "Hello there."), encode_messages(tok, CHAT)
    batch = collate([[text], [chat]], tok.pad_token_id)
    row = batch.labels[0]
    assert batch.input_ids[0][len(text) - 1] == tok.eos_token_id and row[len(text) - 1] == tok.eos_token_id
    assert batch.input_ids[0][len(text):] and set(row[len(text):]) == {IGNORE}  # the padding, also eos's id


def test_a_raising_template_names_the_row(families: dict[str, Path]) -> None:
    tok = load_tokenizer(families["gemma"])
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                 {"role": "assistant", "content": "c"}]
    with pytest.raises(UserError, match=r"^train.jsonl:3: the model's chat template refuses this row \(Conversation "
                                        r"roles must alternate"):
        encode_messages(tok, two_users, where="train.jsonl:3")


def test_a_byte_order_marked_template_is_refused_for_both_engines(families: dict[str, Path], tmp_path: Path) -> None:
    """transformers keeps a chat_template.jinja's UTF-8 byte-order mark (every prompt would start with U+FEFF's
    tokens, before the BOS): refused, by the transformers verbs and by serve before vLLM starts."""
    from llmfast.serve.server import prepare_spec

    model = tmp_path / "marked"
    shutil.copytree(families["llama3"], model)
    template = model / "chat_template.jinja"
    template.write_bytes(b"\xef\xbb\xbf" + template.read_bytes())
    for refuse in (load_tokenizer, prepare_spec):
        with pytest.raises(UserError, match=r"chat_template.jinja starts with a UTF-8 byte-order mark.*save it "):
            refuse(str(model))


@pytest.mark.parametrize("family", ["llama3", "gemma"])
def test_generation_stops_at_generation_configs_end_of_turn(families: dict[str, Path], tmp_path: Path,
                                                            family: str) -> None:
    """A model scripted to answer "4", end its turn and go on: eval's answers and the transformers bench engine's
    output counts stop where transformers' own `generate` stops (generation_config's end-of-turn id, not eos_token's,
    and not the padding after it in a batch)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmfast.bench.engines.hf import run_hf
    from llmfast.bench.workload import Request
    from llmfast.evaluate import generate_answers
    from llmfast.models import load_model

    model = tmp_path / family
    shutil.copytree(families[family], model, copy_function=shutil.copy)  # its own weights, not a link to the fixture's
    raw = AutoTokenizer.from_pretrained(model)
    prompt = _ids(raw.apply_chat_template(CHAT[:1], add_generation_prompt=True))
    four, other = raw.encode("4", add_special_tokens=False)[0], raw.encode(" user", add_special_tokens=False)[0]
    end = raw.convert_tokens_to_ids("<|eot_id|>" if family == "llama3" else "<end_of_turn>")
    script_greedy(model, {prompt[-1]: four, four: end, end: other, other: other})
    import torch

    own = AutoModelForCausalLM.from_pretrained(model).generate(torch.tensor([prompt]), max_new_tokens=8,
                                                               do_sample=False)[0, len(prompt):].tolist()
    assert own == [four, end]
    tok, lm = load_tokenizer(model), load_model(model)
    assert generate_answers(lm, tok, [CHAT[:1]], max_new_tokens=8) == ["4"]
    # batched with a request that runs to its length: the first is followed by padding (eos's id for Llama 3)
    requests = [Request("", len(prompt), 8, prompt_ids=prompt), Request("", 2, 8, prompt_ids=[300, 301])]
    results, _ = run_hf(lm, tok, requests, batch_size=2, ignore_eos=False)
    assert [r.output_tokens for r in results] == [2, 8] and results[0].generated_text == "4"
    # a text prompt (a run of several variants sends text) is encoded as vLLM encodes a completion: with the BOS
    results, _ = run_hf(lm, tok, [Request("Hello there.", 0, 1)], batch_size=1)
    assert results[0].prompt_len == len(raw("Hello there.").input_ids) == len(raw.encode("Hello there.",
                                                                                         add_special_tokens=False)) + 1


def test_perplexity_and_calibration_start_with_the_bos_the_tokenizer_adds(families: dict[str, Path], tmp_path: Path
                                                                         ) -> None:
    """Eval's perplexity is the model's own loss on the tokenizer's own call (Llama 3's starts with its BOS, as
    transformers' perplexity recipe has it), and calibration skips those same ids, the BOS counted."""
    import math

    import torch

    from llmfast.calibration import text_ids
    from llmfast.evaluate import perplexity
    from llmfast.models import load_model

    text = "It was a truth universally acknowledged, then as now, that a single man wanted a wife."
    tok, model = load_tokenizer(families["llama3"]), load_model(families["llama3"])
    ids = tok(text, return_tensors="pt").input_ids
    assert ids[0, 0] == tok.bos_token_id
    with torch.inference_mode():
        loss = model(input_ids=ids, labels=ids).loss.item()
    got = perplexity(model, tok, text, context=64, stride=64)
    assert got["tokens"] == ids.shape[1] - 1 and got["ppl"] == pytest.approx(math.exp(loss), rel=1e-4)
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    assert text_ids(tok, tmp_path / "t.txt").tolist() == ids[0].tolist()
    from tokenizers import Tokenizer

    from llmfast.testing import family_tokenizer

    chatml = family_tokenizer("chatml", Tokenizer.from_file(str(families["llama3"] / "tokenizer.json")))  # adds none
    assert text_ids(chatml, tmp_path / "t.txt").tolist() == chatml(text).input_ids == ids[0, 1:].tolist()


MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
                    "' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")  # Mistral 7B v0.1's


def test_a_sentencepiece_only_tokenizer_trains_on_apply_chat_templates_ids(families: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    """A tokenizer.model alone (Llama 2's, Mistral's way): SentencePiece starts every encoded piece with a word
    boundary, so the answer "4" after `[/INST]` was trained as "▁4", and each later `[INST]` had an extra "▁" before
    it: the ids trained on are now apply_chat_template's, the labels still on the answers and their </s>."""
    import sentencepiece
    from transformers import AutoTokenizer

    from llmfast.testing import _default_corpus

    model = tmp_path / "sp"
    model.mkdir()
    os.link(families["llama3"] / "model.safetensors", model / "model.safetensors")  # 1024 rows, for 1000 pieces
    shutil.copy(families["llama3"] / "config.json", model)
    lines = [line for text in _default_corpus() for line in text.splitlines() if line.strip()]
    with (model / "tokenizer.model").open("wb") as f:
        sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines[:4000]), model_writer=f, vocab_size=1000,
                                                 model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
                                                 pad_id=-1, minloglevel=2)
    (model / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "legacy": False, "chat_template": MISTRAL_TEMPLATE}))
    raw, tok = AutoTokenizer.from_pretrained(model), load_tokenizer(model)
    ex = encode_messages(tok, CHAT)
    assert ex.input_ids == _ids(raw.apply_chat_template(CHAT))
    learned = [t for t, label in zip(tok.convert_ids_to_tokens(ex.input_ids), ex.labels) if label != IGNORE]
    assert learned == ["4", "</s>", "6", "</s>"]
    _same_as_before(tok, _awkward_rows(6, seed=3, max_turns=12, system=False))  # read off one encoding (prefixes.py)


def test_bench_prompt_files_are_encoded_as_vllm_encodes_them(families: dict[str, Path], tmp_path: Path) -> None:
    """Custom, ShareGPT and random prompts carry the BOS vLLM's server puts before a text prompt (and its datasets
    count): without it a Llama was benchmarked on prompts it never sees served, and ShareGPT kept other
    conversations."""
    from llmfast.bench.workload import jsonl_requests, random_requests, sharegpt_requests

    tok = load_tokenizer(families["llama3"])
    prompt, reply = "Tell me about the navy, please.", "The navy is a fine profession for a gentleman."
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": prompt}) + "\n", encoding="utf-8")
    (tmp_path / "s.json").write_text(json.dumps([{"conversations": [{"from": "human", "value": prompt},
                                                                     {"from": "gpt", "value": reply}]}]))
    (custom,) = jsonl_requests(tmp_path / "p.jsonl", tok, 8)
    (shared,) = sharegpt_requests(tmp_path / "s.json", tok, 1)
    assert custom.prompt_ids == shared.prompt_ids == tok(prompt).input_ids and custom.prompt_ids[0] == tok.bos_token_id
    assert shared.prompt_len == len(shared.prompt_ids) and shared.output_len == len(tok(reply).input_ids)
    # random prompts: the BOS counts towards --random-input-len, as in vLLM's random dataset
    for r in random_requests(tok, 3, input_len=12, output_len=4, seed=0):
        assert r.prompt_ids == tok(r.prompt).input_ids and r.prompt_len == len(r.prompt_ids) == 12


def test_a_tokenizer_without_eos_or_pad_still_pads(families: dict[str, Path], tmp_path: Path) -> None:
    """A bare tokenizer.json (no special tokens named): finetune's batches were a "Could not infer dtype of NoneType"
    traceback mid-run, its output left as a stopped run; any id pads, since padding is masked by position."""
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_file=str(families["llama3"] / "tokenizer.json")).save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.eos_token is None and tok.pad_token_id == 0
    rows = [encode_text(tok, "Hello there."), encode_text(tok, "Hi.")]
    assert collate([[r] for r in rows], tok.pad_token_id).tensors()["input_ids"][1, -1] == 0
    # The pad chosen here is not the model's: saved (an adapter, a quantized or relufied model), it became a special
    # token to every later loader, and id 0's text was dropped from decoded answers (skip_special_tokens)
    from transformers import AutoTokenizer

    from llmfast.loading import save_tokenizer

    save_tokenizer(tok, tmp_path / "saved")
    again = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert again.pad_token is None and tok.pad_token_id == 0  # the loaded one still pads
    assert again.all_special_ids == AutoTokenizer.from_pretrained(tmp_path).all_special_ids
    llama = load_tokenizer(families["llama3"])  # pad = EOS: the saved config is the base's, which names no pad
    save_tokenizer(llama, tmp_path / "llama")
    assert AutoTokenizer.from_pretrained(tmp_path / "llama").pad_token is None and llama.pad_token == llama.eos_token
    # the teacher's own samples (relufy, bitnet's QAT) start from a BOS, else the EOS, else that pad: was a TypeError
    from transformers import AutoModelForCausalLM

    from llmfast.distill import teacher_samples

    teacher = AutoModelForCausalLM.from_pretrained(families["llama3"])
    rows = teacher_samples(teacher, tok, count=2, length=5, seed=0)
    assert rows.shape == (2, 5) and (rows[:, 0] == 0).all()


# Message contents a chat row's prefixes can be cut next to: spaces and newlines the pre-tokenizer looks ahead over
# (GPT-2's `\s+(?!\S)`), digits, letters a normalizer could compose, a special token's text inside a message.
_PIECES = ["", " ", "  ", "\n", "\n\n", " \n", "\t", "3", "42", " 7", "1,000.5", "é", "e\u0301", "日本語", "🙂", "naïve",
           "Hello", " world", "x  y", "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "</s>", "[/INST]", ":)", "-\n-"]


def _awkward_rows(n: int, seed: int, max_turns: int = 60, system: bool = True) -> list[tuple[list[dict], int]]:
    """`n` conversations of 1..max_turns turns of _PIECES (empty answers, a system prompt, trailing spaces and
    newlines among them), each with a `learn_from`."""
    import random

    r = random.Random(seed)
    rows = []
    for _ in range(n):
        turns = r.randint(1, max_turns)
        msgs = [{"role": "system", "content": "".join(r.choices(_PIECES, k=3))}] if system and r.random() < 0.3 else []
        for _ in range(turns):
            msgs += [{"role": "user", "content": "".join(r.choices(_PIECES, k=r.randint(0, 6)))},
                     {"role": "assistant", "content": "".join(r.choices(_PIECES, k=r.randint(0, 6)))}]
        rows.append((msgs, r.choice([0, 0, r.randint(0, len(msgs))])))
    return rows


def _encode_as_before(tok: object, messages: list[dict], learn_from: int) -> tuple[list[int], list[int]]:
    """encode_messages as it was before prefixes.py, the reference: every text (prefix) tokenized in full, a piece
    the ids after those before it in its text's encoding, else the new text encoded alone."""
    from llmfast.data.chat import _chat_texts

    texts = _chat_texts(tok, messages, 0, "", learn_from)
    distinct = list(dict.fromkeys(t for t, _ in texts))
    whole = dict(zip(distinct, tok(distinct, add_special_tokens=False).input_ids)) if distinct else {}
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for text, learn in texts:
        if text == done:
            piece = []
        elif whole[text][: len(ids)] == ids:
            piece = whole[text][len(ids):]
        else:
            piece = tok(text[len(done):], add_special_tokens=False).input_ids
        ids += piece
        labels += piece if learn else [IGNORE] * len(piece)
        done = text
    return ids, labels


def _same_as_before(tok: object, rows: list[tuple[list[dict], int]]) -> None:
    for msgs, learn_from in rows:
        try:
            want: object = _encode_as_before(tok, msgs, learn_from)
        except UserError as e:  # Gemma's template refuses a system turn
            want = str(e)
        try:
            ex = encode_messages(tok, msgs, learn_from=learn_from)
            got: object = (ex.input_ids, ex.labels)
        except UserError as e:
            got = str(e)
        assert got == want, (msgs, learn_from)


PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")  # no special token to cut at


@pytest.mark.parametrize("family", ["llama3", "gemma", "chatml", "smollm2", "plain", "opening"])
def test_chat_rows_read_off_one_encoding_are_every_prefix_encoded(families: dict[str, Path], builtin_dir: Path,
                                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   family: str) -> None:
    """A chat row's texts are its prefixes, one pair a turn: their ids are read off one encoding of the last text and
    a window a turn (prefixes.py), not each prefix tokenized in full (O(turns^2) characters: 3.4 s for one 200-turn
    row). The same ids and labels as before, row by row and a data file at a time, for awkward rows (cuts next to
    spaces, newlines, digits, combining marks, special tokens' text; empty answers; `learn_from`); a template with
    no special token to cut at (plain), or one only opening the row (opening: the windows would be the prefixes
    again, a batch's held at once), encodes every prefix in full, a group of rows at a time."""
    import re

    from tokenizers import Tokenizer

    from llmfast.data import chat
    from llmfast.data.prefixes import prefix_ids
    from llmfast.testing import family_tokenizer

    if family in ("chatml", "plain", "opening"):
        tok = family_tokenizer("chatml", Tokenizer.from_file(str(families["llama3"] / "tokenizer.json")))
        # opening: its one special token opens the row, so a text's window would be the text again (quadratic)
        tok.chat_template = {"plain": PLAIN_TEMPLATE, "opening": "<|im_start|>" + PLAIN_TEMPLATE}.get(
            family, tok.chat_template)
    else:
        tok = load_tokenizer(builtin_dir if family == "smollm2" else families[family])
    rows = _awkward_rows(10, seed=len(family), max_turns=20, system=family != "gemma")
    for msgs, _ in rows[::2] if family == "plain" else []:  # half the rows with no special token's text: none to cut at
        for m in msgs:
            m["content"] = re.sub(r"<\|[a-z_]+\|>|<end_of_turn>|</s>", "", m["content"])
    _same_as_before(tok, rows)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m, _ in rows))
    monkeypatch.setattr(chat, "_BATCH_CHARS", 3000)  # several batches, and groups of rows encoded in full
    got = read_examples(path, tok, 1 << 20).examples
    assert [(e.input_ids, e.labels) for e in got] == [_encode_as_before(tok, m, 0) for m, _ in rows]
    # a 60-turn row: windows of about a turn each, not every prefix again; none to cut at in a plain row
    msgs = [m for t in range(60) for m in ({"role": "user", "content": f"q{t} "}, {"role": "assistant", "content":
                                                                                     f"a{t}\n"})]
    (whole,) = prefix_ids(tok, [[t for t, _ in chat._chat_texts(tok, msgs, 0, "", 0)]])
    if family in ("plain", "opening"):  # none to cut at, or too few: every prefix in full, grouped by characters
        assert whole is None
    else:
        assert whole is not None and sum(len(w) for _, w in whole.parts) < 2 * len(whole.base)


def test_a_special_tokens_text_left_to_the_model_by_a_dropped_single_word_match_is_no_place_to_cut() -> None:
    """A single_word added token ("x<s>") whose match has a letter before it is dropped, and the characters it spans
    stay text: "<s>" there is not split off, yet the model's vocabulary gives it <s>'s id at <s>'s offsets. Read off
    one encoding with a cut there, the window "<s>b" encoded alone split <s> off and gave "▁b" where the text gives
    "b"; the last window (cut at a real <s>) agreed, so the row was taken with other ids than encoding it text by
    text."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from llmfast.data.prefixes import prefix_ids

    vocab = {c: i for i, c in enumerate("<>abcqsx▁")}
    vocab.update({"<s": len(vocab), "<s>": len(vocab) + 1, "▁b": len(vocab) + 2})
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[("<", "s"), ("<s", ">"), ("▁", "b")]))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    bpe.add_special_tokens([AddedToken("<s>", special=True, normalized=False)])
    bpe.add_tokens([AddedToken("x<s>", single_word=True, normalized=False)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    tok.chat_template = "{% for m in messages %}{{ '<s>' + m['content'] }}{% endfor %}"
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ax<s>b"},
            {"role": "user", "content": "q"}, {"role": "assistant", "content": "c"}]
    assert tok("ax<s>b", add_special_tokens=False).input_ids == [vocab[c] for c in ("▁", "a", "x", "<s>", "b")]
    _same_as_before(tok, [(msgs, 0)])
    # "<s>" can be inside a dropped "x<s>" anywhere: no place to cut at, every prefix in full
    assert prefix_ids(tok, [["<s>q", "<s>q<s>c"]]) == [None]
