"""Malformed recipes: each gives one line naming the file (and line or --set) and the key, exit code 2."""

import re
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from llmfast.errors import UserError
from llmfast.recipe import EvalRecipe, load_recipe

TEXT = REPO / "eval" / "text" / "persuasion.txt"
DATES = REPO / "eval" / "tasks" / "dates" / "test.jsonl"

GOOD = f"""\
model: builtin:smollm2-135m
eval:
  perplexity:
    text: {TEXT}
    context: 256
  tasks:
    - name: dates
      path: {DATES}
  batch_size: 4
output: OUT
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text.replace("OUT", str(tmp_path / "out" / "results.json")))
    return path


def test_good_recipe_validates_with_overrides(tmp_path):
    path = _write(tmp_path, GOOD)
    recipe = load_recipe(path, EvalRecipe, ["eval.batch_size=2", "eval.perplexity.stride=128", "eval.tasks.0.limit=5"])
    assert recipe.eval.batch_size == 2 and recipe.eval.perplexity.stride == 128
    assert recipe.eval.tasks[0].limit == 5 and recipe.eval.perplexity.context == 256
    assert recipe.eval.max_new_tokens == 48  # default


MALFORMED = [
    # (what, recipe text, extra CLI args, expected pieces of the one-line message)
    ("misspelled top-level key", GOOD.replace("model:", "modle:"), [], [":1:", "unknown key 'modle'", "did you mean 'model'"]),
    ("misspelled nested key", GOOD.replace("batch_size", "bach_size"), [], [":9:", "unknown key 'eval.bach_size'", "did you mean 'batch_size'"]),
    ("misspelled deep key", GOOD.replace("context: 256", "contxt: 256"), [], [":5:", "eval.perplexity.contxt", "did you mean 'context'"]),
    ("wrong type", GOOD.replace("batch_size: 4", "batch_size: four"), [], [":9:", "eval.batch_size", "valid integer", "'four'"]),
    ("not positive", GOOD.replace("batch_size: 4", "batch_size: -1"), [], [":9:", "eval.batch_size", "greater than 0"]),
    ("missing required key", GOOD.replace("model: builtin:smollm2-135m\n", ""), [], ["required key 'model' is missing"]),
    ("missing text file", GOOD.replace(str(TEXT), "no/such/book.txt"), [], [":4:", "eval.perplexity.text", "file not found: no/such/book.txt"]),
    ("missing task file", GOOD.replace(str(DATES), "no/such/test.jsonl"), [], [":8:", "eval.tasks.0.path", "file not found"]),
    ("key at the wrong level", GOOD + "dtype: float32\n", [], [":11:", "unknown key 'dtype'"]),
    ("bad enum value", GOOD.replace("batch_size: 4", "batch_size: 4\n  dtype: float8"), [], [":10:", "eval.dtype", "'float32', 'bfloat16' or 'float16'"]),
    ("tasks not a list", GOOD.replace(f"  tasks:\n    - name: dates\n      path: {DATES}\n", "  tasks: dates\n"), [], [":6:", "eval.tasks", "valid list"]),
    ("YAML syntax error", GOOD.replace("batch_size: 4", "batch_size: [4"), [], ["YAML syntax error"]),
    ("top level is a list", "- model: x\n", [], [":1:", "a recipe is a mapping"]),
    ("empty recipe", "", [], ["the recipe is empty"]),
    ("unknown key via --set", GOOD, ["--set", "eval.bogus=1"], ["(--set eval.bogus)", "unknown key 'eval.bogus'"]),
    ("unknown section via --set", GOOD, ["--set", "train.lr=1e-4"], ["(--set train.lr)", "unknown key 'train'"]),
    ("bad value via --set", GOOD, ["--set", "eval.max_new_tokens=lots"], ["(--set eval.max_new_tokens)", "valid integer"]),
    ("malformed --set", GOOD, ["--set", "eval.batch_size"], ["expected KEY=VALUE"]),
    ("--set index out of range", GOOD, ["--set", "eval.tasks.3.limit=1"], ["not an index of a list of 1 items"]),
]


@pytest.mark.parametrize("what,text,extra,expected", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_recipe_one_line_exit_2(tmp_path, what, text, extra, expected):
    path = _write(tmp_path, text)
    code, out, err = run_cli("eval", str(path), *extra)
    assert code == 2, (what, err)
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    assert err.startswith("llmfast: error: ")
    for piece in expected:
        assert piece in err, f"{piece!r} not in {err!r}"
    if "--set" not in " ".join(extra) and text.strip():
        assert str(path) in err, "the message names the recipe file"
    assert "Traceback" not in err and out == ""
    assert not (tmp_path / "out").exists(), "no partial output on a bad recipe"


def test_missing_recipe_file(tmp_path):
    code, _, err = run_cli("eval", str(tmp_path / "nope.yaml"))
    assert code == 2 and "nope.yaml not found" in err


def test_override_values_are_parsed_as_yaml(tmp_path):
    path = _write(tmp_path, GOOD)
    r = load_recipe(path, EvalRecipe, ["eval.perplexity=null", "eval.max_new_tokens=8"])
    assert r.eval.perplexity is None and r.eval.max_new_tokens == 8
    from llmfast.overrides import parse_overrides

    # what YAML cannot parse is the text as written (a name with a bracket), not an error
    assert parse_overrides(["output=[v2", "a.b=", "n=0x10"]) == [(["output"], "[v2"), (["a", "b"], ""), (["n"], 16)]


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    """YAML keeps the last of a repeated key without a word: a copied chain stage under the same name dropped the
    first stage, `weight: 0.5, weight: 2.0` merged with 2.0 (s43's review). Merge keys (`<<`) still work."""
    from llmfast.recipe import read_yaml

    path = tmp_path / "r.yaml"
    path.write_text("output: a\nstages:\n  ft: {type: finetune}\n  ev: {type: eval}\n  ft: {type: eval}\n")
    with pytest.raises(UserError, match=r"r\.yaml:5: key 'stages\.ft' is given twice \(first at line 3\)"):
        read_yaml(path)
    path.write_text("models:\n  - model: m\n    parameters: {weight: 0.5, weight: 2.0}\n")
    with pytest.raises(UserError, match=r"r\.yaml:3: key 'models\.0\.parameters\.weight' is given twice"):
        read_yaml(path)
    path.write_text("base: &b {lr: 1}\ntrain:\n  <<: *b\n  steps: 2\nother:\n  <<: *b\n")
    assert read_yaml(path)[0] == {"base": {"lr": 1}, "train": {"lr": 1, "steps": 2}, "other": {"lr": 1}}


def test_blame_and_hints_for_set_inside_a_section_and_unquoted_names(tmp_path):
    """A --set inside quantization's settings was blamed on the recipe's line, and `model: 1.5` / `output:
    2024-01-03` (YAML's number and date) gave no hint to quote them (s43's review)."""
    from llmfast.recipe import QuantizeRecipe

    path = tmp_path / "q.yaml"
    path.write_text("model: m\nquantization: {method: w4, group_size: 32}\noutput: o\n")
    with pytest.raises(UserError, match=r"q\.yaml \(--set quantization\.group_size\): quantization: group_size"):
        load_recipe(path, QuantizeRecipe, ["quantization.group_size=1"])
    path.write_text("model: m\nquantization: {method: w4, group_size: 0}\noutput: o\n")  # the file's, not the --set's
    with pytest.raises(UserError, match=r"q\.yaml:2: quantization: group_size"):
        load_recipe(path, QuantizeRecipe, ["quantization.method=w4"])
    path.write_text("model: 1.5\nquantization: nf4\noutput: o\n")
    with pytest.raises(UserError, match=r"q\.yaml:1: model: .*\(got 1\.5\): quote it in the YAML if it is a name "
                                        r"\('1\.5'\)"):
        load_recipe(path, QuantizeRecipe)
    path.write_text("model: m\nquantization: nf4\noutput: 2024-01-03\n")
    with pytest.raises(UserError, match=r"q\.yaml:3: output: .*quote it in the YAML if it is a name \('2024-01-03'\)"):
        load_recipe(path, QuantizeRecipe)


def test_set_reaches_a_key_with_dots_in_it():
    """A chain stage named `base.v1`: `--set stages.base.v1.with.x=2` made a stage `base` holding `v1` ("unknown
    key 'stages.base.v1'", s42's review). The longest run of parts naming a key is that key."""
    from llmfast.overrides import apply_overrides, parse_overrides

    data = {"stages": {"base.v1": {"with": {"x": 1}}, "base": {"x": 1}}, "rows": [{"a.b": 1}]}
    apply_overrides(data, parse_overrides(["stages.base.v1.with.x=2", "stages.base.x=3", "rows.0.a.b=5",
                                           "rows.0.c=6", "new.key=7"]))
    assert data == {"stages": {"base.v1": {"with": {"x": 2}}, "base": {"x": 3}}, "rows": [{"a.b": 5, "c": 6}],
                    "new": {"key": 7}}


def test_a_chain_stage_named_with_dots_takes_set_and_its_one_word_quantization_expands(tmp_path):
    """The chain's --set on a stage `base.v1` was blamed on a line of the file, and `--set
    stages.q.with.quantization.group_size` on `quantization: int4` was "not a mapping" (s43's diff review)."""
    from llmfast.chain.plan import ChainRecipe

    path = tmp_path / "c.yaml"
    path.write_text("output: run\nstages:\n  base.v1: {type: eval, with: {model: m}}\n"
                    "  q: {type: quantize, with: {model: m, quantization: int4}}\n")
    with pytest.raises(UserError, match=r"c\.yaml \(--set stages\.base\.v1\.tpye\): unknown key "
                                        r"'stages\.base\.v1\.tpye' \(did you mean 'type'\?\)"):  # was "(known keys: )"
        load_recipe(path, ChainRecipe, ["stages.base.v1.tpye=1"])
    r = load_recipe(path, ChainRecipe, ["stages.q.with.quantization.group_size=32"])
    assert r.stages["q"].with_["quantization"] == {"method": "w4", "group_size": 32}


def test_set_changes_one_setting_of_a_one_word_quantization(tmp_path):
    """`quantization: nf4` with `--set quantization.double_quant=false` was "'quantization' is not a mapping"
    (s42's review): the word is its mapping ({method: bnb4, type: nf4}) once a key inside it is set."""
    from llmfast.recipe import QuantizeRecipe

    path = tmp_path / "q.yaml"
    path.write_text("model: builtin:smollm2-135m-instruct\nquantization: nf4\noutput: out\n")
    r = load_recipe(path, QuantizeRecipe, ["quantization.double_quant=false"])
    assert (r.quantization.method, r.quantization.config.type, r.quantization.config.double_quant) == (
        "bnb4", "nf4", False)
    assert load_recipe(path, QuantizeRecipe, ["quantization.type=fp4"]).quantization.config.type == "fp4"
    assert load_recipe(path, QuantizeRecipe, []).quantization.config.double_quant is True  # the word's default
    with pytest.raises(UserError, match="unknown key 'bogus' for quantization method bnb4"):
        load_recipe(path, QuantizeRecipe, ["quantization.bogus=1"])
    path.write_text("model: m\nquantization: nf5\noutput: out\n")  # not a word: refused as before, not expanded
    with pytest.raises(UserError, match="--set quantization.type: 'quantization' is not a mapping"):
        load_recipe(path, QuantizeRecipe, ["quantization.type=fp4"])


def test_a_yaml_boolean_is_not_a_number_and_a_comment_is_not_dropped(tmp_path):
    """pydantic took `true` as 1 (`--set eval.batch_size=true` ran batches of one, `--set
    quantization.iters=true` one step of tuning), and `--set 'output=x #1'` wrote to `x` (found by hand, s42)."""
    from llmfast.quant import parse_quantization

    path = _write(tmp_path, GOOD)
    for key in ("eval.batch_size", "eval.perplexity.context"):
        with pytest.raises(UserError, match=rf"\(--set {key}\): {key}: Input should be a valid integer.*got 'true'"):
            load_recipe(path, EvalRecipe, [f"{key}=true"])
    with pytest.raises(UserError, match="Input should be a valid integer.*got 'true'"):
        parse_quantization({"method": "w4", "iters": True})
    with pytest.raises(UserError, match=r"--set 'output=x #1': ' #' starts a comment in YAML, so the value would be "
                                        r"'x': quote it, e.g. --set 'output=\"x #1\"'"):
        load_recipe(path, EvalRecipe, ["output=x #1"])
    assert load_recipe(path, EvalRecipe, ['output="x #1"']).output == Path("x #1")
    assert load_recipe(path, EvalRecipe, ["output=2024"]).output == Path("2024")  # a folder named by a number
    assert load_recipe(path, EvalRecipe, ["eval.batch_size=8"]).eval.batch_size == 8


def test_recipes_in_repo_validate(tmp_path):
    """Every shipped recipe validates, run from the repo root as the README does (the training sets that
    `llmfast tasks` writes are stood in for by a test set)."""
    import os

    from llmfast.recipe import FinetuneRecipe

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        evals = sorted((REPO / "recipes").glob("eval*.yaml"))
        tunes = sorted((REPO / "recipes").glob("*lora*.yaml"))
        assert evals and len(tunes) >= 2
        for path in evals:
            load_recipe(path, EvalRecipe)
        for path in tunes:
            r = load_recipe(path, FinetuneRecipe, [f"data.train={DATES}"])
            assert r.export_merged and r.output.parts[0] == "runs"
    finally:
        os.chdir(cwd)


def test_user_error_is_one_line():
    assert str(UserError("a\nb   c\n")) == "a b c"


def test_quantize_and_sparsify_recipes_in_repo_validate(monkeypatch):
    """Every shipped quantize and sparsify recipe validates with its method's own schema, from the repo root (the
    fine-tune's chats that `llmfast run recipes/quickstart.yaml` writes are stood in for by a task file)."""
    from llmfast.recipe import QuantizeRecipe
    from llmfast.sparse.run import load_sparsify_recipe

    def stand_in(path: Path) -> list[str]:
        return [f"data.conversations=[{DATES}]"] if "conversations:" in path.read_text() else []

    monkeypatch.chdir(REPO)
    quants = sorted((REPO / "recipes").glob("quantize_*.yaml"))
    sparse = sorted((REPO / "recipes").glob("sparsify_*.yaml"))
    assert len(quants) >= 4 and len(sparse) >= 4
    for path in quants:
        assert load_recipe(path, QuantizeRecipe, stand_in(path)).output.parts[0] == "runs", path
    for path in sparse:
        r, method = load_sparsify_recipe(path, stand_in(path))
        assert r.output.parts[0] == "runs" and method.name == r.sparsify.method, path


def test_a_recipe_output_under_home_is_expanded_as_in_a_shell(tmp_path):
    """`~/x` was a literal `./~/x` for the files a verb wrote itself, while libraries expanded it: a run split in two."""
    recipe = EvalRecipe.model_validate({"model": "m", "eval": {}, "output": "~/llmfast-results.json"})
    assert recipe.output == Path.home() / "llmfast-results.json"


def test_held_out_rows_always_leave_one_to_train_on():
    from llmfast.finetune.trainer import split_eval

    rows = [object(), object()]
    train, held = split_eval(rows, 0.75, seed=0)  # round(2 x 0.75) = 2 would hold out both (a division by zero)
    assert len(train) == 1 and len(held) == 1 and set(map(id, train + held)) == set(map(id, rows))


def test_a_default_that_conflicts_is_named_as_the_default():
    """`skip_tokens: 1024` alone was refused as if the user had written heldout_tokens 4096 (found by hand, s42)."""
    from pydantic import ValidationError

    from llmfast.recipe import CalibrationText

    with pytest.raises(ValidationError, match=r"heldout_tokens \(4096, its default\) must not exceed skip_tokens "
                                              r"\(1024\).*set heldout_tokens"):
        CalibrationText.model_validate({"text": str(TEXT), "skip_tokens": 1024})
    with pytest.raises(ValidationError, match=r"heldout_tokens \(2048\) must not exceed skip_tokens \(1024\)"):
        CalibrationText.model_validate({"text": str(TEXT), "skip_tokens": 1024, "heldout_tokens": 2048})
    assert CalibrationText.model_validate({"text": str(TEXT), "skip_tokens": 1024, "heldout_tokens": 512})


def test_a_yaml_boolean_in_a_list_of_numbers_is_refused():
    from pydantic import ValidationError

    from llmfast.recipe import WorkloadConfig

    with pytest.raises(ValidationError, match="max_concurrency.0"):
        WorkloadConfig.model_validate({"max_concurrency": [True, 2]})
    with pytest.raises(ValidationError, match="greater than 0"):
        WorkloadConfig.model_validate({"request_rate": float("nan")})
    with pytest.raises(ValidationError, match=r"\[1, 1\]: give each value once"):
        WorkloadConfig.model_validate({"max_concurrency": [1, 1]})
    ok = WorkloadConfig.model_validate({"max_concurrency": [1, 2], "request_rate": float("inf")})
    assert ok.max_concurrency == [1, 2]


def test_a_yaml_boolean_in_an_optional_list_of_numbers_is_refused():
    """The before-validator looks through `| None` to the list's entries, as through Annotated."""
    from pydantic import ValidationError

    from llmfast.recipe import StrictModel

    class Settings(StrictModel):
        sizes: list[int] | None = None

    with pytest.raises(ValidationError, match="sizes.0"):
        Settings.model_validate({"sizes": [True, 2]})
    assert Settings.model_validate({"sizes": [1, 2]}).sizes == [1, 2] and Settings().sizes is None


def test_a_pipe_given_as_a_file_is_named_so(tmp_path):
    """A FIFO as the perplexity text was "file not found" though it is there (s43's review)."""
    import os

    os.mkfifo(tmp_path / "fifo.txt")
    path = tmp_path / "e.yaml"
    path.write_text(f"model: m\neval: {{perplexity: {{text: {tmp_path / 'fifo.txt'}}}}}\n")
    with pytest.raises(UserError, match=r"e\.yaml:2: eval\.perplexity\.text: .*fifo\.txt is not a regular file"):
        load_recipe(path, EvalRecipe)


def test_set_index_bounds_a_null_section_and_empty_key_parts():
    """Three edges of --set no test held (s44's mutation audit): the last index of a list and the one past it, a
    section written with nothing after it (`lora:` is null in YAML), and a key with an empty part."""
    from llmfast.overrides import apply_overrides, parse_overrides

    data = {"x": [0, 1]}
    apply_overrides(data, parse_overrides(["x.1=5"]))
    assert data == {"x": [0, 5]}
    for key in ("x.2=5", "x.-1=5"):
        with pytest.raises(UserError, match=r"is not an index of a list of 2 items"):
            apply_overrides({"x": [0, 1]}, parse_overrides([key]))
    data = {"lora": None}
    apply_overrides(data, parse_overrides(["lora.r=4"]))
    assert data == {"lora": {"r": 4}}
    for pair in ("a..b=1", ".a=1", "a.=1", "=1", "a"):
        with pytest.raises(UserError, match="expected KEY=VALUE with a dotted key"):
            parse_overrides([pair])


def test_a_positive_flag_refuses_zero_negatives_nan_and_inf():
    """argtypes.positive: what serve's --max-model-len, --tensor-parallel-size and --timeout take."""
    import argparse

    from llmfast.argtypes import positive

    assert positive(int)("3") == 3 and positive(float)("0.5") == 0.5
    for kind, text in ((int, "0"), (int, "-2"), (float, "0"), (float, "-0.1"), (float, "nan"), (float, "inf"),
                       (float, "-inf")):
        with pytest.raises(argparse.ArgumentTypeError, match="give a positive number"):
            positive(kind)(text)
    with pytest.raises(argparse.ArgumentTypeError, match="'2.5' is not a whole number"):
        positive(int)("2.5")


def test_a_list_or_mapping_given_as_a_method_name_is_one_line(tmp_path):
    """`quantization: {method: [w4]}` (a name written as a YAML list) was a TypeError traceback from the registry's
    `in` (unhashable 'list'); it is the unknown-method line naming the recipe's line (s46's mutation audit)."""
    from llmfast.quant import QUANTIZERS
    from llmfast.recipe import QuantizeRecipe

    path = tmp_path / "q.yaml"
    for written, shown in (("[w4]", "['w4']"), ("{a: 1}", "{'a': 1}")):
        path.write_text(f"model: m\nquantization: {{method: {written}}}\noutput: o\n")
        with pytest.raises(UserError, match=rf"q\.yaml:2: quantization: unknown quantization method "
                                            rf"'{re.escape(shown)}'; choose from bitnet, bnb4, w4"):
            load_recipe(path, QuantizeRecipe)
    assert ["w4"] not in QUANTIZERS and "w4" in QUANTIZERS


def test_the_defaults_docs_finetune_md_lists_are_the_schemas():
    """docs/finetune.md's recipe table names each default (`lr` 2e-4, `keep_checkpoints` 2, ...): a default changed in
    one and not the other passed every test (s46's mutation audit)."""
    from llmfast.recipe import DataConfig, EvalConfig, EvalRecipe, LoraConfig, PerplexityConfig, TrainConfig

    rows = {m[0]: m[1] for m in re.findall(r"^\| `(\w+)`\s*\| (.*)\|$", (REPO / "docs" / "finetune.md").read_text(),
                                           re.M)}
    checked = 0
    for section, schema in (("data", DataConfig), ("lora", LoraConfig), ("train", TrainConfig)):
        for key, text in re.findall(r"`(\w+)` (true|false|[0-9][0-9.e-]*|`[\w-]+`)", rows[section]):
            documented = {"true": True, "false": False}.get(text, text.strip("`"))
            default = schema.model_fields[key].default
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                documented = float(documented)
            assert default == documented, (section, key, default, text)
            checked += 1
    assert checked == 17, checked
    # docs/eval.md: `{text, max_tokens 16384, context 1024, stride 512}`; 16, 48, `float32`; runs/eval/results.json
    p = PerplexityConfig.model_fields
    assert (p["max_tokens"].default, p["context"].default, p["stride"].default) == (16384, 1024, 512)
    e = EvalConfig.model_fields
    assert (e["batch_size"].default, e["max_new_tokens"].default, e["dtype"].default) == (16, 48, "float32")
    assert EvalRecipe.model_fields["output"].default == Path("runs/eval/results.json")


def test_edges_of_calibration_spans_and_the_held_out_fraction():
    """heldout_tokens equal to skip_tokens fills the evaluated span exactly (no overlap: taken); eval_fraction 1 would
    hold out every row (refused); s46's mutation audit found neither edge tested."""
    from pydantic import ValidationError

    from llmfast.recipe import CalibrationText, DataConfig

    text = CalibrationText.model_validate({"text": str(TEXT), "skip_tokens": 2048, "heldout_tokens": 2048})
    assert text.heldout_tokens == text.skip_tokens == 2048
    with pytest.raises(ValidationError, match="eval_fraction\n  Input should be less than 1"):
        DataConfig.model_validate({"train": str(DATES), "eval_fraction": 1})
    assert DataConfig.model_validate({"train": str(DATES), "eval_fraction": 0}).eval_fraction == 0


def test_an_alias_that_contains_itself_is_one_line(tmp_path):
    """A YAML anchor referred to inside its own value is a structure without end: one line, not a RecursionError
    traceback from the line index."""
    from llmfast.recipe import read_yaml

    path = tmp_path / "r.yaml"
    path.write_text("model: m\nloop: &a [1, *a]\n")
    with pytest.raises(UserError, match=r"r\.yaml: a YAML alias refers to its own anchor .*: remove it"):
        read_yaml(path)


def test_a_key_yaml_reads_as_a_number_is_blamed_on_its_own_line(tmp_path):
    """`5: 3` is the number 5 to pydantic and the text "5" in the line index: the error named line 1 (or the line of
    its section) instead of the key's own (s46's mutation audit)."""
    path = tmp_path / "e.yaml"
    path.write_text("model: x\neval: {}\n5: 3\n")
    with pytest.raises(UserError, match=r"e\.yaml:3: 5: Keys should be strings \(got 5\)"):
        load_recipe(path, EvalRecipe)
    path.write_text("model: x\neval:\n  batch_size: 4\n  7: 3\n")
    with pytest.raises(UserError, match=r"e\.yaml:4: eval\.7: Keys should be strings \(got 7\)"):
        load_recipe(path, EvalRecipe)


def test_a_recipe_read_from_a_pipe(tmp_path):
    """`llmfast eval <(envsubst < recipe.yaml)` gives a pipe (/dev/fd/N): it was "recipe /dev/fd/63 not found" though
    it is there and reads as a file does (s46's mutation audit)."""
    import os
    import threading

    fifo = tmp_path / "recipe.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text(GOOD.replace("OUT", str(tmp_path / "r.json"))),
                              daemon=True)  # blocked forever where nothing reads the pipe
    writer.start()
    try:
        recipe = load_recipe(fifo, EvalRecipe)
    finally:
        writer.join(timeout=10)
    assert recipe.eval.batch_size == 4 and recipe.output == tmp_path / "r.json"
    with pytest.raises(UserError, match=rf"recipe {tmp_path / 'nope.yaml'} not found"):
        load_recipe(tmp_path / "nope.yaml", EvalRecipe)


def test_a_bounded_number_in_a_union_is_named_by_its_key_alone(tmp_path):
    """`request_rate: -1` (a number with bounds, or "inf") was blamed on `workload.request_rate.constrained-float`,
    a key that does not exist: pydantic's tag for the union's member (s46's mutation audit)."""
    from llmfast.recipe import BenchRecipe

    path = tmp_path / "b.yaml"
    path.write_text("variants: [{name: a, model: m}]\nworkload:\n  request_rate: -1\n")
    with pytest.raises(UserError, match=r"^[^ ]*b\.yaml:3: workload\.request_rate: Input should be greater than 0 "
                                        r"\(got -1\)$"):
        load_recipe(path, BenchRecipe)
    with pytest.raises(UserError, match=r"b\.yaml \(--set workload\.request_rate\): workload\.request_rate: Input "
                                        "should be greater than 0"):
        load_recipe(path, BenchRecipe, ["workload.request_rate=0"])


def test_an_unknown_key_unlike_any_lists_the_known_ones(tmp_path):
    """No close match, no did-you-mean: the section's keys are listed instead (s46's mutation audit: untested)."""
    path = _write(tmp_path, GOOD)
    with pytest.raises(UserError, match=r"\(--set eval\.zzz\): unknown key 'eval\.zzz' \(known keys: perplexity, "
                                        r"tasks, batch_size, max_new_tokens, dtype\)$"):
        load_recipe(path, EvalRecipe, ["eval.zzz=1"])


def test_an_error_inside_a_section_set_whole_is_blamed_on_that_set(tmp_path):
    """`--set 'eval.perplexity={text: ...}'` replaces the section: an error in a key inside it is the --set's, not
    the recipe file's line (s46's mutation audit: only exact keys were tested)."""
    path = _write(tmp_path, GOOD)
    with pytest.raises(UserError, match=r"recipe\.yaml \(--set eval\.perplexity\): eval\.perplexity\.text: file not "
                                        "found: no/such.txt"):
        load_recipe(path, EvalRecipe, ["eval.perplexity={text: no/such.txt}"])


def test_a_union_members_tag_is_not_part_of_the_key(tmp_path):
    """`target_modules` is `all-linear` or a list: pydantic's error path holds the member (`literal['all-linear']`),
    which the message leaves out (s46's mutation audit: no test reached that tag)."""
    from llmfast.recipe import FinetuneRecipe

    path = tmp_path / "f.yaml"
    path.write_text(f"model: m\ndata: {{train: {DATES}}}\nlora:\n  target_modules: 5\noutput: o\n")
    with pytest.raises(UserError, match=r"f\.yaml:4: lora\.target_modules: Input should be 'all-linear' \(got 5\)$"):
        load_recipe(path, FinetuneRecipe)


@pytest.mark.parametrize("schema, text, said", [
    # a list's entry of the wrong kind is named, not the whole list blamed as no path (the path member's report),
    # in words rather than pydantic's "Input is not a valid path for <class 'pathlib.Path'>"
    ("FinetuneRecipe", f"data: {{train: [{DATES}, null]}}", r"f\.yaml:1: data\.train\.1: not a path: give a "
                                                             r"file or folder name \(got null\)$"),
    ("FinetuneRecipe", f"data: {{train: [[{DATES}]]}}", r"f\.yaml:1: data\.train\.0: not a path: give a file or "
                                                          r"folder name \(got a list\)$"),
    ("FinetuneRecipe", f"data: {{train: {DATES}, eval: [{DATES}, nope]}}", r"f\.yaml:1: data\.eval\.1: not found"),
    ("FinetuneRecipe", f"data: {{train: {DATES}}}\nlora: {{target_modules: [q_proj, 5]}}",
     r"f\.yaml:2: lora\.target_modules\.1: Input should be a valid string \(got 5\)"),
    # a literal's mismatch is no better a report than the number member's wrong kind (s50 said "should be 'inf'")
    ("BenchRecipe", "workload: {request_rate: [1]}", r"f\.yaml:1: workload\.request_rate: Input should be a valid "
                                                     r"number$"),
])
def test_a_unions_error_is_the_member_that_took_the_values_kind(tmp_path, schema, text, said):
    """A union's members each report (pydantic): the one that says what is wrong inside the value is shown (s50)."""
    from llmfast import recipe

    path = tmp_path / "f.yaml"
    rest = "model: m\noutput: o" if schema == "FinetuneRecipe" else "variants: [{name: a, model: m}]"
    path.write_text(f"{text}\n{rest}\n")
    with pytest.raises(UserError, match=said):
        load_recipe(path, getattr(recipe, schema))


def test_files_joined_by_a_comma_are_told_to_be_a_list(tmp_path):
    """LLaMA-Factory's `dataset: a,b` (docs/finetune.md compares it): here one file's name, not found; the error says
    how to write two (s50)."""
    from llmfast.recipe import FinetuneRecipe

    path = tmp_path / "f.yaml"
    path.write_text(f"model: m\ndata: {{train: {DATES}}}\noutput: o\n")
    with pytest.raises(UserError, match=r"\(--set data\.eval\): data\.eval: not found: a\.jsonl,b\.jsonl: several "
                                        r"files are a YAML list, \[a\.jsonl, b\.jsonl\]"):
        load_recipe(path, FinetuneRecipe, ["data.eval=a.jsonl,b.jsonl"])


@pytest.mark.parametrize("weight, said", [
    ("{filter: mlp}", r"m\.yaml:4: required key 'models\.0\.parameters\.weight\.value' is missing$"),
    ("{value: [1, [2]]}", r"m\.yaml:4: models\.0\.parameters\.weight\.value\.1: "),
])
def test_a_merge_parameters_error_names_a_key_it_has(tmp_path, weight, said):
    """pydantic tags a scalar union's members `bool`, `int`, ...: 'weight.bool: Input should be a valid boolean' named
    a key no recipe has, for any wrong value (the member tags' strip missed them; s50's review)."""
    from llmfast.merge.config import load_config

    path = tmp_path / "m.yaml"
    path.write_text(f"merge_method: linear\nmodels:\n  - model: a\n    parameters: {{weight: {weight}}}\n  - model: b\n")
    with pytest.raises(UserError, match=said):
        load_config(path)
