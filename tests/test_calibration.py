"""data.conversations: chat rows rendered through the model's template, mixed into calibration and training windows
in the share asked for; checked against the template applied to whole conversations (another tokenization)."""

import json
import random
from types import SimpleNamespace

import pytest
import torch

from llmfast.calibration import conversation_windows, with_conversations
from llmfast.errors import UserError


def _chats(path, n=40):
    rows = [{"messages": [{"role": "user", "content": f"Convert {i} kilograms to grams."},
                          {"role": "assistant", "content": f"{i * 1000} g"}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _reference_windows(tok, rows, window):
    rows = list(rows)
    random.Random(0).shuffle(rows)  # the documented seeded order
    ids = torch.tensor([t for r in rows for t in tok.apply_chat_template(r["messages"], tokenize=True,
                                                                         return_dict=False)])
    return ids[: ids.numel() // window * window].reshape(-1, window)


def _data(path, share):
    return SimpleNamespace(conversations=[path], conversations_share=share)


@pytest.mark.parametrize("add,share,count", [(False, 0.3, 3), (True, 0.3, 4), (False, 0.5, 5), (True, 0.5, 10)])
def test_conversations_make_the_share_asked_for(tmp_path, tiny, add, share, count):
    _, tok = tiny
    path = tmp_path / "train.jsonl"
    conv = _reference_windows(tok, _chats(path), 32)
    assert torch.equal(conversation_windows(tok, [path], 32), conv)
    text = torch.arange(10 * 32).reshape(10, 32) + 50_000  # ids no conversation holds
    mixed, info = with_conversations(text, _data(path, share), conv, add=add)
    is_text = mixed[:, 0] >= 50_000
    # in place of text windows (calibration: 3 of 10 at 30%), or on top of all ten (training: 4 of 14 at 30%)
    assert (len(mixed), int((~is_text).sum())) == ((10 + count) if add else 10, count)
    assert mixed[is_text].tolist() == (text if add else text[: 10 - count]).tolist()  # the first, in order
    assert mixed[~is_text].tolist() == conv[:count].tolist()  # the first conversation windows, each once
    assert info == {"paths": [str(path)], "share": share, "windows": count, "share_used": round(count / len(mixed), 4),
                    "available_windows": len(conv), "epochs": round(count / len(conv), 3)}
    half = len(mixed) // 2  # spread evenly: each half holds about its share of conversations
    assert abs(int((~is_text[:half]).sum()) - count / 2) <= 1


def test_few_conversations_repeat_one_window_is_refused_none_is_the_text(tmp_path, tiny):
    _, tok = tiny
    _chats(tmp_path / "few.jsonl", n=3)
    conv = conversation_windows(tok, [tmp_path / "few.jsonl"], 16)
    text = torch.arange(40 * 16).reshape(40, 16) + 50_000
    mixed, info = with_conversations(text, _data(tmp_path / "few.jsonl", 0.5), conv, add=True)
    assert info["windows"] == 40 and len(mixed) == 80 and info["epochs"] == round(40 / len(conv), 3) > 1
    assert mixed[mixed[:, 0] < 50_000].tolist() == [conv[i % len(conv)].tolist() for i in range(40)]
    with pytest.raises(UserError, match="data.calibration_tokens make 1 window of data.window tokens; mixing in"):
        with_conversations(text[:1], _data(tmp_path / "few.jsonl", 0.5), conv, add=False)
    small, _ = with_conversations(text[:3], _data(tmp_path / "few.jsonl", 0.01), conv, add=True)
    assert len(small) == 4, "a share that rounds to no window still mixes one in"
    same, none = with_conversations(text, _data(tmp_path / "few.jsonl", 0.5), None, add=True)
    assert same is text and none is None


def test_a_model_without_a_chat_template_is_one_line_naming_the_key(tmp_path, tiny):
    import copy

    _, tok = tiny
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    _chats(tmp_path / "train.jsonl", n=3)
    with pytest.raises(UserError, match=r"^data.conversations \(.*train.jsonl\): .+: its tokenizer has no chat "
                                        r"template, which chat rows need"):  # the model's folder named (s43)
        conversation_windows(plain, [tmp_path / "train.jsonl"], 16)


def test_calibration_comes_after_the_evaluated_span_and_heldout_from_inside_it():
    """What sparsify and quantize fit on must not be what `llmfast eval` scores: the calibration windows are the
    tokens right after `skip`, the held-out windows the first ones (s44's mutation audit: calibrating on ids[:n]
    passed every test)."""
    from llmfast.calibration import split_text

    ids = torch.arange(1000)
    train, calib, heldout = split_text(ids, skip=300, calibration=200, heldout=100, window=64, source="t.txt")
    assert train.tolist() == list(range(300, 1000))
    assert calib.shape == (3, 64) and calib.flatten().tolist() == list(range(300, 492))  # full windows only
    assert heldout.shape == (1, 64) and heldout.flatten().tolist() == list(range(64))
    with pytest.raises(UserError, match=r"t.txt has 1000 tokens with this tokenizer; .* needs 1001 \(300 skipped"):
        split_text(ids, skip=300, calibration=701, heldout=100, window=64, source="t.txt")


def test_a_share_whose_training_rows_outgrow_memory_is_one_line_naming_the_key():
    """s46: conversations_share 0.9999999999999999 on top of the training text asked for 10^19 windows (an
    OverflowError traceback in relufy and w4 scale tuning); the largest share below 1 now refuses in one line, and
    a calibration set (in place of text windows) keeps working at any share."""
    text = torch.arange(40 * 16).reshape(40, 16) + 50_000
    conv = torch.arange(3 * 16).reshape(3, 16)
    with pytest.raises(UserError, match=r"data.conversations_share: 0.9999999999999999 asks for \d+ conversation "
                                        r"windows beside the 40 text windows \(.* GiB of token ids, more than"):
        with_conversations(text, SimpleNamespace(conversations=["c.jsonl"], conversations_share=0.9999999999999999),
                           conv, add=True)
    mixed, info = with_conversations(text, SimpleNamespace(conversations=["c.jsonl"],
                                                           conversations_share=0.9999999999999999), conv, add=False)
    assert len(mixed) == 40 and info["windows"] == 39
