"""`TextDeltas`: a request's committed-token events turned into text pieces, each token once.

The controller commits tokens in batches (`ClientEvent(kind="tokens", start, token_ids)`); a
request recomputed after its worker was lost re-commits from `start` (the same tokens, greedy or
seeded). The pieces hold back what might still change: an incomplete UTF-8 character (the
decoder's "\\ufffd") and the last characters that could begin a stop string, which the final
text cuts off. Joined, the pieces are exactly the final text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from elastic_llm.control.requests import ClientEvent


class Decoder(Protocol):
    """What `TextDeltas` needs of a tokenizer."""

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of `token_ids`."""


class TextDeltas:
    """Text pieces of one request, fed its token events in order (not thread-safe: one reader).

    Args:
        decoder: the model's tokenizer (None: no text, only token counts).
        stop: the request's stop strings (their possible starts are held back).
    """

    def __init__(self, decoder: Decoder | None, stop: Sequence[str] = ()) -> None:
        self._decoder = decoder
        self._holdback = max((len(s) for s in stop), default=1) - 1
        #: the committed tokens so far, as the controller last sent them
        self.tokens: list[int] = []
        #: the text already handed out (a prefix of the final text)
        self.sent = ""

    def add(self, event: ClientEvent) -> str:
        """The new text that `event` (a "tokens" event) makes safe to show; "" if none yet."""
        self.tokens[event.start:] = event.token_ids
        if self._decoder is None:
            return ""
        text = self._decoder.decode(self.tokens)
        ready = text[: max(len(self.sent), len(text) - self._holdback)]
        if ready.endswith("\ufffd") or not ready.startswith(self.sent) or len(ready) <= len(self.sent):
            return ""
        piece, self.sent = ready[len(self.sent):], ready
        return piece

    def finish(self, final_text: str) -> str:
        """The rest of `final_text` (the request's finished text) not yet handed out."""
        if final_text.startswith(self.sent) and len(final_text) > len(self.sent):
            piece, self.sent = final_text[len(self.sent):], final_text
            return piece
        return ""
