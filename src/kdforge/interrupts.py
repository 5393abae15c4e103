"""SIGTERM and SIGINT during training: stop at a point where the run's state is whole, so it can be saved.

`StopSignals` turns both signals into `StopRequested` (a KeyboardInterrupt, so everything that handles Ctrl-C
handles a preemption's SIGTERM the same way). Inside `critical()` (an optimizer step and the bookkeeping after it)
a signal is held back until the block ends, so a stop never lands between updating the weights and the optimizer
state, the scheduler and the step counter. Handlers can only be installed from the main thread; elsewhere the
signals keep their previous behaviour.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class StopRequested(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived; `signame` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signame = signal.Signals(signum).name


class StopSignals:
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, install: bool = True) -> None:
        """install=False: leave the signals' behaviour alone (a multi-process run, where ranks would stop at
        different points and wait forever for each other at the next collective); critical() then does nothing."""
        self._install = install
        self._deferring = False
        self._pending: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if self._install and threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self._deferring:
            self._pending = self._pending or signum
            return
        raise StopRequested(signum)

    @contextmanager
    def critical(self) -> Iterator[None]:
        """A block no signal interrupts: one that arrives meanwhile stops the run right after it."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self._pending is not None:
            signum, self._pending = self._pending, None
            raise StopRequested(signum)

    def hold(self) -> None:
        """Ignore further signals (the run is already stopping and saving)."""
        self._deferring = True
