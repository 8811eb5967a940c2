"""The `cpmgen` command (and `python -m cpmgen`).

Set-up that must come before anything imports torch (the OpenMP wait policy), and a Ctrl-C
while the command is still importing exits 130 without a traceback, as at any later moment.
"""

import sys


def main() -> None:
    from cpmgen.threads import configure_wait_policy

    configure_wait_policy()
    try:
        from cpmgen.cli import main as run
    except KeyboardInterrupt:
        sys.exit(130)
    run()


if __name__ == "__main__":
    main()
