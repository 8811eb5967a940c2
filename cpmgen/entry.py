"""The `cpmgen` console script: on a terminal, a spinner while torch loads (a few seconds on a
busy machine), then the CLI. Importing cpmgen.cli imports torch; this module imports only rich."""

from __future__ import annotations

import sys

QUIET = {"-h", "--help", "--version"}  # these print at once; a spinner would only flicker


def main() -> None:
    from cpmgen import console

    status = None
    if console.stderr.is_terminal and len(sys.argv) > 1 and not QUIET & set(sys.argv[1:]):
        status = console.stderr.status("starting cpmgen", spinner="dots")
        status.start()
    try:
        from cpmgen import cli
    finally:
        if status is not None:
            status.stop()
    cli.main()
