"""`llmfast run`: chains of stages (fine-tune, merge, quantize, sparsify, eval, bench), each result reused until
its settings or its parents change. See plan.py (the recipe and keys), stages.py (the verbs), run.py."""
