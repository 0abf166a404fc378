"""Evaluation: perplexity against the model's own loss, batched decoding against one-at-a-time decoding,
and a real run on the built-in model."""

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_cli
from llmfast.data.tasks import check
from llmfast.evaluate import generate_answers, perplexity, task_accuracy

TEXT = (REPO / "eval" / "text" / "persuasion.txt").read_text()[:4000]


def test_single_window_perplexity_equals_model_loss(tiny):
    model, tok = tiny
    ids = tok(TEXT[:600], add_special_tokens=False, return_tensors="pt").input_ids
    with torch.inference_mode():
        ref = model(ids, labels=ids).loss.item()
    got = perplexity(model, tok, TEXT[:600], context=2048, stride=2048)
    assert got["tokens"] == ids.shape[1] - 1
    assert math.isclose(got["nll"], ref, rel_tol=1e-5) and math.isclose(got["ppl"], math.exp(ref), rel_tol=1e-5)


def test_disjoint_windows_equal_mean_of_chunk_losses(tiny):
    model, tok = tiny
    ids = tok(TEXT, add_special_tokens=False, return_tensors="pt").input_ids[0][:700]
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids), 128):
            chunk = ids[start:start + 128].unsqueeze(0)
            if chunk.shape[1] < 2:
                continue
            total += model(chunk, labels=chunk).loss.item() * (chunk.shape[1] - 1)
            count += chunk.shape[1] - 1
    got = perplexity(model, tok, TEXT, context=128, stride=128, max_tokens=700)
    assert got["tokens"] == count
    assert math.isclose(got["nll"], total / count, rel_tol=1e-5)


def test_overlapping_windows_score_every_token_once(tiny):
    model, tok = tiny
    got = perplexity(model, tok, TEXT, context=128, stride=48, max_tokens=500)
    assert got["tokens"] == 499 and math.isfinite(got["ppl"])
    # More left context cannot hurt a lot on average; a broken offset would show up as a large jump.
    disjoint = perplexity(model, tok, TEXT, context=128, stride=128, max_tokens=500)
    assert abs(got["nll"] - disjoint["nll"]) < 0.5


def test_batched_greedy_decoding_matches_one_at_a_time(tiny):
    model, tok = tiny
    prompts = [[{"role": "user", "content": c}] for c in
               ["Convert 3 km to m.", "What is 11 Oct 2013 in ISO format (YYYY-MM-DD)? Give only the date.", "Hi"]]
    side = tok.padding_side
    batched = generate_answers(model, tok, prompts, max_new_tokens=8, batch_size=3)
    single = generate_answers(model, tok, prompts, max_new_tokens=8, batch_size=1)
    assert batched == single and all(isinstance(x, str) for x in batched)
    assert tok.padding_side == side  # left padding is only for the duration of the call


def test_task_accuracy_counts_what_the_checker_says(tiny, tmp_path):
    model, tok = tiny
    rows = [{"messages": [{"role": "user", "content": "Say A"}, {"role": "assistant", "content": "A"}]},
            {"prompt": "Say B", "completion": "B"}]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary, records = task_accuracy(model, tok, "custom", path, max_new_tokens=4, batch_size=2)
    assert summary["n"] == 2 and [r["row"] for r in records] == [1, 2]
    assert summary["correct"] == sum(check("custom", r["prediction"], r["answer"]) for r in records)
    summary, records = task_accuracy(model, tok, "custom", path, limit=1, max_new_tokens=4, batch_size=2)
    assert summary["n"] == 1 and [r["row"] for r in records] == [1]  # eval.tasks' `limit`: the first rows


def test_a_perplexity_text_that_is_not_utf8_is_named_by_its_line(tiny_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_bytes(b"first line\nsecond line\nthird \xff line\n")
    recipe = tmp_path / "ev.yaml"
    recipe.write_text(f"model: {tiny_dir}\neval:\n  perplexity: {{text: {text}}}\n")
    code, _, err = run_cli("eval", str(recipe), "--output", str(tmp_path / "r.json"))
    assert code == 2 and err.strip().splitlines()[-1] == (f"llmfast: error: {text}:3: not UTF-8 text (byte 7 of the "
                                                           "line): save the file as UTF-8"), err[-2000:]


def test_a_perplexity_text_of_one_token_is_refused_before_loading(tiny_dir, tmp_path):
    from llmfast.models import load_tokenizer

    text = tmp_path / "t.txt"
    text.write_text("the")
    assert len(load_tokenizer(tiny_dir)("the", add_special_tokens=False).input_ids) == 1
    recipe = tmp_path / "ev.yaml"
    recipe.write_text(f"model: {tiny_dir}\neval:\n  perplexity: {{text: {text}}}\n")
    code, _, err = run_cli("eval", str(recipe), "--output", str(tmp_path / "r.json"))
    assert code == 2 and err.strip().splitlines()[-1] == (f"llmfast: error: eval.perplexity: {text} has 1 token(s): "
                                                           "at least 2 are needed to score"), err[-2000:]
    assert "Loading weights" not in err  # found from the tokenizer, before the model loads


def test_eval_runs_the_model_in_the_recipes_dtype(tiny_dir, tmp_path, monkeypatch):
    """eval.dtype: bfloat16 scores the bfloat16 model (the figure perplexity() gives on it), not float32's. The book
    is tokenized once (the check before the model loads hands its ids to the scoring)."""
    import llmfast.evaluate
    from llmfast.models import load_model, load_tokenizer

    calls = []
    real = llmfast.evaluate.text_token_ids
    monkeypatch.setattr(llmfast.evaluate, "text_token_ids", lambda tok, t: calls.append(len(t)) or real(tok, t))
    recipe = tmp_path / "ev.yaml"
    text = REPO / "eval" / "text" / "persuasion.txt"
    recipe.write_text(f"model: {tiny_dir}\neval:\n  dtype: bfloat16\n  perplexity: {{text: {text}, max_tokens: 256, "
                      "context: 64, stride: 64}\n")
    code, _, err = run_cli("eval", str(recipe), "--output", str(tmp_path / "r.json"))
    assert code == 0, err[-2000:]
    assert calls == [len(text.read_text())]
    got = json.loads((tmp_path / "r.json").read_text())["perplexity"]["nll"]
    tok, full = load_tokenizer(tiny_dir), text.read_text()
    bf16 = perplexity(load_model(tiny_dir, "bfloat16"), tok, full, 64, 64, 256)["nll"]
    f32 = perplexity(load_model(tiny_dir, "float32"), tok, full, 64, 64, 256)["nll"]
    assert abs(got - bf16) < abs(bf16 - f32) / 10, (got, bf16, f32)


def test_a_mixed_set_scores_each_row_by_its_own_tasks_check(tiny, tmp_path):
    """A set of another name may mix built-in tasks' rows: each row is scored by its `task`'s check (JSON equality
    for extract), not by the set's exact match. Each row's answer is the model's own prediction, so exact match
    would call every row right; extract's check refuses a prediction that is not JSON."""
    model, tok = tiny
    prompts = [[{"role": "user", "content": "Extract the name: Ana Silva, 30, Porto."}],
               [{"role": "user", "content": "Convert 3 km to m."}]]
    preds = generate_answers(model, tok, prompts, max_new_tokens=6, batch_size=2)
    with pytest.raises(json.JSONDecodeError):
        json.loads(preds[0])  # a random model's words, not JSON
    path = tmp_path / "mix.jsonl"
    path.write_text("".join(json.dumps({"task": t, "messages": [*p, {"role": "assistant", "content": a}]}) + "\n"
                            for t, p, a in zip(["extract", "units"], prompts, preds)))
    summary, records = task_accuracy(model, tok, "mix", path, max_new_tokens=6, batch_size=2)
    assert [r["prediction"] for r in records] == preds
    assert [r["correct"] for r in records] == [False, True] and summary["correct"] == 1


def test_a_prompt_and_its_answer_beyond_a_learned_position_table_are_refused_before_loading(tiny_dir, tmp_path):
    """A learned position table (GPT-2's n_positions) fails past its end mid-generation, so the prompt and
    max_new_tokens must fit in it; nothing loads before the refusal (the folder has no weights to load)."""
    import shutil

    from llmfast.data.chat import render_chat
    from llmfast.models import load_tokenizer

    model = tmp_path / "learned"
    model.mkdir()
    for f in tiny_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, model / f.name)
    rows = tmp_path / "q.jsonl"
    rows.write_text(json.dumps({"prompt": "Say A", "completion": "A"}) + "\n")
    tok = load_tokenizer(tiny_dir)
    n = len(tok(render_chat(tok, [{"role": "user", "content": "Say A"}], True, ""), add_special_tokens=False).input_ids)
    recipe = tmp_path / "ev.yaml"
    recipe.write_text(f"model: {model}\neval:\n  tasks:\n    - {{name: custom, path: {rows}}}\n  max_new_tokens: 8\n")
    for positions, fits in ((n + 8, True), (n + 7, False)):
        (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": positions,
                                                       "vocab_size": 1024}))
        code, _, err = run_cli("eval", str(recipe), "--output", str(tmp_path / "r.json"))
        last = err.strip().splitlines()[-1]
        assert code == 2 and not (tmp_path / "r.json").exists(), err[-2000:]
        if fits:  # past the check: the loader finds no weights
            assert "no model.safetensors" in last, last
        else:
            assert last == (f"llmfast: error: {rows}:1: its prompt of {n} tokens and eval.max_new_tokens (8) go beyond "
                            f"the {positions} positions of {model}: shorten the row or lower eval.max_new_tokens")


def test_a_tokenizer_without_a_pad_token_pads_with_its_end_of_sequence(tiny_dir, tmp_path):
    """Left-padded batches need a pad token: a tokenizer that names none gets its end-of-sequence token, and a batch
    decodes as one prompt at a time does."""
    import shutil

    from llmfast.models import load_model, load_tokenizer

    model = tmp_path / "nopad"
    shutil.copytree(tiny_dir, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    stm = model / "special_tokens_map.json"
    if stm.is_file():
        stm.write_text(json.dumps({k: v for k, v in json.loads(stm.read_text()).items() if k != "pad_token"}))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(model).pad_token is None  # the case: transformers gives it none
    tok = load_tokenizer(model)
    assert tok.pad_token == tok.eos_token and tok.pad_token_id == tok.eos_token_id
    lm = load_model(tiny_dir)
    prompts = [[{"role": "user", "content": c}] for c in ["Hi", "Convert 3 km to m, and say it twice."]]
    assert (generate_answers(lm, tok, prompts, max_new_tokens=4, batch_size=2)
            == generate_answers(lm, tok, prompts, max_new_tokens=4, batch_size=1))


@pytest.mark.parametrize("line,expected", [
    ("{bad json", "t.jsonl:1: not valid JSON"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', "t.jsonl:1: only the answer: a task row needs the "
                                                             "question before it"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "t.jsonl:1: no assistant turn"),
    ('{"messages": []}', "t.jsonl:1: field 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}',
     "t.jsonl:1: the last message must be the assistant's answer"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}', "messages[1] lacks field 'content'"),
    ('{"prompt": "x"}', "t.jsonl:1: missing field 'completion'"),
    ('{"text": "x"}', "t.jsonl:1: missing field 'messages'"),
    ("", "t.jsonl: the data set is empty"),
])
def test_bad_task_rows_are_named(tiny, tmp_path, line, expected):
    from llmfast.errors import UserError

    model, tok = tiny
    path = tmp_path / "t.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(UserError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        task_accuracy(model, tok, "custom", path)


@pytest.mark.slow
def test_eval_cli_on_builtin_model(builtin_dir, tmp_path):
    out = tmp_path / "res" / "eval.json"
    code, stdout, err = run_cli(
        "eval", str(REPO / "recipes" / "eval_smollm2.yaml"), "--output", str(out),
        "--set", f"eval.perplexity.text={REPO / 'eval/text/persuasion.txt'}",
        "--set", "eval.perplexity.max_tokens=1500",
        "--set", f"eval.tasks=[{{name: dates, path: {REPO / 'eval/tasks/dates/test.jsonl'}, limit: 6}},"
                 f" {{name: extract, path: {REPO / 'eval/tasks/extract/test.jsonl'}, limit: 6}}]",
        "--set", "eval.batch_size=6",
    )
    assert code == 0, err
    res = json.loads(out.read_text())
    for key in ["model", "model_path", "dtype", "provenance", "perplexity", "tasks", "seconds", "predictions", "recipe"]:
        assert key in res, key
    assert res["model_path"] == str(builtin_dir)
    ppl = res["perplexity"]
    assert ppl["tokens"] == 1499 and 5 < ppl["ppl"] < 200, ppl
    preds = [json.loads(x) for x in open(res["predictions"])]
    assert len(preds) == 12 and all(p["prediction"] for p in preds), "real generations, never empty"
    for name in ["dates", "extract"]:
        mine = [p for p in preds if p["task"] == name]
        assert res["tasks"][name]["correct"] == sum(check(name, p["prediction"], p["answer"]) for p in mine)
        assert res["tasks"][name]["accuracy"] == res["tasks"][name]["correct"] / 6
    assert "perplexity" in stdout and "dates accuracy" in stdout


def _tiny_eval_recipe(tmp_path, tiny_dir) -> Path:
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(f"model: {tiny_dir}\neval:\n  tasks:\n    - {{name: dates, path: {REPO / 'eval/tasks/dates/test.jsonl'},"
                      " limit: 2}\n  max_new_tokens: 4\n")
    return recipe


def test_eval_replaces_only_results_it_wrote(tiny_dir, tmp_path):
    recipe, out = _tiny_eval_recipe(tmp_path, tiny_dir), tmp_path / "res.json"
    code, _, err = run_cli("eval", str(recipe), "--output", str(out))
    assert code == 0, err
    first = json.loads(out.read_text())
    code, _, err = run_cli("eval", str(recipe), "--output", str(out))  # re-running the same command works
    assert code == 0 and json.loads(out.read_text())["predictions"] == first["predictions"], err
    mine = tmp_path / "mine.json"
    mine.write_text('{"my": "notes"}\n')
    code, stdout, err = run_cli("eval", str(recipe), "--output", str(mine))
    assert code == 2 and "mine.json exists and is not a results file written by llmfast eval" in err
    assert mine.read_text() == '{"my": "notes"}\n' and not (tmp_path / "mine.predictions.jsonl").exists()
    (tmp_path / "other.predictions.jsonl").write_text("keep\n")
    code, _, err = run_cli("eval", str(recipe), "--output", str(tmp_path / "other.json"))
    assert code == 2 and "other.predictions.jsonl exists and is not the predictions of an earlier llmfast eval" in err
    assert (tmp_path / "other.predictions.jsonl").read_text() == "keep\n" and not (tmp_path / "other.json").exists()


def test_tasks_on_a_tokenizer_without_a_chat_template_are_refused_before_loading(tiny_dir, tmp_path):
    """It ended in transformers' traceback after the model loaded and the perplexity ran (found by hand, s42)."""
    import shutil

    model = tmp_path / "nochat"
    shutil.copytree(tiny_dir, model)
    (model / "chat_template.jinja").unlink()
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    recipe = _tiny_eval_recipe(tmp_path, model)
    code, _, err = run_cli("eval", str(recipe), "--output", str(tmp_path / "r.json"))
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (f"llmfast: error: {model}: its tokenizer has no chat template, which "
                                            "eval.tasks needs (each task row is a chat): use an instruct model, give "
                                            "it a template (docs/finetune.md, 'A base model'), or leave out eval.tasks")
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "r.predictions.jsonl").exists()


def test_a_task_file_mixing_row_shapes_is_refused_before_loading(tiny_dir, tmp_path):
    """One shape per file, as finetune's data (docs/eval.md); eval took a messages row beside an Alpaca one (s49)."""
    rows = [{"task": "dates", "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
            {"task": "dates", "instruction": "Q", "output": "A"}]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(f"model: {tiny_dir}\neval:\n  tasks:\n    - {{name: dates, path: {tmp_path / 'mixed.jsonl'}}}\n")
    code, _, err = run_cli("eval", str(recipe), "--output", str(tmp_path / "r.json"))
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"llmfast: error: {tmp_path / 'mixed.jsonl'}:2: a row of shape Alpaca (instruction/output), but the rows before "
        "it are chat (messages): a data set holds one shape: convert this row to theirs, or split the file"), err[-2000:]
    assert not (tmp_path / "r.json").exists()


def test_eval_output_that_is_a_directory_or_under_a_file_is_one_line(tiny_dir, tmp_path):
    recipe = _tiny_eval_recipe(tmp_path, tiny_dir)
    (tmp_path / "f").write_text("x")
    for out, expected in ((tmp_path, "is a directory: give a file path"), (tmp_path / "f" / "r.json", "is a file"),
                          (f"{tmp_path / 'new'}/", "names a folder: give a file path for the results")):
        code, _, err = run_cli("eval", str(recipe), "--output", str(out))
        assert code == 2 and expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "new").exists()  # `new/` wrote a file named `new` (s42's review)
    (tmp_path / "link.json").symlink_to(tmp_path / "nowhere.json")  # the results replaced the link itself
    code, _, err = run_cli("eval", str(recipe), "--output", str(tmp_path / "link.json"))
    assert code == 2 and "is a symbolic link (to " in err and (tmp_path / "link.json").is_symlink(), err
    (tmp_path / "r.predictions.jsonl").symlink_to(tmp_path / "mine.jsonl")  # the predictions beside it: the same
    code, _, err = run_cli("eval", str(recipe), "--output", str(tmp_path / "r.json"))
    assert code == 2 and f"output {tmp_path / 'r.predictions.jsonl'} is a symbolic link (to " in err, err
    assert (tmp_path / "r.predictions.jsonl").is_symlink() and not (tmp_path / "r.json").exists()


def test_eval_rerun_after_a_kill_between_predictions_and_results(tiny_dir, tmp_path):
    # SIGKILL after the predictions were written, before the results: the same command must run again.
    recipe, out = _tiny_eval_recipe(tmp_path, tiny_dir), tmp_path / "res.json"
    assert run_cli("eval", str(recipe), "--output", str(out))[0] == 0
    out.unlink()
    code, _, err = run_cli("eval", str(recipe), "--output", str(out))
    assert code == 0 and out.is_file(), err


def test_a_chat_template_that_refuses_a_row_is_one_line_naming_it(tiny_dir, tmp_path):
    """Gemma's and Mistral's templates raise on a system turn: a jinja traceback in finetune and eval (found by hand,
    s42); now the row, before any model loads."""
    import shutil

    model = tmp_path / "strict"
    shutil.copytree(tiny_dir, model)
    template = (model / "chat_template.jinja").read_text()
    (model / "chat_template.jinja").write_text("{% for m in messages %}{% if m['role'] == 'system' %}"
                                               "{{ raise_exception('System role not supported') }}{% endif %}"
                                               "{% endfor %}" + template)
    rows = tmp_path / "sys.jsonl"
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
                    + "\n" + json.dumps({"messages": [{"role": "system", "content": "be brief"},
                                                      {"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "yo"}]}) + "\n")
    recipe = tmp_path / "ev.yaml"
    recipe.write_text(f"model: {model}\neval:\n  tasks:\n    - {{name: dates, path: {rows}}}\n  max_new_tokens: 4\n")
    code, _, err = run_cli("eval", str(recipe), "--output", str(tmp_path / "r.json"))
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"llmfast: error: {rows}:2: the model's chat template refuses this row (System role not supported): change "
        "the row (e.g. fold a system turn into the first user turn) or the template"), err[-2000:]
    ft = tmp_path / "ft.yaml"
    ft.write_text(f"model: {model}\ndata: {{train: {rows}, max_length: 64}}\nlora: {{r: 4}}\n"
                  f"train: {{steps: 1, batch_size: 2}}\noutput: {tmp_path / 'run'}\n")
    code, _, err = run_cli("finetune", str(ft))
    assert code == 2 and f"{rows}:2: the model's chat template refuses this row" in err.strip().splitlines()[-1], err
    assert not (tmp_path / "run").exists() and not (tmp_path / "r.json").exists()


def test_a_tokenizer_with_tokens_the_model_has_no_rows_for_is_one_line(tiny_dir, tmp_path):
    """A special token added to the tokenizer without resizing the model: an IndexError from inside the embedding in
    finetune and eval (found by hand, s42); now the row, before the model loads."""
    import shutil

    from transformers import AutoTokenizer

    model = tmp_path / "addtok"
    shutil.copytree(tiny_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    tok.save_pretrained(model)
    rows = tmp_path / "tool.jsonl"
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": "<|tool|> hi"},
                                             {"role": "assistant", "content": "yo"}]}) + "\n")
    recipe = tmp_path / "ev.yaml"
    recipe.write_text(f"model: {model}\neval:\n  tasks:\n    - {{name: dates, path: {rows}}}\n  max_new_tokens: 4\n")
    code, _, err = run_cli("eval", str(recipe), "--output", str(tmp_path / "r.json"))
    assert code == 2 and err.strip().splitlines()[-1].startswith(
        f"llmfast: error: {rows}:1: token id 1024 is beyond the model's 1024 embedding rows"), err[-2000:]
    ft = tmp_path / "ft.yaml"
    ft.write_text(f"model: {model}\ndata: {{train: {rows}, max_length: 64}}\nlora: {{r: 4}}\n"
                  f"train: {{steps: 1, batch_size: 1}}\noutput: {tmp_path / 'run'}\n")
    code, _, err = run_cli("finetune", str(ft))
    assert code == 2 and f"{rows}:1: token id 1024 is beyond" in err.strip().splitlines()[-1], err[-2000:]
    assert not (tmp_path / "run").exists() and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("context,stride", [(16, 6), (10, 1)])
def test_overlapping_windows_score_each_token_in_the_first_window_that_holds_it(tiny, context, stride):
    """Each token j >= 1 scored once, with the left context of the first window (windows start every `stride`
    tokens, `context` long) that holds both it and a token before it. The reference: one forward per token, on
    that window's tokens up to it, its NLL read off the last position."""
    import torch.nn.functional as F

    model, tok = tiny
    n = 151
    ids = tok(TEXT, add_special_tokens=False, return_tensors="pt").input_ids[0][:n]
    assert len(ids) == n
    nlls = []
    with torch.inference_mode():
        for j in range(1, n):
            begin = next(b for b in range(0, n, stride) if b < j < b + context)
            logits = model(ids[begin : j].unsqueeze(0)).logits[0, -1].float()
            nlls.append(F.cross_entropy(logits[None], ids[j : j + 1]).item())
    got = perplexity(model, tok, TEXT, context=context, stride=stride, max_tokens=n)
    assert got["tokens"] == n - 1 == len(nlls)
    ref = sum(nlls) / len(nlls)
    assert math.isclose(got["nll"], ref, rel_tol=1e-5), (got["nll"], ref)
    assert math.isclose(got["ppl"], math.exp(ref), rel_tol=1e-5)


def test_eval_leaves_a_users_jsonl_at_the_predictions_path_alone(tiny_dir, tmp_path):
    """A JSONL of the user's own (valid JSON, but not eval's records) where the predictions would go: refused before
    the model loads, the file as it was, no results written."""
    recipe = _tiny_eval_recipe(tmp_path, tiny_dir)
    mine = tmp_path / "other.predictions.jsonl"
    text = '{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n'
    mine.write_text(text)
    code, _, err = run_cli("eval", str(recipe), "--output", str(tmp_path / "other.json"))
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"llmfast: error: {mine} exists and is not the predictions of an earlier llmfast eval: it is left as it is; "
        "choose another --output"), err[-2000:]
    assert mine.read_text() == text and not (tmp_path / "other.json").exists()
    # a record with one of eval's keys too many or too few is not one of its records either
    for row in ({"task": "dates", "row": 1, "prompt": "p", "answer": "a", "prediction": "a"},
                {"task": "dates", "row": 1, "prompt": "p", "answer": "a", "prediction": "a", "correct": True,
                 "mine": 1}):
        mine.write_text(json.dumps(row) + "\n")
        code, _, err = run_cli("eval", str(recipe), "--output", str(tmp_path / "other.json"))
        assert code == 2 and "is not the predictions of an earlier llmfast eval" in err, err[-2000:]
        assert json.loads(mine.read_text()) == row and not (tmp_path / "other.json").exists()


def test_a_model_computing_nan_is_refused_and_nothing_is_written(tiny_dir, tmp_path):
    """An adapter whose weights overflow (a merge with weights near float32's max) made every logit NaN: eval wrote
    `"ppl": NaN` (not JSON) and exit 0 (fuzz pass 10, F2); a perplexity past float64 was an OverflowError."""
    import shutil

    from safetensors.torch import load_file, save_file

    from llmfast.errors import UserError
    from llmfast.models import load_model, load_tokenizer

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.norm.weight"][:] = float("inf")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="mean loss is nan nats per token"):
        perplexity(load_model(broken, "float32"), load_tokenizer(broken), TEXT, 64, 64, 128)
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(f"model: {broken}\neval:\n  perplexity: {{text: {REPO / 'eval/text/persuasion.txt'}, "
                      "max_tokens: 128, context: 64, stride: 64}\n")
    code, _, err = run_cli("eval", str(recipe), "--output", str(tmp_path / "r.json"))
    assert code == 2 and err.strip().splitlines()[-1].startswith("llmfast: error: perplexity: the model's mean loss")
    assert not list(tmp_path.glob("r.*"))


@pytest.mark.parametrize("method,package", [("hqq", "HQQ"), ("torchao", "(torchao)")])
def test_a_model_needing_a_missing_package_says_to_install_it(tiny_dir, tmp_path, method, package):
    """A config.json whose quantization_config names a method whose package is not installed: transformers raises
    ImportError, which eval reported as "fix its config.json and weights" (the files are right)."""
    import importlib.util
    import shutil

    if importlib.util.find_spec(method) is not None:
        pytest.skip(f"{method} is installed here")
    model = tmp_path / method
    shutil.copytree(tiny_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": method}}))
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(f"model: {model}\neval:\n  perplexity: {{text: {REPO / 'eval/text/persuasion.txt'}, "
                      "max_tokens: 64, context: 64, stride: 64}\n")
    code, _, err = run_cli("eval", str(recipe), "--output", str(tmp_path / "r.json"))
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith(f"llmfast: error: {model}: transformers cannot load it here: config.json's "
                                         f"quantization_config (quant_method '{method}') needs a package"), last
    assert package in last and last.endswith("install what that names, then run again") and "fix" not in last
    assert not list(tmp_path.glob("r.*"))


@pytest.mark.parametrize("saved_in", ["tokenizer_config.json", "chat_template.jinja"])
def test_an_adapter_saved_with_its_template_but_no_vocabulary_is_prompted_with_that_template(tmp_path, saved_in):
    """An adapter folder carrying the chat template it was trained with but no vocabulary file (tokenizer_config.json
    alone, or chat_template.jinja): no tokenizer loads from it, and eval prompted with the base's template, while
    `serve --lora` judges the adapter by that template (refused: vLLM would render its chats with the base's). eval
    takes the base's tokens and the adapter's template."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmfast.errors import UserError
    from llmfast.modelfiles import has_tokenizer
    from llmfast.serve.lora import check_lora
    from llmfast.testing import build_family_model, script_greedy

    base = build_family_model(tmp_path / "l3", "llama3")
    tok = AutoTokenizer.from_pretrained(base)
    template = ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}### reply:{% endif %}")
    chat = [{"role": "user", "content": "What is 2+2?"}]
    theirs = tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]
    tok.chat_template = template
    prompt = tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert prompt[-1] != theirs[-1]  # the base's prompt ends elsewhere: the scripted answer is the adapter's alone
    four = tok.encode("4", add_special_tokens=False)[0]
    script_greedy(base, {prompt[-1]: four, four: tok.eos_token_id})
    adapter = tmp_path / "adapter"  # B = 0: the adapter leaves the scripted weights as they are
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj"])
                   ).save_pretrained(adapter)
    if saved_in == "tokenizer_config.json":
        cfg = json.loads((base / "tokenizer_config.json").read_text())
        (adapter / saved_in).write_text(json.dumps({**cfg, "chat_template": template}))
    else:
        (adapter / saved_in).write_text(template)
    assert not has_tokenizer(adapter)
    with pytest.raises(UserError, match="was trained with another chat template than the served model"):
        check_lora("mine", adapter, base=base)
    rows = tmp_path / "t.jsonl"
    rows.write_text(json.dumps({"messages": [*chat, {"role": "assistant", "content": "4"}]}) + "\n")
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(f"model: {base}\nadapter: {adapter}\neval:\n  tasks: [{{name: mine, path: {rows}}}]\n"
                      "  max_new_tokens: 4\n")
    code, _, err = run_cli("eval", str(recipe), "--output", str(tmp_path / "r.json"))
    assert code == 0, err[-2000:]
    assert json.loads((tmp_path / "r.predictions.jsonl").read_text())["prediction"] == "4"
