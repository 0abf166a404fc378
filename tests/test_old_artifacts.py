"""Artifacts an older llmfast wrote, read by today's verbs: each reads as the artifact a new llmfast would write, or
is refused in one line. The old manifest shapes are literal dicts below, taken from artifacts that commits of
2026-11-26 to 2026-12-05 made (commits 9f9952c, aca555c, 27dcf28, 3a2632e, 074a79b, c76a7f5); each test builds
today's folder (a copy of the tiny model) and writes its llmfast.json in the old shape."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

RELUFY = {"steps": 2, "batch_size": 2, "lr": 2e-05, "warmup_ratio": 0.05, "weight_decay": 0.0, "max_grad_norm": 1.0,
          "l1": 0.0, "samples": 0, "seed": 0, "log_every": 1, "save_every": None}  # 2026-11-29: no target, no cut
W4 = {"group_size": 32, "sym": True, "iters": 0, "optimized_rtn": False, "nsamples": 32,
      "lr": None}  # 2026-11-29: no seed, batch_size, awq, scale_steps
BITNET = {"qat_steps": 2, "lr": 0.0002, "batch_size": 2, "lambda_warmup": 0.5, "teacher_samples": 0, "save_every": 1,
          "seed": 0}  # 2026-11-29: no eval_every, no device
TEAL = {"target": 0.5}  # 2026-11-29: no sites (MLP only), no weights fingerprint
DEJAVU = {"rank": 4, "lookahead": False, "label_sparsity": None, "target_recall": 0.95, "active_fraction": None,
          "steps": 2, "batch_tokens": 64, "lr": 0.003, "weight_decay": 0.0, "pos_weight": 1.0,
          "seed": 0}  # 2026-11-30: no active_budget, no threshold_share


def _model(root: Path, tiny: Path, name: str, manifest: dict[str, Any], relu: str | None = None) -> Path:
    """A copy of the tiny model with `manifest` as its llmfast.json; `relu`: the architecture a ReLU config names."""
    path = Path(shutil.copytree(tiny, root / name))
    if relu:
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu", "architectures": [relu]}))
    (path / "llmfast.json").write_text(json.dumps({"recipe": {}, "metrics": {}, **manifest}))
    return path


def _relufy_export(root: Path, tiny: Path, arch: str) -> Path:
    """A relufy model, an adapter trained on it and its export, as llmfast wrote them before 2026-12-06: the export's
    manifest records no `sparsity` (its config.json has the ReLU)."""
    relufy = _model(root, tiny, "relufy", {"stage": "sparsify", "parents": [str(tiny)],
                                           "sparsity": {"method": "relufy", "config": RELUFY}}, relu=arch)
    adapter = root / "lora" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "llmfast.json").write_text(json.dumps({"stage": "finetune", "parents": [str(relufy)],
                                                      "base_model_path": str(relufy), "quantization": None}))
    return _model(root, tiny, "export", {"stage": "export", "parents": [str(adapter)], "base_quantization": None},
                  relu=arch)


def _variant(path: Path) -> Any:
    from llmfast.bench.engines.base import resolve_variant

    return resolve_variant("v", str(path), None, None)


def relufy_export_runs_sparse(root: Path, tiny: Path) -> None:
    from llmfast.bench.engines import ENGINES

    v = _variant(_relufy_export(root, tiny, "LlmfastReluLlamaForCausalLM"))
    assert v.sparsity == "relufy" and ENGINES.get("hf-sparse").can_run(v) is None  # as a new export's
    for verb_made in ("merge", "quantize"):  # the same for what merge and quantize made of a relufy model
        m = _model(root, tiny, verb_made, {"stage": verb_made, "parents": [str(root / "relufy")]},
                   relu="LlmfastReluLlamaForCausalLM")
        assert _variant(m).sparsity == "relufy", verb_made


def relufy_export_before_the_plugin_is_refused_by_serve(root: Path, tiny: Path) -> None:
    """2026-11-29: a relufy model named LlamaForCausalLM, whose ReLU vLLM's Llama would not run: serve's check
    refuses its export as it does the relufy model (it passed, and vLLM failed after its start-up)."""
    from llmfast.errors import UserError
    from llmfast.serve.server import prepare_spec

    with pytest.raises(UserError, match="is a ReLU-fied Llama whose config.json names vLLM's own Llama, .*an llmfast "
                                        "before its vLLM plugin, or a save_pretrained outside llmfast.* Make it again "
                                        "with `llmfast sparsify`"):
        prepare_spec(str(_relufy_export(root, tiny, "LlamaForCausalLM")))


def plain_export_stays_plain(root: Path, tiny: Path) -> None:
    """A model that is no relufy artifact's descendant is not taken for one, even with a ReLU config."""
    src = _model(root, tiny, "relu-src", {"stage": "convert", "parents": ["x.gguf"]}, relu="LlamaForCausalLM")
    adapter = root / "a"
    adapter.mkdir()
    (adapter / "llmfast.json").write_text(json.dumps({"stage": "finetune", "parents": [str(src)],
                                                      "base_model_path": str(src)}))
    export = _model(root, tiny, "ex", {"stage": "export", "parents": [str(adapter)]}, relu="LlamaForCausalLM")
    assert _variant(export).sparsity is None
    (adapter / "llmfast.json").write_text(json.dumps({"stage": "finetune", "parents": [str(export)]}))  # a cycle
    assert _variant(export).sparsity is None


def qlora_adapter_true(root: Path, tiny: Path) -> None:
    """2026-11-26: `quantization: true`, the settings in the recipe."""
    from llmfast.models import adapter_base_quantization

    adapter = root / "qlora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "llmfast.json").write_text(json.dumps({"stage": "finetune", "quantization": True,
                                                      "recipe": {"quantization": {"type": "nf4", "double_quant": True}}}))
    spec = adapter_base_quantization(adapter)
    assert spec.method == "bnb4" and spec.config.type == "nf4" and spec.config.double_quant


def quantized_configs_without_new_settings(root: Path, tiny: Path) -> None:
    for method, config in (("w4", W4), ("bitnet", BITNET)):
        path = _model(root, tiny, method, {"stage": "quantize", "quantization": {"method": method, "config": config}})
        v = _variant(path)
        assert v.quantization.method == method and v.sparsity is None
    assert v.quantization.config.device == "auto"
    assert _variant(root / "w4").quantization.config.awq is False


def sparse_configs_without_new_settings(root: Path, tiny: Path) -> None:
    from llmfast.sparse.base import artifact_sparsity

    teal = _model(root, tiny, "teal", {"stage": "sparsify", "sparsity": {"method": "teal", "config": TEAL}})
    method, config = artifact_sparsity(teal)
    assert method.name == "teal" and config.sites == ["mlp"] and config.target == 0.5
    relufy = _model(root, tiny, "relufy", {"stage": "sparsify", "sparsity": {"method": "relufy", "config": RELUFY}},
                    relu="LlmfastReluLlamaForCausalLM")
    assert artifact_sparsity(relufy)[1].target is None  # plain ReLU, no cut: what the old artifact is
    dejavu = _model(root, tiny, "dejavu", {"stage": "sparsify", "sparsity": {"method": "dejavu", "config": DEJAVU}})
    assert artifact_sparsity(dejavu)[1].active_budget is None and _variant(dejavu).sparsity == "dejavu"


def unmarked_work_folder_is_not_resumed(root: Path, tiny: Path) -> None:
    """2026-12-04: a killed relufy run's OUTPUT.checkpoints, with no .llmfast-work mark (so no record of the model it
    trained): refused, and the line no longer says to mark it by hand, which resumed it from any model of the same
    shapes (a mix of two models' training, exit 0)."""
    from conftest import run_cli

    work = root / "relu.checkpoints"
    step = work / "checkpoints" / "step-000002"
    step.mkdir(parents=True)
    (step / "state.json").write_text(json.dumps({"step": 2, "settings": {"steps": 400}, "rows": "bb26"}))
    (work / "relufy.json").write_text(json.dumps({**RELUFY, "steps": 400}))
    (work / "train_log.jsonl").write_text('{"step": 1}\n')
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    text = Path(__file__).resolve().parents[1] / "eval" / "text" / "persuasion.txt"
    (root / "r.yaml").write_text(f"model: {tiny}\nsparsify: {{method: relufy, config: {{steps: 400, batch_size: 2}}}}\n"
                                 f"data: {{text: {text}, skip_tokens: 256, calibration_tokens: 256, heldout_tokens: 128, window: 64}}\n"
                                 f"output: {root / 'relu'}\n")
    code, _, err = run_cli("sparsify", str(root / "r.yaml"), "--resume")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "before 2026-12-05" in err and "delete it" in err and ".llmfast-work" not in err, err
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == sorted([*before, Path("r.yaml")])


def _fingerprint_of_2026_12_05(path: Path, every_file: bool) -> str:
    """weights_fingerprint as llmfast wrote it from 2026-12-05 23:57 (c76a7f5: over every safetensors file, thresholds
    too) to 2026-12-06 01:05 (over model.safetensors only), neither with config.json."""
    import hashlib
    import struct

    found: dict[str, bytes] = {}
    for f in sorted(path.glob("*.safetensors")) if every_file else [path / "model.safetensors"]:
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
            for name, info in header.items():
                if name != "__metadata__":
                    begin, end = info["data_offsets"]
                    fh.seek(8 + n + begin)
                    found[name] = found.get(name, b"") + f"{info['dtype']}:{info['shape']}:".encode() + fh.read(
                        min(4096, end - begin))
    h = hashlib.sha256()
    for name in sorted(found):
        h.update(name.encode() + b"\0" + found[name] + b"\0")
    return h.hexdigest()[:32]


def fingerprints_of_2026_12_05(root: Path, tiny: Path) -> None:
    """A sparse artifact, a quantize/sparsify run's mark and a finetune run's base.json of c76a7f5 record the weights'
    fingerprint as it was then: the same weights, not refused as other ones ("its weights are not those it was made
    with", "holds other weights than the run started on" before); other weights still are."""
    import torch
    from safetensors.torch import save_file

    from llmfast.work_dir import WORK_MARK, check_resumed_run
    from llmfast.errors import UserError
    from llmfast.finetune.checkpoint import SavedTraining, check_fit
    from llmfast.modelfiles import weights_fingerprint
    from llmfast.sparse.base import artifact_sparsity

    teal = _model(root, tiny, "teal", {"stage": "sparsify", "sparsity": {"method": "teal", "config": TEAL}})
    save_file({"down_in": torch.ones(2)}, teal / "sparsity.safetensors")
    for every_file in (True, False):
        spec = {"method": "teal", "config": TEAL, "weights": _fingerprint_of_2026_12_05(teal, every_file)}
        (teal / "llmfast.json").write_text(json.dumps({"stage": "sparsify", "sparsity": spec}))
        assert artifact_sparsity(teal)[0].name == "teal"
        work = root / f"out{every_file}.checkpoints"
        work.mkdir()
        run = {"verb": "sparsify", "model": str(tiny), "method": "relufy", "weights": weights_fingerprint(tiny)}
        (work / WORK_MARK).write_text(json.dumps({"run": {**run, "weights": _fingerprint_of_2026_12_05(tiny, False)}}))
        check_resumed_run(work, run)
    (work / WORK_MARK).write_text(json.dumps({"run": {**run, "weights": _fingerprint_of_2026_12_05(teal, True)}}))
    with pytest.raises(UserError, match="holds a run on other weights"):
        check_resumed_run(work, run)
    ckpt = root / "killed" / "checkpoints" / "step-000002"
    ckpt.mkdir(parents=True)
    (root / "killed" / "base.json").write_text(json.dumps({"weights": _fingerprint_of_2026_12_05(tiny, True)}))
    saved = SavedTraining(adapter={}, optimizer={"state": {}, "param_groups": []}, scheduler={}, rng={})
    try:  # past the weights, the empty adapter and optimizer may be refused: not for other weights
        check_fit(saved, ckpt, rank=4, base=None, model_path=tiny)
    except UserError as e:
        assert "holds other weights" not in str(e), e
    (root / "killed" / "base.json").write_text(json.dumps({"weights": _fingerprint_of_2026_12_05(teal, True)}))
    with pytest.raises(UserError, match="holds other weights than the run"):
        check_fit(saved, ckpt, rank=4, base=None, model_path=tiny)


@pytest.mark.parametrize("check", [relufy_export_runs_sparse, relufy_export_before_the_plugin_is_refused_by_serve,
                                   plain_export_stays_plain, qlora_adapter_true,
                                   quantized_configs_without_new_settings, sparse_configs_without_new_settings,
                                   unmarked_work_folder_is_not_resumed, fingerprints_of_2026_12_05],
                         ids=lambda f: f.__name__)
def test_old_manifest_reads_as_a_new_one(check, tmp_path: Path, tiny_dir: Path) -> None:
    check(tmp_path, tiny_dir)
