"""Task-vector merging of full models and LoRA adapters that share a base (`llmfast merge`).

Modules: `config` (mergekit-compatible YAML schema, parameter values), `plan` (every check made before
any work), `methods/` (one file per merge method, in a registry), `io` (lazy safetensors reading,
sharded writing), `pipeline` (tensors merged in parallel, written in order), `adapters` (LoRA task
vectors B@A, SVD re-rank), `adapter_output` (merged adapters), `merge` (the streaming driver), `cli`
(the verb's arguments). Nothing here imports torch at import time.
"""
