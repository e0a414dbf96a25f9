"""`llamita chat`: a multi-turn conversation with a chat model in the terminal, through its own chat template.

Each turn renders the conversation so far with the template's generation prompt, streams the reply token by token
(`generate.stream`) until the template's end-of-turn token, and keeps the reply as the assistant's message. A
conversation that outgrows the model's context loses its oldest turns (the system message stays), and says so.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TextIO

from llamita.chat.templates import generation_prompt_ids, stop_ids
from llamita.config import ConfigError
from llamita.generate import stream
from llamita.pretrained import Pretrained

HELP = "/reset clears the conversation, /system TEXT sets the system message, /quit (or Ctrl-D) ends"


@dataclass
class Sampling:
    temperature: float = 0.7
    top_k: int | None = None
    top_p: float | None = None
    max_new_tokens: int = 256
    seed: int | None = None


@dataclass
class ChatSession:
    """A conversation with a chat model; `reply` adds a user turn and streams the assistant's answer."""

    pre: Pretrained
    sampling: Sampling = field(default_factory=Sampling)
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    notice: Callable[[str], None] = lambda message: print(message, file=sys.stderr)

    def __post_init__(self) -> None:
        self.template = self.pre.tokenizer.chat_template
        if not self.template:
            raise ConfigError(
                f"{self.pre.checkpoint}: the model's tokenizer has no chat template; fine-tune it with `llamita sft` "
                "(which stores the template) or use `llamita generate` for plain text"
            )
        self.stops = stop_ids(self.template, self.pre.tokenizer)

    def reset(self) -> None:
        self.messages = []

    def _prompt(self) -> list[int]:
        """The conversation rendered up to the generation prompt, oldest turns dropped until it fits."""
        context = self.pre.model_config.max_seq_len
        while True:
            head = [{"role": "system", "content": self.system}] if self.system else []
            ids = generation_prompt_ids(head + self.messages, self.template, self.pre.tokenizer)
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
        s = self.sampling
        ids: list[int] = []
        shown = ""
        tokenizer = self.pre.tokenizer
        for token in stream(
            self.pre.model, self._prompt(), s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
            top_p=s.top_p, eos_id=self.stops, seed=s.seed,
        ):  # fmt: skip
            if token in self.stops:
                break
            ids.append(token)
            text_so_far = tokenizer.decode(ids)
            if text_so_far.endswith("\ufffd"):  # a character whose bytes are not all out yet
                continue
            yield text_so_far[len(shown) :]
            shown = text_so_far
        answer = tokenizer.decode(ids)
        if answer != shown:
            yield answer[len(shown) :]
        self.messages.append({"role": "assistant", "content": answer})


def run_terminal(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    """The interactive loop: read a line, answer it streamed, until /quit or end of input."""
    print(f"chatting with {session.pre.checkpoint} ({HELP})", file=stdout, flush=True)
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
