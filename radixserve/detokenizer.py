"""IncrementalDetokenizer: a request's output text, grown by a few tokens at a time.

Re-decoding the whole output after every token costs O(n) per step, O(n^2) per request: at a
batch of 128 requests 256 tokens into their answers, that is ~32K token decodes a step, and the
step's host time grows past the GPU's. Instead each step decodes a short window: the tokens since
`prefix_offset` (a few tokens of context, so a tokenizer that treats a sequence's first token
differently, or a character split across tokens, decodes the same as in the full text), and
appends what the new tokens add. A window that ends inside a multi-byte character (decodes to a
trailing U+FFFD) waits for the next token. The engine still decodes the full text once, at the
end, so the final text is exactly `tokenizer.decode(output)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from radixserve.model.tokenizer import Tokenizer

_INCOMPLETE = "\ufffd"  # what a decoder makes of a partial UTF-8 sequence


@dataclass(slots=True)
class IncrementalDetokenizer:
    tokenizer: Tokenizer
    text: str = ""
    prefix_offset: int = 0  # start of the context window
    read_offset: int = 0  # tokens already turned into `text`
    _prefix_text: str = field(default="", repr=False)  # decode(ids[prefix_offset:read_offset])

    def update(self, ids: Sequence[int]) -> str:
        """The text of ids (the whole output so far; it only grows), up to its last complete character."""
        if len(ids) <= self.read_offset:
            return self.text
        window = self.tokenizer.decode(ids[self.prefix_offset :])
        if window.endswith(_INCOMPLETE) or len(window) < len(self._prefix_text):
            return self.text  # wait for the rest of the character
        self.text += window[len(self._prefix_text) :]
        # Slide the window: its new start is where this update began reading.
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        self._prefix_text = self.tokenizer.decode(ids[self.prefix_offset : self.read_offset])
        return self.text
