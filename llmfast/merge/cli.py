"""The `llmfast merge CONFIG OUTPUT_DIR` verb: arguments here, work in `llmfast.merge.merge`.

Kept free of heavy imports so building the CLI parser stays instant (the method registry imports no torch).
"""

from __future__ import annotations

import argparse


def configure(p: argparse.ArgumentParser) -> None:
    from llmfast.merge.methods import METHODS

    p.description = (f"Merge full models or LoRA adapters fine-tuned from one base ({', '.join(METHODS.names())}; "
                     "mergekit's config format). Checks every input first, streams tensors a few at a time, and "
                     "writes OUTPUT atomically; an existing OUTPUT is refused unless --overwrite.")
    p.add_argument("config", help="merge config YAML in mergekit's format, e.g. recipes/merge_ties_smollm2.yaml")
    p.add_argument("output", help="directory for the merged model (or merged LoRA adapter); must not exist "
                   "unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUTPUT (only once the new one is complete)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set parameters.density=0.5 (repeatable)")
    p.add_argument("--out-shard-size", default="5G", metavar="SIZE",
                   help="largest output shard, e.g. 500M, 5G (default 5G)")
    p.add_argument("--adapter-rank", default=None, metavar="R",
                   help="for LoRA inputs: write a merged adapter, 'concat' (exact: ranks concatenated) or an "
                   "integer rank (SVD, with the reconstruction error reported); default: a full merged model")
    p.add_argument("--seed", type=int, default=None, help="seed for DARE's random drop (default 0)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="tensors merged at once, one core each (default: the cores available, at most 4; "
                   "one tensor's math is memory-bound, so cores help across tensors, not within one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmfast.merge.merge import run_merge_cli

    return run_merge_cli(args)
