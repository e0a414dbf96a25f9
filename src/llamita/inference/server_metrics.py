"""The server's Prometheus metrics, in a registry of its own (never the process-wide one, so that two servers in
one process, as in the tests, count apart).

Counters and histograms are fed as things happen: requests by endpoint and status (an ASGI middleware), prompt and
generated tokens, time to first token and inter-token latency (the engine thread, when a step returns tokens).
The gauges (requests waiting, sequences running, cache use) are read from the engine when Prometheus scrapes, with
the engine loop's counters: its steps, prefill steps and seconds by part (`LOOP_PARTS`), which say where a
server's step goes beside the GPU's (`bench/serve_load.py` reports them per level).

With several HTTP processes (`llamita serve --api-server-count N`) the server sets ``PROMETHEUS_MULTIPROC_DIR``
before any of them imports prometheus_client: counters and histograms then live in files there, one per process,
and a scrape, whichever process answers it, adds them up (prometheus_client's multiprocess mode). The gauges are
the answering process's view of the engine, which the engine process keeps up to date in every HTTP process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

LOOP_PARTS = ("step", "deltas", "send", "commands")
"""The engine loop's work (`EngineThread.seconds`): `Engine.step`; each sequence's delta (its new ids, latency
metrics); handing the deltas on (to the event loop, or over the engine process's pipe); applying commands
(adding sequences, aborting them)."""

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/")
"""Paths counted by name; every other path counts as "other" (a scan of random paths adds no series)."""


class ServerMetrics:
    """The metrics of one server."""

    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(
        self,
        waiting: Callable[[], float],
        running: Callable[[], float],
        slots: int,
        loop_stats: Callable[[], dict[str, float]] = dict,
    ) -> None:
        """
        Args:
            waiting: Sequences waiting for a cache slot, read at each scrape.
            running: Sequences in cache slots, read at each scrape.
            slots: The engine's cache slots.
            loop_stats: The engine loop's steps, prefill steps and seconds by part (`EngineThread.loop_stats`),
                read at each scrape.
        """
        self.registry = r = CollectorRegistry()
        self.requests = Counter("llamita_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("llamita_prompt_tokens", "Prompt tokens of the sequences started", registry=r)
        self.generation_tokens = Counter("llamita_generation_tokens", "Tokens generated", registry=r)
        self.time_to_first_token = Histogram(
            "llamita_time_to_first_token_seconds", "From a request's arrival to its first token", registry=r,
            buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.inter_token_latency = Histogram(
            "llamita_inter_token_latency_seconds", "Between a sequence's tokens", registry=r, buckets=LATENCY_BUCKETS
        )
        self.request_latency = Histogram(
            "llamita_e2e_request_latency_seconds", "From a sequence's arrival to its last token", registry=r,
            buckets=REQUEST_BUCKETS,
        )  # fmt: skip
        self._readings = _EngineReadings(waiting, running, slots, loop_stats)
        r.register(self._readings)
        self._shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if self._shared and values.ValueClass is values.MutexValue:
            raise RuntimeError("PROMETHEUS_MULTIPROC_DIR was set after prometheus_client was imported: this "
                               "process's metrics would be missing from the sum")  # fmt: skip

    def count_request(self, path: str, status: int) -> None:
        self.requests.labels(endpoint=path if path in ENDPOINTS else "other", status=str(status)).inc()

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric (of every HTTP process, in multiprocess mode)."""
        if not self._shared:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, self._shared)
        registry.register(self._readings)
        return generate_latest(registry)


class _EngineReadings:
    """The metrics read from the engine when scraped: the gauges, and the engine loop's own counters (a collector,
    so that multiprocess mode keeps no files of them: they are the one engine's, not to be added up)."""

    def __init__(
        self,
        waiting: Callable[[], float],
        running: Callable[[], float],
        slots: int,
        loop_stats: Callable[[], dict[str, float]],
    ) -> None:
        self.waiting, self.running, self.slots, self.loop_stats = waiting, running, slots, loop_stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        running = self.running()
        yield GaugeMetricFamily("llamita_requests_waiting", "Sequences waiting for a cache slot", value=self.waiting())
        yield GaugeMetricFamily("llamita_requests_running", "Sequences in cache slots", value=running)
        yield GaugeMetricFamily("llamita_cache_usage", "Share of the KV cache slots in use", value=running / self.slots)
        stats = self.loop_stats()
        if not stats:
            return
        yield CounterMetricFamily("llamita_engine_steps", "Engine steps", value=stats["steps"])
        yield CounterMetricFamily(
            "llamita_engine_prefill_steps", "Engine steps that ran a prefill forward", value=stats["prefill_steps"]
        )
        seconds = CounterMetricFamily(
            "llamita_engine_loop_seconds", "The engine loop's time by part: Engine.step, the sequences' deltas, "
            "handing them on, applying commands", labels=["part"],
        )  # fmt: skip
        for part in LOOP_PARTS:
            seconds.add_metric([part], stats[part])
        yield seconds
