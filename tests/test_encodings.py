"""Every input file as an editor on another machine saves it (llmfast/data/text.py): a UTF-8 byte-order mark, CR LF
or lone CR line ends and no final newline read as the plain file does; Latin-1, UTF-16, a NUL byte and an escaped
lone surrogate are one line naming the file, the line and the byte; emoji, CJK and right-to-left text train."""

import json
import re

import pytest

from llmfast.bench.workload import sharegpt_requests
from llmfast.calibration import text_ids
from llmfast.data.chat import IGNORE, read_examples
from llmfast.data.jsonl import read_jsonl, read_rows
from llmfast.data.text import read_text
from llmfast.errors import UserError
from llmfast.recipe import FinetuneRecipe, load_recipe

# Text from three scripts and an emoji, each a character that UTF-8 writes in several bytes.
WORLD = "😀 日本語の文 שלום עולם مرحبا"
CHAT = [{"role": "user", "content": f"Say {WORLD}"}, {"role": "assistant", "content": WORLD}]
ROWS = [  # every row shape (llmfast/data/shapes.py)
    {"messages": CHAT},
    {"conversations": [{"from": "human", "value": f"Say {WORLD}"}, {"from": "gpt", "value": WORLD}]},
    {"instruction": "Say", "input": WORLD, "output": WORLD},
    {"prompt": f"Say {WORLD}", "completion": WORLD},
    {"prompt": CHAT[:1], "completion": CHAT[1:]},
    {"text": WORLD},
]
RECIPE = f"model: m\ndata:\n  train: {__file__}\noutput: out\n"  # a file that is there

# (how an editor saved it: the file's bytes from its UTF-8 text)
SAVED = {
    "byte-order mark": lambda t: b"\xef\xbb\xbf" + t.encode(),
    "CR LF": lambda t: t.replace("\n", "\r\n").encode(),
    "lone CR": lambda t: t.replace("\n", "\r").encode(),
    "no final newline": lambda t: t.rstrip("\n").encode(),
    "all of them": lambda t: b"\xef\xbb\xbf" + t.rstrip("\n").replace("\n", "\r\n").encode(),
}
JOINED = lambda t: SAVED["byte-order mark"](t) * 2  # noqa: E731  two such files joined with `cat`
# (the file's bytes from its UTF-8 text, whose line 2 holds "Café"; the error: the file and line named, what to do)
REFUSED = {
    "Latin-1": (lambda t: t.encode().replace("é".encode(), b"\xe9"),
                r":2: not UTF-8 text \(byte \d+ of the (row|line)\): save the file as UTF-8"),
    "UTF-16": (lambda t: t.encode("utf-16"), r":1: UTF-16 text \(it starts with the byte-order mark FF FE\): save "),
    "UTF-16 without a mark": (lambda t: t.encode("utf-16-le"), r":1: a NUL byte \(byte \d of the (row|line)\): a "
                              "binary file, or UTF-16/UTF-32 text: save the file as UTF-8 text"),
    "a NUL byte": (lambda t: t.replace("é", "\x00").encode(), r":2: a NUL byte \(byte \d+ of the (row|line)\)"),
}


def _jsonl(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _array(rows):
    return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n"


READERS = {  # (file name, its text, what is read from it)
    "JSON Lines": ("d.jsonl", _jsonl([ROWS[3], {"prompt": "Café", "completion": WORLD}, ROWS[3]]), read_jsonl),
    ".json array": ("d.json", _array([{"prompt": "Café", "completion": WORLD}, ROWS[3]]), read_jsonl),
    "recipe": ("r.yaml", RECIPE.replace("data:", "# Café\ndata:"),
               lambda p: load_recipe(p, FinetuneRecipe).model_dump()),
    "text": ("t.txt", f"{WORLD}\nCafé two\n\nthree\n", lambda p: read_text(p, "text")),
}


@pytest.mark.parametrize("reader", READERS)
def test_a_file_reads_as_its_editor_saved_it_or_is_one_line_saying_so(tmp_path, reader):
    name, text, read = READERS[reader]
    plain = tmp_path / "plain" / name
    plain.parent.mkdir()
    plain.write_text(text)
    expected = read(plain)
    for how, save in SAVED.items():
        path = tmp_path / how / name
        path.parent.mkdir()
        path.write_bytes(save(text))
        if reader == "text":  # the text as given, less the final newline where there is none
            assert read(path) == (expected.rstrip("\n") if "newline" in how or how == "all of them" else expected)
        else:
            assert read(path) == expected, how
    for how, (save, error) in REFUSED.items():
        for ends, called in (("\n", "LF"), ("\r", "CR")):  # lone CRs name the same line (counting LFs said 1)
            path = tmp_path / f"{how} {called}" / name
            path.parent.mkdir()
            path.write_bytes(save(text.replace("\n", ends)))
            with pytest.raises(UserError, match=re.escape(str(path)) + error):
                read(path)


def test_tab_indentation_and_control_characters_in_a_recipe_name_the_line(tmp_path):
    path = tmp_path / "r.yaml"
    for text, expected in (("data:\n\ttrain: d.jsonl\n", r":2: a tab \(column 1\): YAML indents and separates with "
                            "spaces only: replace the tab with spaces"),
                           ("model: m\nout\x07put: o\n", r":2: the character U\+0007, a control character YAML does "
                            "not allow: remove it"),
                           ("model: m\rout\x07put: o\r", r":2: the character U\+0007")):  # lone CRs end lines too
        path.write_text(text)
        with pytest.raises(UserError, match=re.escape(str(path)) + expected):
            load_recipe(path, FinetuneRecipe)


@pytest.mark.parametrize("name", ["d.jsonl", "d.json"])
def test_an_escaped_lone_surrogate_is_refused_at_its_row(tmp_path, name):
    """json.loads takes "\\ud800" (it was a TypeError in the tokenizer, a traceback from finetune and eval); a pair,
    an emoji as `json.dump` writes it by default, is one character."""
    path = tmp_path / name
    row = json.dumps({"prompt": "x", "completion": "😀"})  # ASCII: the emoji as the pair \ud83d\ude00
    path.write_text(row + "\n")
    assert read_jsonl(path)[0]["completion"] == "😀"
    path.write_text(row + "\n" + row.replace("\\ude00", "") + "\n")
    with pytest.raises(UserError, match=re.escape(f"{path}:2: the escape \\ud83d is a lone UTF-16 surrogate, not a "
                                                  "character: fix it")):
        read_jsonl(path)


def test_every_row_shape_trains_on_emoji_cjk_and_rtl_text_saved_any_way(tiny, tmp_path):
    """The examples of a data file saved with a byte-order mark and CR LF, or with lone CRs (one row of 'Extra data'),
    or of two files with a mark joined, are those of the plain file, in every row shape; the text tokenizes to ids that decode to it, character for
    character."""
    _, tok = tiny
    for i, row in enumerate(ROWS):
        plain = tmp_path / f"{i}.jsonl"
        plain.write_text(_jsonl([row, row]))
        (a, b) = read_examples(plain, tok, 256).examples
        for how in ("all of them", "lone CR"):
            saved = tmp_path / f"{i}-{how}.jsonl"
            saved.write_bytes(SAVED[how](_jsonl([row, row])))
            assert [(e.input_ids, e.labels) for e in read_examples(saved, tok, 256).examples] == \
                [(a.input_ids, a.labels), (b.input_ids, b.labels)], (how, row)
        joined = tmp_path / f"{i}-joined.jsonl"
        joined.write_bytes(JOINED(_jsonl([row])))  # the second mark was 'not valid JSON (Unexpected UTF-8 BOM ...)'
        assert [(e.input_ids, e.labels) for e in read_examples(joined, tok, 256).examples] == \
            [(a.input_ids, a.labels), (b.input_ids, b.labels)], row
        assert WORLD in tok.decode(a.input_ids) and set(a.labels) != {IGNORE}, row


def test_calibration_and_bench_files_saved_with_a_byte_order_mark(tiny, tmp_path):
    """Calibration text: the mark was tokenized as text (and CR LF kept), so the tokens skipped for eval's span were
    not the ones eval scores. A ShareGPT file: the mark was 'not a readable ShareGPT JSON file'."""
    _, tok = tiny
    text = f"{WORLD}\nThe second line.\n"
    (tmp_path / "t.txt").write_text(text)
    (tmp_path / "bom.txt").write_bytes(SAVED["all of them"](text))
    assert text_ids(tok, tmp_path / "bom.txt").tolist() == text_ids(tok, tmp_path / "t.txt").tolist()[:-1]
    data = [{"conversations": [{"from": "human", "value": f"Tell me about {WORLD}"},
                               {"from": "gpt", "value": f"It is {WORLD}, said twice: {WORLD}"}]}]
    path = tmp_path / "sg.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(data).encode())
    (request,) = sharegpt_requests(path, tok, 1)
    assert request.prompt == data[0]["conversations"][0]["value"]
    path.write_bytes(json.dumps(data).replace("\\ude00", "", 1).encode())
    with pytest.raises(UserError, match=re.escape(f"--dataset-path {path}: conversation 0: the escape \\ud83d is a "
                                                  "lone UTF-16 surrogate")):
        sharegpt_requests(path, tok, 1)


def test_a_datasets_folder_whose_name_holds_a_double_colon(tmp_path):
    """fsspec reads 'a::b' as a chain of URLs: 'not a dataset saved with datasets.save_to_disk (ValueError)'
    said the folder was something it is not."""
    from datasets import Dataset

    Dataset.from_list([{"prompt": "x", "completion": "y"}]).save_to_disk(str(tmp_path / "v1"))
    path = (tmp_path / "v1").rename(tmp_path / "v1::final")  # as datasets cannot save it there either
    with pytest.raises(UserError, match=re.escape(f"{path}: a folder name holding '::', which datasets reads as a "
                                                  "chain of URLs: rename it")):
        read_rows(path)


def test_a_set_value_holding_a_line_break():
    """YAML folds a plain value's line break into a space: `--set output=$'a\\nb'` wrote to the folder 'a b'. A CR
    LF pasted from Windows at the end is no line inside the value, and YAML's own multi-line forms keep theirs."""
    from llmfast.overrides import parse_overrides

    for raw, value in (("runs/x\r\n", "runs/x"), ('"a\\nb"', "a\nb"), ("|\n  a\n  b", "a\nb"), ("[1,\n 2]", [1, 2])):
        assert parse_overrides([f"output={raw}"]) == [(["output"], value)]
    for raw in ("a\nb", "a\r\nb", "a\rb", '"a\n b"'):
        with pytest.raises(UserError, match=re.escape(f"--set {'output=' + raw!r}: the value spans lines, which YAML "
                                                      "folds into 'a b': give it as a YAML string with the escape")):
            parse_overrides([f"output={raw}"])


def test_finetune_and_eval_in_a_folder_named_with_shell_characters(tiny_dir, tmp_path):
    """A model, recipes, data, text and outputs under a name holding a leading '-', '$', quotes, a backtick, '~' and
    two scripts, every file saved with a byte-order mark and CR LF: finetune trains, and eval scores the text as
    the plain file (the mark was tokenized: three more tokens, another perplexity)."""
    import shutil

    from llmfast.cli import main

    w = tmp_path / "-w $HOME \"q\" 'é' `id` ~ 日本 שלום"
    model = shutil.copytree(tiny_dir, w / "-model $x")
    (w / "plain.txt").write_text(" ".join(["The cat sat on the mat."] * 40) + f"\n{WORLD}\n")
    (w / "saved $t.txt").write_bytes(b"\xef\xbb\xbf" + SAVED["CR LF"]((w / "plain.txt").read_text()))
    (w / "data `d`.jsonl").write_bytes(SAVED["all of them"](_jsonl(ROWS[:1] * 4)))
    results = {}
    for text in ("plain.txt", "saved $t.txt"):
        out = w / f"-ev {text}.json"
        (w / "ev.yaml").write_bytes(SAVED["all of them"](
            f"model: {json.dumps(str(model))}\neval:\n  perplexity: {{text: {json.dumps(str(w / text))}, context: 64, "
            f"stride: 64}}\noutput: {json.dumps(str(out))}\n"))
        assert main(["eval", str(w / "ev.yaml")]) == 0
        results[text] = json.loads(out.read_text())["perplexity"]
    assert {k: results["saved $t.txt"][k] for k in ("ppl", "tokens")} == \
        {k: results["plain.txt"][k] for k in ("ppl", "tokens")}
    (w / "ft.yaml").write_bytes(SAVED["all of them"](
        f"model: {json.dumps(str(model))}\ndata: {{train: {json.dumps(str(w / 'data `d`.jsonl'))}, max_length: 64}}\n"
        f"lora: {{r: 4}}\ntrain: {{steps: 1, batch_size: 2}}\noutput: {json.dumps(str(w / '-ft $o'))}\n"))
    assert main(["finetune", str(w / "ft.yaml")]) == 0
    assert (w / "-ft $o" / "adapter" / "adapter_model.safetensors").is_file()
