"""Progress of long work (a state download, a checkpoint load, the demo) for people watching.

On a terminal one line is redrawn in place (at most every ``tty_interval`` s); when the output is not
a terminal (a log file, a pipe) a plain line is written every ``interval`` s, so logs stay readable.
Both end with a final line. A line says what is done (bytes), of how much, the rate and the time
left: ``downloading the swarm's state: 12.3 MB / 40.0 MB (31%), 5.2 MB/s, 5 s left``.
Not to be confused with :mod:`swarm.progress` (the swarm's training progress in the DHT).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable, TextIO

__all__ = ["ProgressBar", "format_bytes", "format_seconds"]


def format_bytes(n: float) -> str:
    """SI units: ``512 B``, ``1.5 kB``, ``12.3 MB``, ``4.00 GB``."""
    n = float(n)
    if abs(n) < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000.0
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.2f} {unit}" if abs(n) < 10 else f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def format_seconds(s: float) -> str:
    """``7 s``, ``3 min 05 s``, ``2 h 10 min``."""
    s = max(float(s), 0.0)
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


class ProgressBar:
    """``what``: the work (e.g. ``"loading checkpoint x.swst"``); ``total``: bytes to do (None:
    unknown, no percentage nor time left); ``stream``: where to write (default ``sys.stderr``);
    ``tty``: redraw one line (default: whether ``stream`` is a terminal); ``interval``: seconds
    between plain lines when not a terminal (5); ``tty_interval``: between redraws (0.2);
    ``clock``: seconds (for tests). Thread-safe: the work may run on another thread than ``close``.

    ``update(done, detail="")`` sets the bytes done (``advance(n)`` adds), ``detail`` is appended to
    the line; ``close(ok=True, detail="")`` writes the final line (idempotent); also a context
    manager (an exception closes it as failed)."""

    def __init__(self, what: str, total: int | None = None, *, stream: TextIO | None = None,
                 tty: bool | None = None, interval: float = 5.0, tty_interval: float = 0.2,
                 clock: Callable[[], float] = time.monotonic):
        self.what, self.total = what, total
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            try:
                tty = bool(isatty()) if callable(isatty) else False
            except (OSError, ValueError):  # a closed stream
                tty = False
        self.tty = tty
        self.interval = tty_interval if tty else interval
        self.clock = clock
        self.started = clock()
        self.done = 0
        self.detail = ""
        self.closed = False
        self._last_write = self.started
        self._width = 0  # of the line drawn last (tty)
        self._lock = threading.Lock()

    def update(self, done: int, detail: str | None = None) -> None:
        with self._lock:
            self.done = done
            if detail is not None:
                self.detail = detail
            if self.closed:
                return
            now = self.clock()
            if now - self._last_write >= self.interval:
                self._last_write = now
                self._write(self.line(now), final=False)

    def advance(self, n: int, detail: str | None = None) -> None:
        self.update(self.done + n, detail)

    def rate(self, now: float | None = None) -> float:
        """Bytes per second since the start."""
        elapsed = (self.clock() if now is None else now) - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        rate = self.rate(now)
        text = f"{self.what}: {format_bytes(self.done)}"
        if self.total:
            text += f" / {format_bytes(self.total)} ({min(100.0 * self.done / self.total, 100.0):.0f}%)"
        text += f", {format_bytes(rate)}/s"
        if self.total and rate > 0 and self.done < self.total:
            text += f", {format_seconds((self.total - self.done) / rate)} left"
        if self.detail:
            text += f" | {self.detail}"
        return text

    def close(self, ok: bool = True, detail: str | None = None) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if detail is not None:
                self.detail = detail
            now = self.clock()
            elapsed = now - self.started
            took = format_seconds(elapsed) if elapsed >= 1 else f"{max(elapsed, 0.0):.2f} s"
            text = f"{self.what}: {format_bytes(self.done)} in {took} ({format_bytes(self.rate(now))}/s)"
            if not ok:
                text += ", failed"
            if self.detail:
                text += f" | {self.detail}"
            self._write(text, final=True)

    def _write(self, text: str, final: bool) -> None:
        try:
            if self.tty:
                pad = " " * max(self._width - len(text), 0)  # (no escape codes: any terminal clears this way)
                self.stream.write("\r" + text + pad + ("\n" if final else ""))
                self._width = 0 if final else len(text)
            else:
                self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken output: progress is not worth failing for
            pass

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        self.close(ok=exc_type is None)
