"""Ctrl-C / SIGTERM are recorded, so one swallowed by a finalizer still stops the run."""

import os
import signal

import pytest

from pipeline.run.interrupt import Terminated, check, interrupts_handled


@pytest.fixture(autouse=True)
def _sigint_as_a_terminal_delivers_it():
    """A suite started as a background job of a script (`cmd &`) inherits SIGINT ignored, and
    interrupts_handled rightly keeps an ignored SIGINT ignored: these tests need it delivered."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


class _Finalizer:
    def __init__(self, sig):
        self.sig = sig

    def __del__(self):
        os.kill(os.getpid(), self.sig)  # the handler raises here, inside __del__: printed and swallowed
        for _ in range(10_000):  # bytecode: the pending handler runs (and raises) in here
            pass


@pytest.mark.parametrize("sig, kind", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)])
def test_an_interrupt_swallowed_by_a_finalizer_is_raised_at_the_next_check(sig, kind, monkeypatch):
    swallowed = []
    monkeypatch.setattr("sys.unraisablehook", lambda u: swallowed.append(u.exc_type))
    with interrupts_handled():
        _Finalizer(sig)  # dropped at once: __del__ runs now
        assert swallowed == [kind]  # the raise itself was lost, as in a real run
        with pytest.raises(kind):
            check()
        check()  # raised once
    with pytest.raises(KeyboardInterrupt), interrupts_handled():
        _Finalizer(signal.SIGINT)  # swallowed, and nothing checked before the end: raised on the way out


def test_a_sigint_the_parent_ignored_stays_ignored():
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts_handled():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)
