"""What the config fuzz of session 59 (helper f1) found: recipe values that were a traceback, or a refusal that named
neither the key nor the working folder's real role. Each case must end with exit code 2, one `llmfast: error:` line
naming the key, and the working folder as it was. Refusals only: no case reaches a model's weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "eval" / "text" / "persuasion.txt"
TASK = ROOT / "eval" / "tasks" / "dates" / "test.jsonl"
LONG = "x" * 300  # one name past the file system's 255 bytes: `File name too long` from the first stat()

RECIPES = {
    "eval": "model: {M}\neval: {{tasks: [{{name: t, path: " + str(TASK) + ", limit: 2}}], max_new_tokens: 2}}\n"
            "output: out.json\n",
    "finetune": "model: {M}\ndata: {{train: " + str(TASK) + ", max_length: 64}}\ntrain: {{steps: 1}}\noutput: out\n",
    "quantize": "model: {M}\nquantization: {{method: w4}}\ndata: {{text: " + str(TEXT) + ", skip_tokens: 512, "
                "heldout_tokens: 128, calibration_tokens: 256, window: 64}}\noutput: out\n",
    "sparsify": "model: {M}\nsparsify: {{method: teal}}\ndata: {{text: " + str(TEXT) + ", skip_tokens: 512, "
                "heldout_tokens: 128, calibration_tokens: 256, window: 64}}\noutput: out\n",
    "merge": "merge_method: task_arithmetic\nbase_model: {M}\nmodels: [{{model: {M}, parameters: {{weight: 1.0}}}}]\n",
    "run": "output: {OUT}\nstages:\n  data: {{type: tasks, with: {{tasks: [dates], train: 10, test: 5}}}}\n",
    "bench": "variants: [{{name: v, model: {M}, engine: hf}}]\nworkload: {{num_prompts: 2, input_len: 8, output_len: 2, "
             "max_concurrency: [2]}}\nbaseline: none\noutput: out\n",
}

CASES = [  # (verb, --set, what the line must hold)
    # a name past 255 bytes: a traceback (OSError: File name too long) from the path's first stat()
    ("eval", f"model={LONG}", "model: a name in this path is 300 bytes"),
    ("eval", f"output={LONG}", "output: a name in this path is 300 bytes"),
    ("eval", f"eval.tasks.0.path={LONG}", "eval.tasks.0.path: a name in this path is 300 bytes"),
    ("finetune", f"data.train=sub/{LONG}", "data.train: a name in this path is 300 bytes"),
    ("quantize", f"output={LONG}", "output: a name in this path is 300 bytes"),
    ("sparsify", f"data.text={LONG}", "data.text: a name in this path is 300 bytes"),
    ("bench", f"variants.0.lora={LONG}", "variants.0.lora: a name in this path is 300 bytes"),
    # '' was Path('.'), the working folder: eval's output a traceback (has an empty name), finetune's data.train the
    # folder read as data ("output out is inside the input ."), a model '' the working folder
    ("eval", "output=", "output: an empty name"),
    ("eval", "model=", "model: an empty name"),
    ("finetune", "data.train=", "data.train: an empty name"),
    ("finetune", "model=", "model: an empty name"),
    ("quantize", "data.conversations=", "data.conversations.0: an empty name"),
    ("sparsify", "output=", "output: an empty name"),
    ("merge", f"base_model={LONG}", "base_model: a name in this path is 300 bytes"),
    ("merge", "models.0.model=", "models.0.model: an empty name"),
    # 1e300 became inf in float32: the run stopped at its first step, after writing its output folder
    ("finetune", "train.lr=1.0e300", "train.lr: must be at most 3.403e+38"),
    ("quantize", "quantization={method: w4, iters: 4, lr: 1.0e300}", "lr: must be at most 3.403e+38"),
    # a rank past int64 overflowed torch's tensor sizes in peft: a traceback (TypeError), exit 1; 2**31 - 1 asks
    # for 1 TiB, the out-of-memory line
    ("finetune", "lora.r=1000000000000000000000000000000", "lora.r: Input should be less than or equal to 2147483647"),
    # 1e30 samples overflowed a C size in the sampling loop: a traceback (OverflowError), exit 1
    ("quantize", "quantization={method: bitnet, qat_steps: 1, teacher_samples: 1000000000000000000000000000000}",
     "quantization.teacher_samples: 1000000000000000000000000000000 samples: give at most 2147483647"),
    # a chain's output that is a file: a traceback (NotADirectoryError) from listing it
    ("run", "output=recipe.yaml", "output recipe.yaml is a file: give a folder"),
]


def _run(verb: str, overrides: list[str], model: Path, where: Path, monkeypatch) -> tuple[int, str]:
    recipe = where / "recipe.yaml"
    recipe.write_text(RECIPES[verb].format(M=model, OUT=where / "run"))
    monkeypatch.chdir(where)
    before = sorted(where.rglob("*"))
    argv = (["bench", "run"] if verb == "bench" else [verb]) + [str(recipe)] + (["out"] if verb == "merge" else [])
    code, _, err = run_cli(*argv, *(a for o in overrides for a in ("--set", o)))
    assert sorted(where.rglob("*")) == before, "a refusal left files behind"
    return code, err


@pytest.mark.parametrize("verb,override,expected", CASES, ids=[f"{c[0]}-{c[1][:24]}" for c in CASES])
def test_adversarial_value_is_one_line_naming_the_key(verb, override, expected, tiny_dir, tmp_path, monkeypatch):
    code, err = _run(verb, [override], tiny_dir, tmp_path, monkeypatch)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("llmfast: error:"), err
    assert expected in err, err


def test_quantize_text_too_short_for_a_huge_skip_names_skip_tokens(tiny_dir, tmp_path, monkeypatch):
    # said 'data.calibration_tokens needs 10...256 (10... skipped for the evaluation + 256)': the key set was not named
    code, err = _run("quantize", ["data.skip_tokens=1000000000000"], tiny_dir, tmp_path, monkeypatch)
    assert code == 2 and err.count("\n") == 1, err
    assert "data.skip_tokens + data.calibration_tokens needs" in err, err


@pytest.mark.parametrize("argv", [["serve", LONG], ["serve", "{M}", "--log", LONG], ["serve", "{M}", "--lora", f"a={LONG}"],
                                  ["export", LONG, "out"]],
                         ids=["serve-model", "serve-log", "serve-lora", "export-adapter"])
def test_a_name_too_long_for_the_file_system_in_a_flag_is_one_line(argv, tiny_dir, tmp_path, monkeypatch):
    """A positional's or a flag's path past 255 bytes (no recipe schema checks those) was a traceback: File name too
    long, from the first stat() of it; serve stops at its preflight here (the name is refused before vLLM starts)."""
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    code, _, err = run_cli(*(a.format(M=tiny_dir) for a in argv))
    assert code == 2 and err.count("\n") == 1 and err.startswith("llmfast: error:"), err
    assert "File name too long: a file system takes at most 255 bytes per name" in err, err
    assert sorted(tmp_path.rglob("*")) == before


def test_a_data_file_named_in_another_encoding_is_taken(tiny_dir, tmp_path):
    """Review R2: the name-length check counted str.encode()'s bytes, which refuses the surrogates a Latin-1 name
    on disk (caf\\xe9) reaches Python with: data.train of such a file was 'utf-8 codec can't encode' (it trained
    before the check). Its bytes on disk (os.fsencode) are what is counted."""
    import os

    from llmfast.recipe import FinetuneRecipe, load_recipe

    data = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9.jsonl"))
    data.write_bytes(TASK.read_bytes())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPES["finetune"].format(M=tiny_dir))
    assert load_recipe(recipe, FinetuneRecipe, [f"data.train={data}"]).data.train == data


def test_an_eval_results_name_leaves_room_for_the_files_named_after_it(tiny_dir, tmp_path, monkeypatch):
    """Review R2: a results name of 222-255 bytes passed the file system's limit, then eval's predictions file
    (STEM.predictions.jsonl) or its temporary name beside it did not: File name too long after the whole run, or a
    line blaming a name the user never gave. Refused on its key at 201 bytes (as an output folder's name)."""
    code, err = _run("eval", [f"output={'r' * 196}.json"], tiny_dir, tmp_path, monkeypatch)
    assert code == 2 and err.count("\n") == 1, err
    assert "output: its name is 201 bytes, and files named after it are written beside it" in err, err


def test_a_name_too_long_shows_the_path_that_is_too_long_with_its_end():
    """Review R2: the line showed the first 80 characters of the error's first file: for a rename whose second name
    is the long one, or a name llmfast derived from the user's (its end), not the part that was too long."""
    import errno

    from llmfast.errors import as_user_error

    long = "/tmp/" + "d" * 100 + "/" + "n" * 300 + ".predictions.jsonl"
    e = OSError(errno.ENAMETOOLONG, "File name too long", "/tmp/short", None, long)
    line = str(as_user_error(e))
    assert line.startswith(f"{long[:40]}...{long[-37:]}: File name too long"), line
