"""One engine, driven by one thread, for the requests of an asyncio server.

The engine is synchronous and not thread-safe, so exactly one thread touches it: the engine loop. HTTP handlers
(on the event loop) hand it commands through a thread-safe queue (`submit` jobs, `abort` them); the loop applies
every queued command, runs one `Engine.step` and hands the step's `Delta`s (each sequence's new token ids) to the
event loop in one `call_soon_threadsafe`, where each goes to its request's asyncio queue. Their text is made on the
HTTP side (`Server.text`: the sequence's `TextStream`, stop strings, which abort the sequence), as vLLM's front
end detokenizes apart from its engine core: the engine's loop does no text, and with several HTTP processes
(`--api-server-count`) that work is shared among them. With no work the loop sleeps on the
command queue (a blocking get), so an idle server costs nothing. A request behind on reading its queue gets the
deltas of several steps at once: the HTTP side sends them as one chunk.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llamita.config import ConfigError
from llamita.inference.engine import Engine
from llamita.inference.sampling import SamplingParams
from llamita.inference.scheduler import Sequence
from llamita.inference.server_metrics import LOOP_PARTS, ServerMetrics
from llamita.inference.text import TextStream

log = logging.getLogger("llamita.serve")

IDLE_WAIT_S = 1.0
"""How long an idle loop sleeps on the command queue before it looks again (commands wake it at once)."""


@dataclass(slots=True)
class Delta:
    """What one step made for one sequence of a request."""

    index: int
    """The choice (the request's sequence) it belongs to."""
    text: str
    """New text: whole characters, never a part of a stop string ("" from the engine's loop: the HTTP side makes
    the text, `Server.text`)."""
    token_ids: list[int]
    logprobs: list[dict[str, Any]] | None = None
    """Per new token, when asked: {"logprob": float, "top": [(id, logprob), ...]}."""
    offsets: list[int] | None = None
    """Per new token, when logprobs are asked: where its text starts in the sequence's text."""
    finish_reason: str | None = None
    """Set on the last delta: "stop" or "length"."""
    error: str | None = None
    """The engine refused the sequence or stopped: the request fails with this message."""


@dataclass(eq=False)
class Job:
    """One engine sequence of an HTTP request: what it asks for and where its deltas go."""

    index: int
    prompt: list[int]
    params: SamplingParams
    text: TextStream | None
    """Its text, on the HTTP side (None in the engine process)."""
    outbox: Any
    """The request's asyncio queue, on the event loop: every job of a request shares it (in the engine process,
    the request's key, which the server's process maps to its queue)."""
    arrived: float = field(default_factory=time.perf_counter)
    seq: Sequence | None = None
    last_token: float | None = None
    logprobs_sent: int = 0
    held: Delta | None = None
    """Deltas made since the last one sent, merged (`stream_interval`)."""
    done: bool = False
    """The HTTP side has its last delta (a stop string may end it before the engine does)."""


class EngineThread:
    """The engine loop: a thread that owns an engine and serves the jobs of one event loop."""

    def __init__(
        self,
        engine: Engine,
        metrics: ServerMetrics | None = None,
        stream_interval: int = 1,
        deliver: Callable[[list[tuple[Any, Delta]]], None] | None = None,
    ) -> None:
        """
        Args:
            engine: The engine the loop owns.
            metrics: Where TTFT, inter-token latency and token counts go (None: nowhere).
            stream_interval: Hand a sequence's tokens on once it has this many since the last hand-off (its first
                token and its last go at once): fewer, larger chunks, and less work on the event loop, for burstier
                streams (SGLang's and vLLM's --stream-interval; `ServerConfig` checks it is >= 1).
            deliver: Where a step's (outbox, delta) pairs go, called on the engine thread; None: each delta into
                its job's outbox, an asyncio queue of the loop given to `start`. The engine process
                (`engine_process`) sends them to the server's process instead, its jobs' outboxes being keys.
        """
        self.engine = engine
        self.metrics = metrics
        self.stream_interval = stream_interval
        self._deliver = deliver
        self.failure: str | None = None
        """Why the loop died (an exception in a step); None while it is fine."""
        self._commands: queue.SimpleQueue[tuple[str, list[Job]]] = queue.SimpleQueue()
        self._jobs: dict[int, Job] = {}  # by sequence id; the engine thread's own
        self._lock = threading.Lock()
        self._unapplied = 0  # jobs submitted whose sequences are not in the engine yet
        self._thread = threading.Thread(target=self._run, name="llamita-engine", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.seconds = dict.fromkeys(LOOP_PARTS, 0.0)
        """Time the loop spent in each part of its work (`LOOP_PARTS`), for /metrics."""

    # ------------------------------------------------------------------------------ event loop side
    def start(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Start the engine loop; its deltas go to queues of `loop` (None: to `deliver`)."""
        self._loop = loop
        self._thread.start()

    def submit(self, jobs: list[Job]) -> None:
        with self._lock:
            self._unapplied += len(jobs)
        self._commands.put(("add", jobs))

    def abort(self, jobs: list[Job]) -> None:
        """Stop the jobs' sequences (those still running) and free their slots; they send nothing more."""
        self._commands.put(("abort", jobs))

    def stop(self, timeout: float = 10.0) -> None:
        """Abort every sequence and end the loop."""
        if self._thread.is_alive():
            self._commands.put(("stop", []))
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.failure is None

    def waiting(self) -> int:
        """Sequences waiting for a cache slot, the ones not yet given to the engine included."""
        return self._unapplied + len(self.engine.scheduler.waiting)

    def running(self) -> int:
        """Sequences in cache slots."""
        return self.engine.n_slots - len(self.engine.scheduler.free)

    def loop_stats(self) -> dict[str, float]:
        """The engine's steps and prefill steps, and the loop's seconds in each of `LOOP_PARTS`, so far."""
        stats = self.engine.stats
        return {"steps": stats.steps, "prefill_steps": stats.prefill_steps, **self.seconds}

    # ------------------------------------------------------------------------------------ the loop
    def _run(self) -> None:
        try:
            while self._apply(block=not self.engine.has_work()):
                if self.engine.has_work():
                    self._step()
        except Exception as e:  # a bug or an accelerator error: fail every request, say why, stop
            log.exception("the engine loop stopped")
            self.failure = f"the engine stopped: {type(e).__name__}: {e}"
            self._send([(job.outbox, Delta(job.index, "", [], error=self.failure)) for job in self._jobs.values()])
            self._jobs.clear()
        finally:
            self._drain_after_stop()

    def _apply(self, block: bool) -> bool:
        """Apply the queued commands (waiting for one when `block`); False once told to stop."""
        try:
            commands = [self._commands.get(timeout=IDLE_WAIT_S) if block else self._commands.get_nowait()]
        except queue.Empty:
            return True
        start = time.perf_counter()
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                break
        refused = []
        for kind, jobs in commands:
            if kind == "stop":
                for job in list(self._jobs.values()):
                    self.engine.abort(job.seq)
                self._jobs.clear()
                return False
            if kind == "add":
                with self._lock:
                    self._unapplied -= len(jobs)
                for job in jobs:
                    try:
                        job.seq = self.engine.add(job.prompt, job.params)
                    except ConfigError as e:  # checked on the HTTP side already; this is the engine's last word
                        refused.append((job.outbox, Delta(job.index, "", [], error=str(e))))
                        continue
                    self._jobs[job.seq.id] = job
                    if self.metrics is not None:
                        self.metrics.prompt_tokens.inc(len(job.prompt))
            else:
                for job in jobs:
                    if job.seq is not None and not job.seq.finished:
                        self.engine.abort(job.seq)
                    if job.seq is not None:
                        self._jobs.pop(job.seq.id, None)
        self._send(refused)
        self.seconds["commands"] += time.perf_counter() - start
        return True

    def _step(self) -> None:
        start = time.perf_counter()
        out = self.engine.step()
        now = time.perf_counter()
        deltas = []
        tokens = 0
        for seq, new in out:
            job = self._jobs.get(seq.id)
            if job is None:
                continue
            first = job.last_token is None
            delta = _merged(job.held, self._delta(job, seq, new, now))
            tokens += len(new)
            if first or seq.finished or len(delta.token_ids) >= self.stream_interval:
                deltas.append((job.outbox, delta))
                job.held = None
            else:
                job.held = delta
            if seq.finished:
                del self._jobs[seq.id]
        if self.metrics is not None:
            self.metrics.generation_tokens.inc(tokens)  # once a step: the per-token metrics are the histograms'
        made = time.perf_counter()
        self._send(deltas)
        seconds = self.seconds
        seconds["step"] += now - start
        seconds["deltas"] += made - now
        seconds["send"] += time.perf_counter() - made

    def _delta(self, job: Job, seq: Sequence, new: list[int], now: float) -> Delta:
        logprobs = None
        if seq.params.logprobs is not None:
            logprobs = seq.logprobs[job.logprobs_sent :]
            job.logprobs_sent = len(seq.logprobs)
        observe(self.metrics, job, len(new), seq.finished, now)
        finish = seq.finish_reason if seq.finished else None
        return Delta(job.index, "", list(new), logprobs, None, finish)

    def _send(self, deltas: list[tuple[Any, Delta]]) -> None:
        """Hand deltas to their requests' queues, all in one call on the event loop (or to `deliver`)."""
        if self._deliver is not None:  # every step and command batch: the engine process's counts go with them
            self._deliver(deltas)
        else:
            hand_to_loop(self._loop, deltas)

    def _drain_after_stop(self) -> None:
        """Commands that come after the loop ended: their requests fail at once instead of waiting."""
        reason = self.failure or "the server is shutting down"
        while True:
            try:
                kind, jobs = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._send([(job.outbox, Delta(job.index, "", [], error=reason)) for job in jobs])


def observe(metrics: ServerMetrics | None, job: Job, new: int, finished: bool, now: float) -> None:
    """A job's `new` tokens, landed at `now`, in the metrics: its time to first token, or the inter-token latency of
    each; its whole latency once it has finished. Sets `job.last_token`."""
    if metrics is not None and new:
        if job.last_token is None:
            metrics.time_to_first_token.observe(now - job.arrived)
        else:
            for _ in range(new):
                metrics.inter_token_latency.observe((now - job.last_token) / new)
    if metrics is not None and finished:
        metrics.request_latency.observe(now - job.arrived)
    if new:
        job.last_token = now


def _merged(held: Delta | None, new: Delta) -> Delta:
    """`new` after the deltas `held` back from earlier steps: their tokens and logprobs in order."""
    if held is None:
        return new
    held.token_ids += new.token_ids
    if new.logprobs is not None:
        held.logprobs = (held.logprobs or []) + new.logprobs
    held.finish_reason = new.finish_reason
    return held


def hand_to_loop(loop: asyncio.AbstractEventLoop | None, deltas: list[tuple[asyncio.Queue, Delta]]) -> None:
    """Put deltas into their requests' queues, all in one call on `loop` (from another thread)."""
    if deltas and loop is not None and not loop.is_closed():
        try:
            loop.call_soon_threadsafe(_put_all, deltas)
        except RuntimeError:  # the event loop closed in between: nobody waits for them
            pass


def _put_all(deltas: list[tuple[asyncio.Queue, Delta]]) -> None:
    for outbox, delta in deltas:
        outbox.put_nowait(delta)
