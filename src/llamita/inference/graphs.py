"""The decode step captured in CUDA graphs, one per batch size of a set that covers every size the engine reaches.

A decode step of a small model is a few hundred short kernels; replaying them as one graph removes the CPU's
launch time, which is most of the step at small batches. A batch is padded to the next captured size (its extra
rows are idle slots, which write only their scratch position), so no batch size ever falls off the graphs.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

StepOutputs = tuple[Tensor, ...]
T = TypeVar("T")


def capture_sizes(max_batch: int) -> list[int]:
    """2, 4, 8, then every multiple of 16, up to and always including `max_batch`.

    No graph of one row (unless `max_batch` is 1): a batch of one replays the graph of two, whose second row is
    idle. A step of a bandwidth-bound model costs the same for one row or two, and the compiled step is then never
    specialised to a batch of one (dynamic shapes compile sizes 0 and 1 apart), which saves a compilation.
    """
    sizes = [s for s in (2, 4, 8) if s < max_batch] + list(range(16, max_batch, 16))
    return [*sizes, max_batch]


def capture(fn: Callable[[], T], pool: tuple, side: torch.cuda.Stream) -> tuple[torch.cuda.CUDAGraph, T]:
    """`fn` run twice on the side stream (compilation, cuBLAS workspaces), then captured in a graph whose memory
    comes from `pool`; the graph and what the captured run returned (tensors the graph writes)."""
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


class CapturedSteps:
    """A step function `step(batch, variant)` captured for every (size, variant); replayed by `__call__`.

    The step reads and writes only persistent buffers (cache, slot state), so replaying its graph is running it.
    Capturing runs it a few times first (compilation, cuBLAS workspaces); the engine does that before any
    sequence holds a slot, when every row it touches is idle.
    """

    def __init__(self, step: Callable[[int, bool], StepOutputs], sizes: list[int], variants: tuple[bool, ...]) -> None:
        self.sizes = sorted(sizes)
        self.step = step
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, StepOutputs]] = {}
        self.uncaptured = 0
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        for size in reversed(self.sizes):  # the largest first: the smaller graphs reuse its memory pool
            for variant in variants:
                self.graphs[size, variant] = capture(functools.partial(step, size, variant), pool, side)
        torch.cuda.synchronize()

    def __call__(self, batch: int, variant: bool) -> StepOutputs:
        """The step's outputs for rows 0 .. batch - 1 (the padded rows' outputs sliced off)."""
        size = next((s for s in self.sizes if s >= batch), None)
        if size is None or (size, variant) not in self.graphs:
            self.uncaptured += 1
            warnings.warn(
                f"decode step of batch {batch} runs without a CUDA graph (captured: sizes {self.sizes}); "
                "it is several times slower per token",
                stacklevel=2,
            )
            return self.step(batch, variant)
        graph, outputs = self.graphs[size, variant]
        graph.replay()
        return tuple(out[:batch] for out in outputs)


class LazyGraphs:
    """A step `step(key, *inputs)` captured in a CUDA graph for each key the first time that key is met, and
    replayed for it afterwards (`__call__`); each graph reads its own copies of the inputs.

    For the prefill forward, whose shapes are too many to capture all at start-up (rows x width x read length): the
    buckets a workload reaches are captured as it reaches them. Capturing runs the step twice first, for real (it
    must write the same values however often it runs, as the prefill does: the same keys to the same places). All
    the graphs share one memory pool, so they cost about what the largest of them needs; they never run at once,
    and their results go to buffers outside the pool.
    """

    def __init__(self, step: Callable[..., object]) -> None:
        self.step = step
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[Tensor]]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.side = torch.cuda.Stream()
        self.capture_s = 0.0
        """Seconds spent capturing so far (warm-up runs included)."""

    def __call__(self, key: tuple, inputs: list[Tensor]) -> None:
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(key, inputs)
        graph, static = entry
        for dst, src in zip(static, inputs):
            dst.copy_(src)
        graph.replay()

    def _capture(self, key: tuple, inputs: list[Tensor]) -> tuple[torch.cuda.CUDAGraph, list[Tensor]]:
        t0 = time.perf_counter()
        static = [t.clone() for t in inputs]
        graph, _ = capture(functools.partial(self.step, key, *static), self.pool, self.side)
        self.capture_s += time.perf_counter() - t0
        return graph, static
