"""How the command answers Ctrl-C, SIGTERM and SIGHUP outside the generation loop (which stops
after the current token instead: runner.stop_on_ctrl_c).

Imports nothing heavy: the console script uses it before torch is imported."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

HELD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)


def end_on_signals() -> None:
    """SIGTERM and SIGHUP end the command as an exception (exit 128 + signal), so that outputs
    are finished or removed on the way out; past `ulimit -f` a write fails (EFBIG) instead of
    killing the process."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP until the block ends, then deliver them. For code that
    turns an interrupt into something else: importing torch (an interrupted NumPy import is
    swallowed and leaves NumPy half-initialised) and unpickling (an interrupt came out as a
    damaged-file error)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    try:
        with handlers_replaced(HELD, lambda signum, frame: arrived.append(signum)):
            yield
    finally:
        for sig in dict.fromkeys(arrived):
            signal.raise_signal(sig)


@contextlib.contextmanager
def handlers_replaced(signals: tuple[int, ...], handler) -> Iterator[None]:
    """`handler` for each of `signals` inside the block; the previous ones back afterwards, also
    when a signal's exception (an earlier handler's KeyboardInterrupt or SystemExit) arrives
    while they are being swapped: every handler swapped in is swapped back out."""
    previous = {}
    try:
        for sig in signals:
            previous[sig] = signal.signal(sig, handler)
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
