"""Benchmarks: prompt sets (workload), the load generator, vLLM's metrics, the engine registry (engines/), the
three verbs (`bench serve` online.py + serve_flags.py, `bench offline` offline.py, `bench run` runner.py) and the
report. Servers are started through `llmfast.serve`; nothing here imports torch or vLLM at import time.
"""
