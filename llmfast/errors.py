"""The one exception type for mistakes a user can fix.

The CLI prints its message as a single line on stderr and exits with code 2; anything else is a bug and
keeps its traceback. Messages name the file, key or row at fault and say what to do.
"""


class UserError(Exception):
    """Bad input, a missing file or package, an impossible request: shown as one line, exit code 2."""

    def __init__(self, message: str) -> None:
        # One line, always: a multi-line message from a library is folded so the contract holds.
        super().__init__(" ".join(str(message).split()))
