"""The prefill progress bar of `mnemosyne generate`: tokens prefilled, rate and ETA, on stderr.

    prefill [##########--------------]  4,096/9,812 tokens  42%  1,530 tokens/s  ETA 4 s

`render` is the line, a pure function. `PrefillBar` decides when to draw it, from `update(done,
total)` calls (the offline engine's step outputs, or the router's PrefillProgress events):
  - on a terminal it redraws one line in place (at most every `interval_s`), only once a prefill
    has run for `delay_s` (a short prompt shows nothing), and erases it when the prefill is done,
    so the generated text (stdout, the same terminal) starts on a clean line;
  - forced on a pipe or file (`--progress`) it writes whole lines, at most one per
    `line_interval_s`, and always the last one (done = total).
stdout is never touched.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

ERASE = "\r\x1b[K"          # back to column 0, clear to the end of the line


def format_duration(seconds: float) -> str:
    """"0.4 s", "12 s", "3m05s", "1h02m"."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def render(done: int, total: int, elapsed_s: float, width: int = 24) -> str:
    """One progress line for `done` of `total` prompt tokens prefilled in `elapsed_s` seconds. The
    rate is the mean since the start; the ETA assumes it holds ("?" before anything is done)."""
    total = max(total, 1)
    done = min(max(done, 0), total)
    filled = width * done // total
    parts = [f"prefill [{'#' * filled}{'-' * (width - filled)}]", f"{done:,}/{total:,} tokens",
             f"{100 * done // total}%"]
    rate = done / elapsed_s if done and elapsed_s > 0 else None
    if rate is not None:
        parts.append(f"{rate:,.0f} tokens/s")
    if done == total:
        parts.append(f"in {format_duration(elapsed_s)}")
    else:
        parts.append(f"ETA {format_duration((total - done) / rate) if rate else '?'}")
    return "  ".join(parts)


def wanted(flag: bool | None, stream: TextIO) -> bool:
    """--progress / --no-progress, else on when `stream` is a terminal."""
    return flag if flag is not None else _isatty(stream)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class PrefillBar:
    """Draws `render` lines on `stream` as `update` reports progress; see the module docstring.
    `close()` (idempotent) erases a bar left on a terminal, e.g. when the request failed."""

    def __init__(self, stream: TextIO | None = None, enabled: bool = True, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic, delay_s: float = 0.5, interval_s: float = 0.1,
                 line_interval_s: float = 1.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = _isatty(self.stream) if tty is None else tty
        self.clock = clock
        self.delay_s, self.interval_s, self.line_interval_s = delay_s, interval_s, line_interval_s
        self.start = clock()
        self._drawn_at: float | None = None       # when the last line was drawn (None: never)
        self._on_screen = False                   # a terminal line to erase
        self._done = False

    def update(self, done: int, total: int) -> None:
        if not self.enabled or self._done:
            return
        now = self.clock()
        finished = done >= total
        if self.tty:
            if finished:
                self.close()
                return
            if now - self.start < self.delay_s or (
                    self._drawn_at is not None and now - self._drawn_at < self.interval_s):
                return
            self._write(ERASE + render(done, total, now - self.start))
            self._on_screen = True
        else:
            if not finished and self._drawn_at is not None and now - self._drawn_at < self.line_interval_s:
                return
            self._write(render(done, total, now - self.start) + "\n")
            self._done = finished
        self._drawn_at = now

    def close(self) -> None:
        if self._on_screen:
            self._write(ERASE)
            self._on_screen = False
        self._done = True

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
