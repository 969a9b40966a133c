"""Token ids -> the reply text, piece by piece, with stop strings.

A streamed reply must add up to exactly the text a non-streamed one returns, so both are built here
from the same pieces. After each token the whole reply is decoded again (`skip_special_tokens`, as
`slimtune generate` decodes) and the new tail is released, except for text that may still change:
- a trailing U+FFFD: the token ended inside a multi-byte UTF-8 character that the next token completes;
- a tail that could be the start of a stop string: it is held until it either becomes the stop string
  (then the reply ends before it) or cannot any more.
Decoding the whole reply each step costs O(reply length); replies are bounded by `max_tokens`.
"""

from __future__ import annotations

_REPLACEMENT = "\ufffd"


class TextStream:
    """The reply of one request: feed it tokens with `push`, take the released text from its return value."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
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
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(visible)), 0, -1):
                if visible.endswith(stop[:size]):
                    held = max(held, len(text) - len(visible) + size)
                    break
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
