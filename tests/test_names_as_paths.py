"""Names a user writes that become file names (a bench variant's logs and quality files), and links inside inputs:
a bad name is one line at recipe load with nothing on disk; a model folder of symbolic links (a hub cache's
snapshot) loads as its files do."""

import json
import os

import pytest
import torch

from conftest import run_cli
from llmfast.errors import UserError
from llmfast.recipe import BenchRecipe, load_recipe


def _bench(tmp_path, model, *variants, baseline="first"):
    path = tmp_path / "bench.yaml"
    rows = "".join(f"  - {{name: {json.dumps(name)}, model: {model}, engine: {engine}}}\n" for name, engine in variants)
    path.write_text(f"variants:\n{rows}baseline: {baseline}\noutput: {tmp_path / 'out'}\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("name", ["../x", "a/b", "/abs", ".", "..", "", "-a", "a\x00b", "a\nb", "a:b", "a b",
                                  "v" * 201])
def test_a_variant_name_that_is_no_plain_file_name_is_refused_at_load(tmp_path, tiny_dir, name):
    """It becomes part of hf-NAME-cN.log, server-NAME.log and quality-NAME.predictions.jsonl in the output folder: a
    path separator, `..`, NUL or newline must not reach a path, and a 250-byte name ran the whole bench, every point
    failing on `File name too long`, exit 0."""
    code, out, err = run_cli("bench", "run", str(_bench(tmp_path, tiny_dir, (name, "hf"))))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "variants.0.name" in err and "output folder" in err
    assert ("at most 200 bytes" in err) == (len(name) > 200)
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bench.yaml"]


def test_names_up_to_200_bytes_and_names_of_llmfast_files_load(tmp_path, tiny_dir):
    """The longest name's longest file (hf-NAME-baseline-cN.log, quality-NAME.predictions.jsonl) fits 255 bytes; a
    variant named `report` or `results.json` writes hf-report-cN.log, never over report.md or results.json."""
    names = ["v" * 200, "report", "results.json", "llmfast.json", "A", "a"]  # case apart: two files on Linux
    recipe = load_recipe(_bench(tmp_path, tiny_dir, *((n, "hf") for n in names)), BenchRecipe)
    assert [v.name for v in recipe.variants] == names
    longest = f"quality-{names[0]}.predictions.jsonl"
    assert len(f"hf-{names[0]}-baseline-c64.log".encode()) <= 255 and len(longest.encode()) <= 255


def test_a_variant_named_as_another_ones_baseline_is_refused(tmp_path, tiny_dir):
    """Variant X's transformers baseline logs to hf-X-baseline-cN.log, the files of a variant named X-baseline: the
    two runs' output went to one file (opened for appending); without a baseline the name is free."""
    path = _bench(tmp_path, tiny_dir, ("a", "auto"), ("a-baseline", "hf"))
    code, _, err = run_cli("bench", "run", str(path))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "variant 'a-baseline'" in err and "baseline of variant 'a'" in err and "baseline: none" in err
    assert not (tmp_path / "out").exists()
    assert len(load_recipe(_bench(tmp_path, tiny_dir, ("a", "auto"), ("a-baseline", "hf"), baseline="none"),
                           BenchRecipe).variants) == 2
    with pytest.raises(UserError, match="baseline of variant 'a'"):
        load_recipe(_bench(tmp_path, tiny_dir, ("a", "auto"), ("a-baseline", "hf"), baseline="all"), BenchRecipe)


def test_a_model_folder_of_links_loads_as_its_files(tmp_path, tiny_dir):
    """A hub cache's snapshot is links into blobs/ (relative, outside the snapshot folder): checked and loaded as
    the files themselves, the same logits."""
    from llmfast.modelfiles import check_model_dir
    from llmfast.models import load_model, load_tokenizer

    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(tiny_dir.iterdir())):
        (blobs / f"blob{i}").write_bytes(f.read_bytes())
        os.symlink(os.path.relpath(blobs / f"blob{i}", snap), snap / f.name)
    assert check_model_dir(snap) == snap
    ids = load_tokenizer(snap)("the cat sat", return_tensors="pt").input_ids
    with torch.no_grad():
        got, want = load_model(snap)(ids).logits, load_model(tiny_dir)(ids).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("dead", ["config.json", "model.safetensors", "tokenizer.json"])
def test_a_dead_link_among_a_models_files_is_named_as_one(tmp_path, tiny_dir, dead):
    """A snapshot whose blob is gone: the link and where it points, not 'no config.json' or 'No such file' for a
    file `ls` shows; a dead link to a file nothing loads (a README) is no matter."""
    from llmfast.modelfiles import check_model_dir

    model = tmp_path / "m"
    model.mkdir()
    for f in tiny_dir.iterdir():
        os.symlink(f, model / f.name)
    os.symlink(tmp_path / "gone" / "readme", model / "README.md")
    assert check_model_dir(model) == model
    (model / dead).unlink()
    os.symlink(tmp_path / "gone" / dead, model / dead)
    with pytest.raises(UserError) as e:
        check_model_dir(model)
    assert str(e.value).startswith(f"{model / dead} is a symbolic link to {tmp_path / 'gone' / dead}, which does "
                                   "not exist: restore what it points to")


def test_a_model_folder_that_is_a_dead_link_is_named_as_one(tmp_path, tiny_dir, monkeypatch):
    """A model folder that is a link to one that is gone (a disk not mounted): 'not found' for a folder `ls` shows,
    and one named as ORG/NAME was looked up on the hub; a link to a folder loads as that folder."""
    from llmfast.models import check_model_spec, resolve_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    os.symlink(tiny_dir, tmp_path / "models" / "live")
    assert resolve_model("models/live") == tmp_path / "models" / "live"
    os.symlink(tmp_path / "gone" / "llama", tmp_path / "models" / "llama")
    for check in (resolve_model, check_model_spec):
        with pytest.raises(UserError, match=rf"^models/llama is a symbolic link to {tmp_path / 'gone' / 'llama'}, "
                                            "which does not exist: restore what it points to"):
            check("models/llama")


@pytest.mark.parametrize("name", ["t\n", "../t", "t/u", "", "t\x00"])
def test_a_chain_stage_name_that_is_no_plain_file_name_is_refused(tmp_path, name):
    """A stage's output is the folder OUT/NAME: 't\\n' passed re.match (`$` matches before a last newline) and
    made a folder named with a newline."""
    path = tmp_path / "chain.yaml"
    stage = "{type: tasks, with: {tasks: [dates], train: 5, test: 2}}"
    path.write_text(f"output: {tmp_path / 'run'}\nstages:\n  {json.dumps(name)}: {stage}\n", encoding="utf-8")
    code, out, err = run_cli("run", str(path))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"stage name {name!r} must be letters, digits" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chain.yaml"]
