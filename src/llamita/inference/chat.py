"""`llamita chat`: a multi-turn conversation with a chat model in the terminal, through its own chat template.

Each turn renders the conversation so far with the template's generation prompt, streams the reply token by token
through the engine (`LLM.stream`) until the template's end-of-turn token, and keeps the reply as the assistant's
message. A conversation that outgrows the model's context loses its oldest turns (the system message stays), and
says so.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TextIO

from llamita.chat.templates import generation_prompt_ids, stop_ids
from llamita.config import ConfigError
from llamita.inference.llm import LLM
from llamita.inference.sampling import SamplingParams
from llamita.inference.text import text_pieces

HELP = "/reset clears the conversation, /system TEXT sets the system message, /quit (or Ctrl-D) ends"


@dataclass
class ChatSession:
    """A conversation with a chat model; `reply` adds a user turn and streams the assistant's answer."""

    llm: LLM
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.7))
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    notice: Callable[[str], None] = lambda message: print(message, file=sys.stderr)

    def __post_init__(self) -> None:
        self.tokenizer = self.llm.tokenizer
        self.template = self.tokenizer.chat_template if self.tokenizer is not None else None
        if not self.template:
            raise ConfigError(
                f"{self.llm.source or 'the model'}: the model's tokenizer has no chat template; fine-tune it with "
                "`llamita sft` (which stores the template) or use `llamita generate` for plain text"
            )
        self.stops = stop_ids(self.template, self.tokenizer)

    def reset(self) -> None:
        self.messages = []

    def _prompt(self) -> list[int]:
        """The conversation rendered up to the generation prompt, oldest turns dropped until it fits."""
        context = self.llm.engine.seq_len
        while True:
            head = [{"role": "system", "content": self.system}] if self.system else []
            ids = generation_prompt_ids(head + self.messages, self.template, self.tokenizer)
            if len(ids) < context or len(self.messages) <= 1:
                break
            self.messages = self.messages[2:]  # the oldest user turn and its answer
            self.notice("(the conversation outgrew the model's context: its oldest turn was dropped)")
        if len(ids) >= context:
            raise ConfigError(f"the message is {len(ids)} tokens with the template; the model's context is {context}")
        return ids

    def reply(self, text: str) -> Iterator[str]:
        """Add the user's `text`, then yield the answer's text piece by piece as its tokens come."""
        self.messages.append({"role": "user", "content": text})
        params = dataclasses.replace(self.sampling, stop_token_ids=(*self.sampling.stop_token_ids, *self.stops))

        def answer_tokens() -> Iterator[int]:
            for token in self.llm.stream(self._prompt(), params):
                if token in self.stops:
                    return
                yield token

        # The answer decoded on its own: its text is the content the template renders in the next turn.
        pieces = []
        for piece in text_pieces(self.tokenizer, answer_tokens(), stop=params.stop):
            pieces.append(piece)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(pieces)})


def run_terminal(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    """The interactive loop: read a line, answer it streamed, until /quit or end of input."""
    print(f"chatting with {session.llm.source or 'the model'} ({HELP})", file=stdout, flush=True)
    while True:
        print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line or line.strip() == "/quit":
            print(file=stdout)
            return
        line = line.rstrip("\n")
        if line.strip() == "/reset":
            session.reset()
            print("(conversation cleared)", file=stdout, flush=True)
            continue
        if line.startswith("/system"):
            session.system = line[len("/system") :].strip() or None
            session.reset()
            print(f"(system message {'set' if session.system else 'cleared'}; conversation cleared)", file=stdout)
            continue
        if not line.strip():
            continue
        print("assistant> ", end="", file=stdout, flush=True)
        for piece in session.reply(line):
            print(piece, end="", file=stdout, flush=True)
        print(file=stdout, flush=True)
