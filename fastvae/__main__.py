"""``python -m fastvae`` and the ``fastvae`` command.

Ctrl-C while the command's modules are still importing (the first ~0.1 s) ends with one line and exit
status 130, like a Ctrl-C later on, instead of a KeyboardInterrupt traceback from inside an import.
"""

from __future__ import annotations

import signal
import sys


def _interrupted_while_starting(signum: int, frame: object) -> None:
    print("fastvae: error: interrupted", file=sys.stderr)
    raise SystemExit(130)


def run() -> int:
    signal.signal(signal.SIGINT, _interrupted_while_starting)
    from fastvae.cli import main

    signal.signal(signal.SIGINT, signal.default_int_handler)
    return main()


if __name__ == "__main__":
    raise SystemExit(run())
