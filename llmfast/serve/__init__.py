"""vLLM's OpenAI server for the user: its command line, machine defaults, LoRA checks, start, readiness, stop.

Benchmarks live in `llmfast.bench`; they use `serve.server` to start servers and `serve.endpoint` to talk to one.
"""
