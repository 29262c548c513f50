"""Progress lines (count, rate, ETA) for `logging`: they reach a log file or a non-interactive
terminal, where a redrawn progress bar shows nothing useful."""

from __future__ import annotations

import time


def format_duration(seconds: float) -> str:
    """3725 -> "1h02m", 2592 -> "43m12s", 7.44 -> "7.4s"."""
    if seconds < 10:
        return f"{max(0.0, seconds):.1f}s"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Progress:
    """Rate and ETA of a counted loop, measured from construction (or from `start` done units, e.g.
    the step a resumed training starts at, so the rate counts only this run's work)."""

    def __init__(self, total: int | None, unit: str = "it", noun: str = "", start: int = 0) -> None:
        self.total = total if total and total > 0 else None
        self.unit, self.noun, self.start = unit, noun, start
        self.t0 = time.perf_counter()
        self._last_mark = -1

    def due(self, done: int, lines: int = 10) -> bool:
        """Whether a line is due at `done`: once per `lines`-th of the total crossed (a batch that
        finishes several units at once still gives one line) and at the end; never twice for a mark."""
        if self.total is None:
            return False
        mark = self.total if done >= self.total else done // max(1, -(-self.total // lines))
        if mark <= self._last_mark or (mark == 0 and done < self.total):
            return False
        self._last_mark = mark
        return True

    def line(self, done: int) -> str:
        """E.g. "40/200 records (20.0%) 1.30 rec/s ETA 2m03s"."""
        elapsed = time.perf_counter() - self.t0
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        noun = f" {self.noun}" if self.noun else ""
        # A slow loop (a 1000-edit sequence: ~70 s a step) reads as seconds per unit, not "0.01 step/s".
        speed = f"{1 / rate:.1f} s/{self.unit}" if 0 < rate < 0.1 else f"{rate:.2f} {self.unit}/s"
        if self.total is None:
            return f"{done}{noun} {speed}"
        text = f"{done}/{self.total}{noun} ({100 * done / self.total:.1f}%) {speed}"
        if done >= self.total:
            text += f" in {format_duration(elapsed)}"
        elif rate > 0:
            text += f" ETA {format_duration((self.total - done) / rate)}"
        return text

    def seconds(self) -> float:
        return time.perf_counter() - self.t0
