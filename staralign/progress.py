"""Progress for long loops, wherever the output goes.

On a terminal a user sees a live bar (tqdm).  Without one -- a CI log, ``nohup``, ``make demo >
log`` -- a bar is switched off, and silence for minutes reads as a hang; so there this writes
plain lines instead: one at each tenth of the total and at least one every ``interval`` seconds
(a heartbeat thread writes it even while a single step runs longer), each carrying
step/total, rate, elapsed and remaining time and the current values (the loss)::

    epoch 1/8: 47/93 steps (51%), 1.62 steps/s, 0:29 elapsed, 0:28 left, loss 24.6973

``STARALIGN_PROGRESS`` overrides the choice: ``bar`` (or ``1``), ``lines``, or ``off`` (or ``0``).
Every loop in the project (train, test, predict, data synth and convert, the demo) uses
:func:`progress`; this is the one home of that rule.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TextIO

INTERVAL_S = 30.0  # the longest silence without a terminal
TENTHS = 10  # a plain line at each tenth of the total


def format_duration(seconds: float) -> str:
    """``0:42``, ``12:05``, ``1:02:03``: minutes and seconds, hours when needed."""
    s = max(0, int(round(seconds)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def mode_for(stream: TextIO) -> str:
    """``"bar"``, ``"lines"`` or ``"off"`` for output to ``stream`` (``STARALIGN_PROGRESS`` wins)."""
    forced = os.environ.get("STARALIGN_PROGRESS", "").strip().lower()
    if forced in ("1", "bar"):
        return "bar"
    if forced == "lines":
        return "lines"
    if forced in ("0", "off"):
        return "off"
    try:
        return "bar" if stream.isatty() else "lines"
    except (AttributeError, ValueError):  # a closed or odd stream
        return "lines"


class Progress:
    """A counter that shows itself as a bar on a terminal and as plain lines elsewhere.

    ``update(n)`` after each unit of work, ``set_postfix(loss=...)`` for the current values,
    ``close()`` (or a ``with`` block) at the end.  ``clock`` and ``heartbeat`` exist for tests:
    a fake clock drives the timing, and without the heartbeat thread ``tick()`` stands in for it.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "step", *, initial: int = 0,
                 enabled: bool = True, stream: TextIO | None = None, mode: str | None = None,
                 interval: float = INTERVAL_S, clock: Callable[[], float] = time.monotonic,
                 heartbeat: bool = True) -> None:
        self.total = int(total) if total is not None else None
        self.desc, self.unit = desc, unit
        self.n = self.initial = int(initial)
        self.stream = stream if stream is not None else sys.stderr
        self.mode = "off" if not enabled else (mode or mode_for(self.stream))
        self.interval, self.clock = float(interval), clock
        self.postfix: dict[str, Any] = {}
        self.t0 = self.last_line = clock()
        self.lines_written = 0
        self.lines_written_at: int | None = None
        self._tenth = self._tenth_of(self.n)
        self._lock = threading.Lock()
        self._closed = False
        self._bar = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=self.n, desc=desc, unit=unit, dynamic_ncols=True,
                             leave=False, file=self.stream)
        elif self.mode == "lines" and heartbeat and self.interval > 0:
            # The thread holds the Progress weakly: one left unclosed (an exception out of the loop)
            # is collected, and its heartbeat ends with it.
            self._thread = threading.Thread(target=_heartbeat, args=(weakref.ref(self), self._stop,
                                                                     min(self.interval, 5.0)),
                                            name=f"progress: {desc}", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ use

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.n += n
            if self._bar is not None:
                self._bar.update(n)
            elif self.mode == "lines":
                tenth = self._tenth_of(self.n)
                if tenth > self._tenth or self.clock() - self.last_line >= self.interval:
                    self._tenth = tenth
                    self._write_line()

    def set_postfix(self, **values: Any) -> None:
        with self._lock:
            self.postfix = dict(values)
            if self._bar is not None:
                self._bar.set_postfix(**values)

    def tick(self) -> None:
        """Write a line if none was written for ``interval`` seconds (the heartbeat's job)."""
        with self._lock:
            if self.mode == "lines" and not self._closed and self.clock() - self.last_line >= self.interval:
                self._write_line()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop.set()
            if self._bar is not None:
                self._bar.close()
            elif self.mode == "lines" and self.n > self.initial and self.lines_written_at != self.n:
                self._write_line()  # the final count, unless the last line already said it

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the line

    def line(self) -> str:
        """The status line as it reads now."""
        now = self.clock()
        elapsed = now - self.t0
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.n}/{self.total} {self.unit}s" if self.total is not None else f"{self.n} {self.unit}s"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        if rate > 0:
            parts.append(f"{rate:.3g} {self.unit}s/s" if rate >= 1 else f"{1 / rate:.3g} s/{self.unit}")
        parts.append(f"{format_duration(elapsed)} elapsed")
        if self.total is not None and rate > 0 and self.n < self.total:
            parts.append(f"{format_duration((self.total - self.n) / rate)} left")
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        return f"{self.desc}: " + ", ".join(parts)

    def _write_line(self) -> None:
        try:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed pipe must not stop the work
            pass
        self.last_line = self.clock()
        self.lines_written += 1
        self.lines_written_at = self.n

    def _tenth_of(self, n: int) -> int:
        return n * TENTHS // self.total if self.total else 0



def _heartbeat(ref: weakref.ref, stop: threading.Event, period: float) -> None:
    while not stop.wait(period):
        owner = ref()
        if owner is None:
            return
        owner.tick()
        del owner


def progress(total: int | None, desc: str, unit: str = "step", **kwargs: Any) -> Progress:
    """A :class:`Progress` (the name call sites use)."""
    return Progress(total, desc, unit, **kwargs)
