"""Stop strings (services/router/stops.py): the emitted text is exactly the text before the first stop
string, however the text is split into deltas."""
from __future__ import annotations

import random

import pytest

from services.router.stops import StopMatcher


def run(stops, pieces):
    m = StopMatcher(tuple(stops))
    out = "".join(m.push(p) for p in pieces)
    return out + m.flush(), m.hit


def reference(stops, text):
    found = [(text.find(s), s) for s in stops if s in text]
    if not found:
        return text, None
    at, s = min(found)
    return text[:at], s


@pytest.mark.parametrize("stops, pieces, want, hit", [
    (("END",), ["Hello EN", "D more"], "Hello ", "END"),
    (("END",), ["Hello EN", "Dless"], "Hello ", "END"),
    (("END",), ["Hello EN", "d"], "Hello ENd", None),          # a held-back prefix that did not complete
    (("\n\n", "."), ["a.b\n", "\n"], "a", "."),                # the earliest stop wins
    (("abc", "bcd"), ["xab", "cd"], "x", "abc"),
    (("abc", "bcd"), ["xxb", "cd"], "xx", "bcd"),
    ((), ["any", "thing"], "anything", None),
    (("aaa",), ["aa", "aa"], "", "aaa"),
])
def test_cases(stops, pieces, want, hit):
    assert run(stops, pieces) == (want, hit)


def test_nothing_after_a_hit():
    m = StopMatcher(("x",))
    assert m.push("ax") == "a" and m.push("more") == "" and m.flush() == ""


def test_held_text_is_never_emitted_early():
    m = StopMatcher(("STOP",))
    assert m.push("go ST") == "go " and m.push("O") == "" and m.push("P!") == ""


def test_random_splits_match_the_reference():
    rng = random.Random(7)
    for _ in range(2000):
        text = "".join(rng.choice("ab.\n ") for _ in range(rng.randint(0, 30)))
        stops = tuple({"".join(rng.choice("ab.\n ") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))})
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        want, hit = reference(stops, text)
        got, got_hit = run(stops, pieces)
        assert got == want, (text, stops, pieces)
        assert (got_hit is None) == (hit is None)
