"""Token ids to text, incrementally: UTF-8-safe streaming and stop strings.

A byte-level tokenizer can split one character over several tokens; decoding a prefix of them
yields U+FFFD. :class:`IncrementalDetokenizer` never emits text ending in such a half character
(it waits for the next token), and it decodes only a short window of recent tokens per step
(the offsets scheme vLLM and text-generation-inference use), not the whole sequence.

:class:`TextAssembler` adds stop strings: the text is cut before the first stop string, and
while streaming the last ``len(longest stop) - 1`` characters are held back, so a stop string
split across tokens is never half-emitted. Each token searches only the window where a stop
string could newly end (its own length back from the new text), never the whole text, so the
per-token cost is bounded by the (bounded, see ``protocol.MAX_STOP_STRINGS``) stop list and
the new text, not by how long the answer has grown.
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the context window re-decoded each step
        self.read_offset = 0  # tokens before this are already emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_ids: list[int]) -> str:
        """Text completed by ``token_ids`` (possibly empty while a character is incomplete)."""
        self.ids.extend(token_ids)
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character decodes as U+FFFD)."""
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return after[len(before) :]


class TextAssembler:
    """Detokenize a stream and apply stop strings; tells the caller when a stop string hit."""

    def __init__(self, tokenizer: Decoder, stop: list[str]) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stop = [s for s in stop if s]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def _add(self, delta: str) -> None:
        if not delta or self.stopped:
            return
        old_length = len(self.text)
        self.text += delta
        hits = [
            i
            for i in (self.text.find(s, max(0, old_length - len(s) + 1)) for s in self.stop)
            if i >= 0
        ]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _take(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        piece = self.text[self.emitted : end]
        self.emitted = end
        return piece

    def feed(self, token_ids: list[int]) -> str:
        """New text safe to send now. Check :attr:`stopped` afterwards."""
        self._add(self.detokenizer.push(token_ids))
        if self.stopped:
            return self._take(len(self.text))
        return self._take(len(self.text) - self.holdback)

    def finish(self) -> str:
        """The rest of the text once generation ended."""
        self._add(self.detokenizer.flush())
        return self._take(len(self.text))
