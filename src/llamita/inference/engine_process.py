"""The engine in a process of its own, for `llamita serve`: the HTTP side and the engine no longer share a GIL.

In one process, the engine thread (`EngineThread`) and the event loop take turns on the interpreter: at 256
streams the loop formats and sends 256 chunks a step while the engine thread waits for it to launch the next
step, and on an H200 the server's inter-token latency was 21 ms against the engine's 13.5 offline
(`bench/results/2026-12-02-engine-r6.md`). vLLM's V1 splits the same way (its engine core in a process of its own).

The engine process loads the model (`LLM`, from the settings `LLM` takes), runs the same `EngineThread` (steps,
text, stop strings, slots freed at once) and sends each step's deltas over a pipe, one message a step, with its
counts of sequences waiting and running. The server's process keeps a `Job` for every sequence (its request's
asyncio queue, its arrival time): a reader thread takes each message, feeds the metrics (time to first token,
inter-token latency) and hands the deltas to the event loop in one call. A request behind on reading its queue gets
the deltas of several steps at once, as one chunk, so a slow HTTP side costs bigger chunks, not engine steps.

Commands go the other way: jobs to add (prompt ids and sampling settings), requests to abort (a client gone, a
time limit, a request done), stop. The engine process ignores SIGINT and SIGTERM: the server shuts down first, then
stops it; if the server's process dies, its pipe closes and the engine process ends. If the engine process dies,
every request in flight fails with the reason and the server answers 503.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from llamita.config import ConfigError
from llamita.inference.engine_thread import Delta, EngineThread, Job, hand_to_loop, observe
from llamita.inference.sampling import SamplingParams
from llamita.inference.server_metrics import ServerMetrics
from llamita.tokenizer import Tokenizer

log = logging.getLogger("llamita.serve")


@dataclass(frozen=True, slots=True)
class _Spec:
    """What the engine process needs of a job."""

    key: int
    """Its request's key."""
    index: int
    prompt: list[int]
    params: SamplingParams


@dataclass(slots=True)
class _Request:
    outbox: asyncio.Queue
    jobs: dict[int, Job]
    """By choice index."""
    left: int
    """Jobs not finished yet."""


class EngineProcess:
    """An engine in a child process, with the interface of `EngineThread` that the server uses."""

    def __init__(self, llm: dict[str, Any], stream_interval: int = 1) -> None:
        """Start the engine process and wait until its engine is ready (loaded, compiled, graphs captured).

        Args:
            llm: Keyword arguments of `LLM` (the checkpoint path first): what the engine process loads.
            stream_interval: `EngineThread`'s.

        Raises:
            ConfigError: The engine process could not build its engine with these settings (a missing checkpoint,
                settings that do not fit the model): its reason.
        """
        context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
        commands_in, self._commands = context.Pipe(duplex=False)
        self._events, events_out = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_engine_main, args=(commands_in, events_out, llm, stream_interval), name="llamita-engine"
        )
        self._process.start()
        commands_in.close()
        events_out.close()
        ready = self._first_message()
        self.tokenizer: Tokenizer = ready["tokenizer"]
        self.seq_len: int = ready["seq_len"]
        self.n_slots: int = ready["n_slots"]
        self.metrics: ServerMetrics | None = None
        self.failure: str | None = None
        self._lock = threading.Lock()
        self._keys = itertools.count()
        self._requests: dict[int, _Request] = {}
        self._key_of: dict[asyncio.Queue, int] = {}
        self._sent = 0
        self._received = 0  # jobs the engine process has taken in, as of its last message
        self._waiting = 0
        self._running = 0
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader = threading.Thread(target=self._read, name="llamita-engine-reader", daemon=True)

    def _first_message(self) -> dict[str, Any]:
        try:
            while not self._events.poll(0.5):
                if not self._process.is_alive():
                    raise EOFError
            kind, *payload = self._events.recv()
        except EOFError:
            self._process.join(10)
            raise ConfigError(f"the engine process exited with code {self._process.exitcode} before its engine "
                              "was ready (see the log above)") from None  # fmt: skip
        if kind == "failed":  # the exception itself where it pickles (a user error stays one), else its text
            (error,) = payload
            self._process.join(10)
            if isinstance(error, Exception):
                raise error
            raise RuntimeError(f"the engine process could not start its engine: {error}")
        return payload[0]

    # ------------------------------------------------------------------------------ event loop side
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._reader.start()

    def submit(self, jobs: list[Job]) -> None:
        outbox = jobs[0].outbox
        with self._lock:
            key = next(self._keys)
            self._requests[key] = _Request(outbox, {job.index: job for job in jobs}, len(jobs))
            self._key_of[outbox] = key
            self._sent += len(jobs)
            self._command("add", [_Spec(key, job.index, job.prompt, job.params) for job in jobs])
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(sum(len(job.prompt) for job in jobs))

    def abort(self, jobs: list[Job]) -> None:
        """Stop the jobs' request (those of its sequences still running); it is sent nothing more."""
        with self._lock:
            key = self._key_of.pop(jobs[0].outbox, None) if jobs else None
            if key is not None:
                self._requests.pop(key, None)
                self._command("abort", [key])

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the engine process (its sequences aborted) and wait for it to end."""
        with self._lock:
            self._stopping = True
            self._command("stop", None)
        self._process.join(timeout)
        if self._process.is_alive():
            log.warning("the engine process did not stop in %.0f s: terminating it", timeout)
            self._process.terminate()
            self._process.join(10)
        if self._reader.is_alive():
            self._reader.join(5)

    @property
    def alive(self) -> bool:
        return self._process.is_alive() and self.failure is None and not self._stopping

    def waiting(self) -> int:
        """Sequences waiting for a cache slot: those the engine process counted at its last message, and those
        sent since that it had not taken in."""
        return self._waiting + self._sent - self._received

    def running(self) -> int:
        return self._running

    # -------------------------------------------------------------------------------- the reader
    def _command(self, kind: str, payload: Any) -> None:
        """Send a command (holding `_lock`); a closed pipe (the engine process gone) is the reader's to report."""
        try:
            self._commands.send((kind, payload))
        except (BrokenPipeError, OSError):
            pass

    def _read(self) -> None:
        try:
            while True:
                kind, deltas, counts, failure = self._events.recv()
                self._received, self._waiting, self._running = counts
                if failure is not None:
                    self.failure = failure
                if deltas:
                    self._hand_on([(key, Delta(*fields)) for key, *fields in deltas])
        except (EOFError, OSError):
            pass
        if not self._stopping and self.failure is None:
            self._process.join(5)
            self.failure = f"the engine process exited (code {self._process.exitcode})"
            log.error("llamita serve: %s", self.failure)
        with self._lock:
            requests, self._requests = list(self._requests.values()), {}
            self._key_of.clear()
        reason = self.failure or "the server is shutting down"
        hand_to_loop(self._loop, [(r.outbox, Delta(i, "", [], error=reason)) for r in requests for i in r.jobs])

    def _hand_on(self, deltas: list[tuple[int, Delta]]) -> None:
        now = time.perf_counter()
        out, done, tokens = [], [], 0
        with self._lock:
            for key, delta in deltas:
                request = self._requests.get(key)
                if request is None:  # aborted meanwhile
                    continue
                job = request.jobs[delta.index]
                finished = delta.finish_reason is not None or delta.error is not None
                observe(self.metrics, job, len(delta.token_ids), finished, now)
                tokens += len(delta.token_ids)
                out.append((request.outbox, delta))
                request.left -= finished
                if not request.left:  # every sequence finished: forget the request, there too
                    done.append(key)
                    del self._requests[key], self._key_of[request.outbox]
            if done:
                self._command("abort", done)
        if self.metrics is not None:
            self.metrics.generation_tokens.inc(tokens)
        hand_to_loop(self._loop, out)


# ------------------------------------------------------------------------------------ the child
def wire(deltas: list[tuple[int, Delta]]) -> list[tuple]:
    """A step's (request key, delta) pairs as the pipe carries them: plain tuples of the key and the delta's fields,
    which the server's process makes deltas again (`Delta(*fields)`). Pickling 256 slotted dataclasses took 0.4 ms
    a step on this repository's CPU machine, tuples of the same fields 0.05 ms; the engine process's host time is
    the steps' own wherever it exceeds the GPU's (`bench/serve_host.py`)."""
    return [(k, d.index, d.text, d.token_ids, d.logprobs, d.offsets, d.finish_reason, d.error) for k, d in deltas]


def _engine_main(commands: Connection, events: Connection, llm: dict[str, Any], stream_interval: int) -> None:
    """The engine process: build the engine, then run its loop until told to stop or the server's process is gone."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the server stops us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        from llamita.inference.llm import LLM
        from llamita.inference.text import TextStream

        model = LLM(**llm)
        if model.tokenizer is None:
            raise ConfigError("the server needs the model's tokenizer")
    except Exception as e:  # the server's process reports it and exits
        try:
            events.send(("failed", e))
        except Exception:  # an exception that does not pickle: its text
            events.send(("failed", f"{type(e).__name__}: {e}"))
        return
    lock = threading.Lock()
    received = 0
    jobs: dict[int, list[Job]] = {}

    def deliver(deltas: list[tuple[int, Delta]]) -> None:
        with lock:
            events.send(("deltas", wire(deltas), (received, thread.waiting(), thread.running()), thread.failure))

    thread = EngineThread(model.engine, stream_interval=stream_interval, deliver=deliver)
    events.send(("ready", {"tokenizer": model.tokenizer, "seq_len": model.engine.seq_len,
                           "n_slots": model.engine.n_slots}))  # fmt: skip
    thread.start(None)
    try:
        while True:
            kind, payload = commands.recv()
            if kind == "add":
                new = [Job(s.index, s.prompt, s.params, TextStream(model.tokenizer, s.prompt, s.params.stop), s.key)
                       for s in payload]  # fmt: skip
                received += len(new)
                if not thread.alive:  # the loop died: its reason for each, at once
                    deliver([(job.outbox, Delta(job.index, "", [], error=thread.failure or "stopped")) for job in new])
                    continue
                jobs.setdefault(payload[0].key, []).extend(new)
                thread.submit(new)
            elif kind == "abort":
                thread.abort([job for key in payload for job in jobs.pop(key, [])])
            else:  # stop
                break
    except EOFError:  # the server's process is gone
        pass
    finally:
        thread.stop()
