"""Completion-only labels, packing and the chunked loss, each against a reference computed another way."""

import re

import pytest
import torch

from llmfast.data.chat import IGNORE, Encoded, encode_messages, read_examples
from llmfast.data.packing import collate, label_positions, pack
from llmfast.errors import UserError
from llmfast.finetune.loss import causal_lm_loss, chunked_lm_loss

CHAT = [{"role": "user", "content": "Convert 3 km to m."}, {"role": "assistant", "content": "3000"}]


def test_labels_cover_exactly_the_answer_and_end_of_turn(tiny):
    _, tok = tiny
    ex = encode_messages(tok, CHAT)
    full = tok.apply_chat_template(CHAT, tokenize=False)
    assert tok.decode(ex.input_ids) == full
    learned = [t for t, l in zip(ex.input_ids, ex.labels) if l != IGNORE]
    assert tok.decode(learned) == "3000<|im_end|>\n"
    first = ex.labels.index(next(l for l in ex.labels if l != IGNORE))
    assert tok.decode(ex.input_ids[:first]).endswith("<|im_start|>assistant\n")


def test_multi_turn_labels_every_assistant_turn(tiny):
    _, tok = tiny
    msgs = CHAT + [{"role": "user", "content": "And 2 km?"}, {"role": "assistant", "content": "2000"}]
    ex = encode_messages(tok, msgs)
    learned = tok.decode([t for t, l in zip(ex.input_ids, ex.labels) if l != IGNORE])
    assert learned == "3000<|im_end|>\n2000<|im_end|>\n"
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(msgs, tokenize=False)


def _examples(tok, n=7):
    rows = []
    for i in range(n):
        q = "Convert " + "1" * (1 + 3 * i) + " km to m."
        rows.append(encode_messages(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": str(i)}], i))
    return rows


def test_packing_bins_respect_the_budget_and_keep_every_example(tiny):
    _, tok = tiny
    exs = _examples(tok)
    bins = pack(exs, pack_length=64)
    assert all(sum(len(e) for e in b) <= 64 for b in bins)
    assert sorted(e.row for b in bins for e in b) == list(range(7))
    assert len(bins) < len(exs)
    batch = collate(bins, pad_id=tok.pad_token_id)
    assert batch.real_tokens == sum(len(e) for e in exs)
    assert batch.target_tokens == sum(e.target_tokens for e in exs)


def test_packed_logits_equal_unpacked_logits(tiny):
    model, tok = tiny
    exs = _examples(tok, 4)
    batch = collate([exs], pad_id=tok.pad_token_id)  # all four in one row, positions restarting
    t = batch.tensors()
    with torch.no_grad():
        # use_cache=False as in training: transformers only detects packing when there is no KV cache
        packed = model(input_ids=t["input_ids"], position_ids=t["position_ids"], use_cache=False).logits[0]
        offset = 0
        for e in exs:
            alone = model(input_ids=torch.tensor([e.input_ids])).logits[0]
            torch.testing.assert_close(packed[offset:offset + len(e)], alone, rtol=1e-4, atol=1e-4)
            offset += len(e)
    # and attention really is blocked: without restarting positions the second example's logits differ
    with torch.no_grad():
        naive = model(input_ids=t["input_ids"], use_cache=False).logits[0]
    assert not torch.allclose(naive[len(exs[0]):len(exs[0]) + len(exs[1])],
                              packed[len(exs[0]):len(exs[0]) + len(exs[1])], atol=1e-3)


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_chunked_loss_equals_full_cross_entropy(tiny, chunk):
    model, tok = tiny
    exs = _examples(tok, 5)
    batch = collate([[e] for e in exs], pad_id=tok.pad_token_id)  # padded rows
    t = batch.tensors()
    ref = model(input_ids=t["input_ids"], labels=t["labels"]).loss  # HF's mean over labelled tokens
    total, count = causal_lm_loss(model, t, chunk_size=chunk)
    assert count == batch.target_tokens
    torch.testing.assert_close(total / count, ref, rtol=1e-5, atol=1e-5)
    # the host-computed label positions are exactly where the shifted labels are kept
    found = (t["labels"][:, 1:].reshape(-1) != IGNORE).nonzero().squeeze(1)
    assert t["label_positions"].tolist() == found.tolist()
    without = {k: v for k, v in t.items() if k != "label_positions"}
    total_found, count_found = causal_lm_loss(model, without, chunk_size=chunk)
    assert count_found == count
    torch.testing.assert_close(total_found, total)


@pytest.mark.parametrize("dtype,bias,chunk", [(torch.float32, False, 3), (torch.float32, True, 100),
                                               (torch.bfloat16, False, 4)])
def test_frozen_head_loss_and_gradient_equal_full_cross_entropy(dtype, bias, chunk):
    """The frozen-head path computes d/d hidden in its forward; it must equal autograd on full logits."""
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 70, bias=bias).to(dtype).requires_grad_(False)
    hidden = torch.randn(3, 11, 32, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 70, (3, 11))
    labels[1, :5] = IGNORE  # a masked prompt
    labels[2, 7:] = IGNORE  # a padded row
    total, count = chunked_lm_loss(hidden, labels, head, chunk_size=chunk)
    (total / count * 2.5).backward()
    g_fused = hidden.grad.clone()
    hidden.grad = None
    # the trainer's way: labelled positions found on the host with the batch
    positions = torch.tensor(label_positions(labels.tolist()))
    total_host, count_host = chunked_lm_loss(hidden, labels, head, chunk_size=chunk, positions=positions)
    (total_host / count_host * 2.5).backward()
    assert count_host == count
    torch.testing.assert_close(total_host, total)
    torch.testing.assert_close(hidden.grad, g_fused)
    hidden.grad = None
    logits = head(hidden)[:, :-1].reshape(-1, 70).float()
    ref = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum")
    (ref / count * 2.5).backward()
    assert count == int((labels[:, 1:] != IGNORE).sum())
    tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    torch.testing.assert_close(total, ref, **tol)
    torch.testing.assert_close(g_fused, hidden.grad, **tol)
    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(chunked_lm_loss(hidden, labels, head, chunk_size=chunk)[0], ref.detach(), **tol)


def test_chunked_loss_gradients_match(tiny):
    model, tok = tiny
    head = torch.nn.Linear(128, 50, bias=False)
    hidden = torch.randn(2, 9, 128, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :4] = IGNORE
    total, count = chunked_lm_loss(hidden, labels, head, chunk_size=3)
    (total / count).backward()
    g_chunked = hidden.grad.clone()
    hidden.grad = None
    logits = head(hidden)[:, :-1].reshape(-1, 50)
    ref = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    ref.backward()
    torch.testing.assert_close(total / count, ref)
    torch.testing.assert_close(g_chunked, hidden.grad)


@pytest.mark.parametrize("rows,expected", [
    (['{"messages": [{"role": "user", "content": "x"}]}'], "d.jsonl:1: no assistant turn"),
    (['{"prompt": "x"}'], "d.jsonl:1: missing field 'completion'"),
    (['{"prompt": "x", "completion": "y"}', '{"question": "x"}'], "d.jsonl:2: missing field 'messages'"),
    (['{"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}'], "d.jsonl:1: messages[0] lacks field 'content'"),
    ([], "d.jsonl: the data set is empty"),
    (['{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}',
      '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 5}]}'],
     "d.jsonl:2: messages[1].content must be a string, not int (5)"),
    (['{"messages": [{"role": "user", "content": null}, {"role": "assistant", "content": "y"}]}'],
     "d.jsonl:1: messages[0].content must be a string, not null"),
    (['{"prompt": "x", "completion": 2021}'], "d.jsonl:1: field 'completion' must be a string, not int"),
    (['{"messages": [{"role": 1, "content": "x"}, {"role": "assistant", "content": "y"}]}'],
     "d.jsonl:1: messages[0].role must be a string"),
])
def test_bad_rows_are_named(tiny, tmp_path, rows, expected):
    _, tok = tiny
    (tmp_path / "d.jsonl").write_text("".join(r + "\n" for r in rows))
    with pytest.raises(UserError) as e:
        read_examples(tmp_path / "d.jsonl", tok, 64)
    assert expected in str(e.value)


def test_too_long_examples_truncate_with_warning_or_refuse(tiny, tmp_path):
    _, tok = tiny
    (tmp_path / "d.jsonl").write_text('{"prompt": "short", "completion": "' + "word " * 50 + '"}\n')
    got = read_examples(tmp_path / "d.jsonl", tok, 40)
    exs, warnings = got.examples, got.warnings
    assert len(exs[0]) == 40 and "truncated" in warnings[0] and "rows 1" in warnings[0]
    with pytest.raises(UserError, match=r"d.jsonl:1: example has \d+ tokens, more than max_length 40"):
        read_examples(tmp_path / "d.jsonl", tok, 40, too_long="error")


def test_an_example_of_exactly_max_length_tokens_is_kept_whole_without_a_warning(tiny, tmp_path):
    _, tok = tiny
    (tmp_path / "d.jsonl").write_text('{"prompt": "short", "completion": "' + "word " * 50 + '"}\n')
    (whole,) = read_examples(tmp_path / "d.jsonl", tok, 1000).examples
    got = read_examples(tmp_path / "d.jsonl", tok, len(whole))
    exs, warnings = got.examples, got.warnings
    assert exs == [whole] and warnings == []
    assert read_examples(tmp_path / "d.jsonl", tok, len(whole), too_long="error").examples == [whole]
    got = read_examples(tmp_path / "d.jsonl", tok, len(whole) - 1)
    exs, warnings = got.examples, got.warnings
    assert len(exs[0]) == len(whole) - 1 and "truncated" in warnings[0]


def test_a_chat_template_whose_prompt_is_not_a_prefix_of_the_conversation_is_refused(tiny, tmp_path):
    """Completion-only labels cut the rendered conversation at the rendered prompt: a template that renders the
    generation prompt as something the conversation does not start with would label the wrong tokens."""
    import copy

    _, tok = tiny
    odd = copy.deepcopy(tok)
    odd.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}ASSISTANT>{% endif %}")
    with pytest.raises(UserError, match="does not render conversations as prefixes of each other"):
        encode_messages(odd, CHAT)
    import json

    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": CHAT}) + "\n")  # named, as every row's error is
    with pytest.raises(UserError, match=rf"^{re.escape(str(tmp_path / 'd.jsonl'))}:1: the chat template does not"):
        read_examples(tmp_path / "d.jsonl", odd, 4096)
    plain = copy.deepcopy(tok)
    plain.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                           "{% if add_generation_prompt %}assistant: {% endif %}")
    ex = encode_messages(plain, CHAT)
    assert plain.decode([t for t, l in zip(ex.input_ids, ex.labels) if l != IGNORE]) == "3000\n"


def test_jsonl_that_is_not_utf8_names_the_file_and_row(tiny, tmp_path):
    _, tok = tiny
    rows = ['{"prompt": "a", "completion": "b"}', '{"prompt": "caf\u00e9", "completion": "b"}']
    (tmp_path / "d.jsonl").write_bytes(("\n".join(rows) + "\n").encode("latin-1"))
    with pytest.raises(UserError, match=r"d\.jsonl:2: not UTF-8 text \(byte 16 of the row\): save the file as UTF-8"):
        read_examples(tmp_path / "d.jsonl", tok, 64)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + rows[0].encode() + b"\n")
    assert len(read_examples(tmp_path / "bom.jsonl", tok, 64).examples) == 1  # a UTF-8 byte-order mark is fine


def test_truncate_drops_a_row_whose_prompt_fills_max_length_and_keeps_the_rest(tiny, tmp_path):
    _, tok = tiny
    rows = ['{"prompt": "short", "completion": "yes"}', '{"prompt": "' + "word " * 80 + '", "completion": "no"}',
            '{"prompt": "short too", "completion": "' + "word " * 50 + '"}']
    (tmp_path / "d.jsonl").write_text("".join(r + "\n" for r in rows))
    got = read_examples(tmp_path / "d.jsonl", tok, 40)
    exs, warnings = got.examples, got.warnings
    assert [e.row for e in exs] == [1, 3] and len(exs[1]) == 40 and exs[1].target_tokens > 0
    assert any("1 example(s) dropped" in w and "rows 2" in w for w in warnings)
    assert any("1 example(s) longer than max_length 40 were truncated (rows 3)" in w for w in warnings)
    (tmp_path / "all.jsonl").write_text(rows[1] + "\n")
    with pytest.raises(UserError, match=r"all\.jsonl: every example's prompt fills max_length 40"):
        read_examples(tmp_path / "all.jsonl", tok, 40)


def test_local_datasets_directory(tiny, tmp_path):
    from datasets import Dataset

    _, tok = tiny
    Dataset.from_list([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]).save_to_disk(tmp_path / "ds")
    exs = read_examples(tmp_path / "ds", tok, 64).examples
    assert len(exs) == 2 and all(e.target_tokens > 0 for e in exs)


def test_allocation_counter_counts_storages_once_and_releases_them():
    from llmfast.allocations import AllocationCounter

    before = torch.ones(10, 10)
    with AllocationCounter(block=512) as counter:
        a = torch.empty(1000)  # 4000 bytes, rounded up to 4096
        view = a[10:20]  # the same storage: not counted again
        b = torch.empty(10, dtype=torch.float64)  # 80 bytes -> 512
        assert counter.current == 4096 + 512
        del a, view
        assert counter.current == 512
        c = torch.ones(3)
        assert counter.current == 1024
        older_view = before.t()  # a view of a storage from before: no new memory
        before.mul_(2)  # in place: none either
        assert counter.current == 1024
    assert counter.peak == 4096 + 512 and b.numel() + c.numel() + older_view.numel() == 113


def test_fused_loss_never_holds_the_whole_batch_of_logits():
    """The issue's memory saver: at most one chunk of float32 logits at a time, forward and backward."""
    from llmfast.allocations import AllocationCounter

    torch.manual_seed(0)
    n, dim, vocab, chunk = 512, 32, 4000, 64
    head = torch.nn.Linear(dim, vocab, bias=False).requires_grad_(False)
    hidden = torch.randn(1, n + 1, dim, requires_grad=True)
    labels = torch.randint(0, vocab, (1, n + 1))
    all_logits = n * vocab * 4
    with AllocationCounter() as fused:
        total, count = chunked_lm_loss(hidden, labels, head, chunk_size=chunk)
        (total / count).backward()
    with AllocationCounter() as plain:
        logits = head(hidden)[:, :-1].reshape(-1, vocab).float()
        torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1)).backward()
    assert plain.peak >= 2 * all_logits  # logits, log-softmax, gradients: several full copies
    # one chunk of float32 logits, plus hidden-sized gradients and small per-row vectors
    assert fused.peak < chunk * vocab * 4 + 4 * hidden.numel() * 4 + 8 * n * 4


def test_packing_fills_a_bin_exactly_and_first_fit_decreasing():
    """An example that fills the room left exactly goes into that bin (s44's mutation audit: `<` for `<=` passed)."""
    exs = [Encoded([1] * n, [1] * n, i) for i, n in enumerate([4, 6, 3, 7, 10])]
    bins = pack(exs, 10)
    assert [[e.row for e in b] for b in bins] == [[4], [3, 2], [1, 0]]  # 10 | 7+3 | 6+4, longest first
    assert all(sum(map(len, b)) <= 10 for b in bins)


def test_read_jsonl_names_file_lines_past_blank_lines(tmp_path):
    """A row's `_row` and an error's line are the file's own line numbers, counting blank lines, not the count of
    rows read before it."""
    import json

    from llmfast.data.jsonl import read_jsonl

    good = json.dumps({"prompt": "a", "completion": "b"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good + "\n\n" + '{"prompt": \n')
    with pytest.raises(UserError, match=rf"^{re.escape(str(bad))}:3: not valid JSON"):
        read_jsonl(bad)
    ok = tmp_path / "ok.jsonl"
    ok.write_text(good + "\n\n" + json.dumps({"prompt": "c", "completion": "d"}) + "\n   \n" + good + "\n")
    rows = read_jsonl(ok)
    assert [(r["_row"], r["prompt"]) for r in rows] == [(1, "a"), (3, "c"), (5, "a")]


def test_read_examples_names_a_row_past_a_blank_line_by_its_file_line(tiny, tmp_path):
    """The row read_examples names (a dropped example, here) is the file's line of that row."""
    import json

    _, tok = tiny
    path = tmp_path / "d.jsonl"
    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "yo"}]}
    long = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "yo"}]}
    path.write_text(json.dumps(short) + "\n\n" + json.dumps(long) + "\n")
    got = read_examples(path, tok, max_length=32)
    examples, warnings = got.examples, got.warnings
    assert [e.row for e in examples] == [1]
    assert warnings == [f"{path}: 1 example(s) dropped: the prompt alone fills max_length 32, no answer left to "
                        "learn (rows 3)"]


def test_collate_restarts_positions_per_example_and_pads_with_ignored_labels():
    """The layout written out by hand: each packed example's positions start at 0 (a model with learned position
    embeddings reads them as they are; s46's mutation audit: positions from 1 passed on RoPE's relative angles), the
    padding is one more run of positions with IGNORE labels, and only labelled next tokens are predicted from."""
    a = Encoded([11, 12, 13], [IGNORE, 12, 13], 0)
    b = Encoded([21, 22], [IGNORE, 22], 1)
    c = Encoded([31], [IGNORE], 2)
    batch = collate([[a, b], [c]], pad_id=0)
    assert batch.input_ids == [[11, 12, 13, 21, 22], [31, 0, 0, 0, 0]]
    assert batch.position_ids == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    assert batch.labels == [[IGNORE, 12, 13, IGNORE, 22], [IGNORE] * 5]
    assert (batch.real_tokens, batch.target_tokens) == (6, 3)
    # predicted from positions 0, 1 and 3 of row 0 (next tokens 12, 13, 22), as flat indices into (2, 4)
    assert label_positions(batch.labels) == [0, 1, 3]
    assert batch.tensors()["label_positions"].tolist() == [0, 1, 3]


def test_an_example_longer_than_pack_length_is_refused_naming_its_row(tmp_path):
    """pack_length below max_length put a longer example alone in a bin past pack_length: trained at positions
    preflight never checked (a learned position table's IndexError mid-run) and with more memory than chosen (s46)."""
    exs = [Encoded([1] * n, [1] * n, row, f"d{row}.jsonl:{row}") for row, n in ((3, 8), (5, 17), (9, 30))]
    with pytest.raises(UserError, match=re.escape("d5.jsonl:5: 17 tokens, more than data.pack_length 16 (a packed "
                                                  "row's length): raise data.pack_length to data.max_length")):
        pack(exs, 16)  # named by its own file: data.train may list several
    assert [[e.row for e in b] for b in pack(exs, 30)] == [[9], [5, 3]]  # exactly pack_length fits


def test_packing_is_first_fit_decreasing_on_many_examples():
    """The bins a scan of every open bin gives (the first with room, else a new one), on lengths where the choice
    matters; pack finds the first through a tree of free room, whose descent a wrong comparison or child would send
    to a later bin."""
    import random

    rng = random.Random(0)
    for size in (1, 2, 3, 5, 64, 700):
        lengths = [rng.randint(1, 40) for _ in range(size)]
        exs = [Encoded([1] * n, [1] * n, i) for i, n in enumerate(lengths)]
        bins, room = [], []
        for i in sorted(range(size), key=lambda i: (-lengths[i], i)):
            b = next((b for b, free in enumerate(room) if lengths[i] <= free), len(bins))
            if b == len(bins):
                bins.append([])
                room.append(40)
            bins[b].append(i)
            room[b] -= lengths[i]
        assert [[e.row for e in b] for b in pack(exs, 40)] == bins, size


def test_examples_hold_four_bytes_a_token_and_give_out_lists():
    """A million rows of 200 tokens held as lists of Python ints were ~9 GB (36 bytes a token for the ids, 8 more for
    the labels); int32 arrays hold 8 bytes a token in all."""
    import tracemalloc

    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    exs = [Encoded(list(range(1000 + i, 1500 + i)), [IGNORE] * 100 + list(range(1100 + i, 1500 + i)), i)
           for i in range(200)]
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert held / (200 * 500) < 10, held / (200 * 500)
    e = exs[3]
    assert e.input_ids == list(range(1003, 1503)) and e.labels[99:101] == [IGNORE, 1103]
    assert len(e) == 500 and e.target_tokens == 400 and e.truncated(150).target_tokens == 50


def test_rows_encoded_in_batches_are_each_row_encoded_alone_and_the_first_problem_is_named(tiny, tmp_path):
    """read_examples tokenizes a batch of rows' texts in one call: each example is what encode_messages makes of its
    row alone (rows past the first batch included), and a row refused before tokenizing (its shape, here) is named
    after an earlier row's problem (too long), as when each row was encoded in turn."""
    import json

    _, tok = tiny
    rows = [{"messages": [{"role": "user", "content": f"Say {i} " * (i % 7 + 1)}, {"role": "assistant", "content":
             f"{i} ok."}, {"role": "user", "content": "and?"}, {"role": "assistant", "content": "more " * (i % 3)}]}
            for i in range(300)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = read_examples(path, tok, 4096).examples
    alone = [encode_messages(tok, r["messages"], i + 1, f"{path}:{i + 1}") for i, r in enumerate(rows)]
    assert [(e.input_ids, e.labels, e.row) for e in got] == [(e.input_ids, e.labels, e.row) for e in alone]
    assert [e.where for e in got[:2]] == [f"{path}:1", f"{path}:2"] and max(map(len, got)) < 200
    rows[260] = {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "yo"}]}
    rows[270] = {"messages": [{"role": "user", "content": 3}]}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}:261: example has \d+ tokens, more than max_length"):
        read_examples(path, tok, 200, too_long="error")
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}:271: "):
        read_examples(path, tok, 4096, too_long="error")


def test_long_conversations_are_not_tokenized_all_at_once(tiny, tmp_path, monkeypatch):
    """A chat row's texts are its prefixes (one pair a turn): a batch of 256 long conversations tokenized in one call
    held every prefix's ids at once (6.5 GB for 256 rows of 50 turns). Batches stop at a character budget, and a row
    over it is encoded text by text: the same examples, a small peak."""
    import json
    import tracemalloc

    from llmfast.data import chat

    _, tok = tiny
    rows = [{"messages": [m for t in range(20) for m in ({"role": "user", "content": f"row {i} turn {t} " * 8},
                                                          {"role": "assistant", "content": f"ok {t} " * 12})]}
            for i in range(30)]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(chat, "_BATCH_CHARS", 20_000, raising=False)  # each row's prefixes hold ~100k characters
    tracemalloc.start()
    got = read_examples(path, tok, 1 << 20).examples
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    alone = [encode_messages(tok, r["messages"], i + 1, f"{path}:{i + 1}") for i, r in enumerate(rows)]
    assert [(e.input_ids, e.labels) for e in got] == [(e.input_ids, e.labels) for e in alone]
    assert peak < 8 << 20, peak  # all 30 rows' prefixes tokenized together: ~55 MB
