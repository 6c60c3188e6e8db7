"""Streaming decode: generated token ids to text pieces, never splitting a UTF-8 character."""

from __future__ import annotations

from typing import Any, Protocol

try:  # tokenizers >= 0.21
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - older tokenizers: IncrementalDecoder only
    DecodeStream = None


class Decodes(Protocol):
    """What a decoder needs of a tokenizer (``tokenizer.Tokenizer``)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces, never splitting a character.

    Byte-level tokens can end in the middle of a multi-byte UTF-8 character (one emoji is often
    two or three tokens); decoding such a prefix yields U+FFFD. We keep the ids since the last
    emitted piece, decode them as one span, and hold back while the span ends in U+FFFD.
    Decoding a short window (not the whole history) keeps each push cheap, and starting the window
    one emitted token back lets decoders that treat a sequence's first token specially see context.
    """

    def __init__(self, tokenizer: Decodes, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start: the first id whose text is already emitted
        self._read = 0  # ids before this are fully emitted
        self.text = ""  # everything emitted so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is still partial)."""
        self.ids.append(int(token_id))
        return self._advance(self._decode(self.ids[self._prefix : self._read]), self._decode(self.ids[self._prefix :]))

    def _windows(self, token_id: int) -> tuple[list[int], list[int]]:
        self.ids.append(int(token_id))
        return self.ids[self._prefix : self._read], self.ids[self._prefix :]

    def _advance(self, done: str, full: str) -> str:
        # Hold back while the last character is incomplete, or when nothing new appeared (a
        # skipped special token): those ids stay in the window and are decoded with the next.
        if len(full) <= len(done) or full.endswith("\ufffd"):
            return ""
        piece = full[len(done) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += piece
        return piece

    def skip(self, token_ids: list[int]) -> None:
        """Take ids whose text nobody will read: the next ``push`` decodes from the last of them on.

        A character split across the skipped ids and the next one loses its first bytes (the
        next piece starts after them); skipping is for steps that are dropped unread.
        """
        if not token_ids:
            return
        self.ids.extend(int(t) for t in token_ids)
        self._read = len(self.ids)
        self._prefix = self._read - 1

    def flush(self) -> str:
        """Text still held back at the end of generation (a trailing partial character as U+FFFD)."""
        done = self._decode(self.ids[self._prefix : self._read])
        full = self._decode(self.ids[self._prefix :])
        piece = full[len(done) :] if full.startswith(done) else ""
        self._prefix = self._read = len(self.ids)
        self.text += piece
        return piece


class StreamDecoder:
    """``IncrementalDecoder``'s contract on the tokenizers library's own ``DecodeStream``: one call
    into Rust per token instead of two decodes and their windows in Python (a trace writer finishes
    hundreds of requests' tokens a step, holding the GIL the engine needs for most of that Python).

    Like ``IncrementalDecoder`` it holds back ids that end inside a character or add no text, and
    ``flush`` gives a trailing partial character as U+FFFD. For tokenizers whose decoded text is
    used as the library returns it (``Tokenizer.stream_decoder`` picks this one only then).
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._backend = tokenizer.backend
        self.text = ""
        self._restart()

    def _restart(self) -> None:
        """A fresh stream with no context and nothing held."""
        self._stream = DecodeStream(skip_special_tokens=self.skip_special_tokens)
        self._held: list[int] = []  # ids since the last piece
        self._last: int | None = None  # the last id of the last piece: the context of a flush

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is still partial)."""
        token_id = int(token_id)
        try:
            piece = self._stream.step(self._backend, token_id)
        except Exception:  # the library refused its own prefix: decode on from this id with no context
            self._restart()
            try:
                piece = self._stream.step(self._backend, token_id)
            except Exception:
                piece = None
        if not piece:
            self._held.append(token_id)
            return ""
        self._held.clear()
        self._last = token_id
        self.text += piece
        return piece

    def skip(self, token_ids: list[int]) -> None:
        """Take ids whose text nobody will read: the next piece is decoded after the last of them."""
        if not token_ids:
            return
        self._restart()
        try:  # the last id is the context of the next piece; its own text is not emitted
            context = self._stream.step(self._backend, int(token_ids[-1]))
        except Exception:
            context = None
        if context:
            self._last = int(token_ids[-1])
        else:  # it ends inside a character (or adds nothing): no context, its bytes are dropped
            self._restart()

    def flush(self) -> str:
        """Text still held back at the end of generation (a trailing partial character as U+FFFD)."""
        if not self._held:
            return ""
        context = [] if self._last is None else [self._last]
        done = self.tokenizer.decode(context, skip_special_tokens=self.skip_special_tokens)
        full = self.tokenizer.decode(context + self._held, skip_special_tokens=self.skip_special_tokens)
        self._restart()  # what it held is out now
        piece = full[len(done):] if full.startswith(done) else ""
        self.text += piece
        return piece


def push_tokens(decoders: list[IncrementalDecoder | StreamDecoder], token_ids: list[int]) -> list[str]:
    """``d.push(t)`` for many decoders of one tokenizer at once (``IncrementalDecoder`` s with one
    batched decode call)."""
    if not decoders:
        return []
    first = decoders[0]
    if not isinstance(first, IncrementalDecoder):
        return [d.push(t) for d, t in zip(decoders, token_ids, strict=True)]
    windows = [w for d, t in zip(decoders, token_ids, strict=True) for w in d._windows(t)]
    texts = first.tokenizer.decode_batch(windows, skip_special_tokens=first.skip_special_tokens)
    return [d._advance(texts[2 * k], texts[2 * k + 1]) for k, d in enumerate(decoders)]
