"""Progress of kdforge's long phases (teacher load, tokenization, training, teacher caching, evaluation).

In a terminal: a rich bar (or a spinner for a phase without a count) with the counter, elapsed time and an ETA; the
live loss terms go on a line of their own, so at 80 columns the counter and ETA stay visible. When the stream is not a
terminal (a log file, a pipe): plain lines, one when the phase starts, then at least every `INTERVAL` seconds (from a
heartbeat thread too, so a 5-minute step still leaves a line every 30 s), and one when it ends.

The ETA is the mean time per unit so far times the units left (less the time already spent on the current one): it
works whatever a step costs (rich's own estimate gives up on steps slower than 30 s). One live rich display at a
time: a phase started while another shows its bar stays silent in a terminal.
"""
from __future__ import annotations

import os
import sys
import threading
import time

INTERVAL = 30.0
"""Seconds between plain progress lines when the output is not a terminal."""

ENABLED = True
"""False turns every progress display off (`kdforge distill --no-progress`)."""
clock = time.monotonic  # replaced by tests that simulate slow steps
_live: list["Progress"] = []  # the rich display now shown (rich allows one at a time)


def hms(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    s = int(round(max(0.0, seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """Progress of one phase: `total` units (None: an unknown count, e.g. loading a model). A context manager;
    `update(done, terms)` after each unit; `terms` (e.g. the loss terms) are shown beside the counter."""

    def __init__(self, title: str, total: int | None = None, *, start: int = 0, unit: str = "step",
                 enabled: bool = True, stream=None, interval: float | None = None, terminal: bool | None = None,
                 width: int | None = None):
        self.title, self.total, self.unit = title, total, unit
        self.start = self.done = start
        self.stream = stream if stream is not None else sys.stderr
        self.interval = INTERVAL if interval is None else interval
        self.terms = ""
        self.t0 = self.t_last = self.printed = clock()
        self.tty = _is_terminal(self.stream) if terminal is None else terminal
        self.enabled = enabled and ENABLED and os.environ.get("RANK", "0") == "0" and not (self.tty and _live)
        self.bar = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        if not self.enabled:
            return
        if self.tty:
            self._start_bar(width)
        else:
            self._line()
            self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="kdforge-progress")
            self._thread.start()

    # --- figures
    def elapsed(self) -> float:
        return clock() - self.t0

    def eta(self) -> float | None:
        """Seconds left: mean seconds per unit done in this session times the units left, less the time already spent
        on the current unit. None until one unit is done (or without a total)."""
        n = self.done - self.start
        if self.total is None or n <= 0:
            return None
        per = (self.t_last - self.t0) / n
        return max(0.0, per * (self.total - self.done) - (clock() - self.t_last))

    def status(self) -> str:
        """One plain line: title, counter, elapsed, ETA, seconds per unit (and the terms)."""
        elapsed = self.elapsed()
        if self.total is None:
            return f"{self.title}: elapsed {hms(elapsed)}"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        n = self.done - self.start
        rate = f", {(self.t_last - self.t0) / n:.2f} s/{self.unit}" if n > 0 else ""
        line = (f"{self.title}: {self.unit} {self.done}/{self.total} ({pct:.0f}%), elapsed {hms(elapsed)}, "
                f"ETA {hms(self.eta())}{rate}")
        return line + (f" | {self.terms}" if self.terms else "")

    # --- output
    def _line(self, text: str | None = None) -> None:
        with self._lock:
            try:
                print(text or self.status(), file=self.stream, flush=True)
            except (OSError, ValueError):  # a closed or broken stream: progress is never worth a crash
                pass
            self.printed = clock()

    def _heartbeat(self) -> None:
        while not self._stop.wait(min(self.interval, 1.0)):
            if clock() - self.printed >= self.interval:
                self._line()

    def _start_bar(self, width: int | None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, SpinnerColumn, TextColumn
        from rich.progress import Progress as RichProgress
        from rich.text import Text

        owner = self

        class Elapsed(ProgressColumn):
            def render(self, task):
                return Text(hms(owner.elapsed()), style="progress.elapsed")

        class Eta(ProgressColumn):
            def render(self, task):
                return Text(f"ETA {hms(owner.eta())}", style="progress.remaining")

        class Bar(RichProgress):
            def get_renderables(self):  # the terms on their own line: the counter and ETA never scroll off
                yield self.make_tasks_table(self.tasks)
                if owner.terms:
                    yield Text("  " + owner.terms, no_wrap=True, overflow="ellipsis")

        if self.total is None:
            columns = [SpinnerColumn(), TextColumn("[bold]{task.description}"), Elapsed()]
        else:
            columns = [TextColumn("[bold]{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(),
                       Elapsed(), Eta()]
        console = Console(file=self.stream, width=width, force_terminal=True if width else None)
        self.bar = Bar(*columns, console=console, transient=False, redirect_stdout=False, redirect_stderr=False)
        self.task = self.bar.add_task(self.title, total=self.total, completed=self.start)
        self.bar.start()
        _live.append(self)

    def update(self, done: int, terms: dict[str, float] | None = None) -> None:
        if not self.enabled:
            return
        self.done, self.t_last = done, clock()
        if terms is not None:
            self.terms = " ".join(f"{k}={v:.3f}" for k, v in terms.items())
        if self.bar is not None:
            self.bar.update(self.task, completed=done)
        elif self.t_last - self.printed >= self.interval:
            self._line()

    def close(self) -> None:
        if not self.enabled:
            return
        self.enabled = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
        if self.bar is not None:
            self.bar.stop()
            _live.remove(self)
        elif self.total is None or self.done >= self.total:
            self._line(f"{self.title}: done in {hms(self.elapsed())}" if self.total is None else self.status())
        else:
            self._line()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def phase(title: str, enabled: bool = True) -> Progress:
    """A phase without a count (loading a model, tokenizing): a spinner, or a start line, a line every 30 s and a
    closing 'done in' line."""
    return Progress(title, None, enabled=enabled)
