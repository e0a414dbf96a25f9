"""`llamita serve --engine-process`, its engine in a process of its own (`EngineProcess`): the same answers as the
engine in the server's process, a clear error when the engine cannot start, 503 (never a hang) when the engine
process dies, and no engine process left behind when the server dies. With `--api-server-count 2`, a second HTTP
process on the same port and engine: the same answers, metrics added up, a clean shutdown, and a server that goes
down (exit 1) when an HTTP process dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from live_server import start_server, wait_for
from text_fixtures import llama_tokenizer, write_chat_model

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

MODEL = "tiny-chat"
JSON = "application/json"
PROMPTS = [f"the {w} model {i}" for i, w in enumerate(["river", "loss", "café", "data"] * 4)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    return write_chat_model(root / "model", llama_tokenizer(root / "tokenizer"))


def _client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="-", max_retries=0, timeout=60)


def _ask(client, prompt: str, stream: bool) -> str:
    kw = {"model": MODEL, "prompt": prompt, "max_tokens": 10, "temperature": 0, "stop": ["e"]}
    if not stream:
        return client.completions.create(**kw).choices[0].text
    return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)


def _logprobs(client) -> tuple:
    """A streamed answer's text, tokens, text offsets, logprobs and finish reason, over all its chunks (how many
    tokens a chunk holds depends on timing)."""
    chunks = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=2,
                                       stream=True)  # fmt: skip
    text, fields, finish = "", ([], [], [], []), None
    for c in chunks:
        if c.choices:
            text, finish, lp = text + c.choices[0].text, c.choices[0].finish_reason or finish, c.choices[0].logprobs
            for all_of, part in zip(fields, (lp.tokens, lp.text_offset, lp.token_logprobs, lp.top_logprobs)):
                all_of.extend(part)
    return text, fields, finish


def _engine_pids(server_pid: int) -> list[int]:
    """The server process's children that multiprocessing spawned (the engine process; not its resource tracker),
    through Linux's /proc."""
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children")
    pids = [int(p) for p in children.read_text().split()] if children.exists() else []
    return [p for p in pids if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" in status.read_text()


@pytest.fixture(scope="module")
def answers(checkpoint, tmp_path_factory):
    """The answers to PROMPTS (streamed for odd indices) and `_logprobs` of a server with its engine in a thread."""
    inside = start_server(checkpoint, tmp_path_factory.mktemp("inside") / "server.log")
    try:
        assert _engine_pids(inside.process.pid) == []
        client = _client(inside)
        return [_ask(client, p, stream=i % 2 == 1) for i, p in enumerate(PROMPTS)], _logprobs(client)
    finally:
        assert inside.stop() == 0, inside.output()


def _has_socket(pid: int) -> bool:
    fds = Path(f"/proc/{pid}/fd")
    return any(os.readlink(fd).startswith("socket:") for fd in fds.iterdir() if fd.is_symlink())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the engine process through /proc")
def test_the_engine_process_answers_as_the_engine_in_the_servers_process(checkpoint, answers, tmp_path):
    """16 concurrent clients, streaming and not, with a stop string: the same text from both servers; the engine
    process is the server's child, and the gauges return to 0 once the requests are done."""
    expected, expected_logprobs = answers
    apart = start_server(checkpoint, tmp_path / "apart.log", "--engine-process")
    try:
        assert len(_engine_pids(apart.process.pid)) == 1
        client = _client(apart)
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda i: _ask(client, PROMPTS[i], stream=i % 2 == 1), range(len(PROMPTS))))
        assert got == expected
        assert len(set(got)) > 4

        def idle() -> bool:
            body = apart.request("GET", "/metrics")[1].decode()
            return "llamita_requests_running 0.0" in body and "llamita_requests_waiting 0.0" in body

        wait_for(idle, timeout=10)
        body = apart.request("GET", "/metrics")[1].decode()
        assert "llamita_generation_tokens_total" in body and "llamita_time_to_first_token_seconds_count 16.0" in body
        assert 'llamita_engine_loop_seconds_total{part="send"}' in body  # the engine process's, across the pipe
        assert _logprobs(client) == expected_logprobs  # the fields a delta carries across the pipe, all of them
    finally:
        assert apart.stop() == 0, apart.output()
    assert "Traceback" not in apart.output(), apart.output()


def test_an_engine_that_cannot_start_is_a_clear_error(tmp_path):
    """The engine process's reason (here: no checkpoint at the path) is the command's error, and it exits."""
    missing = tmp_path / "no-such-run"
    done = subprocess.run(
        [sys.executable, "-m", "llamita.cli", "serve", "--checkpoint", str(missing), "--device", "cpu",
         "--port", "0", "--log-level", "warning", "--engine-process"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert str(missing) in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the engine process through /proc")
def test_a_dead_engine_process_fails_requests_with_503_and_the_server_still_exits_0(checkpoint, tmp_path):
    live = start_server(checkpoint, tmp_path / "server.log", "--engine-process")
    try:
        client = _client(live)
        stream = client.completions.create(
            model=MODEL, prompt=PROMPTS[0], max_tokens=400, stream=True, extra_body={"ignore_eos": True}
        )
        chunks = iter(stream)
        next(chunks)
        (engine,) = _engine_pids(live.process.pid)
        os.kill(engine, signal.SIGKILL)
        with pytest.raises(Exception):  # noqa: B017 - an error event ends the stream: the client raises
            for _ in chunks:
                pass
        wait_for(lambda: live.request("GET", "/health")[0] == 503, timeout=10)
        status, body = live.request("GET", "/health")
        assert b"engine process exited" in body
        with pytest.raises(openai.APIStatusError) as refused:
            client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=4)
        assert refused.value.status_code == 503 and "engine process exited" in str(refused.value)
        assert live.process.poll() is None  # the server itself stays up, and says why
    finally:
        assert live.stop() == 0, live.output()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the engine process through /proc")
def test_the_engine_process_ends_when_the_server_is_killed(checkpoint, tmp_path):
    live = start_server(checkpoint, tmp_path / "server.log", "--engine-process")
    (engine,) = _engine_pids(live.process.pid)
    live.process.kill()
    live.process.wait(10)
    deadline = time.monotonic() + 20
    while not _gone(engine) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(engine)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the processes through /proc")
def test_two_http_processes_share_the_port_and_the_engine(checkpoint, answers, tmp_path):
    """`--api-server-count 2`: an engine process and a second HTTP process, children of the server's; 16 concurrent
    clients get the answers of the engine in a thread; with the server's own process stopped (SIGSTOP) the other
    answers a new connection; the metrics of both add up whichever answers the scrape; SIGTERM ends all of them."""
    expected, expected_logprobs = answers
    live = start_server(checkpoint, tmp_path / "server.log", "--api-server-count", "2")
    try:
        children = _engine_pids(live.process.pid)
        assert len(children) == 2
        (http,) = [pid for pid in children if _has_socket(pid)]  # the other HTTP process listens too
        client = _client(live)
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda i: _ask(client, PROMPTS[i], stream=i % 2 == 1), range(len(PROMPTS))))
        assert got == expected
        assert _logprobs(client) == expected_logprobs
        body = json.dumps({"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 10, "temperature": 0, "stop": ["e"]})
        os.kill(live.process.pid, signal.SIGSTOP)
        try:  # a new connection: only the other HTTP process can take it
            status, answer = live.request("POST", "/v1/completions", body.encode(), {"Content-Type": JSON})
        finally:
            os.kill(live.process.pid, signal.SIGCONT)
        assert status == 200 and json.loads(answer)["choices"][0]["text"] == expected[2]

        def counted() -> str:
            return live.request("GET", "/metrics")[1].decode()

        wait_for(lambda: "llamita_requests_running 0.0" in counted(), timeout=10)
        for _ in range(4):  # new connections: scrapes answered by either process say the same
            metrics = counted()
            assert 'llamita_requests_total{endpoint="/v1/completions",status="200"} 18.0' in metrics, metrics
            assert "llamita_time_to_first_token_seconds_count 18.0" in metrics
    finally:
        assert live.stop() == 0, live.output()
    assert all(_gone(pid) for pid in children)
    assert "Traceback" not in live.output(), live.output()
    assert http


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the processes through /proc")
def test_an_http_process_that_dies_takes_the_server_down(checkpoint, tmp_path):
    live = start_server(checkpoint, tmp_path / "server.log", "--api-server-count", "2")
    children = _engine_pids(live.process.pid)
    (http,) = [pid for pid in children if _has_socket(pid)]
    os.kill(http, signal.SIGKILL)
    assert live.process.wait(60) == 1
    assert f"HTTP process llamita-http-1 (pid {http}) exited with code -9" in live.output(), live.output()
    wait_for(lambda: all(_gone(pid) for pid in children), timeout=20)


def test_a_choice_stopped_on_the_http_side_is_aborted_alone_and_its_request_forgotten_at_the_end():
    """`EngineClient`'s bookkeeping with the engine process's side played here: a stop string ends one of two
    choices (`abort_choices` for it alone), the other finishes in the engine, and then the request is forgotten on
    both sides (an "abort" of its key), with nothing left behind."""
    import asyncio
    import multiprocessing

    from llamita.inference.engine_process import EngineClient, wire
    from llamita.inference.engine_thread import Delta, Job
    from llamita.inference.sampling import SamplingParams

    commands_in, commands = multiprocessing.Pipe(duplex=False)
    events, events_out = multiprocessing.Pipe(duplex=False)
    client = EngineClient(commands, events, {"tokenizer": None, "seq_len": 64, "n_slots": 4})
    loop = asyncio.new_event_loop()
    try:
        client.start(loop)
        outbox: asyncio.Queue = asyncio.Queue()
        jobs = [Job(i, [1, 2, 3], SamplingParams(), None, outbox) for i in range(2)]
        client.submit(jobs)
        kind, specs = commands_in.recv()
        assert kind == "add" and [s.index for s in specs] == [0, 1]
        key = specs[0].key
        client.abort([jobs[0]])  # a stop string in choice 0's text
        assert commands_in.recv() == ("abort_choices", (key, [0]))
        assert key in client._requests
        counts = (2, 0, 1)
        events_out.send(("deltas", wire([(key, Delta(1, "", [7], finish_reason="length"))]), counts, None, {}))
        assert commands_in.poll(10) and commands_in.recv() == ("abort", [key])
        assert client._requests == {} and client._key_of == {}
        client.abort(jobs)  # the stream's end aborts the whole request: already forgotten, nothing is sent
        assert not commands_in.poll(0.2)
    finally:
        events_out.close()  # the engine process's end: the reader stops
        client.stop()
        loop.close()
