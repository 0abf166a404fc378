"""Bench engines behind one registry (see engines/base.py); importing this package registers them all.

    vllm          vLLM's OpenAI server, loaded by the load generator (bench run)
    vllm-offline  vLLM's engine in this process (bench offline --engine vllm)
    hf            transformers `generate` in static batches, the baseline (bench offline --engine hf, bench run)
    hf-sparse     hf on a sparse artifact with llmfast's sparse MLP (llmfast/sparse/runtime.py): batch-1 decode
                  skips the zeros (bench run picks it for teal, cats and dejavu variants; relufy ones go to
                  vLLM through llmfast's plugin first, hf-sparse when vLLM cannot run here)

A new engine is one module here that registers an `Engine` subclass instance; vLLM and torch are imported
inside its methods so listing engines stays instant.
"""

from llmfast.bench.engines import hf, hf_sparse, vllm_offline, vllm_server  # noqa: F401  (registers them)
from llmfast.bench.engines.base import ENGINES, Engine, OfflineEngine, Variant, engine_families, resolve_variant

__all__ = ["ENGINES", "Engine", "OfflineEngine", "Variant", "engine_families", "resolve_variant"]
