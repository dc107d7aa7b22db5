"""Ctrl-C and SIGTERM, never lost.

Python raises KeyboardInterrupt wherever the main thread is when the signal lands. Inside a
``__del__``, a weakref callback or the garbage collector (asyncio and Dask make many), the exception
is printed as "Exception ignored in ..." and swallowed, and the run would go on to the end. So the
handler also records the request, and the lifecycle calls ``check()`` between shards and steps.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

_requested = threading.Event()
_signal: list[int] = []


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: outputs kept, lock released."""


def _interrupt(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _handler(signum, frame):
    _signal[:] = [signum]
    _requested.set()
    raise _interrupt(signum)


def check() -> None:
    """Raise the interrupt a signal asked for (once), in case its own raise was swallowed."""
    if _requested.is_set():
        _requested.clear()
        raise _interrupt(_signal[0] if _signal else signal.SIGINT)


@contextmanager
def interrupts_handled():
    """SIGINT and SIGTERM raise (and are recorded) for the duration; a SIGINT the parent set to be
    ignored (a background job of a script) stays ignored. Handlers only in the main thread."""
    _requested.clear()
    _signal.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            old[sig] = signal.signal(sig, _handler)
    try:
        yield
        check()  # still pending at the end: the caller returns the interrupt, not success
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
