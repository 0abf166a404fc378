"""The weight files of a model folder, read in one place (modelfiles.model_weight_files) for the checks, the merge,
the offline cache lookup, the w4 artifact's readers and writer and the bench report's size: the files transformers
loads, sorted, an index's missing shards named in one line."""

import json
from pathlib import Path
from typing import Any

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


def test_a_sparse_artifact_takes_the_models_weights_and_sidecars_not_a_stray_copy(tmp_path: Path) -> None:
    """TEAL and Deja Vu artifacts link (or, across file systems, copy) their source's files: a consolidated copy
    beside the shards came along (14.5 GB for Mistral-7B on another disk) and counted in the space check. The
    index's shards, a thresholds file a Deja Vu artifact builds on, config and tokenizer still come."""
    from llmfast.sparse.thresholds import source_files

    d = _folder(tmp_path, {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
                ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "consolidated.safetensors",
                 "sparsity.safetensors", "backup.safetensors"))
    (d / "tokenizer.json").write_text("{}")
    assert [f.name for f in source_files(d)] == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "sparsity.safetensors", "tokenizer.json"]
    (d / "model.safetensors.index.json").unlink()  # neither model.safetensors nor an index: nothing says which
    assert len([f for f in source_files(d) if f.suffix == ".safetensors"]) == 5


def test_bin_only_folders_get_the_merges_own_line(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    (d / "pytorch_model.bin").write_bytes(b"not read")
    assert not _has_weights(d)
    with pytest.raises(UserError, match="only PyTorch .bin weights"):
        merge_io.weight_files(d)


# A w4 artifact as AutoRound writes a large model's: shards and an index. Embeddings and the final norm in one shard,
# each decoder layer in one of its own.
W4_SHARDS = ("model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors")


def _w4_tensors(tiny_dir: Path, scale: float) -> dict[str, Any]:
    """The tiny model's tensors with its layers' linear maps GPTQ-packed as AutoRound does, every level 0 and every
    zero point 1 (stored as 0): each dequantized weight is minus its group's scale, `scale` everywhere."""
    import torch
    from safetensors.torch import load_file

    out = {}
    for name, t in load_file(str(tiny_dir / "model.safetensors")).items():
        if ".layers." in name and name.endswith("proj.weight"):
            rows, cols, base = t.shape[0], t.shape[1], name.removesuffix(".weight")
            out[f"{base}.qweight"] = torch.zeros(cols // 8, rows, dtype=torch.int32)
            out[f"{base}.qzeros"] = torch.zeros(cols // 32, rows // 8, dtype=torch.int32)
            out[f"{base}.scales"] = torch.full((cols // 32, rows), scale, dtype=torch.float16)
        else:
            out[name] = t
    return out


def _w4_artifact(tmp_path: Path, tiny_dir: Path) -> Path:
    """The sharded artifact (scales 1), and beside it a backup made before a scale tuning (`model.untuned`, the same
    tensors with scales 2, read last in name order) and a consolidated copy under other names (as Mistral's hub
    repos ship one): neither is the model's weights."""
    from safetensors.torch import save_file as save_torch

    art = tmp_path / "w4"
    art.mkdir()
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "auto-round", "packing_format": "auto_round:auto_gptq", "bits": 4,
                                  "group_size": 32, "sym": True}
    (art / "config.json").write_text(json.dumps(cfg))
    tensors = _w4_tensors(tiny_dir, 1.0)
    shard = {k: W4_SHARDS[int(k.split(".")[2]) + 1] if ".layers." in k else W4_SHARDS[0] for k in tensors}
    for file in W4_SHARDS:
        save_torch({k: v for k, v in tensors.items() if shard[k] == file}, str(art / file))
    (art / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shard}))
    save_torch(_w4_tensors(tiny_dir, 2.0), str(art / "model.untuned.safetensors"))
    save_file({"layers.0.attention.wq.weight": np.zeros((8, 8), np.float32)}, str(art / "consolidated.safetensors"))
    return art


def test_a_w4_artifact_is_read_and_its_scales_written_in_its_own_files_not_a_stray_copy(tmp_path: Path,
                                                                                        tiny_dir: Path) -> None:
    """Fixed: every reader of a w4 artifact took each *.safetensors of its folder. The transformers engine refused it
    for the consolidated copy's tensors ('do not match its config'), or loaded the backup's weights over the model's;
    the scale tuning trained the backup's scales and wrote the tuned ones into both (twice the count, the user's
    backup rewritten); the bench report's size counted all three files. Now the index's shards alone, each as it
    is, and a shard without quantized layers is not rewritten."""
    import torch

    from llmfast.bench.lineage import model_size
    from llmfast.quant.scale_tuning import quantized_layers, student_from_artifact, write_scales
    from llmfast.quant.w4_format import load_dequantized

    art = _w4_artifact(tmp_path, tiny_dir)
    model = load_dequantized(art, 32, "float32")
    layers = quantized_layers(art)
    assert len(layers) == 2 * 7 and all(torch.equal(x["scales"], torch.ones_like(x["scales"])) for x in layers.values())
    for name in layers:  # minus the shards' scale: level 0, zero point 1
        assert torch.equal(model.get_submodule(name).weight, torch.full_like(model.get_submodule(name).weight, -1.0))
    strays = {f: (art / f).read_bytes() for f in ("model.untuned.safetensors", "consolidated.safetensors")}
    embeddings = (art / W4_SHARDS[0]).stat().st_ino
    student, names = student_from_artifact(art, 32)
    for name in names:
        student.get_submodule(name).factor.data.fill_(3.0)
    assert write_scales(art, student, names) == 2 * 7
    assert {f: (art / f).read_bytes() == strays[f] for f in strays} == dict.fromkeys(strays, True)
    assert (art / W4_SHARDS[0]).stat().st_ino == embeddings  # embeddings and norm only: left as they are
    assert all(torch.equal(x["scales"], torch.full_like(x["scales"], 3.0)) for x in quantized_layers(art).values())
    # the report's bytes: the shards (and a sparse artifact's thresholds), not the copies beside them
    save_file({"mlp_in": np.zeros(2, np.float32)}, str(art / "sparsity.safetensors"))
    counted = [*W4_SHARDS, "sparsity.safetensors"]
    assert model_size(art)["file_bytes"] == sum((art / f).stat().st_size for f in counted)


def test_a_w4_artifact_missing_a_shard_is_one_line_naming_it(tmp_path: Path, tiny_dir: Path) -> None:
    """Fixed: the transformers engine said the weights 'do not match its config (missing ...): quantize the model
    again', the scale tuning read the layers of the shards there were, the report's size came out smaller."""
    from llmfast.bench.lineage import model_size
    from llmfast.quant.scale_tuning import quantized_layers
    from llmfast.quant.w4_format import load_dequantized

    art = _w4_artifact(tmp_path, tiny_dir)
    (art / W4_SHARDS[2]).unlink()
    for read in (lambda: load_dequantized(art, 32, "float32"), lambda: quantized_layers(art), lambda: model_size(art)):
        with pytest.raises(MissingShards, match=rf"index\.json: names 1 missing file\(s\) \({W4_SHARDS[2]}\)"):
            read()
