"""Export: a full model with a LoRA adapter merged into its weights.

For an adapter trained on a quantized base (QLoRA), the base is loaded quantized exactly as it was trained
against (in the training's dtype), dequantized by its quantization method, and the adapter merged into that: the
merged model reproduces the trained model, not the adapter applied to the original weights. The merge is in
float32 wherever the base is not already in the output dtype, so each weight is rounded to it once. Merging into
4-bit weights is refused: the LoRA delta is far smaller than one 4-bit quantization step, so rounding would throw
most of it away.

Everything that can be wrong is checked before a model is loaded: the dtype, the adapter and base
directories, and the output (an existing one only with `overwrite`; never the adapter or the base).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmfast.artifacts import atomic_dir, check_output, check_space, read_manifest, write_manifest
from llmfast.errors import UserError
from llmfast.finetune.stored_float32 import (StoredTensors, loading_dtype, rereadable, round_loaded,
                                           rounded_into, widen)

MERGE_DTYPES = ("float32", "bfloat16", "float16")


def _check_dtype(dtype: str) -> None:
    from llmfast.quant import is_quantized_format

    if is_quantized_format(dtype) or dtype.lower() in ("int4", "4bit", "4-bit"):
        raise UserError(f"merging into {dtype} weights is refused: a LoRA delta is much smaller than one 4-bit "
                        "quantization step and would be rounded away; export in float32/bfloat16/float16 and "
                        "quantize the merged model afterwards")
    if dtype not in MERGE_DTYPES:
        raise UserError(f"export dtype '{dtype}' unknown: use one of {', '.join(MERGE_DTYPES)}")


def base_of(adapter_dir: Path, manifest: dict[str, Any], given: str | None = None) -> Path:
    """The local base model directory an adapter was trained on: `given` (export's --base: builtin:NAME, a
    directory, a .gguf or a hub id), else the one its manifest or adapter_config.json records. A recorded folder
    that is gone is looked for where the recipe's path points from here; a recorded built-in is converted again
    and a hub id fetched (plain PEFT adapters name their base so)."""
    from llmfast.modelfiles import read_json_file
    from llmfast.models import check_model_dir, is_hub_id, resolve_model

    cfg = read_json_file(adapter_dir / "adapter_config.json", "adapter config", "re-create the adapter")
    recorded = manifest.get("base_model_path") or (cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None)
    typed = (manifest.get("recipe") or {}).get("model")
    specs = [s for s in (recorded, typed) if isinstance(s, str) and s.strip()]
    if given is not None:
        base = resolve_model(given)
        _check_given_base(adapter_dir, specs, base, given)
        return base
    for spec in specs:  # recorded absolute; moved since: the recipe's path from here
        if Path(spec).expanduser().is_dir():
            return check_model_dir(Path(spec).expanduser())
    # a hub id only as plain PEFT records one (a recipe's `models/tiny` has the same form: never fetched)
    hub = None if manifest.get("base_model_path") or not isinstance(cfg, dict) else cfg.get("base_model_name_or_path")
    for spec in specs:
        if spec.startswith("builtin:") or (spec == hub and is_hub_id(spec)) or (
                spec.lower().endswith(".gguf") and Path(spec).is_file()):
            try:
                return resolve_model(spec)
            except UserError as e:
                raise UserError(f"{adapter_dir}: its base model {spec}: {e}; or give the base it was trained on "
                                "with --base") from None
    raise UserError(f"{adapter_dir}: its base model {recorded!r} is not a local directory: put it back there, give "
                    "it with --base, or run from the folder its recipe's model path is relative to")


def _check_given_base(adapter_dir: Path, specs: list[str], base: Path, given: str) -> None:
    """--base names a model whose weights differ from the recorded base's, where that one is here to compare: the
    export would merge the adapter into a model it was not trained on. The same model in another dtype (its
    bfloat16 release) is the same base."""
    for spec in specs:
        recorded = Path(spec).expanduser()
        if recorded.is_dir() and (recorded / "config.json").is_file():
            if recorded.resolve() != base.resolve() and _values(recorded) != _values(base):
                raise UserError(f"--base {given}: {adapter_dir} was trained on {recorded}, whose weights differ: give "
                                "that model, or leave --base out")
            return


def _values(model_dir: Path) -> dict[str, tuple[list[int], bytes]]:
    """Each weight's shape and its first 64 values rounded to bfloat16: equal for a model and its bfloat16 copy."""
    import torch
    from safetensors import safe_open

    from llmfast.modelfiles import model_weight_files

    found = {}
    for f in model_weight_files(model_dir, f"re-create the model in {model_dir}"):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open is not a dict
                part = st.get_slice(name)
                shape = list(part.get_shape())
                head = (st.get_tensor(name) if not shape else part[:64] if len(shape) == 1 else part[:1]).flatten()[:64]
                found[name] = (shape, head.to(torch.bfloat16).float().numpy().tobytes())
    return found


def _check_unmergeable_options(adapter_dir: Path) -> None:
    """Options with which a merged model is not the adapter PEFT runs: refused before anything loads."""
    from llmfast.modelfiles import read_json_file

    from llmfast.adapter_options import refusal

    cfg_path = adapter_dir / "adapter_config.json"
    found = refusal(read_json_file(cfg_path, "adapter config", "re-create the adapter"), "export")
    if found is not None:  # layer_replication, aLoRA: what PEFT runs is not one weight a layer
        raise UserError(found.message("export", path=adapter_dir, cfg_path=cfg_path))


def _check_merge_fits(adapter_dir: Path, base: Path) -> None:
    """On the base's modules (meta device, before loading): LoRA on the embedding or the head of a model that ties
    them (PEFT applies it to that one module, merged it changes the matrix both share), and LoRA-B biases on layers
    without a bias (PEFT refuses to merge them)."""
    from llmfast.loading import meta_skeleton, tied_modules
    from llmfast.modelfiles import safetensors_header

    model = meta_skeleton(base)
    stored = [k.removeprefix("base_model.model.") for k in safetensors_header(
        adapter_dir / "adapter_model.safetensors", "re-create the adapter") if k != "__metadata__"]
    for module in tied_modules(model):
        hit = [k for k in stored if k.startswith(f"{module}.lora_")]
        if hit:
            raise UserError(f"{adapter_dir}: LoRA on {module} ({hit[0]}) of a model that ties its input "
                            "embedding and output head: merged, it would change both; use it unmerged (eval, "
                            "bench --engine hf), or retrain it without that module in target_modules")
    for k in stored:
        if k.endswith(".lora_B.bias"):
            try:
                layer = model.get_submodule(k.removesuffix(".lora_B.bias"))
            except AttributeError:  # not this base's module: attach_adapter names the misfit
                continue
            if getattr(layer, "bias", None) is None:
                raise UserError(f"{adapter_dir}: lora_bias: {k} is a bias for {base}'s layer "
                                f"{k.removesuffix('.lora_B.bias')}, which has none, so PEFT cannot merge it; nothing "
                                "was written: use the adapter unmerged (eval, bench --engine hf)")


def _config_quantization(adapter_dir: Path, base: Path) -> Any:
    """The format of a quantized base that only its config.json names (a pre-quantized hub model such as Unsloth's
    `*-bnb-4bit`, which adapters are trained on): a bitsandbytes 4-bit one is dequantized like a QLoRA base (merged
    into the 4-bit weights, transformers could not save it: a traceback); another format is refused."""
    from llmfast.quant import already_quantized, parse_quantization
    from llmfast.quant.bnb4 import saved_4bit

    saved = saved_4bit(base)
    if saved is not None:
        return parse_quantization({"method": "bnb4", "type": saved[0], "double_quant": saved[1]},
                                  where=f"{base / 'config.json'}: quantization_config")
    found = already_quantized(base)
    if found:
        raise UserError(f"{adapter_dir}: its base {base} is quantized ({found}), which export cannot dequantize to "
                        "merge into: give the full-precision model it was made from with --base")
    return None


def _check_finite(model: Any, dtype: str) -> None:
    """Every merged weight finite: a base weight beyond float16's range loads as inf, and an adapter trained to NaN
    merges as NaN; either way the exported model's outputs would be NaN. Checked a slice at a time: isfinite of a
    whole embedding holds its absolute values and three masks (130 MB beside the built-in model's 270)."""
    import torch

    for name, t in model.state_dict().items():
        if t.is_floating_point() and not all(bool(torch.isfinite(part).all()) for part in t.reshape(-1).split(1 << 22)):
            fix = ("export in bfloat16 or float32 (--dtype): a weight is beyond float16's range (+-65504)"
                   if dtype == "float16" else "the base model or the adapter holds inf or NaN: retrain the adapter "
                   "(a lower learning rate) or check the base model")
            raise UserError(f"{name} is not finite once merged in {dtype}: {fix}")


def _merge(base: Path, adapter_dir: Path, dtype: str, qlora: Any, saved: Any, trained_in: str,
           on_layer: Callable[[Any], None] | None = None) -> Any:
    """The adapter merged into its base in float32 (the layers it changes), on the CPU, each weight then rounded to
    `dtype` once (as `_round_once` keeps or rounds it). A base stored wider than `dtype` or in mixed dtypes has each
    weight read again from its file and rounded as it loads, a changed layer read again in float32 for its merge
    (`_work_dtype`; whole in float32 where its tensors cannot be read by name). A QLoRA
    base (`qlora`, the adapter's recorded quantization) is quantized as it loads, in the dtype it was trained in
    (`trained_in`), a saved 4-bit one (`saved`, its format) loads in it; either is dequantized one layer at a time,
    each decoded in float32 and rounded before the next, a changed one once merged: the model is held in `dtype`
    plus one float32 layer, not whole in float32 (a 7B: 14 GB in bfloat16, not 28). `on_layer(model)` is called
    after each layer's merge, before it is rounded (a test counts the float32 bytes then held)."""
    import torch

    from llmfast.loading import from_pretrained, resize_for_adapter
    from llmfast.models import attach_adapter

    keep, changed, stored = _kept_float32(base, dtype), _changed_layers(adapter_dir), None
    if qlora is not None:
        # its NF4 codes, scales and what is not quantized are the trained model's only when loaded in the training's
        # dtype: quantized from float32 rather than bfloat16 weights, 89% of SmolLM2-135M's decoded weights differ
        model = qlora.quantizer.load_for_training(base, qlora.config, trained_in,
                                                  "cuda" if torch.cuda.is_available() else "cpu")
    elif saved is not None:
        model = from_pretrained(base, "float32")
    else:
        work, stored = _work_dtype(base, dtype)
        model = from_pretrained(base, work)
        if stored is not None:
            round_loaded(model, stored, _kept_in(dtype, keep))
    if qlora is not None or saved is not None:  # decoded as bitsandbytes decodes it for training, in float32
        want = _kept_in(dtype, keep)
        # a layer LoRA merges into stays in 4 bits until its merge (a saved module is loaded into: decoded now)
        deferred = _changed_layers(adapter_dir, only="lora_A")
        (qlora or saved).quantizer.dequantize_for_merge(model, "float32", store=want, defer=deferred)
        resize_for_adapter(model, adapter_dir)
        for name, p in model.named_parameters():  # what was not quantized: rounded from the training's dtype
            if p.is_floating_point() and not any(name.startswith(f"{layer}.") for layer in changed):
                p.data = p.data.to(want(name))
    else:
        resize_for_adapter(model, adapter_dir)
    # a LoRA layer is widened as its turn comes (_merge_each): all at once would hold every one in float32; one
    # whose base weight the adapter saves (PEFT's embedding layers) now, so that it loads into float32 unrounded
    lora_only = _changed_layers(adapter_dir, only="lora_A") - _changed_layers(adapter_dir, only="base_layer")
    _widen_changed(model, changed - lora_only, stored)
    merged = _merge_each(attach_adapter(model, adapter_dir, base), dtype, keep, on_layer, stored).to("cpu")
    _round_once(merged, dtype, keep)
    return merged


def _kept_in(dtype: str, keep: set[str]) -> Callable[[str], Any]:
    """The torch dtype a parameter (by its name in the exported model) is written in: float32 if `keep`s it."""
    import torch

    from llmfast.loading import torch_dtype

    target = torch_dtype(dtype)
    return lambda name: torch.float32 if name in keep else target


def _merge_each(model: Any, dtype: str, keep: set[str], on_layer: Callable[[Any], None] | None,
                stored: StoredTensors | None) -> Any:
    """PEFT's `model` merged and unloaded, each LoRA layer merged by PEFT on its own (its deferred 4-bit weight
    decoded first) and rounded to `dtype` before the next; what else PEFT merges (saved modules, trainable tokens)
    its own merge_and_unload merges, skipping the layers merged here. A base loaded rounded has each layer's
    weights re-read as `stored` (`widen`)."""
    import warnings

    from peft.tuners.lora import LoraLayer

    from llmfast.quant.bnb4 import decode_deferred

    want = _kept_in(dtype, keep)
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            layer, prefix = module.get_base_layer(), name.removeprefix("base_model.model.")
            decode_deferred(layer)
            narrow = {part: widen(p, f"{prefix}.{part}", stored)  # merged in float32, then rounded once (below)
                      for part, p in layer.named_parameters() if p.is_floating_point()}
            module.merge()
            if on_layer is not None:
                on_layer(model)
            for part, p in layer.named_parameters():
                if p.is_floating_point():
                    p.data = rounded_into(p.data, want(f"{prefix}.{part}"), narrow.get(part))
    for module in model.modules():  # one the adapter's config leaves without a LoRA layer: as it is stored
        decode_deferred(module)
    with warnings.catch_warnings():  # PEFT's "All adapters are already merged": those merged above
        warnings.filterwarnings("ignore", message="All adapters are already merged")
        return model.merge_and_unload()


def _changed_layers(adapter_dir: Path, only: str | None = None) -> set[str]:
    """The layers the adapter changes, named by its keys (`...q_proj.lora_A.weight`,
    `...embed_tokens.token_adapter...`, a saved module's `lm_head.weight`); those with an `only` part (`lora_A`)."""
    from llmfast.adapter_keys import adapter_module
    from llmfast.modelfiles import safetensors_header

    layers = set()
    for key in safetensors_header(adapter_dir / "adapter_model.safetensors", "re-create the adapter"):
        module, rest = adapter_module(key)
        if only is None or only in rest:
            layers.add(module)
    return layers - {""}


def _widen_changed(model: Any, layers: set[str], stored: StoredTensors | None) -> None:
    """The layers the adapter changes in float32 (a base loaded in a 16-bit --dtype keeps the rest in it), so each
    merges in float32 and is rounded once: PEFT adds a LoRA embedding's delta rounded to the weight's dtype (28% of
    a bfloat16 embedding's entries were then off the once-rounded sum). Read again as `stored` where the load
    rounded, by the name each weight is stored under (a tied head's is its embedding's)."""
    stored_as = {id(p): name for name, p in model.named_parameters()}
    for name in sorted(layers):
        try:
            layer = model.get_submodule(name)
        except AttributeError:  # not this base's: attach_adapter names the misfit
            continue
        for part, p in layer.named_parameters():
            if p.is_floating_point():
                widen(p, stored_as.get(id(p), f"{name}.{part}"), stored)


def _trained_in(manifest: dict[str, Any]) -> str:
    """The dtype a QLoRA adapter was trained in (its base quantized from weights in it), as finetune records it;
    float32, the stored weights widened exactly, where the manifest does not say."""
    found = (manifest.get("metrics") or {}).get("dtype")
    return found if found in MERGE_DTYPES else "float32"


def _work_dtype(base: Path, dtype: str) -> tuple[str, StoredTensors | None]:
    """The dtype a full-precision base loads in, and its stored tensors where each weight is to be read again by
    name (`round_loaded`, `widen`). `dtype` where the base stores every floating-point tensor in it (nothing is
    rounded as it loads; `_widen_changed` merges the adapter's layers in float32). A base stored in a wider or mixed
    dtype loads in the one most of it is stored in, each weight then read again and rounded to `dtype` once
    (stored_float32): loaded whole in float32 (s54), a float32 7B held 28 GB to write 14. Where its tensors cannot be
    read again by name (`rereadable`), in float32, into which 16-bit weights widen exactly."""
    from llmfast.modelfiles import stored_floats

    counts = stored_floats(base, f"re-create the model in {base}")
    if dtype == "float32" or set(counts) <= {dtype}:
        return dtype, None
    stored = rereadable(base)
    return (loading_dtype(counts), stored) if stored is not None else ("float32", None)


def _kept_float32(base: Path, dtype: str) -> set[str]:
    """Tensors a 16-bit export keeps in float32: those the base stores in float32 beside mostly 16-bit weights
    (norms, as many bfloat16 checkpoints keep them), as `merge` keeps each tensor's stored dtype; rounded, they
    would change the model its author saved. A float32 base's are all rounded to `dtype`."""
    from llmfast.modelfiles import model_weight_files, safetensors_header, stored_floats

    fix = f"re-create the model in {base}"
    counts = stored_floats(base, fix)
    if dtype == "float32" or not counts or max(counts, key=lambda d: counts[d]) == "float32":
        return set()
    return {k for f in model_weight_files(base, fix) for k, v in safetensors_header(f, fix).items()
            if k != "__metadata__" and v.get("dtype") == "F32"}


def _round_once(model: Any, dtype: str, keep: set[str]) -> None:
    """Every floating-point weight of the merged `model` in `dtype` (those in `keep` in float32), rounded from the
    float32 merge once; a tied head is its embedding, rounded with it."""
    from llmfast.loading import torch_dtype

    want = _kept_in(dtype, keep)
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.dtype != want(name):
            p.data = p.data.to(want(name))
    model.config.dtype = torch_dtype(dtype)  # what config.json says the model is: its weights' dtype, not the load's


def _check_arguments(adapter_dir: Path, out_dir: Path, dtype: str, overwrite: bool,
                     base: str | None) -> tuple[dict[str, Any], Path]:
    """(the adapter's manifest, its base's directory), with every argument checked from its files alone: a missing
    adapter, an existing output or an unknown dtype is one line before torch and transformers are imported (~5 s)."""
    from llmfast.models import check_adapter_dir

    _check_dtype(dtype)
    check_adapter_dir(adapter_dir)
    check_output(out_dir, overwrite, inputs=[adapter_dir])  # before the base is looked for (or fetched)
    _check_unmergeable_options(adapter_dir)
    manifest = read_manifest(adapter_dir) or {}
    found = base_of(adapter_dir, manifest, base)
    check_output(out_dir, overwrite, inputs=[adapter_dir, found])
    return manifest, found


def _own_template(adapter_dir: Path) -> object:
    """The chat template an adapter folder carries without a vocabulary (tokenizer_config.json alone, or
    chat_template.jinja) as its file holds it (any JSON value: the caller checks for text), or None; one saved
    with a byte-order mark is refused as the tokenizer's loader does."""
    from llmfast.modelfiles import chat_template_text
    from llmfast.models import check_chat_template_file

    check_chat_template_file(adapter_dir)
    return chat_template_text(adapter_dir)


def export_merged(adapter_dir: str | Path, out_dir: str | Path, dtype: str = "float32",
                  overwrite: bool = False, base: str | None = None) -> Path:
    """`adapter_dir` merged into its base model (`base`, else the one it records), written to `out_dir` in
    `dtype`."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    manifest, base = _check_arguments(adapter_dir, out_dir, dtype, overwrite, base)
    from transformers import AutoTokenizer

    from llmfast.modelfiles import has_tokenizer
    from llmfast.quant import manifest_quantization
    from llmfast.serve.stops import add_turn_end_stop
    from llmfast.serve.vllm_plugin import mark_relu_architecture
    from llmfast.sparse.derived import carried_sparsity, refuse_sparse_files

    _check_merge_fits(adapter_dir, base)
    # the thresholds or predictors fit the base's weights, not the merged ones (a TEAL artifact hard-links the
    # weights of the model it was made from, so --base names it as that model's equal)
    refuse_sparse_files(base, "export", "export onto the model it was made from (--base), then sparsify the export")
    quant = manifest_quantization(manifest, adapter_dir)
    # an adapter trained on a saved 4-bit artifact: its own format loads it (then dequantized like a QLoRA base)
    own = (manifest_quantization(read_manifest(base), base) or _config_quantization(adapter_dir, base)
           if quant is None else None)
    if own is not None and not own.quantizer.dequantizes:
        raise UserError(f"{adapter_dir}: its base {base} is quantized ({own.method}), which export cannot dequantize "
                        "to merge into: train the adapter on the full-precision model it came from")
    # Adapters shared by plain PEFT carry no tokenizer: then the base's is the one they were trained with. Loaded
    # before the merge, so a broken one is found before minutes of work.
    tokenizer_dir = adapter_dir if has_tokenizer(adapter_dir) else base
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - missing or corrupt tokenizer files: transformers' own errors
        from llmfast.loading import first_line

        raise UserError(f"{tokenizer_dir}: transformers cannot load its tokenizer ({type(e).__name__}: "
                        f"{first_line(e)}): restore its tokenizer files") from None
    if tokenizer_dir == base and isinstance(template := _own_template(adapter_dir), str):
        tokenizer.chat_template = template  # the one it was trained with (eval prompts it so; serve --lora judges it)

    if quant is None and own is None:  # the merged weights are the base's, in `dtype`
        from llmfast.loading import torch_dtype
        from llmfast.modelfiles import stored_shapes

        shapes = stored_shapes(base, f"re-create the model in {base}")
        check_space(out_dir, sum(math.prod(s) for s in shapes.values()) * torch_dtype(dtype).itemsize)
    merged = _merge(base, adapter_dir, dtype, quant, own, _trained_in(manifest))
    quant = quant or own
    _check_finite(merged, dtype)
    with atomic_dir(out_dir, overwrite=overwrite, inputs=[adapter_dir, base], guard=True) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        stop = add_turn_end_stop(tmp, tokenizer)  # replies end where the fine-tune taught them to (vLLM, eval)
        mark_relu_architecture(tmp)  # a ReLU-fied Llama stays one (save_pretrained writes LlamaForCausalLM)
        write_manifest(tmp, stage="export", parents=[str(adapter_dir)], recipe={"dtype": dtype},
                       metrics=manifest.get("metrics", {}),
                       base_quantization=quant.manifest() if quant is not None else None,
                       **carried_sparsity([base], tmp))  # a relufy base's ReLU (and cut) is the export's
    from llmfast.modelfiles import widened_note

    if (note := widened_note(base, out_dir, "--dtype")) is not None:  # a bfloat16 base exported in float32
        print(note, file=sys.stderr)
    if stop is not None:
        print(f"llmfast: note: {out_dir / 'generation_config.json'}: eos_token_id gains {stop} "
              f"({tokenizer.convert_ids_to_tokens(stop)}), the chat template's end of a reply, which vLLM and "
              "transformers would not stop at otherwise", file=sys.stderr)
    return out_dir
