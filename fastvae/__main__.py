"""``python -m fastvae`` and the ``fastvae`` command.

A Ctrl-C while the command is starting (imports take about a second) is held until the heavy modules
(numpy, torch) have finished importing, then ends the command with one line and exit status 130: a
KeyboardInterrupt raised inside an import leaves a half-initialised module behind, whose later use gave a
traceback (found by the start-up test, one run in five).
"""

from __future__ import annotations

import os
import signal
import sys

_PENDING: list[int] = []


def _hold(signum: int, frame: object) -> None:
    _PENDING.append(signum)


def run() -> int:
    signal.signal(signal.SIGINT, _hold)
    from fastvae.cli import main

    if not {"-h", "--help", "--version"} & set(sys.argv[1:2]) and len(sys.argv) > 1:
        import numpy  # noqa: F401
        import torch  # noqa: F401
    signal.signal(signal.SIGINT, signal.default_int_handler)
    code = 130 if _PENDING else main()
    if _PENDING:
        print("fastvae: error: interrupted", file=sys.stderr)
    if code == 130:
        # Interrupted: leave at once. A KeyboardInterrupt seen anywhere during the run makes CPython's
        # finalisation re-raise SIGINT (exit status -2 instead of 130), one run in five in the test.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    return code


if __name__ == "__main__":
    raise SystemExit(run())
