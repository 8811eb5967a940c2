"""The `cpmgen` console script (and `python -m cpmgen`).

Before anything imports torch: the OpenMP wait policy (cpmgen/threads.py), and on a terminal a
spinner while torch loads (a few seconds on a busy machine). A Ctrl-C while the command is
still importing exits 130 without a traceback, as at any later moment. This module imports
only rich."""

from __future__ import annotations

import signal
import sys

QUIET = {"-h", "--help", "--version"}  # these print at once; a spinner would only flicker


def main() -> None:
    status = None
    try:
        from cpmgen import console
        from cpmgen.signals import held
        from cpmgen.threads import configure_wait_policy

        configure_wait_policy()
        command = len(sys.argv) > 1 and not QUIET & set(sys.argv[1:])
        if console.stderr.is_terminal and command:
            status = console.stderr.status("starting cpmgen", spinner="dots")
            status.start()
        # An interrupt inside torch's import (NumPy's, within it) would leave NumPy half-initialised
        # and fail the next import; the CLI imports torch lazily, so a command imports it here.
        with held():
            from cpmgen import cli
            if command:
                import torch  # noqa: F401
    except KeyboardInterrupt:  # also while rich and the small modules above import
        sys.exit(130)
    finally:
        if status is not None:
            status.stop()
    try:
        cli.main()
    finally:
        # The command's work and output are done. Python's shutdown puts back the default Ctrl-C
        # action (death by the signal) but leaves an ignored signal ignored, so a Ctrl-C arriving
        # now cannot turn a finished run into a killed one.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
