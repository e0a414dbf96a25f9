"""Text as a sequence's tokens come: incremental detokenization with stop strings held back.

A `TextStream` follows one sequence. Its text is what decoding prompt and output together adds to the prompt's
text, ``decode(prompt + output)[len(decode(prompt)):]``, so a continuation keeps the space it starts with. It is
computed the way vLLM's detokenizer does, without decoding everything again for every token: only a small window
of recent ids is decoded, ``ids[prefix:read]`` (text already given out) and ``ids[prefix:]`` (with the new ids);
what the longer decoding adds is the new text. A decoding that ends in U+FFFD ends in a character whose bytes are
not all out yet (byte-fallback or byte-level tokens split one UTF-8 character), so it waits for the next ids.

Stop strings: a stop string may span tokens, so text whose tail could be the start of one is held back until the
next ids decide it. Once one appears, the stream is `stopped` and its text ends before it.

`step_text` is where a step's new ids meet the text: a stop id adds none, a finished sequence gets what was held
back. `follow` does it beside the engine and finishes a sequence whose text reached a stop string there (`LLM`,
`llamita chat`); the server does it in its HTTP processes, as vLLM's front end detokenizes apart from its engine
core, and aborts the sequence (`Server.text`). `text_pieces` is the same stream over an iterable of ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from llamita.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llamita.inference.engine import Engine
    from llamita.inference.scheduler import Sequence as EngineSequence

WINDOW = 5
"""Prompt ids the first decoding window starts with (vLLM's number): enough for a leading space to show."""
MAX_WINDOW = 16
"""The first window grows back to at most this many ids, to start on whole characters, not on special tokens only
(a decoder drops the leading space of a window's first text: it must be the window's own)."""
INCOMPLETE = "\ufffd"
"""What a decoder writes for the bytes of a character whose other bytes are not there (yet)."""


class TextStream:
    """The text of one sequence, given out piece by piece as its ids come, never half a character and never a part
    of a stop string.

    For ids whose bytes form valid UTF-8, the pieces joined equal ``decode(prompt + output)[len(decode(prompt)):]``
    cut before the first stop string (a decoder replaces invalid bytes as a whole, so no stream can match it there).

    Args:
        tokenizer: Decodes the ids.
        prompt_ids: The ids before the output: its text is not given out, but a continuation's leading space is.
        stop: Strings that end the text (the text ends before the first one that appears).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), stop: Sequence[str] = ()) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.stopped = False
        """Whether a stop string appeared: the text ends before it, and later ids are ignored."""
        self._ids = list(prompt_ids)
        self._n_prompt = len(self._ids)
        self._read = len(self._ids)  # ids whose text is in _decoded
        self._prefix = _window_start(tokenizer, self._ids, self._read)
        self._prefix_text = tokenizer.decode(self._ids[self._prefix : self._read])
        self._decoded = ""  # the new text of ids[:_read], whole characters only
        self._emitted = 0  # characters of _decoded given out
        self._finished = False

    @property
    def text(self) -> str:
        """All the text given out so far (after `finish`, all of it); it ends before a stop string."""
        return self._decoded[: self._emitted]

    @property
    def offset(self) -> int:
        """Characters decoded so far, given out or held back: where the text of the next id starts."""
        return len(self._decoded)

    @property
    def token_ids(self) -> list[int]:
        """The ids pushed so far (after the prompt)."""
        return self._ids[self._n_prompt :]

    def push(self, token_ids: Iterable[int]) -> str:
        """Add new ids; returns the text that can now be given out ("" while it waits or after a stop)."""
        if self.stopped or self._finished:
            return ""
        self._ids.extend(token_ids)
        text = self.tokenizer.decode(self._ids[self._prefix :])
        if len(text) > len(self._prefix_text) and not text.endswith(INCOMPLETE):
            self._take(text)
        return self._release(final=False)

    def finish(self) -> str:
        """The end of the sequence: give out what was held back (an incomplete character as U+FFFD, text that
        might have begun a stop string); "" after a stop."""
        if self.stopped or self._finished:
            return ""
        text = self.tokenizer.decode(self._ids[self._prefix :])
        if len(text) > len(self._prefix_text):
            self._take(text)
        self._finished = True
        return self._release(final=True)

    def _take(self, text: str) -> None:
        """`text` (the window decoded through the last id) is complete: keep what it adds, move the window on."""
        self._decoded += text[len(self._prefix_text) :]
        # The next window starts where this one's new ids start: on whole characters, as their text is complete.
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self.tokenizer.decode(self._ids[self._prefix : self._read])

    def _release(self, final: bool) -> str:
        """Give out the decoded text up to a stop string, or up to a tail that might begin one."""
        text, start = self._decoded, self._emitted
        if not self.stop:  # nothing to hold back (most streams: a quarter of a push's time at 256 streams)
            self._emitted = len(text)
            return text[start:]
        # A stop string cannot begin before `start`: a tail that could begin one is never given out.
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            end = min(hits)
            self._decoded, self.stopped = text[:end], True
        elif final:
            end = len(text)
        else:
            end = len(text) - self._held(text, start)
        self._emitted = end
        return text[start:end]

    def _held(self, text: str, start: int) -> int:
        """Length of the longest tail of `text` (after `start`) that is the beginning of a stop string."""
        longest = min(max((len(s) for s in self.stop), default=1) - 1, len(text) - start)
        for n in range(longest, 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0


def _window_start(tokenizer: Tokenizer, ids: list[int], end: int) -> int:
    """Where the first decoding window starts: `WINDOW` ids back, further back while it would start inside a
    character (its text begins with U+FFFD) or decode to nothing (special tokens)."""
    start = max(end - WINDOW, 0)
    while start > 0 and end - start < MAX_WINDOW:
        text = tokenizer.decode(ids[start:end])
        if text and not text.startswith(INCOMPLETE):
            break
        start -= 1
    return start


def follow(engine: Engine, seq: EngineSequence, new: list[int], text: TextStream) -> str:
    """A step's new ids of `seq` through its stream; returns the text they add.

    A stop id that finished the sequence adds no text (it is in the output ids, as in vLLM). A stop string in the
    text finishes the sequence there: finish reason "stop", aborted in the engine if it was still running (its slot
    free for the next step). A sequence that finished otherwise gets the text held back.
    """
    ends_on_stop_id = bool(seq.finish_reason == "stop" and new and new[-1] in seq.stops)
    piece = step_text(text, new, ends_on_stop_id, seq.finished)
    if text.stopped:
        running = not seq.finished
        seq.finish_reason = "stop"
        if running:
            engine.abort(seq)
    return piece


def step_text(
    text: TextStream, new: list[int], ends_on_stop_id: bool, finished: bool, offsets: list[int] | None = None
) -> str:
    """A step's new ids through `text`; returns the text they add ("" once it has stopped).

    Args:
        text: The sequence's stream.
        new: The step's ids.
        ends_on_stop_id: The last of them is a stop id, which adds no text.
        finished: The sequence ended with them: what was held back is given out (unless a stop string ended it).
        offsets: Where each id's text starts in the sequence's text is appended to it, the ids pushed one by one
            (for logprobs); None: all at once.
    """
    pushed = new[:-1] if ends_on_stop_id else new
    if offsets is None:
        piece = text.push(pushed)
    else:
        pieces = []
        for token in pushed:
            offsets.append(text.offset)
            pieces.append(text.push([token]))
        if ends_on_stop_id:
            offsets.append(text.offset)
        piece = "".join(pieces)
    if finished and not text.stopped:
        piece += text.finish()
    return piece


def text_pieces(
    tokenizer: Tokenizer,
    tokens: Iterable[int],
    *,
    prefix: Sequence[int] = (),
    show_prefix: bool = False,
    stop: Sequence[str] = (),
) -> Iterator[str]:
    """Text as the tokens come, piece by piece (a `TextStream` over them), never half a character.

    Args:
        tokenizer: Decodes the ids.
        tokens: The ids, as they are made.
        prefix: Ids before them (the prompt): keeps a continuation's leading space.
        show_prefix: Yield the prefix's text first.
        stop: Stop strings: the text ends before the first one.
    """
    if show_prefix and prefix:
        yield tokenizer.decode(prefix)
    stream = TextStream(tokenizer, prefix, stop)
    for token in tokens:
        piece = stream.push([token])
        if piece:
            yield piece
    piece = stream.finish()
    if piece:
        yield piece
