"""Stop strings: the text a client sees ends before the first stop string the model generates.

Text arrives in deltas, so a stop string may span several of them: the matcher holds back the
longest tail that could still begin one and emits everything before it.

    m = StopMatcher(("\\n\\n", "END"))
    m.push("Hello EN")   # -> "Hello " ("EN" held back)
    m.push("D more")     # -> ""       (m.hit: the request ends; "END" and what follows are dropped)
    m.flush()            # -> ""       (at the natural end of a stream: whatever was held back)
"""
from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.hit: str | None = None       # the stop string found (then nothing more is emitted)
        self._held = ""

    def push(self, text: str) -> str:
        """The part of held + text that is safe to show now."""
        if self.hit is not None:
            return ""
        buf = self._held + text
        found = [(i, s) for s in self.stops if (i := buf.find(s)) >= 0]
        if found:
            at, self.hit = min(found)
            self._held = ""
            return buf[:at]
        keep = max((k for s in self.stops for k in range(min(len(s) - 1, len(buf)), 0, -1)
                    if s.startswith(buf[len(buf) - k:])), default=0)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """What was held back, at the end of a stream that hit no stop string."""
        held, self._held = self._held, ""
        return "" if self.hit is not None else held
