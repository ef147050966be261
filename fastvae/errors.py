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


# The distribution name on the package index (the import name stays ``fastvae``).
DISTRIBUTION = "fastvae-engine"
# Optional packages -> the extra that installs them.
EXTRAS = {"onnx": "export", "onnxscript": "export", "onnxruntime": "export", "matplotlib": "plot",
          "triton": "triton", "tensorboard": "tensorboard", "sklearn": "metrics"}  # fmt: skip


def require(module: str, what: str) -> object:
    """Import an optional package, or raise one FastVAEError line naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        extra = EXTRAS.get(top)
        hint = f"pip install '{DISTRIBUTION}[{extra}]'" if extra else f"pip install {top}"
        if top == "onnxruntime":
            hint += f" (or the torch-free runtime alone: pip install {DISTRIBUTION}-runtime)"
        raise FastVAEError(f"{what} needs the optional package {top}: {hint}") from None
