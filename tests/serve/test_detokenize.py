"""Reply text released token by token (the tiny tokenizer has one token per byte): multi-byte characters
are never split, stop strings never leak, and the pieces add up to the decoded reply. Expected pieces are
worked out by hand from the rules in the module docstring."""

from __future__ import annotations

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
