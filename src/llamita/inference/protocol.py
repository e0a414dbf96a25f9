"""The OpenAI API as llamita speaks it: request bodies checked into engine requests, and answers in OpenAI's shapes.

A body is read by pydantic straight from its bytes (invalid JSON and bad UTF-8 are caught there), with unknown
fields ignored as OpenAI's server ignores them. Every problem is an `APIError` in OpenAI's error JSON naming the
field (``param``), never an exception of the server: fields llamita cannot honour (tools, logit_bias, a
response_format other than text, best_of above n, suffix, echo with logprobs) are refused by name rather than
ignored, and a prompt past the context says its token counts.

A request becomes one `Choice` per prompt and per `n`: the prompt's token ids and the `SamplingParams` of one engine
sequence (seeds seed + i when a seed is given). The answers' parts are built here too: each endpoint's own logprobs
format (completions: tokens, token_logprobs, top_logprobs, text_offset; chat: content entries with token, logprob,
bytes, top_logprobs) and the usage counts.

A token in logprobs is named by its exact bytes (`Tokenizer.token_bytes`: a byte-fallback or byte-level token may
hold a part of a character): its text where those bytes are valid UTF-8 on their own, else ``bytes:`` and each byte
as ``\\xNN`` (``"bytes:\\xe2\\x82"``), as vLLM writes it, rather than a U+FFFD that several tokens would share.
Chat's ``bytes`` are the token's bytes themselves, so joining them rebuilds a character split over tokens. The keys
of a completion's ``top_logprobs`` are unique: two tokens with the same bytes (a byte token ``<0x41>`` and the
token ``A``) are told apart by naming the later one (the less likely; never the chosen token) ``token_id:N``, as
vLLM names tokens with ``return_tokens_as_token_ids``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llamita.chat.templates import generation_prompt_ids
from llamita.config import ConfigError
from llamita.inference.sampling import SamplingParams
from llamita.tokenizer import Tokenizer

MAX_N = 128
"""Choices per request at most (OpenAI's limit)."""
MAX_LOGPROBS = 20
"""Most likely tokens returned per token at most (OpenAI's limit for chat, vLLM's default)."""
MAX_STOP = 16
"""Stop strings per request at most."""
COMPLETION_MAX_TOKENS = 16
"""OpenAI's default max_tokens of a completion; a chat answer may fill the context."""


class APIError(Exception):
    """An answer in OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------- bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Request(_Body):
    """The fields both endpoints share."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Any = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: Any = None
    # vLLM's extra sampling fields, honoured the same way.
    top_k: int | None = Field(None, ge=-1, le=2**31)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    ignore_eos: bool = False

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Request):
    prompt: Any = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: Any = None


class ChatRequest(_Request):
    messages: Any = None
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    modalities: Any = None
    audio: Any = None


def parse_body(cls: type[_Request], raw: bytes) -> Any:
    """The request of a raw body, or an `APIError` naming the first field that is wrong."""
    try:
        return cls.model_validate_json(raw)
    except ValidationError as e:
        error = e.errors(include_url=False)[0]
        param = _param(error["loc"])
        where = f"{param}: " if param else "request body: "
        raise APIError(400, where + error["msg"], param, code="invalid_value") from None


def _param(loc: Sequence[str | int]) -> str | None:
    """A pydantic location as OpenAI writes a param: ``messages[0].content``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or None


# ----------------------------------------------------------------------------------------------- checks
def _refuse(field: str, why: str) -> APIError:
    return APIError(400, f"{field}: {why}", field, code="unsupported_parameter")


def check_supported(req: _Request) -> None:
    """Refuse, by name, what llamita cannot honour (rather than ignore it and answer something else)."""
    if req.logit_bias:
        raise _refuse("logit_bias", "is not supported by llamita; leave it out")
    if isinstance(req, CompletionRequest):
        if req.best_of is not None and req.best_of != req.n:
            raise _refuse("best_of", f"must equal n ({req.n}): llamita returns every sequence it generates")
        if req.suffix not in (None, ""):
            raise _refuse("suffix", "insertion (a suffix after the completion) is not supported; leave it out")
        if req.echo and req.logprobs is not None:
            raise _refuse("echo", "echo with logprobs would need the prompt's logprobs, which llamita does not score")
        return
    assert isinstance(req, ChatRequest)
    for field in ("tools", "functions"):
        if getattr(req, field):
            raise _refuse(field, "tool calling is not supported by llamita; leave it out")
    for field in ("tool_choice", "function_call"):
        if getattr(req, field) not in (None, "none"):
            raise _refuse(field, "tool calling is not supported by llamita; leave it out or send 'none'")
    fmt = req.response_format
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise _refuse("response_format", "only {'type': 'text'} is supported (no JSON mode or schemas)")
    if req.modalities is not None and req.modalities != ["text"]:
        raise _refuse("modalities", "only ['text'] is supported")
    if req.audio is not None:
        raise _refuse("audio", "audio output is not supported")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs: needs logprobs set to true", "top_logprobs", code="invalid_value")


def stop_strings(value: Any) -> tuple[str, ...]:
    """``stop``: a string or a list of strings (null: none)."""
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise APIError(400, "stop: must be a string or a list of strings", "stop", code="invalid_value")
    if len(stops) > MAX_STOP:
        raise APIError(400, f"stop: at most {MAX_STOP} strings, got {len(stops)}", "stop", code="invalid_value")
    if not all(stops):
        raise APIError(400, "stop: the strings must not be empty", "stop", code="invalid_value")
    for s in stops:
        _check_unicode(s, "stop")
    return tuple(stops)


def _check_unicode(text: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{param}: is not valid Unicode (a lone surrogate)", param, code="invalid_value") from None


# ----------------------------------------------------------------------------------------------- prompts
@dataclass
class Prompt:
    """One prompt of a request: its ids, and its text as given (for echo)."""

    ids: list[int]
    text: str | None


def completion_prompts(value: Any, tokenizer: Tokenizer) -> list[Prompt]:
    """``prompt``: a string, a list of strings, token ids, or a list of token-id lists; text gets BOS, as in `LLM`."""
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, list) and value and all(_is_id(i) for i in value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise APIError(
            400, "prompt: must be a string, a list of strings, a list of token ids or a list of token-id lists "
            "(and not empty)", "prompt", code="invalid_value",
        )  # fmt: skip
    prompts = []
    for i, p in enumerate(value):
        if isinstance(p, str):
            _check_unicode(p, f"prompt[{i}]")
            prompts.append(Prompt(tokenizer.encode(p, bos=True), p))
        elif isinstance(p, list) and p and all(_is_id(t) for t in p):
            bad = [t for t in p if not 0 <= t < tokenizer.vocab_size]
            if bad:
                raise APIError(
                    400, f"prompt[{i}]: token ids {bad[:5]} are outside the vocabulary 0..{tokenizer.vocab_size - 1}",
                    f"prompt[{i}]", code="invalid_value",
                )  # fmt: skip
            prompts.append(Prompt(list(p), None))
        else:
            raise APIError(
                400,
                f"prompt[{i}]: must be a string or a non-empty list of token ids",
                f"prompt[{i}]",
                code="invalid_value",
            )
    return prompts


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def chat_messages(value: Any) -> list[dict[str, str]]:
    """``messages`` as the chat template takes them: roles system, user, assistant (developer is system), text
    content (a string, or text parts joined by newlines)."""
    if not isinstance(value, list) or not value:
        raise APIError(400, "messages: must be a non-empty list of messages", "messages", code="invalid_value")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where}: must be an object with role and content", where, code="invalid_value")
        role = {"developer": "system"}.get(m.get("role"), m.get("role"))
        if role not in ("system", "user", "assistant"):
            raise APIError(
                400, f"{where}.role: {m.get('role')!r} is not supported; use system, user or assistant (no tools)",
                f"{where}.role", code="invalid_value",
            )  # fmt: skip
        if m.get("tool_calls") or m.get("function_call"):
            raise _refuse(f"{where}.tool_calls", "tool calling is not supported by llamita")
        out.append({"role": role, "content": _content(m.get("content"), f"{where}.content")})
    return out


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        _check_unicode(content, where)
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(
                    400, f"{where}[{j}]: only text parts ({{'type': 'text', 'text': ...}}) are supported",
                    f"{where}[{j}]", code="invalid_value",
                )  # fmt: skip
            _check_unicode(part["text"], f"{where}[{j}].text")
            texts.append(part["text"])
        return "\n".join(texts)
    raise APIError(400, f"{where}: must be a string or a list of text parts", where, code="invalid_value")


def chat_prompt(messages: list[dict[str, str]], template: str, tokenizer: Tokenizer) -> list[int]:
    """The conversation rendered by the model's chat template up to the generation prompt."""
    try:
        return generation_prompt_ids(messages, template, tokenizer)
    except ValueError as e:  # a template's raise_exception, or a message it cannot render
        raise APIError(400, f"messages: the chat template cannot render them: {e}", "messages") from None


# ----------------------------------------------------------------------------------------------- choices
@dataclass
class Choice:
    """One engine sequence of a request."""

    index: int
    prompt: Prompt
    params: SamplingParams


def choices(
    req: _Request,
    prompts: list[Prompt],
    context: int,
    *,
    max_tokens: int | None,
    default_max_tokens: int | None,
    logprobs: int | None,
    prompt_param: str,
    stop_token_ids: Sequence[int] = (),
) -> list[Choice]:
    """The engine sequences of a request: n per prompt, prompt-major (OpenAI's order of choices).

    Args:
        req: The request.
        prompts: Its prompts.
        context: Positions per sequence: a prompt and its output fit in it.
        max_tokens: The max_tokens asked for (None: the default).
        default_max_tokens: The endpoint's default (None: what the context leaves).
        logprobs: Most likely tokens per token to return (None: no logprobs).
        prompt_param: The field the prompt came from, for errors.
        stop_token_ids: Ids that end a sequence (the chat template's end of turn).

    Raises:
        APIError: A prompt that leaves no room, or max_tokens past the context (with the token counts).
    """
    stops = stop_strings(req.stop)
    out = []
    for p in prompts:
        n_prompt = len(p.ids)
        if n_prompt >= context:
            raise APIError(
                400, f"This model's maximum context length is {context} tokens, but the {prompt_param} is "
                f"{n_prompt} tokens (one more is needed for the output); shorten it to at most {context - 1} tokens",
                prompt_param, code="context_length_exceeded",
            )  # fmt: skip
        room = context - n_prompt
        if max_tokens is not None and max_tokens > room:
            raise APIError(
                400, f"This model's maximum context length is {context} tokens, but {n_prompt + max_tokens} were "
                f"requested ({n_prompt} in the {prompt_param}, {max_tokens} for the completion); lower max_tokens to "
                f"at most {room} or shorten the {prompt_param}",
                "max_tokens", code="context_length_exceeded",
            )  # fmt: skip
        n_new = max_tokens or min(default_max_tokens or room, room)
        for i in range(req.n):
            try:
                params = SamplingParams(
                    max_tokens=n_new,
                    temperature=1.0 if req.temperature is None else req.temperature,
                    top_p=1.0 if req.top_p is None else req.top_p,
                    top_k=None if req.top_k in (None, -1, 0) else req.top_k,
                    min_p=req.min_p or 0.0,
                    repetition_penalty=req.repetition_penalty or 1.0,
                    presence_penalty=req.presence_penalty or 0.0,
                    frequency_penalty=req.frequency_penalty or 0.0,
                    seed=None if req.seed is None else req.seed + i,
                    stop=stops,
                    stop_token_ids=tuple(stop_token_ids),
                    ignore_eos=req.ignore_eos,
                    logprobs=logprobs,
                )
            except ConfigError as e:  # the fields are checked above; this names what SamplingParams still refuses
                raise APIError(400, str(e).removeprefix("SamplingParams: "), code="invalid_value") from None
            out.append(Choice(len(out), p, params))
    return out


# ---------------------------------------------------------------------------------------------- answers
class TokenTexts:
    """Each token's name in logprobs (`token_string` of its bytes), worked out once per token."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.bytes = tokenizer.token_bytes
        self.known: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        text = self.known.get(token)
        if text is None:
            text = self.known[token] = token_string(self.bytes(token))
        return text


def token_string(data: bytes) -> str:
    """A token's bytes as logprobs name them: their text, or ``bytes:\\xNN...`` when they are not valid UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def completion_logprobs(
    token_texts: TokenTexts, token_ids: list[int], logprobs: list[dict[str, Any]], offsets: list[int]
) -> dict[str, Any]:
    """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs ({token: logprob}), text_offset."""
    return {
        "tokens": [token_texts(t) for t in token_ids],
        "token_logprobs": [lp["logprob"] for lp in logprobs],
        "top_logprobs": [_top_logprobs(token_texts, t, lp["top"]) for t, lp in zip(token_ids, logprobs)],
        "text_offset": offsets,
    }


def _top_logprobs(token_texts: TokenTexts, chosen: int, top: list[tuple[int, float]]) -> dict[str, float]:
    """{token: logprob}, most likely first; a token whose name another one has already is ``token_id:N`` (the chosen
    token keeps its name, the one ``tokens`` gives it)."""
    owner = {token_texts(chosen): chosen}
    out = {}
    for token, logprob in top:
        name = token_texts(token)
        if owner.setdefault(name, token) != token:
            name = f"token_id:{token}"
        out[name] = logprob
    return out


def chat_logprobs(token_texts: TokenTexts, token_ids: list[int], logprobs: list[dict[str, Any]]) -> dict[str, Any]:
    """OpenAI's chat logprobs: content, one entry per token with token, logprob, bytes and top_logprobs."""

    def entry(token: int, logprob: float) -> dict[str, Any]:
        return {"token": token_texts(token), "logprob": logprob, "bytes": list(token_texts.bytes(token))}

    return {
        "content": [
            {**entry(t, lp["logprob"]), "top_logprobs": [entry(i, v) for i, v in lp["top"]]}
            for t, lp in zip(token_ids, logprobs)
        ]
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
