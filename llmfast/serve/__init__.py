"""Serving and benchmarking: vLLM's OpenAI server, offline engines, a load generator and its metrics."""
