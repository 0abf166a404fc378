"""`python -m llmfast ...`: the `llmfast` command (as `python -m llmfast.cli`, which torchrun launches)."""

from llmfast.cli import main
from llmfast.process_exit import exit_process

if __name__ == "__main__":
    exit_process(main())
