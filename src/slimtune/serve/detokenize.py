"""Token ids -> the reply text, piece by piece, with stop strings.

A streamed reply must add up to exactly the text a non-streamed one returns, so both are built here
from the same pieces. After each token the whole reply is decoded again (`skip_special_tokens`, as
`slimtune generate` decodes) and the new tail is released, except for text that may still change:
- a trailing U+FFFD: the token ended inside a multi-byte UTF-8 character that the next token completes;
- a tail that could be the start of a stop string: it is held until it either becomes the stop string
  (then the reply ends before it) or cannot any more.
Decoding the whole reply each step costs O(reply length); replies are bounded by `max_tokens`. Stop
strings cost O(their total length) per step: the held-back tail is found with the Knuth-Morris-Pratt
failure function of each stop string (computed once), not by trying every prefix (quadratic).
"""

from __future__ import annotations

_REPLACEMENT = "\ufffd"


class TextStream:
    """The reply of one request: feed it tokens with `push`, take the released text from its return value."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self._failures = [_failure_function(s) for s in self.stop]
        self.ids: list[int] = []
        self.sent = ""  # text released so far; a prefix of every later decoding
        self.stopped = False

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _stop_at(self, text: str) -> int | None:
        """Index of the earliest stop string in `text` that is not wholly inside released text."""
        start = max(0, len(self.sent) - max((len(s) for s in self.stop), default=0))
        found = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _held_back(self, text: str) -> int:
        """How many trailing characters of `text` must wait: an incomplete character or a partial stop string."""
        held = len(text) - len(text.rstrip(_REPLACEMENT))
        visible = text[: len(text) - held]
        for stop, failure in zip(self.stop, self._failures):
            size = _longest_suffix_prefix(visible[-(len(stop) - 1):] if len(stop) > 1 else "", stop, failure)
            if size:
                held = max(held, len(text) - len(visible) + size)
        return held

    def push(self, token_id: int) -> str:
        """Add one token; returns the text it releases (possibly ''). Sets `stopped` on a stop string."""
        self.ids.append(token_id)
        text = self._decode()
        end = self._stop_at(text)
        if end is not None:
            self.stopped = True
        else:
            end = len(text) - self._held_back(text)
        return self._release(text, end)

    def finish(self) -> str:
        """The reply is over (EOS or length): release everything still held."""
        if self.stopped:
            return ""
        return self._release(self._decode(), None)

    def _release(self, text: str, end: int | None) -> str:
        piece = text[len(self.sent): end]
        # Decodings of growing prefixes extend each other for byte-level and SentencePiece tokenizers; if a
        # tokenizer ever rewrote released text, the later text is still released, never the earlier retracted.
        self.sent += piece
        return piece


def _failure_function(pattern: str) -> list[int]:
    """KMP: failure[i] = length of the longest proper prefix of pattern[: i + 1] that is also its suffix."""
    failure = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = failure[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        failure[i] = k
    return failure


def _longest_suffix_prefix(text: str, pattern: str, failure: list[int]) -> int:
    """The length of the longest suffix of `text` that is a proper prefix of `pattern`, in O(len(text) +
    len(pattern)): run the KMP automaton of `pattern` over `text` and read its final state."""
    k = 0
    for char in text:
        while k and (k == len(pattern) or char != pattern[k]):
            k = failure[k - 1]
        if char == pattern[k]:
            k += 1
    while k == len(pattern):  # a whole occurrence ends here: fall back to its longest proper border
        k = failure[k - 1]
    return k
