"""Task-vector merging of full models and LoRA adapters that share a base (`llmfast merge`).

Modules: `config` (mergekit-compatible YAML schema and the checks made before any work), `methods`
(one function per merge method, in a registry), `io` (lazy safetensors reading, sharded writing),
`adapters` (LoRA task vectors B@A, rank concatenation, SVD re-rank), `merge` (the streaming driver),
`cli` (the verb's arguments). Nothing here imports torch at import time.
"""
