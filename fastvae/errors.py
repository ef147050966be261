"""The one exception type fastvae raises for bad input.

The CLI turns a :class:`FastVAEError` into one line on stderr and exit status 2; anything else is a bug
and keeps its traceback.
"""


class FastVAEError(ValueError):
    """Bad user input: a config, a data file, a run directory or a flag value."""
