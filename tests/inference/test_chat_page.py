"""The chat page (`GET /` of `llamita serve`) in a real browser: headless Chromium, driven by selenium, against a
live server on 127.0.0.1 that the test starts on a tiny chat checkpoint.

The reference is the server itself through the official `openai` client: at temperature 0 the reply the page
streams must equal the greedy answer to the same conversation asked without streaming, which shows both that the
page reassembles the event stream exactly and that it sent the whole conversation (the system prompt and every
earlier turn). The request bodies the page sends are recorded as well (a wrapper around `window.fetch`). Stop is
pressed while Chrome's network emulation slows the download, so the reply is still arriving when it is pressed.

Needs Debian's `chromium` and `chromium-driver` and the `selenium` package; skipped, saying so, where they are
missing. With LLAMITA_SCREENSHOT=path.png the page is saved mid-conversation (the README's picture).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from importlib import resources
from typing import Any

import pytest
from live_server import LiveServer, start_server
from text_fixtures import llama_tokenizer, write_chat_model

API_KEY = "sk-chat-page-test"
SYSTEM = "You answer in one short line."
WAIT = 60.0
"""Seconds any one wait in the browser may take (the replies here take well under one)."""


def _browser() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromedriver", driver)) if path is None]
    if missing:
        pytest.skip(
            f"headless Chromium not found: apt-get install chromium chromium-driver ({' and '.join(missing)} not on "
            "PATH)"
        )
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("headless Chromium not found: selenium is not installed (pip install -e '.[test]')")
    return chromium, driver


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LiveServer]:
    """`llamita serve` with an API key on a tiny zephyr-template checkpoint, in a process of its own."""
    root = tmp_path_factory.mktemp("chat_page")
    checkpoint = write_chat_model(root / "model", llama_tokenizer(root / "tokenizer"), max_seq_len=1024)
    live = start_server(checkpoint, root / "server.log", "--api-key", API_KEY)
    yield live
    assert live.stop() == 0, live.output()
    assert "Traceback" not in live.output(), live.output()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=WAIT)


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Iterator[Any]:
    chromium, chromedriver = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}", "--window-size=1000,800"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=options, service=Service(chromedriver))
    browser.set_script_timeout(WAIT)
    yield browser
    browser.quit()


class Page:
    """The chat page in the browser, read the way a person reads it: the text of its bubbles and fields."""

    def __init__(self, driver: Any, server: LiveServer) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        self.server = server
        self.url = url = server.url
        self.wait = WebDriverWait(driver, WAIT, poll_frequency=0.02)
        driver.execute_cdp_cmd("Network.enable", {})
        self.throttle(None)
        driver.get(url)
        driver.get_log("browser")  # start with an empty log
        # Every request body and its headers, as the page hands them to fetch().
        driver.execute_script(
            "window.sent = []; const fetch0 = window.fetch;"
            "window.fetch = (url, init) => { window.sent.push({url: String(url), init: init || {}});"
            " return fetch0(url, init); };"
        )

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        """The same request as the page's, over plain HTTP: (status, body)."""
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
        return self.server.request("POST", path, json.dumps(body).encode(), headers)

    def element(self, id_: str) -> Any:
        return self.driver.find_element("id", id_)

    def text(self, id_: str) -> str:
        return self.driver.execute_script("return document.getElementById(arguments[0]).textContent", id_)

    def fill(self, id_: str, value: str | float) -> None:
        field = self.element(id_)
        field.clear()
        field.send_keys(str(value))

    def log_in(self, client) -> str:
        """Type the API key (the model's name comes once the field is left); the model's id."""
        from selenium.webdriver.common.keys import Keys

        model = client.models.list().data[0].id
        self.element("api_key").send_keys(API_KEY + Keys.TAB)
        self.wait.until(lambda _: self.text("model") == model)
        assert self.text("error") == ""
        return model

    def send(self, message: str) -> None:
        self.fill("input", message)
        self.element("send").click()

    def idle(self) -> bool:
        return self.driver.execute_script("return document.body.dataset.state") == "idle"

    def send_and_wait(self, message: str) -> str:
        """Send `message` and wait for the whole reply; the reply's text as the page shows it."""
        self.send(message)
        self.wait.until(lambda _: self.idle())
        return self.replies()[-1]

    def replies(self) -> list[str]:
        return self.driver.execute_script(
            "return [...document.querySelectorAll('#messages .msg.assistant .bubble')].map(b => b.textContent)"
        )

    def conversation(self) -> list[dict[str, str]]:
        """The page's own record of the conversation (the `messages` array it sends)."""
        return self.driver.execute_script("return messages")

    def sent(self, path: str) -> list[dict[str, Any]]:
        """The requests to `path` the page made: {"body": parsed JSON or None, "headers": {...}}."""
        calls = self.driver.execute_script("return window.sent.map(c => ({url: c.url, init: c.init}))")
        out = []
        for call in calls:
            if call["url"].endswith(path):
                init = call["init"]
                out.append({"body": json.loads(init["body"]) if init.get("body") else None,
                            "headers": init.get("headers", {})})  # fmt: skip
        return out

    def throttle(self, bytes_per_second: int | None) -> None:
        """Slow every download of the page to `bytes_per_second` (None: full speed)."""
        self.driver.execute_cdp_cmd(
            "Network.emulateNetworkConditions",
            {"offline": False, "latency": 0, "uploadThroughput": -1,
             "downloadThroughput": -1 if bytes_per_second is None else bytes_per_second},
        )  # fmt: skip

    def script_errors(self) -> list[str]:
        return [e["message"] for e in self.driver.get_log("browser") if e.get("source") == "javascript"]


@pytest.fixture
def page(driver, server) -> Iterator[Page]:
    page = Page(driver, server)
    yield page
    assert page.script_errors() == []


def _greedy(client, model: str, messages: list[dict[str, str]], max_tokens: int) -> str:
    """The server's greedy answer to `messages`, not streamed."""
    answer = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens)
    return answer.choices[0].message.content


def test_the_page_is_the_packaged_file_and_loads_nothing_else(server):
    status, served = server.request("GET", "/")  # the page needs no API key: it asks for one
    packaged = resources.files("llamita.inference").joinpath("chat_page.html").read_text(encoding="utf-8")
    assert status == 200 and served.decode() == packaged
    for outside in ("http://", "https://", "src=", "@import", "url("):
        assert outside not in packaged, f"the chat page must be self-contained; it holds {outside!r}"


def test_a_conversation_streams_the_greedy_answers_with_the_whole_history(page, client):
    # Without the key the server's own 401 message is shown, and how to fix it.
    status, unauthorised = page.server.request("GET", "/v1/models")
    assert status == 401
    page.wait.until(lambda _: page.text("error"))
    assert page.text("error") == f"401: {json.loads(unauthorised)['error']['message']} (enter the server's API key)"
    model = page.log_in(client)
    loaded = page.driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert set(loaded) == {f"{page.url}/v1/models"}  # and nothing from anywhere else

    page.fill("system", SYSTEM)
    page.fill("temperature", 0)
    page.fill("max_tokens", 24)
    system = [{"role": "system", "content": SYSTEM}]
    first = [{"role": "user", "content": "where does the river go?"}]
    reply = page.send_and_wait(first[0]["content"])
    assert reply == _greedy(client, model, system + first, 24) and reply
    first.append({"role": "assistant", "content": reply})

    second = [{"role": "user", "content": "and the café? déjà vu → naïve"}]
    reply = page.send_and_wait(second[0]["content"])
    assert reply == _greedy(client, model, system + first + second, 24)
    # The history changes this model's answer, so the equality above is proof that the page sent it.
    assert reply != _greedy(client, model, system + second, 24)
    assert page.conversation() == first + second + [{"role": "assistant", "content": reply}]
    sent = page.sent("v1/chat/completions")
    assert [call["body"]["messages"] for call in sent] == [system + first[:1], system + first + second]
    for call in sent:
        assert call["headers"]["Authorization"] == f"Bearer {API_KEY}"
        body = {key: value for key, value in call["body"].items() if key != "messages"}
        assert body == {"model": model, "stream": True, "stream_options": {"include_usage": True},
                        "temperature": 0, "top_p": 1, "max_tokens": 24}  # fmt: skip
    if os.environ.get("LLAMITA_SCREENSHOT"):
        page.driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1000, "height": 700, "deviceScaleFactor": 1, "mobile": False},
        )
        page.fill("input", "what does the model say next?")
        page.driver.save_screenshot(os.environ["LLAMITA_SCREENSHOT"])
        page.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

    # A new chat starts from the system prompt alone, with a seed when one is given.
    page.element("new_chat").click()
    assert page.replies() == [] and page.conversation() == []
    page.fill("seed", 7)
    reply = page.send_and_wait(second[0]["content"])
    assert reply == _greedy(client, model, system + second, 24)
    assert page.sent("v1/chat/completions")[-1]["body"]["messages"] == system + second
    assert page.sent("v1/chat/completions")[-1]["body"]["seed"] == 7


def test_stop_ends_the_stream_and_keeps_the_partial_reply(page, client):
    model = page.log_in(client)
    page.fill("temperature", 0)
    page.fill("max_tokens", 600)
    question = [{"role": "user", "content": "tell me a long story"}]
    answer = client.chat.completions.create(model=model, messages=question, temperature=0, max_tokens=600)
    full = answer.choices[0].message.content
    assert answer.usage.completion_tokens > 300  # a long answer: it is still coming when Stop is pressed

    page.throttle(3000)  # bytes/s: about 15 events a second
    page.send(question[0]["content"])
    page.wait.until(lambda _: page.replies() and page.replies()[-1])
    page.element("stop").click()
    page.wait.until(lambda _: page.idle())
    partial = page.replies()[-1]
    assert 0 < len(partial) < len(full) and full.startswith(partial)
    assert page.driver.execute_script("return document.querySelector('.msg.assistant .meta').textContent") == "stopped"
    assert page.element("send").is_enabled() and not page.element("stop").is_enabled()
    assert page.conversation() == question + [{"role": "assistant", "content": partial}]

    # The conversation goes on from the partial reply.
    page.throttle(None)
    page.fill("max_tokens", 16)
    follow_up = [{"role": "user", "content": "go on"}]
    reply = page.send_and_wait(follow_up[0]["content"])
    history = question + [{"role": "assistant", "content": partial}] + follow_up
    assert page.sent("v1/chat/completions")[-1]["body"]["messages"] == history
    assert reply == _greedy(client, model, history, 16)


def test_a_server_error_is_shown_and_the_message_comes_back_to_the_input(page, client):
    page.log_in(client)
    page.fill("temperature", -1)
    page.send("the river")
    page.wait.until(lambda _: page.text("error"))
    status, refused = page.post("/v1/chat/completions", page.sent("v1/chat/completions")[-1]["body"])
    error = json.loads(refused)["error"]
    assert status == 400 and error["param"] == "temperature"
    assert page.text("error") == f"400: {error['message']}"
    assert page.element("input").get_attribute("value") == "the river"
    assert page.replies() == [] and page.conversation() == [] and page.idle()
    # A field the page can tell is wrong is named before anything is sent.
    page.fill("temperature", 0)
    page.fill("max_tokens", 2.5)
    page.element("send").click()
    assert page.text("error") == 'max_tokens must be an integer, got "2.5"'
    assert len(page.sent("v1/chat/completions")) == 1


def test_any_split_of_the_event_stream_gives_the_same_reply(page, client):
    """The server's own stream of events, handed to the page in reads of every small size (which cut lines, CRLFs
    and UTF-8 characters), with an event carrying markup and characters of several bytes added."""
    model = page.log_in(client)
    question = [{"role": "user", "content": "the river"}]
    body = {"model": model, "messages": question, "temperature": 0, "max_tokens": 12, "stream": True}
    status, raw = page.post("/v1/chat/completions", body)
    assert status == 200
    events = raw.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    extra = json.loads(events[0].removeprefix(b"data: "))
    extra["choices"][0]["delta"] = {"content": " <b>naïve</b> 東京 🦙 &amp;"}
    events.insert(1, b"data: " + json.dumps(extra, ensure_ascii=False).encode())
    stream = b"\n\n".join(events)
    greedy = _greedy(client, model, question, 12)
    assert greedy and extra["choices"][0]["delta"]["content"].encode() in stream

    for size, newline in [(1, b"\n"), (2, b"\r\n"), (3, b"\n"), (5, b"\r\n"), (7, b"\r"), (4096, b"\n")]:
        page.element("new_chat").click()
        page.driver.execute_script(
            "const bytes = new Uint8Array(arguments[0]), size = arguments[1], fetch0 = window.fetch;"
            "window.fetch = (url, init) => String(url).endsWith('chat/completions')"
            "  ? Promise.resolve(new Response(new ReadableStream({start(c) {"
            "      for (let i = 0; i < bytes.length; i += size) c.enqueue(bytes.slice(i, i + size)); c.close(); }}),"
            "    {headers: {'Content-Type': 'text/event-stream'}}))"
            "  : fetch0(url, init);",
            list(stream.replace(b"\n", newline)),
            size,
        )
        reply = page.send_and_wait("the river")
        assert page.text("error") == ""
        # The first event's text, the added event's, then the rest: the added event came second.
        first = json.loads(events[0].removeprefix(b"data: "))["choices"][0]["delta"].get("content", "")
        assert reply == first + extra["choices"][0]["delta"]["content"] + greedy[len(first) :], (size, newline)
        bubble = page.driver.find_elements("css selector", "#messages .msg.assistant .bubble")[-1]
        assert bubble.find_elements("css selector", "*") == []  # markup from the model stays text
