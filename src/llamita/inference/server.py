"""`llamita serve`: an OpenAI-compatible HTTP server on the inference engine (FastAPI on uvicorn).

    llamita serve --checkpoint runs/chat --port 8000
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "runs/chat", "messages": [{"role": "user", "content": "Hi"}]}'

FastAPI and uvicorn because they are what vLLM and SGLang serve on: well kept, asyncio-native (one event loop holds
thousands of open streams), and with pydantic for the request bodies. Endpoints: ``GET /v1/models``,
``POST /v1/completions``, ``POST /v1/chat/completions`` (the checkpoint's chat template), ``GET /health``,
``GET /metrics`` (Prometheus) and the chat page at ``/``.

One engine serves every request, driven by one thread (`EngineThread`), in the server's process or, with
`llamita serve --engine-process`, in a process of its own (`EngineProcess`: the HTTP side and the engine then do not
share a GIL); handlers only parse, queue and format. A
request becomes one engine sequence per prompt and per ``n``; its deltas come back through an asyncio queue and go
out as they are (``stream``: server-sent events in OpenAI's chunk format, ending ``data: [DONE]``; everything
queued for a request since its last chunk goes out as one chunk) or as one JSON answer at the end.

Limits, each with OpenAI's status and error JSON: more than ``max_queue`` sequences waiting for a slot is a 429;
a client that disconnects has its sequences aborted at once (their slots go to the next requests); a request past
``request_timeout`` seconds (from its arrival, queueing included) is aborted: a plain request answers 408
(``request_timeout``) and a stream gets an error event before ``data: [DONE]``, as vLLM streams errors, never a
``length`` finish that would pass for a complete answer. On SIGTERM (or Ctrl-C) uvicorn stops accepting
connections, requests in flight finish within ``shutdown_grace`` seconds (then they are cancelled), the engine
thread stops, and the process exits 0.

With ``--api-server-count N`` (N > 1) the engine runs in a process of its own and N HTTP processes share it and
the listening socket (vLLM's option of that name; uvicorn's workers share a socket the same way): this process and
N - 1 it starts (`_front_main`), each with its own event loop and its own pipes to the engine process
(`EngineClient`), the kernel handing each new connection to one of them. Their metrics are added up across the
processes (prometheus_client's multiprocess mode, `ServerMetrics`). SIGTERM or Ctrl-C reaches every HTTP process
(this one passes SIGTERM on); each shuts down as above, then the engine process stops. An HTTP process that dies
takes the server down with it (exit 1, the reason in the log), rather than serve on at a part of its capacity.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from llamita.chat.templates import stop_ids
from llamita.config import ConfigError
from llamita.inference.engine_process import EngineClient, EngineProcess
from llamita.inference.engine_thread import Delta, EngineThread, Job
from llamita.inference.llm import LLM
from llamita.inference.protocol import (
    COMPLETION_MAX_TOKENS,
    APIError,
    ChatRequest,
    Choice,
    CompletionRequest,
    Prompt,
    TokenTexts,
    chat_logprobs,
    chat_messages,
    chat_prompt,
    check_supported,
    choices,
    completion_logprobs,
    completion_prompts,
    parse_body,
    usage,
)
from llamita.inference.server_metrics import ServerMetrics
from llamita.inference.text import TextStream, step_text

log = logging.getLogger("llamita.serve")

CHAT_PAGE = Path(__file__).with_name("chat_page.html")


@dataclass(frozen=True)
class ServerConfig:
    """How the server listens and what it lets in."""

    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "llamita"
    """The model's id in /v1/models; requests naming another model get a 404."""
    api_key: str | None = None
    """Requests to /v1/* need ``Authorization: Bearer <api_key>``; None: no key."""
    max_queue: int = 1000
    """Sequences that may wait for a cache slot; a request that would make more is refused (429)."""
    request_timeout: float | None = None
    """Seconds a request may take from its arrival (queueing included) before it is aborted; None: no limit."""
    shutdown_grace: float = 30.0
    """Seconds requests in flight have to finish after SIGTERM before they are cancelled."""
    stream_interval: int = 1
    """A stream's chunk carries this many new tokens (its first and its last at once): fewer chunks under load."""
    log_level: str = "info"

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.port <= 65535, f"--port must be in 0..65535, got {self.port}"),
            (self.max_queue >= 1, f"--max-queue must be >= 1, got {self.max_queue}"),
            (self.request_timeout is None or self.request_timeout > 0, "--request-timeout must be > 0 seconds"),
            (self.shutdown_grace >= 0, f"--shutdown-grace must be >= 0 seconds, got {self.shutdown_grace}"),
            (self.stream_interval >= 1, f"--stream-interval must be >= 1, got {self.stream_interval}"),
            (self.api_key is None or bool(self.api_key.strip()), "--api-key must not be empty"),
            (bool(self.model_name), "the served model name must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


class RequestTimeout(Exception):
    """A request ran past ``request_timeout``."""


class Server:
    """The routes' state: the model's tokenizer, its engine (a thread here or a process of its own), the metrics."""

    def __init__(self, model: LLM | EngineClient, config: ServerConfig) -> None:
        """
        Args:
            model: An `LLM`, whose engine a thread of this process runs (`EngineThread`), or an engine process
                already started (`EngineProcess`, or another HTTP process's `EngineClient` of it).
            config: The server's settings.
        """
        self.config = config
        if isinstance(model, EngineClient):
            self.engine: EngineThread | EngineClient = model
            self.tokenizer, self.context, slots = model.tokenizer, model.seq_len, model.n_slots
        else:
            if model.tokenizer is None:
                raise ConfigError("the server needs the model's tokenizer")
            self.engine = EngineThread(model.engine, stream_interval=config.stream_interval)
            self.tokenizer, self.context, slots = model.tokenizer, model.engine.seq_len, model.engine.n_slots
        self.metrics = ServerMetrics(self.engine.waiting, self.engine.running, slots, self.engine.loop_stats)
        self.engine.metrics = self.metrics
        self.token_texts = TokenTexts(self.tokenizer)
        self.template = self.tokenizer.chat_template
        self.chat_unavailable: str | None = None
        self.chat_stops: list[int] = []
        if not self.template:
            self.chat_unavailable = (
                "the model has no chat template, so /v1/chat/completions cannot render messages; fine-tune it with "
                "`llamita sft` (which stores the template), or use /v1/completions"
            )
        else:
            try:
                self.chat_stops = stop_ids(self.template, self.tokenizer)
            except ValueError as e:
                self.chat_unavailable = f"the model's chat template cannot be used: {e}"
        self.created = int(time.time())

    # ------------------------------------------------------------------------------------------- checks
    def authorize(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.config.api_key.encode()):
            raise APIError(
                401, "Incorrect or missing API key: send the header 'Authorization: Bearer <key>' with the key the "
                "server was started with (--api-key)", code="invalid_api_key",
            )  # fmt: skip

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.model_name:
            raise APIError(
                404, f"The model '{model}' does not exist; this server serves '{self.config.model_name}' "
                "(GET /v1/models)", "model", code="model_not_found",
            )  # fmt: skip

    def check_room(self, n: int) -> None:
        if not self.engine.alive:
            raise APIError(503, self.engine.failure or "the server is shutting down", type="server_error")
        waiting = self.engine.waiting()
        if waiting + n > self.config.max_queue:
            raise APIError(
                429, f"The server is busy: {waiting} sequences are waiting for a slot and at most "
                f"{self.config.max_queue} may wait (--max-queue); retry later", type="server_busy",
                code="queue_full",
            )  # fmt: skip

    # ------------------------------------------------------------------------------------------ running
    def jobs(self, picks: list[Choice], outbox: asyncio.Queue) -> list[Job]:
        return [
            Job(c.index, c.prompt.ids, c.params, TextStream(self.tokenizer, c.prompt.ids, c.params.stop), outbox)
            for c in picks
        ]

    async def deltas(
        self, jobs: list[Job], outbox: asyncio.Queue, deadline: float | None
    ) -> AsyncIterator[list[Delta]]:
        """The jobs' deltas until each has finished, in batches: all that is queued when the request looks.

        Raises:
            RequestTimeout: The deadline passed first.
            APIError: The engine refused a sequence or stopped (503).
        """
        loop = asyncio.get_running_loop()
        by_index = {job.index: job for job in jobs}
        running = len(jobs)
        while running:
            if deadline is None:
                raw = [await outbox.get()]
            else:
                try:
                    raw = [await asyncio.wait_for(outbox.get(), max(deadline - loop.time(), 0))]
                except asyncio.TimeoutError:
                    raise RequestTimeout from None
            while not outbox.empty():
                raw.append(outbox.get_nowait())
            batch = []
            for d in raw:
                if d.error is not None and not self.engine.alive:
                    raise APIError(503, d.error, type="server_error")
                if d.error is not None:  # the engine refused the sequence
                    raise APIError(400, d.error)
                job = by_index[d.index]
                if not job.done:  # after a stop string, the tokens the engine made before it heard are dropped
                    batch.append(self.text(job, d))
                    running -= job.done
            yield batch

    def text(self, job: Job, d: Delta) -> Delta:
        """A delta of the engine's (new ids) with its text, through the job's stream: a stop id adds none, and a
        stop string ends the choice there (finish reason "stop") and aborts its sequence in the engine."""
        offsets: list[int] | None = [] if d.logprobs is not None else None
        finish = d.finish_reason  # the engine's "stop" is a stop id's: stop strings are this side's
        ends_on_stop_id = finish == "stop" and bool(d.token_ids)
        text = step_text(job.text, d.token_ids, ends_on_stop_id, finish is not None, offsets)  # type: ignore[arg-type]
        if job.text.stopped:  # type: ignore[union-attr]
            if finish is None:
                self.engine.abort([job])
            finish = "stop"
        job.done = finish is not None
        return Delta(d.index, text, d.token_ids, d.logprobs, offsets, finish)

    def deadline(self) -> float | None:
        timeout = self.config.request_timeout
        return None if timeout is None else asyncio.get_running_loop().time() + timeout

    def timeout_error(self) -> APIError:
        return APIError(
            408, f"The request took longer than the server's limit of {self.config.request_timeout:g} s "
            "(--request-timeout) and was cancelled", type="timeout_error", code="request_timeout",
        )  # fmt: skip


# ------------------------------------------------------------------------------------------- app
def build_app(model: LLM | EngineClient, config: ServerConfig) -> FastAPI:
    """The ASGI app of one model; its engine runs while the app's lifespan does (`Server`)."""
    server = Server(model, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.engine.start(asyncio.get_running_loop())
        yield
        server.engine.stop()

    app = FastAPI(title="llamita", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(_CountRequests, metrics=server.metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        error = APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=str(e.status_code))
        return JSONResponse(error.body(), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        error = APIError(500, f"internal server error ({type(e).__name__}); see the server's log", type="server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not server.engine.alive:
            return JSONResponse({"status": "unavailable", "reason": server.engine.failure}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.exposition(), media_type=server.metrics.content_type)

    @app.get("/")
    async def chat_page() -> HTMLResponse:
        try:
            return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return HTMLResponse(
                "<!doctype html><meta charset='utf-8'><title>llamita</title><p>This llamita install has no chat page "
                f"({CHAT_PAGE.name}); the API is at <code>/v1</code>.</p>"
            )

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        server.authorize(request)
        model = {"id": config.model_name, "object": "model", "created": server.created, "owned_by": "llamita",
                 "max_model_len": server.context}  # fmt: skip
        return JSONResponse({"object": "list", "data": [model]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        server.authorize(request)
        req = parse_body(CompletionRequest, await request.body())
        server.check_model(req.model)
        check_supported(req)
        prompts = completion_prompts(req.prompt, server.tokenizer)
        picks = choices(
            req, prompts, server.context, max_tokens=req.max_tokens, default_max_tokens=COMPLETION_MAX_TOKENS,
            logprobs=req.logprobs, prompt_param="prompt",
        )  # fmt: skip
        return await _answer(server, request, req, picks, _CompletionFormat(server, req, picks))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        server.authorize(request)
        req = parse_body(ChatRequest, await request.body())
        server.check_model(req.model)
        check_supported(req)
        messages = chat_messages(req.messages)
        if server.chat_unavailable:
            raise APIError(400, server.chat_unavailable, "messages", code="no_chat_template")
        prompt = Prompt(chat_prompt(messages, server.template, server.tokenizer), None)
        picks = choices(
            req, [prompt], server.context, max_tokens=req.max_completion_tokens or req.max_tokens,
            default_max_tokens=None, logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            prompt_param="messages", stop_token_ids=server.chat_stops,
        )  # fmt: skip
        return await _answer(server, request, req, picks, _ChatFormat(server, req, picks))

    return app


async def _answer(server: Server, request: Request, req: Any, picks: list[Choice], fmt: _Format) -> Response:
    """Queue a request's sequences and answer: a stream of chunks, or one JSON body when all have finished."""
    server.check_room(len(picks))
    outbox: asyncio.Queue = asyncio.Queue()
    jobs = server.jobs(picks, outbox)
    deadline = server.deadline()
    server.engine.submit(jobs)
    if req.stream:
        return _EventStream(_events(server, jobs, outbox, deadline, fmt), media_type="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
    work = asyncio.ensure_future(_collect(server, jobs, outbox, deadline, fmt))
    gone = asyncio.ensure_future(_disconnected(request))
    left = True
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        left = not work.done()
    finally:
        gone.cancel()
        if left:  # the client left (or the server stops): nobody will read the answer
            work.cancel()
            # A time limit that runs out as it is cancelled ends it with RequestTimeout instead: retrieved here,
            # not logged as a task exception never retrieved.
            work.add_done_callback(lambda task: task.cancelled() or task.exception())
            server.engine.abort(jobs)
    if left:
        return Response(status_code=499)  # nginx's "client closed request", for the log: nobody receives it
    try:
        return JSONResponse(work.result())
    except RequestTimeout:
        server.engine.abort(jobs)
        raise server.timeout_error() from None


async def _collect(server: Server, jobs: list[Job], outbox: asyncio.Queue, deadline: float | None, fmt: _Format):
    async for batch in server.deltas(jobs, outbox, deadline):
        for d in batch:
            fmt.add(d)
    return fmt.whole()


async def _events(
    server: Server, jobs: list[Job], outbox: asyncio.Queue, deadline: float | None, fmt: _Format
) -> AsyncIterator[str]:
    """The server-sent events of a stream; its unfinished sequences are aborted however it ends."""
    try:
        for chunk in fmt.opening():
            yield _sse(chunk)
        async for batch in server.deltas(jobs, outbox, deadline):
            chunk = fmt.chunk(batch)
            if chunk is not None:
                yield _sse(chunk)
        if fmt.req.include_usage:
            yield _sse(fmt.usage_chunk())
    except RequestTimeout:
        yield _sse(_json(server.timeout_error().body()))
    except APIError as e:
        yield _sse(_json(e.body()))
    finally:
        server.engine.abort(jobs)  # a no-op for sequences that finished
    yield "data: [DONE]\n\n"


def _sse(data: str) -> str:
    """One server-sent event of JSON text."""
    return f"data: {data}\n\n"


_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _json(value: Any) -> str:
    """Compact JSON text of `value`, UTF-8 kept; a string or null without the encoder, which sets itself up on every
    call (those are the usual parts of a chunk)."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return encode_basestring(value)
    return _ENCODE(value)


async def _disconnected(request: Request) -> None:
    """Returns when the client of a request whose body has been read disconnects."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _EventStream(StreamingResponse):
    """A stream whose generator is closed however the response ends (a client gone mid-write included), so that its
    `finally` frees the request's slots at once."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


class _CountRequests:
    """ASGI middleware: every HTTP answer counted by endpoint and status (a failure as 500)."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def counted(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            self.metrics.count_request(scope["path"], status)


# ------------------------------------------------------------------------------------------- answers
class _Format:
    """One request's answer being put together from its deltas, in its endpoint's OpenAI shape.

    A stream's chunks are JSON text put together from parts rendered once per request (the head: id, object,
    created, model; the tail: usage null) and each choice's fields, so a chunk of one token costs a few string joins
    rather than building and encoding a nested dict; the answer of a plain request is a dict.
    """

    object_whole: str
    object_chunk: str
    prefix: str
    content_key: str
    """The key of a chunk choice's new text: "text" (completions) or "delta" (chat)."""

    def __init__(self, server: Server, req: Any, picks: list[Choice]) -> None:
        self.server, self.req, self.picks = server, req, picks
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.texts: list[list[str]] = [[] for _ in picks]  # pieces, joined once (not a string grown per token)
        self.token_ids: list[list[int]] = [[] for _ in picks]
        self.logprobs: list[list[dict[str, Any]]] = [[] for _ in picks]
        self.offsets: list[list[int]] = [[] for _ in picks]
        self.finish: list[str | None] = [None for _ in picks]
        head = _json(self.head(self.object_chunk))
        self._chunk_head = head[:-1] + ',"choices":['
        self._chunk_tail = '],"usage":null}' if req.include_usage else "]}"  # OpenAI's: null in all but the last

    def add(self, d: Delta) -> None:
        i = d.index
        self.texts[i].append(d.text)
        self.token_ids[i] += d.token_ids
        if d.logprobs is not None:
            self.logprobs[i] += d.logprobs
            self.offsets[i] += d.offsets or []
        if d.finish_reason is not None:
            self.finish[i] = _finish_reason(d.finish_reason)

    def text(self, i: int) -> str:
        return "".join(self.texts[i])

    def usage(self) -> dict[str, int]:
        # The prompt of each distinct prompt counted once, as OpenAI does for n > 1.
        prompts = {id(c.prompt): len(c.prompt.ids) for c in self.picks}
        return usage(sum(prompts.values()), sum(map(len, self.token_ids)))

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.server.config.model_name}

    def chunk(self, batch: list[Delta]) -> str | None:
        """One chunk (JSON text) of every delta in `batch`: one choice per sequence with something to say (None:
        none has; a step may end inside a character or a possible stop string, and that text waits)."""
        starts: dict[int, tuple[int, int]] = {}  # per choice: its text pieces and logprobs before the batch
        for d in batch:
            if d.index not in starts:
                starts[d.index] = len(self.texts[d.index]), len(self.logprobs[d.index])
            self.add(d)
        parts = []
        for i in sorted(starts):
            start_text, start_tokens = starts[i]
            text = "".join(self.texts[i][start_text:])
            if text or self.finish[i] or len(self.logprobs[i]) > start_tokens:
                parts.append(self.choice_chunk(i, text, start_tokens))
        return self.chunk_of(parts) if parts else None

    def chunk_of(self, parts: list[str]) -> str:
        """A chunk of choices rendered by `choice_chunk`."""
        return self._chunk_head + ",".join(parts) + self._chunk_tail

    def usage_chunk(self) -> str:
        return _json({**self.head(self.object_chunk), "choices": [], "usage": self.usage()})

    def opening(self) -> list[str]:
        return []

    def whole(self) -> dict[str, Any]:
        raise NotImplementedError

    def choice_chunk(self, i: int, text: str, start: int) -> str:
        """Choice `i` of a chunk, as JSON text: `text` and the logprobs from token `start` on."""
        return self._choice(i, self.content(text), _json(self._logprobs(i, start)), self.finish[i])

    def content(self, text: str) -> str:
        """A chunk's new text as the JSON value of `content_key`."""
        raise NotImplementedError

    def _logprobs(self, i: int, start: int = 0) -> dict[str, Any] | None:
        raise NotImplementedError

    def _choice(self, i: int, content: str, logprobs: str, finish: str | None) -> str:
        """A chunk choice from JSON texts of its content and logprobs."""
        return f'{{"index":{i},"{self.content_key}":{content},"logprobs":{logprobs},"finish_reason":{_json(finish)}}}'


class _CompletionFormat(_Format):
    object_whole = object_chunk = "text_completion"
    prefix = "cmpl"
    content_key = "text"

    def _echo(self, i: int) -> str:
        prompt = self.picks[i].prompt
        if not self.req.echo:
            return ""
        return prompt.text if prompt.text is not None else self.server.tokenizer.decode(prompt.ids)

    def _logprobs(self, i: int, start: int = 0) -> dict[str, Any] | None:
        if self.req.logprobs is None:
            return None
        n = len(self.logprobs[i])
        ids = self.token_ids[i][start:n]
        return completion_logprobs(self.server.token_texts, ids, self.logprobs[i][start:n], self.offsets[i][start:n])

    def opening(self) -> list[str]:
        if not self.req.echo:
            return []
        return [
            self.chunk_of([self._choice(i, self.content(self._echo(i)), "null", None) for i in range(len(self.picks))])
        ]

    def content(self, text: str) -> str:
        return _json(text)

    def whole(self) -> dict[str, Any]:
        parts = [
            {"index": i, "text": self._echo(i) + self.text(i), "logprobs": self._logprobs(i),
             "finish_reason": self.finish[i]}
            for i in range(len(self.picks))
        ]  # fmt: skip
        return {**self.head(self.object_whole), "choices": parts, "usage": self.usage()}


class _ChatFormat(_Format):
    object_whole, object_chunk = "chat.completion", "chat.completion.chunk"
    prefix = "chatcmpl"
    content_key = "delta"

    def _logprobs(self, i: int, start: int = 0) -> dict[str, Any] | None:
        if not self.req.logprobs:
            return None
        n = len(self.logprobs[i])
        return chat_logprobs(self.server.token_texts, self.token_ids[i][start:n], self.logprobs[i][start:n])

    def opening(self) -> list[str]:
        delta = '{"role":"assistant","content":""}'
        return [self.chunk_of([self._choice(i, delta, "null", None) for i in range(len(self.picks))])]

    def content(self, text: str) -> str:
        return f'{{"content":{_json(text)}}}' if text else "{}"

    def whole(self) -> dict[str, Any]:
        parts = [
            {"index": i, "message": {"role": "assistant", "content": self.text(i)}, "logprobs": self._logprobs(i),
             "finish_reason": self.finish[i]}
            for i in range(len(self.picks))
        ]  # fmt: skip
        return {**self.head(self.object_whole), "choices": parts, "usage": self.usage()}


def _finish_reason(reason: str) -> str:
    """The engine's finish reasons as OpenAI's: a stop id or string is "stop", max_tokens or the context "length"."""
    return "stop" if reason == "stop" else "length"


# ------------------------------------------------------------------------------------------- serve
def serve(model: LLM | EngineProcess, config: ServerConfig) -> None:
    """Serve `model` until SIGTERM or Ctrl-C, then shut down gracefully (see the module's docstring): in this
    process, and in the other HTTP processes an `EngineProcess` has pipes for (`EngineProcess.fronts`)."""
    _log_setup(config)
    fronts = model.fronts if isinstance(model, EngineProcess) else []
    app = build_app(model, config)
    uconfig = _uvicorn_config(app, config)
    server = _Uvicorn(uconfig)
    sockets = None
    try:
        if fronts:
            sockets = [uconfig.bind_socket()]
            server.fronts = _start_fronts(model, sockets[0], config)
            threading.Thread(target=server.watch_fronts, name="llamita-fronts", daemon=True).start()
        _run(server, sockets)
    finally:
        for process in server.fronts:  # the server's own HTTP process ended early (a port taken): theirs too
            if process.is_alive() and not server.started:
                process.terminate()
        if isinstance(model, EngineProcess):  # stopped with the app's lifespan, unless the app never started
            model.stop()
    if server.failed_front:
        log.error("llamita serve: %s; the server shut down", server.failed_front)
        raise SystemExit(1)
    if not server.started:
        raise ConfigError(f"the server could not start on {config.host}:{config.port} (see the log above)")


class _Uvicorn(uvicorn.Server):
    """uvicorn's server that passes SIGTERM on to the other HTTP processes (`--api-server-count`) as it starts to
    shut down, and shuts down if one of them ends before it does."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.fronts: list[Any] = []
        self.failed_front: str | None = None
        self.stopping = False

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.stopping = True  # before the others hear: one that ends at once has not failed
        for process in self.fronts:
            if process.is_alive() and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)  # SIGTERM even for a SIGINT: a second SIGINT forces exit
        super().handle_exit(sig, frame)

    def watch_fronts(self) -> None:
        from multiprocessing.connection import wait

        sentinels = {process.sentinel: process for process in self.fronts}
        (ended, *_) = wait(list(sentinels))
        if not self.stopping:
            process = sentinels[ended]
            process.join(1)
            self.failed_front = f"HTTP process {process.name} (pid {process.pid}) exited with code {process.exitcode}"
            log.error("llamita serve: %s: shutting down", self.failed_front)
            self.handle_exit(signal.SIGTERM, None)


def _start_fronts(model: EngineProcess, sock: Any, config: ServerConfig) -> list[Any]:
    """Start an HTTP process for each of `model`'s other pipes (`fronts`), on `sock`; returns once each has built its
    app and listens.

    Raises:
        RuntimeError: One of them could not start: the reason.
    """
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    processes, reports = [], []
    for i, (commands, events) in enumerate(model.fronts, start=1):
        report, report_in = context.Pipe(duplex=False)
        process = context.Process(
            target=_front_main, name=f"llamita-http-{i}", args=(sock, commands, events, model.ready, config, report_in)
        )
        process.start()
        report_in.close()
        processes.append(process)
        reports.append(report)
    model.close_fronts(processes, config.shutdown_grace)
    for process, report in zip(processes, reports):
        try:
            failure = report.recv()
        except EOFError:
            process.join(5)
            failure = f"exited with code {process.exitcode}"
        if failure is not None:
            for other in processes:
                other.terminate()
            raise RuntimeError(f"HTTP process {process.name} could not start: {failure}")
    return processes


def _front_main(sock: Any, commands: Any, events: Any, ready: dict, config: ServerConfig, report: Any) -> None:
    """Another HTTP process of `--api-server-count`: the same app on its own pipes to the engine process, on the
    socket the server's process listens on."""
    try:
        _log_setup(config)
        server = uvicorn.Server(_uvicorn_config(build_app(EngineClient(commands, events, ready), config), config))
    except Exception as e:
        report.send(f"{type(e).__name__}: {e}")
        raise
    report.send(None)
    report.close()
    _run(server, [sock])
    if not server.started:
        raise SystemExit(1)


def _log_setup(config: ServerConfig) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=config.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")


def _uvicorn_config(app: FastAPI, config: ServerConfig) -> uvicorn.Config:
    return uvicorn.Config(
        app, host=config.host, port=config.port, log_level=config.log_level,
        timeout_graceful_shutdown=config.shutdown_grace, lifespan="on",
    )  # fmt: skip


def _run(server: uvicorn.Server, sockets: list | None) -> None:
    """Run a uvicorn server until it has shut down."""
    # uvicorn raises the signal again once it has shut down, with the handlers it found: these make that the
    # end of a graceful shutdown (exit 0) instead of a kill by the signal.
    previous = {sig: signal.signal(sig, _shut_down) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=sockets)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _shut_down(signum: int, frame: Any) -> None:
    log.info("llamita serve: shut down (signal %d)", signum)
