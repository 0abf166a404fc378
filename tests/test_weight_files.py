"""The weight files of a model folder, read in one place (modelfiles.model_weight_files) for the checks, the merge and
the offline cache lookup: the files transformers loads, sorted, an index's missing shards named in one line."""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from llmfast.errors import UserError
from llmfast.merge import io as merge_io
from llmfast.modelfiles import MissingShards, check_model_dir, model_weight_files, weight_files
from llmfast.offline import _has_weights

FIX = "re-create it"


def _folder(tmp_path: Path, shards: dict[str, str] | None = None, files: tuple[str, ...] = ()) -> Path:
    """A model folder: config.json, the safetensors `files`, and an index mapping tensor -> file (`shards`)."""
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for i, name in enumerate(files):
        save_file({f"t{i}": np.zeros(2, np.float32)}, str(d / name))
    if shards is not None:
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    return d


def test_model_safetensors_wins_over_an_index_beside_it_whose_shards_are_checked(tmp_path: Path) -> None:
    """transformers loads model.safetensors before an index beside it, so the merge reads that; vLLM reads the index
    and refuses one naming missing files, so the check names them and the cache lookup fetches them."""
    a = "model-00001-of-00001.safetensors"
    d = _folder(tmp_path, {"a": a}, ("model.safetensors",))
    assert model_weight_files(d, FIX) == merge_io.weight_files(d) == [d / "model.safetensors"]
    assert not _has_weights(d)
    with pytest.raises(MissingShards, match=rf"names 1 missing file\(s\) \({a}\)"):
        check_model_dir(d)
    save_file({"a": np.zeros(2, np.float32)}, str(d / a))
    assert model_weight_files(d, FIX) == [d / "model.safetensors"] and weight_files(d, FIX) == [d / a]
    assert _has_weights(d) and check_model_dir(d) == d


def test_shards_are_sorted_and_each_once_whatever_the_index_order(tmp_path: Path) -> None:
    """transformers reads sorted(set(weight_map.values())); the merge took the index's order."""
    b, a = "model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors"
    d = _folder(tmp_path, {"x": b, "y": a, "z": b}, (b, a))
    assert model_weight_files(d, FIX) == merge_io.weight_files(d) == weight_files(d, FIX) == [d / a, d / b]
    assert _has_weights(d)


def test_a_missing_shard_is_one_line_for_all_and_a_refetch_offline(tmp_path: Path) -> None:
    """An interrupted download: the merge named it only when it opened the file, the cache lookup fetches it again."""
    d = _folder(tmp_path, {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"},
                ("model-00001-of-00002.safetensors",))
    for read in (lambda: model_weight_files(d, FIX), lambda: merge_io.weight_files(d), lambda: check_model_dir(d)):
        with pytest.raises(MissingShards, match=r"index\.json: names 1 missing file\(s\) \(model-00002-of-00002"):
            read()
    assert not _has_weights(d)


@pytest.mark.parametrize(("index", "needle"), [
    ("{not json", "not valid JSON"), ('{"weight_map": {}}', "no 'weight_map'"), ('["a"]', "no 'weight_map'")])
def test_a_broken_index_is_kept_offline_and_named_by_the_check(tmp_path: Path, index: str, needle: str) -> None:
    """Fetching it again gives the same file: the cached copy is taken, and check_model_dir names the index (an empty
    weight_map too, which the cache lookup took for missing weights)."""
    d = _folder(tmp_path, {}, ("model-00001-of-00001.safetensors",))
    (d / "model.safetensors.index.json").write_text(index)
    assert _has_weights(d)
    for read in (lambda: check_model_dir(d), lambda: merge_io.weight_files(d)):
        with pytest.raises(UserError, match=needle) as e:
            read()
        assert not isinstance(e.value, MissingShards)


def test_stray_safetensors_without_index_are_not_the_models_weights(tmp_path: Path) -> None:
    """Without model.safetensors or an index transformers loads nothing: the cache lookup fetches the copy again
    (it took any *.safetensors for the weights), the merge says so; the check still reads every file's header."""
    d = _folder(tmp_path, None, ("consolidated.safetensors",))
    assert model_weight_files(d, FIX) == [] and not _has_weights(d)
    assert weight_files(d, FIX) == [d / "consolidated.safetensors"]  # the older fingerprints' files
    with pytest.raises(UserError, match="has no model.safetensors"):
        merge_io.weight_files(d)
    (d / "consolidated.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(UserError, match="consolidated.safetensors: 4 bytes, too short"):
        check_model_dir(d)


def test_bin_only_folders_get_the_merges_own_line(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    (d / "pytorch_model.bin").write_bytes(b"not read")
    assert not _has_weights(d)
    with pytest.raises(UserError, match="only PyTorch .bin weights"):
        merge_io.weight_files(d)
