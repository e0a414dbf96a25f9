"""Chat templates: a conversation -> token ids and a per-token trainable mask, rendered as transformers does.

A template is a Jinja string, the ``chat_template`` of a ``tokenizer_config.json``: a built-in one
(:data:`BUILTIN`: ``zephyr``, ``chatml``, ``llama2``) or any other. It is rendered in transformers' sandbox with
transformers' options and helpers, and the text is tokenized as ``apply_chat_template(..., tokenize=True)`` does:
special-token strings are the special ids and no BOS is added, so a template writes BOS where it wants one
(``llama2`` before every ``[INST]``; ``zephyr`` and ``chatml`` nowhere, as TinyLlama-Chat's ids from
transformers start without one). As in transformers, a special token's string inside a message also becomes
that token.

What is trained (``train_on="assistant"``) is what a chat model must write itself: everything after the
generation prompt up to and including the turn's end token, in every assistant turn (zephyr: content + ``</s>``,
its prompt being ``<|assistant|>\\n``; chatml: content + ``<|im_end|>``; llama2: `` `` + content + `` </s>``).
Text after the end token (chatml's and zephyr's newline) is not trained: generation stops at that token, so a
model never writes what follows it. axolotl's ``train_on_eos: turn`` labels the token alone too; TRL's training
templates put the newline inside ``{% generation %}`` and train it, which is harmless but never used.

The spans come from the rendering, never from searching token ids: an assistant turn starts where the
conversation before it, rendered with the generation prompt, ends, and ends with its last end-of-turn token
before where the conversation through it ends. A token is trainable when its characters overlap a span, as in
transformers' ``return_assistant_tokens_mask``. So a template whose earlier turns change with later ones is
refused, and an end-of-turn EOS is trained even where EOS also pads.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from llamita.tokenizer import Tokenizer, read_chat_template

try:
    from jinja2 import TemplateError, nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
except ImportError as e:  # pragma: no cover - jinja2 comes with transformers
    raise ImportError("chat templates need jinja2: pip install 'jinja2>=3.1.6'") from e

ZEPHYR = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)
"""TinyLlama-1.1B-Chat-v1.0's template, as its tokenizer_config.json has it."""

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML, as in transformers' chat-template docs; ``<|im_start|>`` and ``<|im_end|>`` are new special tokens."""

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
"""Llama-2-chat's template, as Meta's Hugging Face tokenizer_config.json has it (no generation prompt)."""

BUILTIN = {"zephyr": ZEPHYR, "chatml": CHATML, "llama2": LLAMA2}
_NEW_TOKENS = {CHATML: ("<|im_start|>", "<|im_end|>")}
"""Special tokens a built-in template writes that a Llama tokenizer lacks."""
_END_OF_TURN = {CHATML: "<|im_end|>"}
"""The token that ends an assistant turn, where it is not the tokenizer's EOS token."""
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Rendered:
    """A rendered conversation: token ids, whether each id is a training target, and the text they encode."""

    ids: list[int]
    trainable: list[bool]
    text: str


def get_template(spec: str | Path, tokenizer: Tokenizer | None = None) -> str:
    """The Jinja source of a chat template.

    Args:
        spec: a built-in name (``zephyr``, ``chatml``, ``llama2``); ``tokenizer`` for the tokenizer's own
            template; a Jinja string; or a path to a ``.jinja`` file, a ``tokenizer_config.json`` or a directory
            holding one.
        tokenizer: the tokenizer, needed for ``tokenizer``.

    Raises:
        ValueError: ``spec`` is none of these, or names a file or tokenizer without a template.
    """
    if isinstance(spec, str):
        if spec in BUILTIN:
            return BUILTIN[spec]
        if spec == "tokenizer":
            if tokenizer is None or tokenizer.chat_template is None:
                raise ValueError(
                    "template 'tokenizer': the tokenizer has no chat_template; name a built-in template "
                    f"({', '.join(BUILTIN)}) or a Jinja file"
                )
            return tokenizer.chat_template
        if "{{" in spec or "{%" in spec:
            return spec
    path = Path(spec)
    if not path.exists():
        raise ValueError(
            f"{str(spec)[:100]!r} is not a chat template: name a built-in one ({', '.join(BUILTIN)}), 'tokenizer', "
            "a Jinja string, a .jinja file, or a tokenizer_config.json (or its directory)"
        )
    source = read_chat_template(path)
    if source is None:
        raise ValueError(f"{path}: holds no chat_template")
    return source


def add_template_tokens(tokenizer: Tokenizer, template: str | Path) -> int:
    """Add the special tokens ``template`` writes (chatml's two) to ``tokenizer``.

    Returns:
        How many were new: grow the model by as many rows (:func:`llamita.chat.vocab.resize_token_embeddings`).
    """
    return tokenizer.add_special_tokens(_NEW_TOKENS.get(get_template(template, tokenizer), ()))


def render(
    messages: Sequence[Mapping[str, Any]],
    template: str | Path,
    tokenizer: Tokenizer,
    *,
    add_generation_prompt: bool = False,
    train_on: Literal["assistant", "all"] = "assistant",
    **variables: Any,
) -> Rendered:
    """Render and tokenize a conversation, marking the tokens to train on.

    ``ids`` and ``text`` equal transformers' ``apply_chat_template(messages, tokenize=True / False,
    add_generation_prompt=..., **variables)`` for this tokenizer saved with this template.

    Args:
        messages: ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``; other keys are passed to
            the template as they are.
        template: anything :func:`get_template` reads.
        tokenizer: the tokenizer; its named special tokens are template variables (``bos_token``, ...).
        add_generation_prompt: end with the prompt for the assistant's next turn (never trained).
        train_on: ``assistant``: every assistant turn through its end-of-turn token (see the module's
            docstring); ``all``: every token.
        variables: further template variables, e.g. ``date_string``; they override the special tokens.

    Raises:
        ValueError: a message is malformed (its index named), the template fails or needs tokens the tokenizer
            lacks, or an assistant turn cannot be found in the rendering or does not end with its end token.
    """
    source = get_template(template, tokenizer)
    messages = _checked(messages)
    if train_on not in ("assistant", "all"):
        raise ValueError(f"train_on must be 'assistant' or 'all', got {train_on!r}")
    _check_tokens(source, tokenizer)
    text = _render_text(messages, source, tokenizer, add_generation_prompt, variables)
    ids, offsets = tokenizer.encode_rendered(text)
    if train_on == "all":
        return Rendered(ids, [True] * len(ids), text)
    spans = _assistant_spans(messages, source, tokenizer, text, variables)
    trainable = [any(start < end_tok and start_tok < end for start, end in spans) for start_tok, end_tok in offsets]
    return Rendered(ids, trainable, text)


def render_answers(
    prompt: Sequence[Mapping[str, Any]],
    answers: Sequence[Mapping[str, Any]],
    template: str | Path,
    tokenizer: Tokenizer,
    **variables: Any,
) -> tuple[list[int], list[list[int]]]:
    """Token ids of a prompt and of alternative assistant answers to it (a preference pair's two completions).

    Each ``prompt + [answer]`` is rendered as :func:`render` renders it; an answer's ids are what the model writes
    in that last turn (its trained tokens, through the end-of-turn token; what follows that token is left out),
    and the prompt's are the ids all renderings share before them.

    Args:
        prompt: the conversation before the answers, ending with a user turn.
        answers: assistant messages.
        template, tokenizer, variables: as for :func:`render`.

    Returns:
        (prompt ids, [answer ids, ...]).

    Raises:
        ValueError: as :func:`render`, or an answer renders no trained token.
    """
    rendered = [render([*prompt, answer], template, tokenizer, **variables) for answer in answers]
    spans = []
    for i, r in enumerate(rendered):
        if not any(r.trainable):
            raise ValueError(f"answer {i}: the template renders no token of it")
        end = len(r.trainable) - r.trainable[::-1].index(True)  # one past the last trained token
        start = end
        while start > 0 and r.trainable[start - 1]:
            start -= 1
        spans.append((start, end))
    shared = min(start for start, _ in spans)
    first = rendered[0].ids
    for r in rendered[1:]:
        shared = next((k for k in range(shared) if r.ids[k] != first[k]), shared)
    return first[:shared], [r.ids[shared:end] for r, (_, end) in zip(rendered, spans)]


def generation_prompt_ids(
    messages: Sequence[Mapping[str, Any]], template: str | Path, tokenizer: Tokenizer, **variables: Any
) -> list[int]:
    """Token ids of the conversation so far and the generation prompt: what a chat model continues."""
    return render(messages, template, tokenizer, add_generation_prompt=True, train_on="all", **variables).ids


def stop_ids(template: str | Path, tokenizer: Tokenizer) -> list[int]:
    """The id that ends an assistant turn, where generation stops: zephyr and llama2 ``</s>``, chatml ``<|im_end|>``.

    A template other than the built-ins ends its turns with the tokenizer's EOS token.

    Raises:
        ValueError: the end-of-turn token is not one token of this tokenizer.
    """
    source = get_template(template, tokenizer)
    _check_tokens(source, tokenizer)
    end_of_turn = _end_of_turn(source, tokenizer)
    ids, _ = tokenizer.encode_rendered(end_of_turn)
    if len(ids) != 1:
        raise ValueError(f"the end-of-turn token {end_of_turn!r} is {len(ids)} tokens of this tokenizer, not one")
    return ids


def _checked(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Plain dict copies of valid messages, without None values (transformers drops them too)."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("a conversation must be a non-empty list of {'role': ..., 'content': ...} messages")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {i}: expected a dict with 'role' and 'content', got {type(message).__name__}")
        if message.get("role") not in ROLES:
            raise ValueError(f"message {i}: role {message.get('role')!r} is not one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"message {i}: content must be a string, got {type(message.get('content')).__name__}")
    return [{key: value for key, value in message.items() if value is not None} for message in messages]


def _check_tokens(source: str, tokenizer: Tokenizer) -> None:
    for token in _NEW_TOKENS.get(source, ()):
        if len(tokenizer.encode_rendered(token)[0]) != 1:
            raise ValueError(
                f"the chat template writes {token!r}, which this tokenizer lacks: call "
                "llamita.chat.templates.add_template_tokens(tokenizer, template) and grow the model's embeddings "
                "(llamita.chat.vocab.resize_token_embeddings)"
            )


def _end_of_turn(source: str, tokenizer: Tokenizer) -> str:
    return _END_OF_TURN.get(source, tokenizer.special_tokens["eos_token"])


def _assistant_spans(
    messages: list[dict[str, Any]], source: str, tokenizer: Tokenizer, text: str, variables: dict[str, Any]
) -> list[tuple[int, int]]:
    """Character spans of what the model writes in each assistant turn, from renderings of the turns before it."""

    def rendered_length(index: int, n_messages: int, add_generation_prompt: bool) -> int:
        prefix = _render_text(messages[:n_messages], source, tokenizer, add_generation_prompt, variables)
        if not text.startswith(prefix):
            raise ValueError(
                f"message {index}: the template renders the conversation up to here differently from the start "
                "of the whole conversation (a later turn changes an earlier one), so the assistant turn cannot "
                "be located; use a template whose turns do not depend on later ones"
            )
        return len(prefix)

    end_of_turn = _end_of_turn(source, tokenizer)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = rendered_length(i, i, add_generation_prompt=True) if i else 0
        end = rendered_length(i, i + 1, add_generation_prompt=False)
        stop = text.rfind(end_of_turn, start, end)
        if stop < 0:
            raise ValueError(
                f"message {i}: the template does not end this assistant turn with {end_of_turn!r}, so a model "
                "trained on it would not learn to stop; end assistant turns with the tokenizer's EOS token"
            )
        spans.append((start, stop + len(end_of_turn)))
    return spans


def _render_text(
    messages: list[dict[str, Any]],
    source: str,
    tokenizer: Tokenizer,
    add_generation_prompt: bool,
    variables: dict[str, Any],
) -> str:
    """The template's text, with the variables transformers' ``apply_chat_template`` passes."""
    try:
        return _compile(source).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            **{"tools": None, "documents": None, **tokenizer.special_tokens, **variables},
        )
    except TemplateError as e:
        raise ValueError(f"chat template: {e}") from e


class _GenerationTag(Extension):
    """transformers' ``{% generation %}...{% endgeneration %}``: renders its body (our spans need no markers)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> Any:
    """transformers' environment: sandboxed, blocks trimmed, loop controls, and its three helpers."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    # transformers' filter: unlike Jinja's own, it does not HTML-escape.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)
