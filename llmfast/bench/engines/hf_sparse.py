"""The transformers engine with llmfast's sparse MLP: `hf`'s generation loop on a sparse artifact loaded by the
sparse runtime (llmfast/sparse/runtime.py), so batch-1 decode skips the zeros the artifact makes.

Batches of more than one sequence run the same zeros on dense matmuls, like `hf` (it is the same model up to
float summation order); only batch 1 can be faster. `hf` stays available for the dense-with-zeros
comparison: name `engine: hf` on a variant of the same artifact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmfast.bench.engines.base import ENGINES, OfflineEngine, Variant

if TYPE_CHECKING:
    from llmfast.bench.metrics import RequestResult
    from llmfast.bench.workload import Request


class HfSparseEngine(OfflineEngine):
    name = "hf-sparse"
    family = "hf-sparse"
    label = "transformers + llmfast sparse MLP"

    def can_run(self, variant: Variant) -> str | None:
        from llmfast.sparse.runtime import RUNTIME_METHODS

        runs = f"the sparse MLP runs {', '.join(RUNTIME_METHODS)} artifacts"
        if not variant.sparsity:
            return f"{runs}; this model is not a sparse artifact"
        if variant.sparsity not in RUNTIME_METHODS:
            return f"{runs}, not {variant.sparsity} artifacts"
        if variant.lora is not None:
            return "the sparse MLP reads the base weights and would skip the LoRA adapter"
        from llmfast.quant import already_quantized

        # the second: a sparse artifact made over a quantized model (earlier versions of sparsify took one)
        if variant.quantization is not None or already_quantized(variant.model_dir):
            return ("the sparse MLP reads float weights, not quantized ones (the full-precision model it was "
                    "quantized from runs on hf-sparse)")
        from llmfast.modelfiles import describe_model_dir

        if describe_model_dir(variant.model_dir)["config"].get("mlp_bias"):  # SparseMLP refused it mid-run: a traceback, 0 tok/s
            return "the sparse MLP takes bias-free MLP projections, and this model has mlp_bias"
        return super().can_run(variant)

    def generate(self, variant: Variant, requests: list["Request"], *, dtype: str, batch_size: int,
                 ignore_eos: bool) -> tuple[list["RequestResult"], float]:
        from llmfast.bench.engines.hf import run_hf
        from llmfast.models import load_tokenizer
        from llmfast.sparse.runtime import load_sparse_model

        model = load_sparse_model(variant.model_dir, dtype)
        return run_hf(model, load_tokenizer(variant.model_dir), requests, batch_size, ignore_eos)


ENGINES.add("hf-sparse", HfSparseEngine())
