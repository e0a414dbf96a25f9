"""`llamita serve`'s refusals and limits on a live server (an API key, one slot, a queue of one, a request timeout):
each error's status and OpenAI error JSON, a client leaving mid-stream, timeouts, a fuzz of request bodies that
never gets a 500, and a graceful SIGTERM."""

from __future__ import annotations

import json
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from live_server import server_thread, start_server, wait_for
from text_fixtures import llama_tokenizer, write_chat_model

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

MODEL, KEY, CONTEXT, TIMEOUT = "tiny-chat", "sesame", 16384, 3.0
PROMPT = "the river model"
MESSAGES = [{"role": "user", "content": "café or 東京?"}]
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A long context, so that one sequence can outlast the request timeout on any CPU."""
    root = tmp_path_factory.mktemp("served")
    return write_chat_model(root / "model", llama_tokenizer(root / "tokenizer"), max_seq_len=CONTEXT)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    live = start_server(
        checkpoint, tmp_path_factory.mktemp("log") / "server.log", "--api-key", KEY, "--max-batch", "1",
        "--max-queue", "1", "--request-timeout", str(TIMEOUT),
    )  # fmt: skip
    yield live
    assert live.stop() == 0, live.output()
    assert "Traceback" not in live.output() and "unexpected error" not in live.output(), live.output()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, path: str, body: dict | bytes, headers: dict[str, str] = AUTH) -> tuple[int, dict]:
    status, raw = server.request("POST", path, body if isinstance(body, bytes) else json.dumps(body).encode(), headers)
    return status, json.loads(raw)


def error_of(status_body: tuple[int, dict], status: int) -> dict:
    got, body = status_body
    assert got == status, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def sample(server, name: str) -> float:
    _, body = server.request("GET", "/metrics")
    return sum(
        s.value for family in text_string_to_metric_families(body.decode()) for s in family.samples if s.name == name
    )


# ------------------------------------------------------------------------------------------ refusals
def test_a_wrong_or_missing_key_is_401_and_health_needs_none(server, checkpoint):
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="guess", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    error = error_of(post(server, "/v1/chat/completions", {"messages": MESSAGES}, {}), 401)
    assert "Authorization: Bearer" in error["message"]
    assert server.request("GET", "/v1/models")[0] == 401
    assert server.request("GET", "/health")[0] == 200 and server.request("GET", "/metrics")[0] == 200


def test_an_unknown_model_or_path_is_404(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
    assert MODEL in e.value.body["message"]
    error_of(post(server, "/v1/embeddings", {"input": "x"}), 404)
    status, body = server.request("GET", "/v1/completions", headers=AUTH)
    assert status == 405 and "error" in json.loads(body)


BAD_FIELDS = [
    ("completions", {"temperature": 3}, "temperature"),
    ("completions", {"temperature": "hot"}, "temperature"),
    ("completions", {"top_p": 0}, "top_p"),
    ("completions", {"n": 0}, "n"),
    ("completions", {"n": 10**30}, "n"),
    ("completions", {"max_tokens": 0}, "max_tokens"),
    ("completions", {"max_tokens": "ten"}, "max_tokens"),
    ("completions", {"seed": 2**70}, "seed"),
    ("completions", {"logprobs": 50}, "logprobs"),
    ("completions", {"presence_penalty": 2.5}, "presence_penalty"),
    ("completions", {"frequency_penalty": -1e300}, "frequency_penalty"),
    ("completions", {"stop": [1, 2]}, "stop"),
    ("completions", {"stop": ""}, "stop"),
    ("completions", {"stream": []}, "stream"),
    ("completions", {"stream_options": {"include_usage": "maybe"}}, "stream_options.include_usage"),
    ("completions", {"prompt": {"text": "x"}}, "prompt"),
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"prompt": [[1, 2], [3, 10**6]]}, "prompt[1]"),
    ("completions", {"prompt": ["ok", 7.5]}, "prompt[1]"),
    ("completions", {"logit_bias": {"5": 10}}, "logit_bias"),
    ("completions", {"best_of": 3}, "best_of"),
    ("completions", {"suffix": "}"}, "suffix"),
    ("completions", {"echo": True, "logprobs": 1}, "echo"),
    ("chat/completions", {"messages": []}, "messages"),
    ("chat/completions", {"messages": "hello"}, "messages"),
    ("chat/completions", {"messages": [{"role": "tool", "content": "4"}]}, "messages[0].role"),
    ("chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0]"),
    ("chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat/completions", {"max_completion_tokens": -1}, "max_completion_tokens"),
]  # fmt: skip


@pytest.mark.parametrize(("endpoint", "fields", "param"), BAD_FIELDS)
def test_a_bad_field_is_400_naming_it(server, endpoint, fields, param):
    base = {
        "model": MODEL,
        "max_tokens": 2,
        **({"prompt": PROMPT} if endpoint == "completions" else {"messages": MESSAGES}),
    }
    error = error_of(post(server, f"/v1/{endpoint}", {**base, **fields}), 400)
    assert error["param"] == param and error["message"].startswith(param), error
    assert error["type"] == "invalid_request_error"


def test_bodies_that_are_no_json_object_are_400(server, client):
    for raw in [b"{broken", b"", b"[1, 2]", b'"text"', b'{"prompt": "\xff\xfe"}', b"\xc3\x28", b"[" * 100_000]:
        error = error_of(post(server, "/v1/completions", raw), 400)
        assert error["param"] is None and error["message"].startswith("request body: ")
    # Through the official client too: its BadRequestError carries the same JSON.
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=-1)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"


def test_a_prompt_past_the_context_is_400_with_the_counts(server):
    ids = [5] * (CONTEXT + 10)
    error = error_of(post(server, "/v1/completions", {"model": MODEL, "prompt": ids}), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert str(CONTEXT) in error["message"] and str(CONTEXT + 10) in error["message"]
    error = error_of(post(server, "/v1/completions", {"model": MODEL, "prompt": [5] * 100, "max_tokens": CONTEXT}), 400)
    assert error["param"] == "max_tokens" and f"{CONTEXT + 100} were requested (100 in the prompt" in error["message"]
    long = [{"role": "user", "content": "river " * CONTEXT}]
    error = error_of(post(server, "/v1/chat/completions", {"model": MODEL, "messages": long}), 400)
    assert error["param"] == "messages" and error["code"] == "context_length_exceeded"


def test_chat_without_a_template_is_a_clear_400(checkpoint):
    from llamita.inference import LLM
    from llamita.inference.server import ServerConfig, build_app

    llm = LLM(checkpoint, device="cpu", max_batch=1, max_seq_len=64)
    llm.tokenizer.chat_template = None
    with server_thread(build_app(llm, ServerConfig(model_name=MODEL))) as live:
        error = error_of(post(live, "/v1/chat/completions", {"messages": MESSAGES}, {}), 400)
        assert error["code"] == "no_chat_template" and "llamita sft" in error["message"]
        status, body = post(live, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2}, {})
        assert status == 200 and body["usage"]["completion_tokens"] == 2


def test_an_engine_that_fails_fails_its_requests_with_503_and_health_says_so(checkpoint):
    from llamita.inference import LLM
    from llamita.inference.server import ServerConfig, build_app

    llm = LLM(checkpoint, device="cpu", max_batch=1, max_seq_len=64)

    def broken_step():
        raise RuntimeError("device lost")

    llm.engine.step = broken_step
    with server_thread(build_app(llm, ServerConfig(model_name=MODEL))) as live:
        error = error_of(post(live, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2}, {}), 503)
        assert error["type"] == "server_error" and "device lost" in error["message"]
        status, body = live.request("GET", "/health")
        assert status == 503 and "device lost" in json.loads(body)["reason"]
        error_of(post(live, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2}, {}), 503)  # at once, no hang


# -------------------------------------------------------------------------------------- capacity
def test_a_full_queue_is_429_and_a_client_leaving_mid_stream_frees_its_slot(client, server):
    started, generated = time.monotonic(), sample(server, "llamita_generation_tokens_total")
    long = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=CONTEXT - 10, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = iter(long)
    next(chunks), next(chunks)  # it holds the only slot
    with ThreadPoolExecutor(1) as pool:
        queued = pool.submit(client.completions.create, model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
        wait_for(lambda: sample(server, "llamita_requests_waiting") == 1)
        with pytest.raises(openai.RateLimitError) as e:  # one waits already: --max-queue 1
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
        assert e.value.status_code == 429 and e.value.body["code"] == "queue_full"
        long.close()  # the client leaves
        answer = queued.result(timeout=TIMEOUT)
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 3
    assert time.monotonic() - started < TIMEOUT  # it ran before the stream's timeout could have freed the slot
    wait_for(lambda: sample(server, "llamita_requests_running") == 0)
    assert sample(server, "llamita_generation_tokens_total") - generated < CONTEXT / 4  # the stream was aborted


def test_a_client_leaving_a_plain_request_frees_its_slot(server):
    import http.client
    import socket

    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": CONTEXT - 10, "ignore_eos": True}
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=0.5)
    connection.request("POST", "/v1/completions", json.dumps(body).encode(), AUTH)
    with pytest.raises(socket.timeout):
        connection.getresponse()
    assert sample(server, "llamita_requests_running") == 1
    left = time.monotonic()
    connection.close()
    wait_for(lambda: sample(server, "llamita_requests_running") == 0)
    assert time.monotonic() - left < TIMEOUT / 2  # aborted when the client left, not at its timeout


def test_a_request_past_the_timeout_is_cancelled(server):
    def stream() -> tuple[float, list[str]]:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": CONTEXT - 10, "ignore_eos": True, "stream": True}
        start = time.monotonic()
        status, raw = server.request("POST", "/v1/completions", json.dumps(body).encode(), AUTH)
        assert status == 200
        return time.monotonic() - start, [e for e in raw.decode().split("\n\n") if e]

    with ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(stream)
        wait_for(lambda: sample(server, "llamita_requests_running") == 1)
        start = time.monotonic()
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": CONTEXT - 10, "ignore_eos": True}
        error = error_of(post(server, "/v1/completions", body), 408)  # it waited, then started, then ran out
        assert error["code"] == "request_timeout" and "--request-timeout" in error["message"]
        assert TIMEOUT <= time.monotonic() - start < TIMEOUT + 2
        took, events = streaming.result()
    assert TIMEOUT <= took < TIMEOUT + 2 and events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: ") :])
    assert last["error"]["code"] == "request_timeout"  # an error event, not a finish that passes for complete
    assert not any(c["finish_reason"] for e in events[:-2] for c in json.loads(e[6:])["choices"])
    wait_for(lambda: sample(server, "llamita_requests_running") == 0)


# ------------------------------------------------------------------------------------------ fuzz
def _fuzz_value(rng: random.Random, depth: int = 0):
    simple = [None, True, False, 0, 1, 2, -1, 3.5, -0.0, 1e308, -1e308, 2**63, 2**64 + 1, 10**40, "", "x", "ü",
              "\ud800", "0.5", "\x00", [], {}, MODEL, PROMPT, "\U0001f999" * 50]  # fmt: skip
    if depth < 3 and rng.random() < 0.3:
        if rng.random() < 0.5:
            return [_fuzz_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
        return {rng.choice(["role", "content", "type", "text", "x"]): _fuzz_value(rng, depth + 1) for _ in range(3)}
    return rng.choice(simple)


FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop",
          "seed", "stream", "stream_options", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty",
          "echo", "best_of", "suffix", "logit_bias", "tools", "response_format", "top_k", "min_p", "user"]  # fmt: skip


def _fuzz_body(rng: random.Random) -> tuple[str, bytes]:
    endpoint = rng.choice(["/v1/completions", "/v1/chat/completions"])
    kind = rng.random()
    if kind < 0.15:  # bytes that are no JSON or no UTF-8
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
        return endpoint, rng.choice([raw, b'{"prompt": "' + raw + b'"}', b'{"model": 1e999999}', b"{" * 5000])
    if kind < 0.3:  # random JSON documents
        return endpoint, json.dumps(_fuzz_value(rng)).encode()
    body = {"model": MODEL, "max_tokens": 2, "temperature": 0}
    body.update({"prompt": PROMPT} if endpoint == "/v1/completions" else {"messages": MESSAGES})
    for _ in range(rng.randint(1, 3)):
        field = rng.choice(FIELDS)
        if rng.random() < 0.2 and field in body and field not in ("max_tokens", "max_completion_tokens"):
            del body[field]
        else:
            body[field] = _fuzz_value(rng)
    for field in ("max_tokens", "max_completion_tokens"):  # a valid length stays short, so the fuzz stays quick
        if isinstance(body.get(field), int) and 3 < body[field] < 10**6:
            body[field] = 3
    text = json.dumps(body)
    if rng.random() < 0.1:
        text = text[: rng.randrange(len(text))]
    return endpoint, text.encode("utf-8", errors="surrogatepass")


def test_a_fuzz_of_request_bodies_never_gets_a_500(server):
    rng = random.Random(20240515)
    reference = post(server, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    statuses: dict[int, int] = {}
    for _ in range(300):
        endpoint, raw = _fuzz_body(rng)
        headers = AUTH if rng.random() < 0.95 else {}
        status, body = server.request("POST", endpoint, raw, headers)
        statuses[status] = statuses.get(status, 0) + 1
        assert status in (200, 400, 401, 404, 408, 429), (status, raw, body)
        if status != 200:
            assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
    assert statuses.get(200, 0) > 10 and statuses.get(400, 0) > 100  # both kinds were exercised
    assert server.request("GET", "/health")[0] == 200
    again = post(server, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    assert again[1]["choices"] == reference[1]["choices"]  # the server answers as before


# -------------------------------------------------------------------------------------- shutdown
def test_sigterm_finishes_the_request_in_flight_then_exits_0(checkpoint, tmp_path):
    live = start_server(checkpoint, tmp_path / "server.log", "--shutdown-grace", "30")
    try:
        stream = openai.OpenAI(base_url=f"{live.url}/v1", api_key="-", max_retries=0).completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=400, stream=True, extra_body={"ignore_eos": True}
        )
        chunks = iter(stream)
        text = next(chunks).choices[0].text
        live.process.send_signal(signal.SIGTERM)
        wait_for(lambda: _refused(live), timeout=5)  # no new connections
        finish = None
        for chunk in chunks:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "length"
        assert live.process.wait(30) == 0, live.output()
    finally:
        live.stop()


def test_sigterm_past_the_grace_cancels_the_request_and_exits_0(checkpoint, tmp_path):
    live = start_server(checkpoint, tmp_path / "server.log", "--shutdown-grace", "1")
    try:
        stream = openai.OpenAI(base_url=f"{live.url}/v1", api_key="-", max_retries=0).completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=CONTEXT - 10, stream=True, extra_body={"ignore_eos": True}
        )
        chunks = iter(stream)
        next(chunks)
        start = time.monotonic()
        live.process.send_signal(signal.SIGTERM)
        with pytest.raises(Exception):  # noqa: B017 - the connection is cut: whatever the client raises
            for _ in chunks:
                pass
        assert live.process.wait(30) == 0, live.output()
        assert time.monotonic() - start < 10
    finally:
        live.stop()


def _refused(live) -> bool:
    try:
        live.request("GET", "/health")
    except OSError:
        return True
    return False
