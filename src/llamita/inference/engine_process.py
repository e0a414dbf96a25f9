"""The engine in a process of its own, for `llamita serve`: the HTTP side and the engine no longer share a GIL.

In one process, the engine thread (`EngineThread`) and the event loop take turns on the interpreter: at 256
streams the loop formats and sends 256 chunks a step while the engine thread waits for it to launch the next
step, and on an H200 the server's inter-token latency was 21 ms against the engine's 13.5 offline
(`bench/results/2026-12-02-engine-r6.md`). vLLM's V1 splits the same way (its engine core in a process of its own).

The engine process loads the model (`LLM`, from the settings `LLM` takes), runs the same `EngineThread` (steps,
slots freed at once) and sends each step's deltas (new token ids; the server's process makes their text) over a
pipe, one message a step, with its counts of sequences waiting and running. The server's process keeps a `Job` for
every sequence (its request's asyncio queue, its arrival time): a reader thread takes each message, feeds the
metrics (time to first token, inter-token latency) and hands the deltas to the event loop in one call. A request
behind on reading its queue gets the deltas of several steps at once, as one chunk, so a slow HTTP side costs bigger
chunks, not engine steps.

Commands go the other way: jobs to add (prompt ids and sampling settings), requests to abort (a client gone, a time
limit, a request done), some of a request's choices to abort (a stop string in their text), stop. The engine process
ignores SIGINT and SIGTERM: the server shuts down first, then stops it; if the server's process dies, its pipe
closes and the engine process ends. If the engine process dies, every request in flight fails with the reason and
the server answers 503.

Several HTTP processes can share the engine process (`llamita serve --api-server-count N`, vLLM's option of that
name): the engine process then has a pair of pipes per HTTP process (`EngineProcess(fronts=N)`; the first pair is
the server's own process's, the others are handed to the HTTP processes it starts, `EngineClient`), the keys of
their requests apart, and each step's deltas go to the HTTP process whose request they belong to, with the counts
of sequences waiting and running to every HTTP process whose view of them is out of date. An HTTP process that
ends closes its pipes: its sequences are aborted and the engine serves the others; the server's own process
closing its pipe ends the engine process, as before.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
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
    open: set[int]
    """The choices whose sequences have neither finished nor been aborted."""


class EngineClient:
    """One HTTP process's end of the engine process's pipes, with the interface of `EngineThread` that the server
    uses. `EngineProcess` is the server's own process's; the other HTTP processes (`--api-server-count`) make
    theirs from the pipes and the engine's description that `EngineProcess.fronts` hands them."""

    def __init__(self, commands: Connection, events: Connection, ready: dict[str, Any]) -> None:
        """
        Args:
            commands: The pipe to the engine process.
            events: The pipe from it.
            ready: The engine's description (its tokenizer, context length and slots), from the engine process.
        """
        self._commands, self._events = commands, events
        self.ready = ready
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
        self._loop_stats: dict[str, float] = {}
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader = threading.Thread(target=self._read, name="llamita-engine-reader", daemon=True)

    # ------------------------------------------------------------------------------ event loop side
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._reader.start()

    def submit(self, jobs: list[Job]) -> None:
        outbox = jobs[0].outbox
        with self._lock:
            key = next(self._keys)
            self._requests[key] = _Request(outbox, {job.index: job for job in jobs}, {job.index for job in jobs})
            self._key_of[outbox] = key
            self._sent += len(jobs)
            self._command("add", [_Spec(key, job.index, job.prompt, job.params) for job in jobs])
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(sum(len(job.prompt) for job in jobs))

    def abort(self, jobs: list[Job]) -> None:
        """Stop the jobs' sequences (those still running). All of a request's: it is sent nothing more; some of
        them: they stop, and the others go on."""
        with self._lock:
            key = self._key_of.get(jobs[0].outbox) if jobs else None
            if key is None:
                return
            request = self._requests[key]
            request.open.difference_update(job.index for job in jobs)
            if request.open:  # some of its choices (a stop string ended them): the others go on
                self._command("abort_choices", (key, [job.index for job in jobs]))
                return
            del self._key_of[jobs[0].outbox], self._requests[key]
            self._command("abort", [key])

    def stop(self, timeout: float = 10.0) -> None:
        """Close this end of the pipes: the engine process aborts this process's sequences and serves the others."""
        with self._lock:
            self._stopping = True
            self._commands.close()
        if self._reader.is_alive():
            self._reader.join(timeout)

    @property
    def alive(self) -> bool:
        return self.failure is None and not self._stopping

    def waiting(self) -> int:
        """Sequences waiting for a cache slot: those the engine process counted at its last message, and those
        sent since that it had not taken in."""
        return self._waiting + self._sent - self._received

    def running(self) -> int:
        return self._running

    def loop_stats(self) -> dict[str, float]:
        """`EngineThread.loop_stats` of the engine process, as of its last message."""
        return self._loop_stats

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
                kind, deltas, counts, failure, self._loop_stats = self._events.recv()
                self._received, self._waiting, self._running = counts
                if failure is not None:
                    self.failure = failure
                if deltas:
                    self._hand_on(unwire(deltas))
        except (EOFError, OSError):
            pass
        except Exception as e:  # a bug: every request in flight fails with it, rather than wait for good
            log.exception("llamita serve: reading the engine process's messages failed")
            self.failure = f"reading the engine process's messages failed: {type(e).__name__}: {e}"
        if not self._stopping and self.failure is None:
            self.failure = self._exited()
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
                if finished:
                    request.open.discard(delta.index)
                if not request.open:  # every sequence finished: forget the request, there too
                    done.append(key)
                    del self._requests[key], self._key_of[request.outbox]
            if done:
                self._command("abort", done)
        if self.metrics is not None:
            self.metrics.generation_tokens.inc(tokens)
        hand_to_loop(self._loop, out)

    def _exited(self) -> str:
        """Why the events pipe closed unasked."""
        return "the engine process exited"


class EngineProcess(EngineClient):
    """An engine in a child process, and the server's own process's end of its pipes (`EngineClient`)."""

    def __init__(self, llm: dict[str, Any], stream_interval: int = 1, fronts: int = 1) -> None:
        """Start the engine process and wait until its engine is ready (loaded, compiled, graphs captured).

        Args:
            llm: Keyword arguments of `LLM` (the checkpoint path first): what the engine process loads.
            stream_interval: `EngineThread`'s.
            fronts: HTTP processes that share the engine: this one, and `fronts - 1` others, whose pipes are in
                `fronts` (hand each pair to its process's `EngineClient`, then `close_fronts`).

        Raises:
            ConfigError: The engine process could not build its engine with these settings (a missing checkpoint,
                settings that do not fit the model): its reason.
        """
        if fronts < 1:
            raise ConfigError(f"an engine process needs at least one HTTP process (fronts >= 1), got {fronts}")
        context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
        pipes = [(context.Pipe(duplex=False), context.Pipe(duplex=False)) for _ in range(fronts)]
        # Each pair: (commands: the engine's end, the HTTP side's), (events: the HTTP side's end, the engine's).
        self._process = context.Process(
            target=_engine_main, name="llamita-engine",
            args=([(commands_in, events_out) for (commands_in, _), (_, events_out) in pipes], llm, stream_interval),
        )  # fmt: skip
        self._process.start()
        for (commands_in, _), (_, events_out) in pipes:
            commands_in.close()
            events_out.close()
        (_, commands), (events, _) = pipes[0]
        self.fronts: list[tuple[Connection, Connection]] = [(c, e) for (_, c), (e, _) in pipes[1:]]
        """The other HTTP processes' (commands, events) pipes."""
        self._front_processes: list[Any] = []
        self._front_grace = 0.0
        super().__init__(commands, events, self._first_message(events))

    def _first_message(self, events: Connection) -> dict[str, Any]:
        try:
            while not events.poll(0.5):
                if not self._process.is_alive():
                    raise EOFError
            kind, *payload = events.recv()
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

    def close_fronts(self, processes: list[Any], grace: float) -> None:
        """The other HTTP processes have started with their pipes (`fronts`): close this process's copies, so that
        a process that ends closes its pipes for good; `stop` waits up to `grace` + 10 s for `processes` to end
        first (then terminates them)."""
        for commands, events in self.fronts:
            commands.close()
            events.close()
        self.fronts = []
        self._front_processes = processes
        self._front_grace = grace

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the engine process (its sequences aborted) and wait for it to end, once the other HTTP processes
        (`close_fronts`) have ended: they may still be finishing their requests."""
        deadline = time.monotonic() + self._front_grace + 10
        for process in self._front_processes:
            process.join(max(deadline - time.monotonic(), 0))
            if process.is_alive():
                log.warning("HTTP process %s did not end in its grace period: terminating it", process.name)
                process.terminate()
                process.join(10)
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
        return self._process.is_alive() and super().alive

    def _exited(self) -> str:
        self._process.join(5)
        return f"the engine process exited (code {self._process.exitcode})"


# ------------------------------------------------------------------------------------ the child
def wire(deltas: list[tuple[int, Delta]]) -> list[tuple]:
    """A step's (request key, delta) pairs as the pipe carries them: plain tuples of the key and the fields the
    engine's loop sets (no text: the server's process makes it), which the server's process makes deltas again
    (`unwire`). Pickling 256 slotted dataclasses took 0.4 ms a step on this repository's CPU machine, tuples of the
    same fields 0.05 ms; the engine process's host time is the steps' own wherever it exceeds the GPU's
    (`bench/serve_host.py`)."""
    return [(k, d.index, d.token_ids, d.logprobs, d.finish_reason, d.error) for k, d in deltas]


def unwire(deltas: list[tuple]) -> list[tuple[int, Delta]]:
    """`wire`'s tuples as (request key, delta) pairs again."""
    return [(k, Delta(i, "", ids, logprobs, None, finish, error)) for k, i, ids, logprobs, finish, error in deltas]


def _engine_main(fronts: list[tuple[Connection, Connection]], llm: dict[str, Any], stream_interval: int) -> None:
    """The engine process: build the engine, then run its loop until told to stop or the server's process is gone.

    `fronts`: each HTTP process's (commands, events) pipes, the server's own process's first. A job's outbox here
    is (its HTTP process, its request's key)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the server stops us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    events = {front: pipe for front, (_, pipe) in enumerate(fronts)}
    try:
        from llamita.inference.llm import LLM

        model = LLM(**llm)
        if model.tokenizer is None:
            raise ConfigError("the server needs the model's tokenizer")
    except Exception as e:  # the server's process reports it and exits
        try:
            events[0].send(("failed", e))
        except Exception:  # an exception that does not pickle: its text
            events[0].send(("failed", f"{type(e).__name__}: {e}"))
        return
    lock = threading.Lock()
    received = [0] * len(fronts)  # jobs taken in, per HTTP process
    told: list[tuple | None] = [None] * len(fronts)  # the counts (failure, steps) each HTTP process was last sent
    jobs: dict[tuple[int, int], list[Job]] = {}

    def deliver(deltas: list[tuple[tuple[int, int], Delta]]) -> None:
        """Each HTTP process its deltas, and the counts to those whose are out of date (with or without deltas)."""
        by_front: dict[int, list[tuple[int, Delta]]] = {}
        for (front, key), d in deltas:
            by_front.setdefault(front, []).append((key, d))
        with lock:
            waiting, running, stats = thread.waiting(), thread.running(), thread.loop_stats()
            for front, pipe in list(events.items()):
                counts, mine = (received[front], waiting, running), by_front.get(front)
                if mine is None and (counts, thread.failure, stats["steps"]) == told[front]:
                    continue
                told[front] = counts, thread.failure, stats["steps"]
                try:
                    pipe.send(("deltas", wire(mine or []), counts, thread.failure, stats))
                except OSError:  # that HTTP process is gone: its command pipe tells the main loop
                    pass

    thread = EngineThread(model.engine, stream_interval=stream_interval, deliver=deliver)
    ready = {"tokenizer": model.tokenizer, "seq_len": model.engine.seq_len, "n_slots": model.engine.n_slots}
    events[0].send(("ready", ready))  # the server's process hands it on to the other HTTP processes
    thread.start(None)
    commands = {pipe: front for front, (pipe, _) in enumerate(fronts)}
    try:
        while commands:
            for pipe in wait(list(commands)):
                front = commands[pipe]
                try:
                    kind, payload = pipe.recv()
                except EOFError:  # that HTTP process is gone: the server's own process ends the engine process
                    if front == 0:
                        return
                    del commands[pipe]
                    with lock:
                        events.pop(front).close()
                    gone = [key for key in jobs if key[0] == front]
                    thread.abort([job for key in gone for job in jobs.pop(key)])
                    continue
                if kind == "add":
                    new = [Job(s.index, s.prompt, s.params, None, (front, s.key)) for s in payload]
                    received[front] += len(new)
                    if not thread.alive:  # the loop died: its reason for each, at once
                        deliver([(job.outbox, Delta(job.index, "", [], error=thread.failure or "stopped"))
                                 for job in new])  # fmt: skip
                        continue
                    jobs.setdefault((front, payload[0].key), []).extend(new)
                    thread.submit(new)
                elif kind == "abort":
                    thread.abort([job for key in payload for job in jobs.pop((front, key), [])])
                elif kind == "abort_choices":  # some of a request's sequences (a stop string ended them)
                    key, indices = payload
                    thread.abort([job for job in jobs.get((front, key), []) if job.index in indices])
                else:  # stop
                    return
    finally:
        thread.stop()
