"""LoRA and QLoRA set-up: the base model (16/32-bit, or quantized by a method of llmfast/quant) with PEFT adapters.

LoRA: Hu et al., 2021 (arXiv:2106.09685); rsLoRA scaling alpha/sqrt(r): Kalajdzievski, 2023
(arXiv:2312.03732); DoRA: Liu et al., 2024 (arXiv:2402.09353); QLoRA (NF4, double quantization):
Dettmers et al., 2023 (arXiv:2305.14314).

For QLoRA we do not call peft's `prepare_model_for_kbit_training`: it upcasts every non-quantized
parameter (embeddings, head, norms) to float32, which at a 152k vocabulary costs more memory than the
4-bit body saves. The frozen base stays in the compute dtype; only the adapters train (in float32 where
the compute dtype is 16-bit, as PEFT keeps them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmfast.errors import UserError

if TYPE_CHECKING:
    from llmfast.recipe import FinetuneRecipe


def pick_compute_dtype(requested: str) -> str:
    """bfloat16 on GPUs that have it, float16 on older ones, float32 on CPUs (fast path without AVX512-BF16)."""
    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def load_base(model_path: str, recipe: "FinetuneRecipe", dtype: str, device: str) -> Any:
    """The frozen base: in `dtype` on `device`, or quantized by the recipe's method (QLoRA) as it loads; a relufy
    model's shifted ReLU cut (in its config.json) on, so the adapter trains on the model as every verb runs it."""
    from llmfast.loading import from_pretrained
    from llmfast.sparse.relu_cut import apply_config_cut

    q = recipe.quantization
    if q is None:
        model = from_pretrained(model_path, dtype).to(device)
    else:
        model = q.quantizer.load_for_training(model_path, q.config, dtype, device)
    apply_config_cut(model, model_path)
    return model


def attach_lora(model: Any, recipe: "FinetuneRecipe") -> Any:
    from peft import LoraConfig, get_peft_model

    lc = recipe.lora
    for p in model.parameters():
        p.requires_grad_(False)
    if recipe.train.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs, so no input-embedding grad hook is needed.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    _refuse_tied_targets(model, lc.target_modules)
    config = LoraConfig(
        r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
        use_rslora=lc.rslora, use_dora=lc.dora, bias="none", task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:
        if "not found in the base model" in str(e) or "Target modules" in str(e):
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if "Linear" in type(m).__name__})
            raise UserError(f"lora.target_modules {lc.target_modules!r} match no layer of the model; "
                            f"its linear layers are: {', '.join(names)} (or use all-linear)") from None
        raise
    return peft_model


def _refuse_tied_targets(model: Any, targets: Any) -> None:
    """A LoRA on lm_head or embed_tokens where the two share one weight (tie_word_embeddings: SmolLM2, Llama 3.2,
    Gemma) changes both once merged, so the exported model is not the one trained; refused before training."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or out is None or inp.weight is not out.weight or isinstance(targets, str):
        return
    names = {n: m for n, m in model.named_modules() if m is inp or m is out}
    tied = sorted({n.rsplit(".", 1)[-1] for n in names} & set(targets))
    if tied:
        raise UserError(f"lora.target_modules: {tied[0]} shares its weight with the "
                        f"{'input embeddings' if tied[0] != 'embed_tokens' else 'output head'} in this model "
                        "(tie_word_embeddings): a LoRA on it would change both once merged, so the exported model "
                        "would not be the one trained; leave it out of the targets")


def trainable_parameters(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
