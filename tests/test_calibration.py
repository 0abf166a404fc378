"""data.conversations: chat rows rendered through the model's template, mixed into calibration and training windows
in the share asked for; checked against the template applied to whole conversations (another tokenization)."""

import json
import random
from types import SimpleNamespace

import pytest
import torch

from llmfast.calibration import conversation_windows, with_conversations


def _chats(path, n=40):
    rows = [{"messages": [{"role": "user", "content": f"Convert {i} kilograms to grams."},
                          {"role": "assistant", "content": f"{i * 1000} g"}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _reference_stream(tok, rows):
    rows = list(rows)
    random.Random(0).shuffle(rows)  # the documented seeded order
    return torch.tensor([t for r in rows for t in tok.apply_chat_template(r["messages"], tokenize=True,
                                                                          return_dict=False)])


@pytest.mark.parametrize("add", [False, True])
def test_conversations_make_the_share_asked_for(tmp_path, tiny, add):
    _, tok = tiny
    rows = _chats(tmp_path / "train.jsonl")
    stream = _reference_stream(tok, rows)
    window = 32
    conv = stream[: stream.numel() // window * window].reshape(-1, window)
    assert torch.equal(conversation_windows(tok, [tmp_path / "train.jsonl"], window), conv)
    text = torch.arange(10 * window).reshape(10, window) + 50_000  # ids no conversation holds
    data = SimpleNamespace(conversations=[tmp_path / "train.jsonl"], conversations_share=0.3)
    mixed, info = with_conversations(text, data, tok, add=add)
    is_text = mixed[:, 0] >= 50_000
    k = round(0.3 * 10 / 0.7) if add else 3  # on top of all ten text rows, or in place of three of them
    assert (len(mixed), int((~is_text).sum())) == ((10 + k) if add else 10, k)
    kept = sorted(mixed[is_text].tolist())
    assert kept == (text if add else text[: 10 - k]).tolist()  # the first text windows, each once
    taken = mixed[~is_text]
    assert all(any(torch.equal(r, c) for c in conv[:k]) for r in taken)  # the first k conversation windows
    assert info == {"paths": [str(tmp_path / "train.jsonl")], "share": 0.3, "windows": k,
                    "available_windows": len(conv), "epochs": round(k / len(conv), 3)}
    assert is_text.tolist() != sorted(is_text.tolist(), reverse=True)  # shuffled, not the text then the chats


def test_too_few_conversations_repeat_and_none_leaves_the_text(tmp_path, tiny):
    _, tok = tiny
    _chats(tmp_path / "few.jsonl", n=3)
    text = torch.arange(40 * 16).reshape(40, 16) + 50_000
    mixed, info = with_conversations(text, SimpleNamespace(conversations=[tmp_path / "few.jsonl"],
                                                           conversations_share=0.5), tok, add=True)
    assert info["windows"] == 40 and info["epochs"] == round(40 / info["available_windows"], 3) > 1
    assert len(mixed) == 80
    same, none = with_conversations(text, SimpleNamespace(conversations=[], conversations_share=0.5), tok, add=True)
    assert same is text and none is None
