"""`llamita serve` through the official `openai` client: a live server on 127.0.0.1 (a subprocess) on a tiny chat
model, its answers checked against the engine offline (`LLM`), the tokenizer's own counts and each other (streamed
against whole, alone against 32 at once, n > 1 against one seed at a time)."""

from __future__ import annotations

import itertools
import json
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from live_server import start_server
from text_fixtures import llama_tokenizer, write_chat_model

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from llamita.chat.templates import generation_prompt_ids  # noqa: E402
from llamita.inference import LLM, SamplingParams  # noqa: E402

MODEL = "tiny-chat"
PROMPT = "the river model"
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "café or 東京?"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    return write_chat_model(root / "model", llama_tokenizer(root / "tokenizer"))


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    live = start_server(checkpoint, tmp_path_factory.mktemp("log") / "server.log")
    yield live
    assert live.stop() == 0, live.output()
    assert "Traceback" not in live.output(), live.output()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def llm(checkpoint):
    """The same model offline: the reference of the server's answers."""
    return LLM(checkpoint, device="cpu", max_batch=4)


def greedy(**kw):
    return {"model": MODEL, "temperature": 0, **kw}


def chat_prompt_ids(llm, messages=MESSAGES) -> list[int]:
    return generation_prompt_ids(messages, llm.tokenizer.chat_template, llm.tokenizer)


def streamed_completion(client, **kw) -> tuple[str, str | None, list]:
    text, finish, chunks = "", None, list(client.completions.create(stream=True, **kw))
    for chunk in chunks:
        for c in chunk.choices:
            text += c.text
            finish = c.finish_reason or finish
    return text, finish, chunks


def streamed_chat(client, **kw) -> tuple[str, str | None, list]:
    text, finish, chunks = "", None, list(client.chat.completions.create(stream=True, **kw))
    for chunk in chunks:
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    return text, finish, chunks


def metrics(server) -> dict[tuple[str, tuple], float]:
    status, body = server.request("GET", "/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


# ------------------------------------------------------------------------------------------- the API
def test_models_health_and_the_chat_page(server, client):
    (model,) = client.models.list().data
    assert model.id == MODEL and model.owned_by == "llamita" and model.model_extra["max_model_len"] == 4096
    assert server.request("GET", "/health") == (200, b'{"status":"ok"}')
    status, page = server.request("GET", "/")
    assert status == 200 and b"<html" in page.lower()


def test_a_completion_is_the_engines_with_the_tokenizers_counts(client, llm):
    answer = client.completions.create(prompt=PROMPT, max_tokens=12, **greedy())
    expected = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=12))[0]
    (choice,) = answer.choices
    assert choice.text == expected.text and choice.finish_reason == "length" and choice.index == 0
    assert answer.usage.prompt_tokens == len(llm.tokenizer.encode(PROMPT, bos=True)) == len(expected.prompt_token_ids)
    assert answer.usage.completion_tokens == 12 and answer.usage.total_tokens == answer.usage.prompt_tokens + 12
    assert answer.model == MODEL and answer.object == "text_completion" and answer.id.startswith("cmpl-")


def test_a_chat_answer_renders_the_template_and_is_the_engines(client, llm):
    answer = client.chat.completions.create(messages=MESSAGES, max_tokens=10, **greedy())
    prompt = chat_prompt_ids(llm)
    expected = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=10))[0]
    (choice,) = answer.choices
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == "length" and answer.object == "chat.completion"
    assert answer.usage.prompt_tokens == len(prompt) and answer.usage.completion_tokens == 10
    # max_completion_tokens is the newer name of max_tokens; "developer" the newer name of "system".
    newer = [{"role": "developer", "content": MESSAGES[0]["content"]}, MESSAGES[1]]
    again = client.chat.completions.create(messages=newer, max_completion_tokens=10, **greedy())
    assert again.choices[0].message.content == expected.text


def test_prompts_as_lists_strings_and_token_ids_with_echo(client, llm):
    ids = llm.tokenizer.encode("the loss value", bos=True)
    answer = client.completions.create(prompt=[PROMPT, ids], max_tokens=6, n=2, echo=True, **greedy())
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]  # n per prompt, prompt-major
    alone = [llm.generate(p, SamplingParams(temperature=0.0, max_tokens=6))[0].text for p in (PROMPT, ids)]
    texts = [c.text for c in answer.choices]
    assert texts == [PROMPT + alone[0]] * 2 + [llm.tokenizer.decode(ids) + alone[1]] * 2
    assert answer.usage.prompt_tokens == len(llm.tokenizer.encode(PROMPT, bos=True)) + len(ids)
    batch = client.completions.create(prompt=[ids, ids[:3]], max_tokens=6, **greedy())
    assert batch.choices[0].text == alone[1] and batch.usage.completion_tokens == 12


def stop_spanning_tokens(llm, prompt_ids: list[int], text: str, token_ids: list[int]) -> str:
    """A stop string of the text that begins inside one token's text and ends in a later token's."""
    before = len(llm.tokenizer.decode(prompt_ids))
    cuts = [len(llm.tokenizer.decode(prompt_ids + token_ids[:k])) - before for k in range(1, len(token_ids))]
    for cut in cuts:
        stop = text[cut - 1 : cut + 2]
        if cut >= 2 and len(stop) == 3 and "\ufffd" not in stop and text.find(stop) == cut - 1:
            return stop
    raise AssertionError(f"no stop string spans two tokens of {text!r}")


def test_stop_strings_spanning_tokens_cut_streamed_and_whole_alike(client, llm):
    free = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=30))[0]
    stop = stop_spanning_tokens(llm, free.prompt_token_ids, free.text, free.token_ids)
    cut = free.text[: free.text.index(stop)]
    args = greedy(prompt=PROMPT, max_tokens=30, stop=[stop, "never there"])
    whole = client.completions.create(**args)
    assert whole.choices[0].text == cut and whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens < 30
    text, finish, chunks = streamed_completion(client, **args)
    assert text == cut and finish == "stop"
    assert not any(stop[0] in c.text and c.text.endswith(stop[:2]) for ch in chunks for c in ch.choices)

    prompt = chat_prompt_ids(llm)
    free = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=30))[0]
    stop = stop_spanning_tokens(llm, prompt, free.text, free.token_ids)
    cut = free.text[: free.text.index(stop)]
    args = greedy(messages=MESSAGES, max_tokens=30, stop=stop)
    whole = client.chat.completions.create(**args)
    assert whole.choices[0].message.content == cut and whole.choices[0].finish_reason == "stop"
    text, finish, chunks = streamed_chat(client, **args)
    assert text == cut and finish == "stop"


def test_streams_in_openais_chunk_format_with_usage_last(client, server, llm):
    args = greedy(messages=MESSAGES, max_tokens=8, stream_options={"include_usage": True})
    text, finish, chunks = streamed_chat(client, **args)
    whole = client.chat.completions.create(**greedy(messages=MESSAGES, max_tokens=8))
    assert text == whole.choices[0].message.content and finish == "length"
    first, last = chunks[0], chunks[-1]
    assert first.choices[0].delta.role == "assistant" and first.object == "chat.completion.chunk"
    assert last.choices == [] and last.usage.completion_tokens == 8
    assert last.usage.prompt_tokens == len(chat_prompt_ids(llm))
    assert all(c.usage is None for c in chunks[:-1]) and len({c.id for c in chunks}) == 1
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "stream": True, "temperature": 0}).encode()
    status, raw = server.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    events = [line for line in raw.decode().split("\n\n") if line]
    assert status == 200 and events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    text, finish, _ = streamed_completion(client, **greedy(prompt=PROMPT, max_tokens=5))
    assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]) == text


def test_a_stream_interval_sends_its_tokens_in_fewer_chunks_with_the_same_text(checkpoint, tmp_path, llm):
    """`--stream-interval 3`: the first token at once, then chunks of 3 tokens (the last with what is left); the
    text, tokens and logprobs are those of the per-token stream."""
    live = start_server(checkpoint, tmp_path / "server.log", "--stream-interval", "3")
    try:
        spaced = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=60)
        args = greedy(prompt=PROMPT, max_tokens=10, logprobs=1)
        text, finish, chunks = streamed_completion(spaced, **args)
        sizes = [len(c.logprobs.tokens) for ch in chunks for c in ch.choices if c.logprobs and c.logprobs.tokens]
        # The engine hands on 1, 3, 3, 3 tokens; a reader behind by a hand-off gets two in one chunk ([4, 3, 3]).
        ends = set(itertools.accumulate(sizes))
        assert ends <= {1, 4, 7, 10} and max(ends) == 10 and finish == "length"
        expected = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=10, logprobs=1))[0]
        assert text == expected.text
        streamed = [v for ch in chunks for c in ch.choices if c.logprobs for v in c.logprobs.token_logprobs]
        assert streamed == pytest.approx([e["logprob"] for e in expected.logprobs], abs=1e-5)
        chat, _, _ = streamed_chat(spaced, **greedy(messages=MESSAGES, max_tokens=7))
        assert chat == llm.generate(chat_prompt_ids(llm), SamplingParams(temperature=0.0, max_tokens=7))[0].text
    finally:
        assert live.stop() == 0, live.output()


def test_n_choices_take_seeds_seed_plus_i_and_repeat(client):
    args = {"model": MODEL, "prompt": PROMPT, "max_tokens": 10, "temperature": 1.0, "seed": 1234}
    answer = client.completions.create(n=3, **args)
    texts = [c.text for c in answer.choices]
    assert len(set(texts)) == 3  # three samples, not one thrice
    assert [c.text for c in client.completions.create(n=3, **args).choices] == texts
    for i in range(3):
        assert client.completions.create(**{**args, "seed": 1234 + i}).choices[0].text == texts[i]
    assert answer.usage.completion_tokens == 30 and answer.usage.prompt_tokens == 4
    other = client.completions.create(n=3, **{**args, "seed": 99})
    assert [c.text for c in other.choices] != texts
    text, _, chunks = streamed_chat(client, messages=MESSAGES, model=MODEL, max_tokens=6, seed=5, n=2)
    indices = {c.index for ch in chunks for c in ch.choices}
    assert indices == {0, 1}


def test_logprobs_in_each_endpoints_format(client, llm):
    expected = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=8, logprobs=3))[0]
    answer = client.completions.create(prompt=PROMPT, max_tokens=8, logprobs=3, **greedy())
    lp = answer.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert lp.token_logprobs == pytest.approx([e["logprob"] for e in expected.logprobs], abs=1e-5)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for top, e in zip(lp.top_logprobs, expected.logprobs):
        assert list(top.values()) == pytest.approx([v for _, v in e["top"]], abs=1e-5)  # most likely first
        assert max(top.values()) == pytest.approx(e["logprob"], abs=1e-5)  # greedy: the best

    prompt = chat_prompt_ids(llm)
    expected = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6, logprobs=2))[0]
    answer = client.chat.completions.create(messages=MESSAGES, max_tokens=6, logprobs=True, top_logprobs=2, **greedy())
    content = answer.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([e["logprob"] for e in expected.logprobs], abs=1e-5)
    for entry, e in zip(content, expected.logprobs):
        assert len(entry.top_logprobs) == 2
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([v for _, v in e["top"]], abs=1e-5)
    plain = client.chat.completions.create(messages=MESSAGES, max_tokens=3, logprobs=True, **greedy())
    assert all(c.top_logprobs == [] for c in plain.choices[0].logprobs.content)
    _, _, chunks = streamed_chat(client, messages=MESSAGES, max_tokens=6, logprobs=True, **greedy())
    streamed = [c.logprob for ch in chunks for c in ch.choices if c.logprobs for c in c.logprobs.content]
    assert streamed == pytest.approx([c.logprob for c in content], abs=1e-6)


def named_bytes(name: str) -> bytes:
    """The bytes a token's name in logprobs stands for: its text, or `bytes:\\xNN...` for bytes that are not UTF-8."""
    if not name.startswith("bytes:"):
        return name.encode("utf-8")
    data = bytes(int(h, 16) for h in name.removeprefix("bytes:").split("\\x")[1:])
    with pytest.raises(UnicodeDecodeError):
        data.decode("utf-8")  # named by its bytes only when it is not text
    return data


def test_logprobs_name_each_token_by_its_exact_bytes(client, llm):
    tok = llm.tokenizer
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=20)

    def shared(out) -> int:
        """Positions where two of the most likely tokens have the same bytes (a byte token and a learned one)."""
        return sum(len({tok.token_bytes(i) for i, _ in lp["top"]}) < len(lp["top"]) for lp in out.logprobs)

    references = ((p, llm.generate(p, params)[0]) for p in [PROMPT, *(f"{w} or 東京?" for w in ("café", "data", "€"))])
    prompt, expected = next((p, e) for p, e in references if shared(e))
    answer = client.completions.create(prompt=prompt, max_tokens=12, logprobs=20, **greedy())
    lp = answer.choices[0].logprobs
    assert [named_bytes(t) for t in lp.tokens] == [tok.token_bytes(i) for i in expected.token_ids]
    names = [name for top in lp.top_logprobs for name in top]
    for top, e in zip(lp.top_logprobs, expected.logprobs):
        assert len(top) == 20  # one key per token: none shares a name
        for name, (token, logprob) in zip(top, e["top"]):
            assert top[name] == pytest.approx(logprob, abs=1e-5)
            assert name == f"token_id:{token}" or named_bytes(name) == tok.token_bytes(token)
    assert any(n.startswith("bytes:") for n in names) and any(n.startswith("token_id:") for n in names)

    prompt = chat_prompt_ids(llm)
    expected = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=12, logprobs=5))[0]
    answer = client.chat.completions.create(messages=MESSAGES, max_tokens=12, logprobs=True, top_logprobs=5, **greedy())
    content = answer.choices[0].logprobs.content
    assert [bytes(c.bytes) for c in content] == [tok.token_bytes(i) for i in expected.token_ids]
    for entry, e in zip(content, expected.logprobs):
        assert [bytes(t.bytes) for t in entry.top_logprobs] == [tok.token_bytes(i) for i, _ in e["top"]]
        assert all(named_bytes(t.token) == bytes(t.bytes) for t in [entry, *entry.top_logprobs])
    assert any(len(c.bytes) == 1 and c.bytes[0] >= 0x80 for c in content)  # a part of a character, byte for byte


def test_presence_and_frequency_penalties_reach_the_engine(client, llm):
    plain = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=40))[0].text
    for penalty in ({"presence_penalty": 1.5}, {"frequency_penalty": 1.2}):
        answer = client.completions.create(prompt=PROMPT, max_tokens=40, **greedy(**penalty))
        expected = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=40, **penalty))[0].text
        assert answer.choices[0].text == expected != plain


def test_32_concurrent_clients_each_get_their_greedy_answer_alone(client):
    prompts = [f"the {w} model {i}" for i, w in enumerate(["river", "loss", "café", "data"] * 8)]

    def ask(i: int) -> str:
        if i % 2:
            return streamed_completion(client, **greedy(prompt=prompts[i], max_tokens=8))[0]
        return client.completions.create(**greedy(prompt=prompts[i], max_tokens=8)).choices[0].text

    alone = [ask(i) for i in range(32)]
    assert len(set(alone)) > 16
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(ask, range(32)))
    assert together == alone


def test_a_server_running_steps_ahead_answers_as_the_one_in_order(checkpoint, tmp_path, client):
    """`llamita serve --overlap`: 32 concurrent clients, streaming and not, and a streamed chat with a stop string,
    get the answers of the server that steps in order."""
    prompts = [f"the {w} model {i}" for i, w in enumerate(["river", "loss", "café", "data"] * 8)]

    def ask(to, i: int) -> str:
        if i % 2:
            return streamed_completion(to, **greedy(prompt=prompts[i], max_tokens=8))[0]
        return to.completions.create(**greedy(prompt=prompts[i], max_tokens=8)).choices[0].text

    in_order = [ask(client, i) for i in range(32)]
    chat_args = greedy(messages=MESSAGES, max_tokens=12, stop=["e"])
    chat = streamed_chat(client, **chat_args)[0]
    live = start_server(checkpoint, tmp_path / "server.log", "--overlap")
    try:
        ahead = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=60)
        with ThreadPoolExecutor(32) as pool:
            assert list(pool.map(lambda i: ask(ahead, i), range(32))) == in_order
        assert streamed_chat(ahead, **chat_args)[0] == chat
    finally:
        assert live.stop() == 0, live.output()


def test_metrics_count_requests_tokens_and_latencies(client, server):
    before = metrics(server)
    answer = client.completions.create(prompt=PROMPT, max_tokens=7, **greedy())
    server.request("POST", "/v1/completions", b"{broken")
    after = metrics(server)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("llamita_requests_total", endpoint="/v1/completions", status="200") == 1
    assert delta("llamita_requests_total", endpoint="/v1/completions", status="400") == 1
    assert delta("llamita_prompt_tokens_total") == answer.usage.prompt_tokens
    assert delta("llamita_generation_tokens_total") == 7
    assert delta("llamita_time_to_first_token_seconds_count") == 1
    assert delta("llamita_inter_token_latency_seconds_count") == 6
    assert delta("llamita_e2e_request_latency_seconds_count") == 1
    for gauge in ("llamita_requests_waiting", "llamita_requests_running", "llamita_cache_usage"):
        assert after[(gauge, ())] == 0
    # The engine loop's own counters: a prefill step (the first token) and a step for each further token.
    assert delta("llamita_engine_steps_total") >= 7 and delta("llamita_engine_prefill_steps_total") >= 1
    assert delta("llamita_engine_loop_seconds_total", part="step") > 0
    assert delta("llamita_engine_loop_seconds_total", part="deltas") > 0


def test_serve_without_the_extra_says_what_to_install(monkeypatch, capsys):
    from llamita.cli import main

    monkeypatch.delitem(sys.modules, "llamita.inference.server", raising=False)
    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(SystemExit) as exit:
        main(["serve", "--checkpoint", "nowhere"])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "fastapi is not installed" in err and "pip install 'llamita[serve]'" in err


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--max-queue", "0"], "--max-queue must be >= 1"),
        (["--port", "70000"], "--port must be in 0..65535"),
        (["--request-timeout", "0"], "--request-timeout must be > 0"),
        (["--draft", "d", "--speculate", "ngram"], "choose one"),
        (["--max-batch", "0"], "--max-batch must be >= 1"),
        (["--stream-interval", "0"], "--stream-interval must be >= 1"),
    ],
)
def test_serve_checks_its_flags_before_loading_the_model(capsys, tmp_path, flags, needle):
    from llamita.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--checkpoint", str(tmp_path / "none"), *flags])
    assert needle in capsys.readouterr().err
