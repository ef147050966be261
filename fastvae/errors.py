"""The one exception type fastvae raises for bad input.

The CLI turns a :class:`FastVAEError` into one line on stderr and exit status 2; anything else is a bug
and keeps its traceback.
"""


class FastVAEError(ValueError):
    """Bad user input: a config, a data file, a run directory or a flag value."""


class Preempted(FastVAEError):
    """Training stopped by SIGTERM or SIGINT after saving a checkpoint; exits 128 + the signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum
