"""LoRA adapters as task vectors, and merged adapters: rank concatenation (exact) or an SVD re-rank.

A PEFT LoRA adapter on a linear layer W (out x in) changes it by delta = scale * B @ A, with A (r x in),
B (out x r) and scale = alpha / r (alpha / sqrt(r) with rsLoRA). That delta is the adapter's task vector
(Ilharco et al. 2023, "Editing Models with Task Arithmetic"), built here one layer at a time.

A merge that is linear in the task vectors (task arithmetic, linear) of adapters is itself a LoRA
adapter: sum_i c_i * s_i * B_i @ A_i = [c_1 s_1 B_1 | c_2 s_2 B_2 | ...] @ [A_1; A_2; ...], so ranks
concatenate with no error. Any merged delta, e.g. after TIES trimming (Yadav et al. 2023) or DARE drops
(Yu et al. 2023), can be brought back to rank R by a truncated SVD (Eckart-Young: the best rank-R
approximation in Frobenius norm); the relative error ||delta - delta_R||_F / ||delta||_F is reported.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmfast import adapter_options
from llmfast.errors import UserError

if TYPE_CHECKING:
    import torch

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                  r"(?:\.[^.]+)?\.weight$|^(?:base_model\.model\.)?(?P<module2>.+)\.(?P<part2>lora_embedding_[AB])$")


@dataclasses.dataclass
class LoraModule:
    base_name: str  # the base weight this module changes, e.g. model.layers.0.mlp.up_proj.weight
    a_key: str
    b_key: str
    scale: float
    rank: int
    transposed: bool  # delta = (B @ A).T: an nn.Embedding, or a fan_in_fan_out layer (GPT-2's Conv1D, (in, out))
    embedding: bool = False


@dataclasses.dataclass
class LoraAdapter:
    path: Path
    config: dict[str, Any]
    file: Path
    modules: dict[str, LoraModule]  # base weight name -> module

    @classmethod
    def open(cls, path: Path) -> "LoraAdapter":
        from safetensors import safe_open

        path = Path(path)
        cfg = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        # other PEFT types, DoRA, saved modules, biases, and options whose B @ A is not the task vector
        found = adapter_options.refusal(cfg, "merge")
        if found is not None:
            raise UserError(found.message("merge", path=path, cfg_path=path / "adapter_config.json"))
        file = path / "adapter_model.safetensors"
        if not file.is_file():
            raise UserError(f"{path}: no adapter_model.safetensors (only safetensors adapters are read)")
        parts: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
        with safe_open(file, framework="pt") as st:
            for key in st.keys():
                m = _KEY.match(key)
                if not m:
                    raise UserError(f"{path}: unexpected tensor {key} in the adapter ({_what(key)}); export it "
                                    "with `llmfast export` and merge the full model instead")
                module = m.group("module") or m.group("module2")
                part = m.group("part") or m.group("part2")
                parts.setdefault(module, {})[part] = (key, tuple(st.get_slice(key).get_shape()))
        modules = {}
        # GPT-2's Conv1D stores its weight (in, out): PEFT's delta for it is (B @ A).T, as for an embedding
        fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
        for module, p in parts.items():
            emb = "lora_embedding_A" in p
            a = p.get("lora_embedding_A" if emb else "lora_A")
            b = p.get("lora_embedding_B" if emb else "lora_B")
            if a is None or b is None:
                raise UserError(f"{path}: module {module} has only one of its LoRA A/B matrices")
            if len(a[1]) != 2 or len(b[1]) != 2 or a[1][0] != b[1][1]:
                raise UserError(f"{path}: module {module}'s LoRA matrices have shapes A {list(a[1])} and B "
                                f"{list(b[1])}: expected (rank, in) and (out, rank) of one rank; re-create the adapter")
            r = a[1][0]
            patterns = cfg.get("alpha_pattern") or {}
            # no lora_alpha: PEFT's LoraConfig default (8), which PEFT applies (not alpha = r)
            alpha = _pattern(patterns if isinstance(patterns, dict) else {}, module, cfg.get("lora_alpha", 8))
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
                raise UserError(f"{path / 'adapter_config.json'}: the LoRA alpha of {module} is {alpha!r}, not a "
                                "positive number: fix lora_alpha / alpha_pattern, or re-create the adapter")
            alpha = float(alpha)
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            modules[f"{module}.weight"] = LoraModule(f"{module}.weight", a[0], b[0], scale, r,
                                                     emb or fan_in_fan_out, emb)
        return cls(path=path, config=cfg, file=file, modules=dict(sorted(modules.items())))

    def base_spec(self) -> str | None:
        from llmfast.artifacts import read_manifest

        manifest = read_manifest(self.path) or {}
        return manifest.get("base_model_path") or self.config.get("base_model_name_or_path")

    def factors(self, name: str) -> "tuple[torch.Tensor, torch.Tensor, float] | None":
        """(A, B, scale) in float32 for base weight `name`, or None when the adapter does not touch it."""
        from safetensors import safe_open

        mod = self.modules.get(name)
        if mod is None:
            return None
        with safe_open(self.file, framework="pt") as st:
            a = st.get_tensor(mod.a_key).float()
            b = st.get_tensor(mod.b_key).float()
        if mod.transposed:  # PEFT's embedding LoRA: A (r x vocab), B (dim x r), delta (vocab x dim) = (B @ A).T;
            # a Conv1D's: A (r x in), B (out x r), delta (in x out) = (B @ A).T
            a, b = b.T.contiguous(), a.T.contiguous()
        return a, b, mod.scale

    def delta(self, name: str) -> "torch.Tensor | None":
        f = self.factors(name)
        if f is None:
            return None
        a, b, scale = f
        return (b @ a).mul_(scale)


def _what(key: str) -> str:
    """What an adapter tensor other than a LoRA matrix is, by PEFT's names for them."""
    for part, what in (("base_layer", "a whole embedding or head PEFT saved beside its LoRA"),
                       ("trainable_tokens", "trainable token rows (trainable_token_indices)"),
                       ("lora_magnitude_vector", "a DoRA magnitude"), ("lora_B.bias", "a LoRA bias (lora_bias)")):
        if part in key:
            return what
    return "not a LoRA A/B matrix"


def _pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    # PEFT matches pattern keys as a regex against the end of the module name.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):  # grouped: a key `a|b` is either, at the end
            return value
    return default


def check_adapter_base(adapter: LoraAdapter, base_dir: Path, base_spec: str, where: str) -> None:
    """The adapter was trained on `base_dir` (same path, same spec, or the same weights by their fingerprint)."""
    _fit_layout(adapter, base_dir)
    trained_on = adapter.base_spec()
    if not trained_on:
        raise UserError(f"{where}: {adapter.path} does not say which base model it was trained on "
                        "(no base_model_name_or_path in adapter_config.json)")
    p = Path(trained_on).expanduser()
    if p.exists() and p.resolve() == Path(base_dir).resolve():
        return
    if trained_on == base_spec:
        return
    if (p / "config.json").is_file():
        from llmfast.modelfiles import weights_fingerprint

        # the first bytes of every tensor, not the norms alone: a LoRA export keeps its base's norms and shapes
        if weights_fingerprint(p) == weights_fingerprint(base_dir):
            return
        raise UserError(f"{where}: adapter {adapter.path} was trained on {trained_on}, not on base_model "
                        f"{base_spec}: task vectors must share the base")
    from llmfast.artifacts import lineage_ref, read_manifest

    # recorded absolute; a project moved since is still matched by the model's name as its recipe gave it
    manifest = read_manifest(adapter.path) or {}
    parents = manifest.get("parents") or []
    if base_spec in parents or lineage_ref(base_spec) in parents or base_spec == (manifest.get("recipe") or {}).get(
            "model"):
        return
    raise UserError(f"{where}: adapter {adapter.path} was trained on {trained_on}, which is not base_model "
                    f"{base_spec} (and is not here to compare): task vectors must share the base; if base_model is a "
                    f"copy of {trained_on}, set base_model_name_or_path in {adapter.path / 'adapter_config.json'} "
                    "to its path")


def _fit_layout(adapter: LoraAdapter, base_dir: Path) -> None:
    """Each module's delta transposed as PEFT applies it to this base: by the layer's type, not by the config's
    fan_in_fan_out (PEFT sets it false for a torch Linear and true for a Conv1D, with a warning; a square Llama
    projection read the config's way was merged transposed)."""
    from llmfast.loading import meta_skeleton, tied_modules

    skeleton = meta_skeleton(base_dir)
    hit = sorted({f"{n}.weight" for n in tied_modules(skeleton)} & set(adapter.modules))
    if hit:
        raise UserError(f"{adapter.path}: LoRA on {hit[0].removesuffix('.weight')} of a base that ties its input "
                        "embedding and output head: merged, it would change both; use it unmerged (eval, bench "
                        "--engine hf), or retrain it without that module in target_modules")
    for mod in adapter.modules.values():
        try:
            layer = skeleton.get_submodule(mod.base_name.removesuffix(".weight"))
        except AttributeError:  # not in this base: check_adapter_shapes names it
            continue
        mod.transposed = mod.embedding or type(layer).__name__ == "Conv1D"


def check_adapter_shapes(adapter: LoraAdapter, ref_tensors: dict[str, Any], where: str) -> None:
    from safetensors import safe_open

    with safe_open(adapter.file, framework="pt") as st:
        for name, mod in adapter.modules.items():
            if name not in ref_tensors:
                raise UserError(f"{where}: adapter {adapter.path} changes {name}, which the base model lacks: "
                                "it was trained on another architecture")
            a = tuple(st.get_slice(mod.a_key).get_shape())
            b = tuple(st.get_slice(mod.b_key).get_shape())
            out_in = (b[0], a[1]) if not mod.transposed else (a[1], b[0])
            if tuple(ref_tensors[name][0]) != out_in:
                raise UserError(f"{where}: adapter {adapter.path} changes {name} as a {list(out_in)} matrix, but the "
                                f"base's is {list(ref_tensors[name][0])}: it was trained on another base")


def svd_rerank(delta: "torch.Tensor", rank: int) -> "tuple[torch.Tensor, torch.Tensor, float, float]":
    """(A, B, tail energy, total energy) with B @ A the best rank-`rank` approximation of `delta`."""
    import torch

    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    r = min(rank, s.numel())
    b = u[:, :r] * s[:r]
    a = vh[:r]
    if r < rank:  # pad to the requested rank so every module has one rank
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1)
        a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])], dim=0)
    energy = s.double().pow(2)
    return a.contiguous(), b.contiguous(), float(energy[r:].sum()), float(energy.sum())


def adapter_config_for(first: LoraAdapter, base_dir: Path, rank: int, targets: list[str],
                       names: list[str]) -> dict[str, Any]:
    """The merged adapter's config: rank `rank`, alpha = rank (scale 1; the scales live in B), on exactly the modules
    `targets` (weight names) of the base's tensors `names`: their short names where those name these modules and no
    others, else their full names; the first input's layer and module filters are dropped (they are its own)."""
    cfg = dict(first.config)
    short = sorted({t.rsplit(".", 2)[-2] for t in targets})
    named = {n for n in names if n.endswith(".weight") and n.rsplit(".", 2)[-2] in short}
    modules = short if named == set(targets) else sorted(t.removesuffix(".weight") for t in targets)
    cfg.update({"r": rank, "lora_alpha": float(rank), "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
                "target_modules": modules, "base_model_name_or_path": str(base_dir), "lora_dropout": 0.0,
                "inference_mode": True})
    for key in ("layers_to_transform", "layers_pattern", "exclude_modules"):
        if key in cfg:
            cfg[key] = None
    return cfg
