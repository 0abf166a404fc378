"""The row shapes other fine-tuning tools write (ShareGPT, Alpaca, TRL's), each against the same conversation written
as `messages`; the .json array; and the one-line refusals (llmfast/data/shapes.py, jsonl.py)."""

import json
import os
import re
import subprocess

import pytest

from llmfast.data.chat import IGNORE, check_rows, read_examples
from llmfast.data.jsonl import read_jsonl
from llmfast.errors import UserError

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Convert 3 km to m."},
            {"role": "assistant", "content": "3000"}, {"role": "user", "content": "And 2 km?"},
            {"role": "assistant", "content": "2000"}]
FROM = {"system": "system", "user": "human", "assistant": "gpt"}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _one(tok, path):
    (ex,) = read_examples(path, tok, 256).examples
    return ex


def _learned(tok, ex):
    return tok.decode([t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE])


@pytest.mark.parametrize("shape,row", [
    ("ShareGPT (conversations)", {"conversations": [{"from": FROM[m["role"]], "value": m["content"]} for m in MESSAGES],
                                  "id": "x-1"}),
    # LLaMA-Factory's row-level system prompt; user/assistant spelled as in its OpenAI-like files
    ("ShareGPT (conversations)", {"system": "Be brief.", "conversations": [
        {"from": "user", "value": "Convert 3 km to m."}, {"from": "assistant", "value": "3000"},
        {"from": "human", "value": "And 2 km?"}, {"from": "gpt", "value": "2000"}]}),
    ("Alpaca (instruction/output)", {"system": "Be brief.", "history": [["Convert 3 km to m.", "3000"]],
                                     "instruction": "And 2 km?", "input": "", "output": "2000"}),
])
def test_each_chat_shape_labels_exactly_what_the_same_messages_row_labels(tiny, tmp_path, shape, row):
    _, tok = tiny
    reference = _one(tok, _write(tmp_path / "messages.jsonl", [{"messages": MESSAGES}]))
    path = _write(tmp_path / "d.jsonl", [row])
    ex = _one(tok, path)
    assert (ex.input_ids, ex.labels) == (reference.input_ids, reference.labels)
    assert _learned(tok, ex) == "3000<|im_end|>\n2000<|im_end|>\n"
    assert check_rows(path) == shape == read_examples(path, tok, 256).shape  # what finetune says it read


def test_alpaca_joins_instruction_and_input_with_a_newline(tiny, tmp_path):
    _, tok = tiny
    ex = _one(tok, _write(tmp_path / "a.jsonl", [{"instruction": "Convert to m.", "input": "3 km", "output": "3000"}]))
    same = [{"role": "user", "content": "Convert to m.\n3 km"}, {"role": "assistant", "content": "3000"}]
    reference = _one(tok, _write(tmp_path / "m.jsonl", [{"messages": same}]))
    assert (ex.input_ids, ex.labels) == (reference.input_ids, reference.labels)


def test_trl_conversational_prompt_completion_learns_only_the_completion(tiny, tmp_path):
    """The prompt's own assistant turn (a worked example) is context: the same conversation as `messages` would
    learn it too."""
    _, tok = tiny
    path = _write(tmp_path / "c.jsonl", [{"prompt": MESSAGES[:4], "completion": MESSAGES[4:]}])
    ex = _one(tok, path)
    reference = _one(tok, _write(tmp_path / "m.jsonl", [{"messages": MESSAGES}]))
    assert ex.input_ids == reference.input_ids
    assert _learned(tok, ex) == "2000<|im_end|>\n"
    # exactly the reference's labels from the completion's turn on, none before it
    start = next(i for i in range(len(ex.labels)) if ex.labels[i] != IGNORE)
    assert ex.labels[start:] == reference.labels[start:] and set(reference.labels[:start]) != {IGNORE}
    assert check_rows(path) == "prompt/completion (lists of messages)"


def test_text_rows_are_learned_whole_without_the_chat_template(tiny, tmp_path):
    import copy

    _, tok = tiny
    base = copy.deepcopy(tok)
    base.chat_template = None  # a base model's tokenizer: chat rows are refused, text rows need no template
    path = _write(tmp_path / "t.jsonl", [{"text": "The cat sat."}, {"text": "It rained<|im_end|>"}])
    (a, b) = read_examples(path, base, 64).examples
    ids = tok("The cat sat.").input_ids
    assert a.input_ids == ids + [tok.eos_token_id] and a.labels == [IGNORE, *ids[1:], tok.eos_token_id]
    assert b.input_ids[-1] == tok.eos_token_id and b.input_ids[-2] != tok.eos_token_id  # no second end token
    assert check_rows(path) == "plain text (text)"
    with pytest.raises(UserError, match="has no chat template"):
        read_examples(_write(tmp_path / "m.jsonl", [{"messages": MESSAGES}]), base, 64)


def test_the_docs_template_for_a_base_model_learns_each_answer_and_its_end_token(tiny_dir, tmp_path):
    """docs/finetune.md's snippet, run as written on a copy of a model whose tokenizer has no template: chat rows then
    train, learning each answer, the EOS token that ends it and the newline after it; the template is saved beside
    the model, so every verb that loads it reads the same conversations (s50)."""
    import shutil
    from pathlib import Path

    from transformers import AutoTokenizer

    model = tmp_path / "base"
    shutil.copytree(tiny_dir, model)
    (model / "chat_template.jinja").unlink()  # a base model's tokenizer: no template
    with pytest.raises(UserError, match="give it a template .docs/finetune.md, 'A base model'."):
        read_examples(_write(tmp_path / "m.jsonl", [{"messages": MESSAGES}]), AutoTokenizer.from_pretrained(model), 64)
    docs = (Path(__file__).resolve().parents[1] / "docs" / "finetune.md").read_text()
    snippet = docs.split("### A base model")[1].split("```python\n")[1].split("```")[0]
    exec(snippet.replace('"my-base-model"', repr(str(model))), {})
    tok = AutoTokenizer.from_pretrained(model)
    ex = _one(tok, _write(tmp_path / "m.jsonl", [{"messages": MESSAGES}]))
    assert tok.decode(ex.input_ids) == ("### System:\nBe brief.\n### User:\nConvert 3 km to m.\n### Assistant:\n"
                                        "3000<|im_end|>\n### User:\nAnd 2 km?\n### Assistant:\n2000<|im_end|>\n")
    assert _learned(tok, ex) == "3000<|im_end|>\n2000<|im_end|>\n"  # the tiny model's EOS is <|im_end|>


def test_a_json_array_reads_as_jsonl_and_names_rows_by_their_line(tiny, tmp_path):
    _, tok = tiny
    rows = [{"instruction": "Convert 3 km to m.", "output": "3000"}, {"instruction": "And 2 km?", "output": "2000"}]
    jsonl = read_examples(_write(tmp_path / "d.jsonl", rows), tok, 64).examples
    array = tmp_path / "d.json"
    array.write_text(json.dumps(rows, indent=2))  # as LLaMA-Factory's files: a row is five lines
    examples = read_examples(array, tok, 64).examples
    assert [e.input_ids for e in examples] == [e.input_ids for e in jsonl] and [e.row for e in examples] == [2, 6]
    (tmp_path / "lines.json").write_text((tmp_path / "d.jsonl").read_text())  # datasets' to_json: JSON Lines
    assert [e.row for e in read_examples(tmp_path / "lines.json", tok, 64).examples] == [1, 2]
    bad = [rows[0], {"instruction": "And 2 km?", "output": 2000}]
    array.write_text(json.dumps(bad, indent=2))
    with pytest.raises(UserError, match=r"d\.json:6: field 'output' must be a string, not int"):
        check_rows(array)
    for text, expected in (("[]", "the data set is empty"), ('[{"a": 1},\n 2]', r"d\.json:2: each row must be a JSON "
                           "object, not int"), ('[{"a": 1}\n {"b": 2}]', r"d\.json:2: not valid JSON \(Expecting ','"),
                           ('[{"a": 1},]', r"d\.json:1: not valid JSON"), ('[{"a": 1}]\n[]', r"d\.json:1: text after"),
                           ('{\n "train": []\n}', r"d\.json: one JSON object \(fields 'train'\), not rows: give a JSON "
                            "array"), ('[\n{"a": 1},\n{"b": "caf\u00e9"}]', r"d\.json:3: not UTF-8")):
        array.write_bytes(text.encode("latin-1" if "caf" in text else "utf-8"))
        with pytest.raises(UserError, match=expected):
            check_rows(array)
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())  # a UTF-8 byte-order mark is fine
    assert check_rows(array) == "Alpaca (instruction/output)"


def test_other_formats_are_refused_with_a_conversion_that_works(tmp_path):
    """A CSV was 'not valid JSON' at row 1 and Parquet 'not UTF-8': now the line says how to convert, and does, pasted
    into a POSIX shell as it is, whatever the folder's name holds (s49's was quoted for reading only)."""
    folder = tmp_path / "it's \"q\" $HOME `id` two  spaces\ttab\nnewline ünï"
    folder.mkdir()
    for name, sep in (("d.csv", ","), ("d.tsv", "\t")):
        table = folder / name
        table.write_text(sep.join(["instruction", "input", "output"]) + "\n" + sep.join(["Convert 3 km to m.", "",
                                                                                          "3000"]) + "\n")
        with pytest.raises(UserError) as e:
            check_rows(table)
        message = str(e.value)
        assert message.startswith(f"data file {' '.join(str(table).split())}: {name[2:]} files are not read")
        # as printed, through a shell whose PATH has no python (s49's `python -c` needed one with pandas on PATH)
        command = message.split(" convert it with ")[1].rsplit(" and give ", 1)[0]
        subprocess.run(["/bin/sh", "-c", command], check=True, capture_output=True,
                       env={**os.environ, "PATH": "/nonexistent"})
        assert check_rows(folder / "d.jsonl") == "Alpaca (instruction/output)"
        (folder / "d.jsonl").unlink()
    csv = folder / "d.csv"
    # eval's task files and bench's prompt files (read_jsonl) are never folders: their errors do not offer one
    with pytest.raises(UserError, match=re.escape("not read (JSON Lines or a .json array are): convert")):
        read_jsonl(csv)
    with pytest.raises(UserError, match=f"^data file {re.escape(str(tmp_path))} is a directory: give a JSON Lines"):
        read_jsonl(tmp_path)  # was 'not found'
    for name, expected in (("d.parquet", "pd.read_parquet("), ("d.jsonl.gz", "compressed (.gz)")):
        (tmp_path / name).write_bytes(b"PAR1\x00\xff")
        with pytest.raises(UserError, match=re.escape(expected)):
            check_rows(tmp_path / name)


SHAREGPT = '{"conversations": [{"from": "human", "value": "x"}, '
MESSAGE_ROW = '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}'


@pytest.mark.parametrize("rows,expected", [
    ([SHAREGPT + '{"from": "function_call", "value": "{}"}, {"from": "observation", "value": "1"}, '
      '{"from": "gpt", "value": "y"}]}'], "d.jsonl:1: conversations[1].from is 'function_call', a tool turn llmfast "
     "does not map"),
    ([SHAREGPT + '{"from": "bard", "value": "y"}]}'], "conversations[1].from is 'bard', a speaker"),
    ([SHAREGPT + '{"from": "human", "value": "y"}]}'], "d.jsonl:1: no assistant turn to learn from in "
     "'conversations' (a turn from 'gpt')"),
    ([SHAREGPT + '{"from": "gpt", "value": 7}]}'], "d.jsonl:1: conversations[1].value must be a string, not int"),
    (['{"conversations": [{"role": "user", "content": "x"}]}'], "d.jsonl:1: conversations[0] lacks field 'from' "
     "(role/content turns go under 'messages')"),
    (['{"messages": [{"from": "human", "value": "x"}]}'], "messages[0] lacks field 'role' (from/value turns are "
     "ShareGPT's: they go under 'conversations')"),
    (['{"system": "s", "conversations": [{"from": "system", "value": "s"}, {"from": "gpt", "value": "y"}]}'],
     "two system prompts"),
    (['{"instruction": "x", "input": "y"}'], "d.jsonl:1: missing field 'output' (Alpaca rows need"),
    (['{"instruction": "x", "output": null}'], "d.jsonl:1: field 'output' must be a string, not null"),
    (['{"prompt": "x", "completion": null}'], "d.jsonl:1: field 'completion' must be a string, not null"),
    (['{"instruction": "x", "input": 3, "output": "y"}'], "d.jsonl:1: field 'input' must be a string, not int"),
    (['{"instruction": "x", "output": "y", "history": [["a"]]}'], "history[0] must be a [instruction, answer] pair"),
    (['{"instruction": "x", "output": "y", "history": 5}'], "d.jsonl:1: field 'history' must be a list of "
     "[instruction, answer] pairs, not int"),  # was a TypeError
    (['{"prompt": [{"role": "user", "content": "x"}], "completion": "y"}'], "d.jsonl:1: field 'completion' is a "
     "str, but the other is a list of messages"),
    (['{"prompt": [{"role": "user", "content": "x"}], "completion": [{"role": "user", "content": "y"}]}'],
     "d.jsonl:1: no assistant turn to learn from in 'completion'"),
    (['{"text": 5}'], "d.jsonl:1: field 'text' must be a string, not int"),
    (['[', '  {"text": "x"}', ']'], "d.jsonl:1: a JSON array, but a .jsonl is read as JSON Lines (one object a line): "
     "name the file .json"),  # was 'not valid JSON' with no hint
    (['[{"text": "x"}]'], "d.jsonl:1: a JSON array, but a .jsonl is read as JSON Lines"),
    (['{"text": ""}'], "d.jsonl:1: field 'text' is empty"),
    (['{"prompt": "x", "chosen": "y", "rejected": "z"}'], "d.jsonl:1: a preference row (chosen/rejected"),
    (['{"chosen": [{"role": "user", "content": "x"}], "rejected": []}'], "d.jsonl:1: a preference row"),
    (['{"prompt": "x"}'], "d.jsonl:1: missing field 'completion' (prompt/completion rows need both)"),
    (['{"text": null, "messages": null}'], "or 'text'); the row has no fields and null 'messages', 'text'"),
    (['{"question": "x", "answer": "y"}'], "d.jsonl:1: missing field 'messages' (or another row shape: "
     "'conversations', 'instruction' and 'output', 'prompt' and 'completion', or 'text'); the row has fields "
     "'answer', 'question'"),
    ([MESSAGE_ROW, MESSAGE_ROW, SHAREGPT + '{"from": "gpt", "value": "y"}]}'], "d.jsonl:3: a row of shape ShareGPT "
     "(conversations), but the rows before it are chat (messages): a data set holds one shape"),
    (['{"prompt": "x", "completion": "y"}', '{"prompt": [{"role": "user", "content": "x"}], "completion": '
      '[{"role": "assistant", "content": "y"}]}'], "d.jsonl:2: a row of shape prompt/completion (lists of messages), but "
     "the rows before it are prompt/completion (strings)"),
    (['{"text": "x"}', MESSAGE_ROW], "d.jsonl:2: a row of shape chat (messages), but the rows before it are plain text"),
])
def test_bad_rows_of_every_shape_are_one_line_naming_the_row(tiny, tmp_path, rows, expected):
    _, tok = tiny
    path = tmp_path / "d.jsonl"
    path.write_text("".join(r + "\n" for r in rows))
    for check in (lambda: check_rows(path), lambda: read_examples(path, tok, 64)):  # preflight and the trainer
        with pytest.raises(UserError) as e:
            check()
        assert expected in str(e.value) and "\n" not in str(e.value)


def test_a_datasets_folder_of_alpaca_rows_takes_a_missing_column_as_absent(tiny, tmp_path):
    """`datasets` fills a column a row lacks with None: an Alpaca row without `input` (or `system`) beside rows with
    one is a row without it, not a null to refuse; a folder mixing shapes names its row by index."""
    from datasets import Dataset

    _, tok = tiny
    Dataset.from_list([{"instruction": "a", "input": "b", "output": "c", "system": None},
                       {"instruction": "d", "input": None, "output": "e", "system": "s"}]).save_to_disk(tmp_path / "ds")
    first, second = read_examples(tmp_path / "ds", tok, 64).examples
    assert tok.decode(first.input_ids).startswith("<|im_start|>user\na\nb<|im_end|>")
    assert tok.decode(second.input_ids).startswith("<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nd<|im_end|>")
    chat = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    Dataset.from_list([{"instruction": "a", "output": "c", "messages": None},
                       {"instruction": None, "output": None, "messages": chat}]).save_to_disk(tmp_path / "mixed")
    with pytest.raises(UserError, match=r"mixed row 1: a row of shape chat \(messages\), but the rows before it are Alpaca"):
        read_examples(tmp_path / "mixed", tok, 64)


def test_eval_takes_the_last_assistant_turn_of_any_chat_shape_as_the_answer(tmp_path):
    from llmfast.data.chat import prompt_and_answer

    sharegpt = {"_row": 1, "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    alpaca = {"_row": 1, "instruction": "Q", "input": "x", "output": "A"}
    assert prompt_and_answer(sharegpt, "t.jsonl") == ([{"role": "user", "content": "Q"}], "A")
    assert prompt_and_answer(alpaca, "t.jsonl") == ([{"role": "user", "content": "Q\nx"}], "A")
    with pytest.raises(UserError, match=r"t\.jsonl:1: missing field 'messages': a plain 'text' row has no question"):
        prompt_and_answer({"_row": 1, "text": "x"}, "t.jsonl")


def test_the_shape_check_holds_a_row_at_a_time(tmp_path):
    """Preflight's check of every row's shape reads a JSON Lines file a row at a time: it held every row of the file
    (GBs for a million rows) before the trainer read them again. A bad row is still named, after the rows before it."""
    import tracemalloc

    path = tmp_path / "big.jsonl"
    row = json.dumps({"messages": MESSAGES[1:3]}) + "\n"
    path.write_text(row * 20_000)  # held as rows: ~30 MB
    tracemalloc.start()
    assert check_rows(path) == "chat (messages)"
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20, peak
    path.write_text(row * 5 + '{"messages": 3}\n' + row)
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}:6: "):
        check_rows(path)
