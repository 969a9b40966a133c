"""Reply text released token by token (the tiny tokenizer has one token per byte): multi-byte characters
are never split, stop strings never leak, and the pieces add up to the decoded reply. Expected pieces are
worked out by hand from the rules in the module docstring."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slimtune.serve.detokenize import TextStream


def pieces_of(tokenizer, text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stop)
    pieces = []
    for token in tokenizer(text)["input_ids"]:
        pieces.append(stream.push(token))
        if stream.stopped:
            return pieces, stream
    pieces.append(stream.finish())
    return pieces, stream


def test_multibyte_characters_are_released_whole(tiny_tokenizer):
    pieces, _ = pieces_of(tiny_tokenizer, "hé wö ✓")
    # 'é' and 'ö' are 2 bytes, '✓' 3: their leading bytes release nothing, their last byte the whole character.
    assert pieces == ["h", "", "é", " ", "w", "", "ö", " ", "", "", "✓", ""]


def test_stop_string_ends_the_reply_and_never_shows(tiny_tokenizer):
    pieces, stream = pieces_of(tiny_tokenizer, "ab ST STOP def", stop=("STOP", "zz"))
    assert stream.stopped
    # 'S', 'ST' could start 'STOP': held until ' ' rules it out; 'S', 'ST', 'STO' held again, then 'STOP' stops.
    assert pieces == ["a", "b", " ", "", "", "ST ", "", "", "", ""]


def test_partial_stop_is_released_once_it_cannot_match(tiny_tokenizer):
    pieces, stream = pieces_of(tiny_tokenizer, "a STAR", stop=("STOP",))
    assert not stream.stopped and pieces == ["a", " ", "", "", "STA", "R", ""]


def test_finish_releases_a_held_tail(tiny_tokenizer):
    pieces, stream = pieces_of(tiny_tokenizer, "a ST", stop=("STOP",))
    assert not stream.stopped and pieces == ["a", " ", "", "", "ST"], "at the end the held 'ST' is part of the reply"


def _held_back_by_every_prefix(text: str, stop: tuple[str, ...]) -> int:
    """The held-back tail by its definition, trying every prefix of every stop string (quadratic)."""
    held = len(text) - len(text.rstrip("\ufffd"))
    visible = text[: len(text) - held]
    for s in stop:
        for size in range(min(len(s) - 1, len(visible)), 0, -1):
            if visible.endswith(s[:size]):
                held = max(held, len(text) - len(visible) + size)
                break
    return held


@settings(max_examples=300, derandomize=True, deadline=None)
@given(text=st.text(alphabet="abST\ufffd", max_size=30),
       stop=st.lists(st.text(alphabet="abST", min_size=1, max_size=8), max_size=4))
def test_held_back_tail_equals_its_definition(tiny_tokenizer_once, text, stop):
    assert TextStream(tiny_tokenizer_once, tuple(stop))._held_back(text) == _held_back_by_every_prefix(text, tuple(stop))


@pytest.fixture(scope="module")
def tiny_tokenizer_once():
    from conftest import make_tiny_tokenizer

    return make_tiny_tokenizer()


def test_stop_strings_cost_linear_time_per_step(tiny_tokenizer_once):
    """A stop string 'baaa...' against a reply of 'a's: no prefix of it ends the text, so every prefix
    length is a candidate. The time per step must grow about linearly with its length (4x longer: ~4x
    the time; copying and comparing every prefix: ~16x)."""
    def seconds_per_step(length: int) -> float:
        stream = TextStream(tiny_tokenizer_once, ("b" + "a" * (length - 1),))
        text = "a" * (2 * length)
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            stream._held_back(text)
            best = min(best, time.perf_counter() - started)
        return best

    short, long = seconds_per_step(10_000), seconds_per_step(40_000)
    assert long / short < 8, f"a 4x longer stop string took {long / short:.1f}x the time per step: not linear"
