"""common/progress.py: the prefill progress line and when it is drawn (terminal vs forced lines)."""
from __future__ import annotations

import io

from common.progress import ERASE, PrefillBar, format_duration, render, wanted


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_render_shows_tokens_percent_rate_and_eta():
    assert render(1024, 4096, 2.0, width=8) == \
        "prefill [##------]  1,024/4,096 tokens  25%  512 tokens/s  ETA 6.0 s"
    assert render(0, 4096, 0.0, width=4) == "prefill [----]  0/4,096 tokens  0%  ETA ?"
    assert render(4096, 4096, 64.0, width=4) == "prefill [####]  4,096/4,096 tokens  100%  64 tokens/s  in 1m04s"
    assert render(5000, 4096, 1.0, width=4).startswith("prefill [####]  4,096/4,096")      # clipped
    assert [format_duration(s) for s in (0.42, 12.4, 185, 3725)] == ["0.4 s", "12 s", "3m05s", "1h02m"]


def test_terminal_bar_waits_redraws_in_place_throttled_and_erases_itself():
    clock, out = Clock(), Stream(tty=True)
    bar = PrefillBar(out, clock=clock, delay_s=0.5, interval_s=0.1)
    assert bar.tty
    bar.update(100, 1000)                   # a short prefill shows nothing
    clock.t += 1.0
    bar.update(200, 1000)
    assert out.getvalue() == ERASE + render(200, 1000, 1.0)
    clock.t += 0.05
    bar.update(300, 1000)                   # within interval_s: not redrawn
    assert out.getvalue().count("prefill") == 1
    clock.t += 0.1
    bar.update(400, 1000)
    assert out.getvalue().endswith(ERASE + render(400, 1000, 1.15))
    bar.update(1000, 1000)                  # done: the line is erased for the generated text
    assert out.getvalue().endswith(ERASE + render(400, 1000, 1.15) + ERASE)
    bar.update(1000, 1000)
    bar.close()
    assert out.getvalue().count(ERASE) == 3
    assert "\n" not in out.getvalue()


def test_terminal_bar_of_a_quick_prefill_writes_nothing():
    clock, out = Clock(), Stream(tty=True)
    bar = PrefillBar(out, clock=clock)
    bar.update(500, 1000)
    bar.update(1000, 1000)
    bar.close()
    assert out.getvalue() == ""


def test_forced_lines_on_a_pipe_at_most_one_per_interval_and_always_the_last():
    clock, out = Clock(), Stream(tty=False)
    bar = PrefillBar(out, clock=clock, line_interval_s=1.0)
    bar.update(100, 1000)
    clock.t += 0.5
    bar.update(200, 1000)                   # skipped
    clock.t += 0.6
    bar.update(300, 1000)
    bar.update(1000, 1000)                  # the last one, at once
    bar.update(1000, 1000)
    bar.close()
    assert out.getvalue().splitlines() == [render(100, 1000, 0.0), render(300, 1000, 1.1),
                                           render(1000, 1000, 1.1)]
    assert ERASE not in out.getvalue()


def test_disabled_bar_writes_nothing_and_the_default_follows_the_terminal():
    out = Stream(tty=True)
    bar = PrefillBar(out, enabled=False, clock=Clock(), delay_s=0)
    bar.update(1, 10)
    bar.close()
    assert out.getvalue() == ""
    assert wanted(None, Stream(tty=True)) and not wanted(None, Stream(tty=False))
    assert wanted(True, Stream(tty=False)) and not wanted(False, Stream(tty=True))
