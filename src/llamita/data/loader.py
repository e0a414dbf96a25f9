"""Deterministic, resumable (input, target) batches drawn from a mixture of token sources.

Each source is its list of shards read as one token stream, cut into ``n = tokens // (seq_len + 1)``
non-overlapping windows (the tail remainder is unused; ``stats()`` reports it). A source's c-th draw is window
``perm(c mod n)`` of epoch ``c // n``, where ``perm`` is a Feistel permutation keyed by (seed, source, epoch):
every window is used once before any repeats, and the permutation needs O(1) memory however many windows.

Each optimizer step takes the next ``global_batch`` global samples (or, with a batch schedule, as many as the
schedule gives the step at the tokens seen so far); global sample g's source is picked from
``mixture.weights(step)`` with a uniform number hashed from (seed, g). Every rank computes the picks for the
whole global batch, so the per-source draw counters are the same on all ranks; rank r takes the positions
``p`` of each step with ``p % world_size == r``. The state is therefore global: (next sample, step, draw
counters), and a run saved on 2 ranks resumes on 1 in the same global order.

A branch (`branch_from`) starts a new data order at another run's position: the sample and step counts go on
(the batch schedule is the run's), each source the parent read from the same shards with the same seed continues
its draws (no window repeats before its epoch ends), and the mixture's stages count from the branch's first step.
"""

from __future__ import annotations

import logging
import operator
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from llamita.config import ConfigError
from llamita.data.mixture import Mixture
from llamita.data.shards import read_shard

logger = logging.getLogger(__name__)

_STATE_VERSION = 1
_FEISTEL_ROUNDS = 6
_MASK64 = (1 << 64) - 1
_TAG_SOURCE_PICK = 1
_TAG_WINDOW_PERM = 2


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijective, well-mixing hash of uint64 values (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _key(*parts: int) -> int:
    """Hash a tuple of integers to one 64-bit key."""
    h = np.zeros(1, dtype=np.uint64)
    for p in parts:
        h = _mix64(h ^ np.uint64(p & _MASK64))
    return int(h[0])


def feistel_permute(idx: np.ndarray, n: int, key: int) -> np.ndarray:
    """Apply a keyed pseudo-random bijection of ``[0, n)`` to indices, in O(1) memory.

    A balanced Feistel network permutes ``[0, 4**k)`` with ``4**k >= n``; cycle-walking (re-applying it until
    the value falls below ``n``) restricts that to a bijection of ``[0, n)``. Since ``4**k < 4 * n``, each
    index needs under four passes on average.

    Args:
        idx: Integer indices in ``[0, n)``, any shape.
        n: Size of the domain, >= 1.
        key: 64-bit key; different keys give unrelated permutations.

    Returns:
        The permuted indices, int64, same shape as ``idx``.
    """
    if n < 1:
        raise ValueError(f"feistel_permute: n must be >= 1, got {n}")
    x = np.asarray(idx, dtype=np.uint64).copy()
    if x.size and int(x.max()) >= n:
        raise ValueError(f"feistel_permute: indices must be in [0, {n}), got max {int(x.max())}")
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)
    round_keys = [np.uint64(_key(key, r)) for r in range(_FEISTEL_ROUNDS)]

    def rounds(v: np.ndarray) -> np.ndarray:
        left, right = v >> shift, v & mask
        for rk in round_keys:
            left, right = right, left ^ (_mix64(right ^ rk) & mask)
        return (left << shift) | right

    todo = np.ones(x.shape, dtype=bool)
    while todo.any():
        x[todo] = rounds(x[todo])
        todo = x >= np.uint64(n)
    return x.astype(np.int64)


class _TokenStream:
    """A list of shards read as one logical token sequence."""

    def __init__(self, paths: Sequence[Path], vocab_size: int | None, checksums: Sequence[str] | None = None) -> None:
        if not paths:
            raise ValueError("no shard files given")
        if checksums is not None and len(checksums) != len(paths):
            raise ValueError(f"{len(checksums)} checksums for {len(paths)} shard files")
        self.paths = [Path(p) for p in paths]
        self.checksums = list(checksums) if checksums is not None else None
        # Headers and sizes are checked; scanning every token (terabytes, at each start) is left to
        # write_shard, which refuses out-of-range ids.
        self.arrays = [read_shard(p, vocab_size=vocab_size, check_tokens=False) for p in self.paths]
        self.counts = [int(a.shape[0]) for a in self.arrays]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])
        self.total = int(self.offsets[-1])

    def read(self, start: int, out: np.ndarray) -> None:
        """Copy tokens ``[start, start + len(out))`` into ``out``, crossing shard boundaries as needed."""
        pos, filled = start, 0
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while filled < out.shape[0]:
            local = pos - int(self.offsets[shard])
            take = min(out.shape[0] - filled, self.counts[shard] - local)
            out[filled : filled + take] = self.arrays[shard][local : local + take]
            filled += take
            pos += take
            shard += 1

    def fingerprint(self) -> dict[str, list]:
        out = {"shards": [p.name for p in self.paths], "tokens": list(self.counts)}
        if self.checksums is not None:
            out["sha256"] = list(self.checksums)
        return out


@dataclass(frozen=True)
class _Position:
    """Where the global sample stream stands at an optimizer-step boundary."""

    sample: int
    step: int
    draws: tuple[int, ...]


class BatchSizes(Protocol):
    """A global batch in tokens per step as a function of the tokens seen (`llamita.train.optim.BatchSchedule`)."""

    @property
    def sizes(self) -> tuple[int, ...]:
        """Every batch the schedule takes, in tokens."""
        ...

    def at(self, tokens: int) -> int:
        """The batch of the step that starts after `tokens` tokens."""
        ...

    def tokens_after(self, steps: int) -> int:
        """Tokens seen after `steps` steps."""
        ...


class DataLoader:
    """Infinite iterator of (inputs, targets) micro-batches for one rank, resumable exactly.

    Args:
        sources: Shard files per source name (train split), in stream order.
        mixture: Source weights per optimizer step (counted from the data order's first step); must name exactly
            the sources in ``sources``.
        seq_len: Tokens per sequence; each sample reads a window of ``seq_len + 1`` tokens.
        micro_batch: Sequences per yielded batch on this rank.
        global_batch: Sequences per optimizer step, summed over all ranks and micro-steps (the first step's, with
            ``batch_schedule``).
        rank: This rank's index.
        world_size: Number of data-parallel ranks.
        seed: Seeds the source picks and the window permutations.
        vocab_size: If given, shards are checked against it.
        prefetch: Batches a background thread prepares ahead; 0 reads in the caller's thread.
        pin_memory: Pin the batches' host memory (for faster copies to the GPU); ignored without CUDA.
        checksums: Per source, the sha256 of each shard (from the prepared manifest), part of the fingerprint
            that a resume compares; without them only shard names and token counts are compared.
        batch_schedule: The global batch in tokens as a function of the tokens seen (each step takes
            ``batch_schedule.at(sample * seq_len) // seq_len`` sequences); None: ``global_batch`` throughout.

    Raises:
        ValueError: If the sizes do not divide, the mixture and sources disagree, or a source is too short.
    """

    def __init__(
        self,
        sources: dict[str, list[Path]],
        mixture: Mixture,
        seq_len: int,
        micro_batch: int,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        vocab_size: int | None = None,
        prefetch: int = 2,
        pin_memory: bool = False,
        checksums: dict[str, list[str]] | None = None,
        batch_schedule: BatchSizes | None = None,
    ) -> None:
        for name, value in [("seq_len", seq_len), ("micro_batch", micro_batch), ("world_size", world_size)]:
            if value < 1:
                raise ValueError(f"DataLoader: {name} must be >= 1, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"DataLoader: rank must be in [0, {world_size}), got {rank}")
        if global_batch < 1 or global_batch % (micro_batch * world_size):
            raise ValueError(
                f"DataLoader: global_batch ({global_batch}) must be a positive multiple of "
                f"micro_batch * world_size ({micro_batch} * {world_size} = {micro_batch * world_size}); "
                "adjust the batch sizes or the number of ranks"
            )
        if batch_schedule is not None:
            if batch_schedule.at(0) != global_batch * seq_len:
                raise ValueError(
                    f"DataLoader: global_batch ({global_batch} sequences) is not the batch schedule's first "
                    f"({batch_schedule.at(0)} tokens / seq_len {seq_len})"
                )
            per_micro = seq_len * micro_batch * world_size
            bad = [size for size in batch_schedule.sizes if size % per_micro]
            if bad:
                raise ValueError(
                    f"DataLoader: the batch schedule's global batch of {bad[0]} tokens is not a multiple of "
                    f"seq_len * micro_batch * world_size ({seq_len} * {micro_batch} * {world_size}); adjust the "
                    "batch sizes or the number of ranks"
                )
        if prefetch < 0:
            raise ValueError(f"DataLoader: prefetch must be >= 0, got {prefetch}")
        if set(sources) != set(mixture.sources):
            raise ValueError(
                f"DataLoader: the mixture names sources {sorted(mixture.sources)} but data was given for "
                f"{sorted(sources)}; make them match"
            )
        self.names: tuple[str, ...] = mixture.sources
        self.mixture = mixture
        self.seq_len = seq_len
        self.micro_batch = micro_batch
        self.global_batch = global_batch
        self.batch_schedule = batch_schedule
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.prefetch = prefetch
        self.pin_memory = pin_memory and torch.cuda.is_available()

        self._streams: list[_TokenStream] = []
        for name in self.names:
            try:
                stream = _TokenStream(sources[name], vocab_size, None if checksums is None else checksums[name])
            except ValueError as e:
                raise ValueError(f"DataLoader: source {name!r}: {e}") from e
            if stream.total < seq_len + 1:
                raise ValueError(
                    f"DataLoader: source {name!r} has {stream.total} tokens, fewer than seq_len + 1 = "
                    f"{seq_len + 1}; add data or remove the source"
                )
            self._streams.append(stream)
        self._windows = np.array([s.total // (seq_len + 1) for s in self._streams], dtype=np.int64)
        for name, stream, n in zip(self.names, self._streams, self._windows, strict=True):
            logger.info(
                "source %s: %d tokens in %d shards -> %d windows of %d (%d tail tokens unused)",
                name,
                stream.total,
                len(stream.paths),
                n,
                seq_len + 1,
                stream.total - int(n) * (seq_len + 1),
            )
        self._pick_key = _key(seed, _TAG_SOURCE_PICK)
        # Handed to the caller so far: the last step boundary, plus micro-batches of the step after it.
        self._consumed = _Position(sample=0, step=0, draws=(0,) * len(self.names))
        self._micro = 0
        self._start_step = 0  # the data order's first step (a branch's), from which the mixture's stages count
        # Per source, the number its window permutations are keyed by: its index, or in a branch the parent's for a
        # source whose order continues (the index of a name changes when the branch adds sources).
        self._window_keys = tuple(range(len(self.names)))
        self._batches: Iterator[tuple[torch.Tensor, torch.Tensor, _Position | None]] | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    @property
    def micro_steps_per_step(self) -> int:
        """Micro-batches each rank yields in the current optimizer step (gradient accumulation steps)."""
        return self._step_batch(self._consumed.sample) // (self.micro_batch * self.world_size)

    def _step_batch(self, sample: int) -> int:
        """Global sequences of the step that starts at global sample ``sample``."""
        if self.batch_schedule is None:
            return self.global_batch
        return self.batch_schedule.at(sample * self.seq_len) // self.seq_len

    def _sample_after(self, steps: int) -> int:
        """The global sample at which step ``steps`` (0-based) starts."""
        if self.batch_schedule is None:
            return steps * self.global_batch
        return self.batch_schedule.tokens_after(steps) // self.seq_len

    def __iter__(self) -> DataLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prefetch == 0:
            if self._batches is None:
                self._batches = self._generate(self._consumed, self._micro)
            inputs, targets, boundary = next(self._batches)
        else:
            if self._thread is None:
                self._start_thread()
            assert self._queue is not None
            item = self._queue.get()
            if isinstance(item, BaseException):
                self.close()
                raise item
            inputs, targets, boundary = item
        if boundary is None:
            self._micro += 1
        else:
            self._consumed, self._micro = boundary, 0
        return inputs, targets

    def state_dict(self) -> dict:
        """The position after the last batch handed to the caller, in plain Python types.

        The state is global (not per rank), so it can be loaded with a different ``world_size`` or
        ``micro_batch`` as long as the batch sizes are unchanged.

        Raises:
            RuntimeError: If called in the middle of an optimizer step on this rank.
        """
        if self._micro:
            raise RuntimeError(
                "DataLoader.state_dict: called in the middle of an optimizer step; save only after the last "
                f"of the {self.micro_steps_per_step} micro-batches of a step"
            )
        return {
            "version": _STATE_VERSION,
            "sample": self._consumed.sample,
            "step": self._consumed.step,
            "start_step": self._start_step,
            "draws": {name: self._consumed.draws[i] for i, name in enumerate(self.names)},
            "window_keys": dict(zip(self.names, self._window_keys, strict=True)),
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
            "sources": self.fingerprint(),
        }

    def load_state_dict(self, state: dict, allow_data_change: bool = False) -> None:
        """Continue from a position saved by ``state_dict``.

        Args:
            state: from ``state_dict``.
            allow_data_change: continue from the saved position even if a source's shards changed (names, token
                counts, or sha256 where both sides have them); a warning says what changed.

        Raises:
            ValueError: If the state comes from a run with a different seed, seq_len or global_batch, or from
                different data without ``allow_data_change``.
        """
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"DataLoader state: version {state.get('version')!r}, expected {_STATE_VERSION}")
        for field in ("seed", "seq_len", "global_batch"):
            if state[field] != getattr(self, field):
                raise ValueError(
                    f"DataLoader state: {field} changed from {state[field]} (checkpoint) to "
                    f"{getattr(self, field)} (now); resuming needs the same {field}"
                )
        saved, now = state["sources"], self.fingerprint()
        if set(saved) != set(now):
            raise ValueError(
                f"DataLoader state: sources changed from {sorted(saved)} (checkpoint) to {sorted(now)} (now)"
            )
        for name in self.names:
            old, new = _comparable(saved[name], now[name])
            if old == new:
                continue
            message = (
                f"DataLoader state: the shards of source {name!r} changed since the checkpoint ({_diff(old, new)})"
            )
            if not allow_data_change:
                raise ValueError(
                    f"{message}; resume with the same data, or set checkpoint.allow_data_change=true to continue "
                    "from the saved position on the new data"
                )
            logger.warning("%s; continuing because data changes are allowed", message)
        step = self._check_position(state)
        self.close()
        self._micro = 0
        self._start_step = int(state.get("start_step", 0))
        keys = state.get("window_keys")
        self._window_keys = tuple(range(len(self.names))) if keys is None else tuple(int(keys[n]) for n in self.names)
        self._consumed = _Position(
            sample=int(state["sample"]), step=step, draws=tuple(int(state["draws"][name]) for name in self.names)
        )

    def branch_from(self, state: dict) -> dict[str, int]:
        """Start a new data order at the position of another run's ``state_dict`` (a branch, `init.branch_from`).

        The sample and step counts go on, so the batch schedule continues; the mixture's stages count from here.
        A source the parent read too (same name, shards and seed) continues its draws in the parent's window
        permutations, so its windows go on in the parent's epoch order; any other source starts at its first draw
        of a permutation of its own.

        Args:
            state: the parent run's loader state.

        Returns:
            The draws each continued source carried over, by name.

        Raises:
            ValueError: If the parent had another seq_len, or its position is not one of this batch schedule's
                step boundaries.
        """
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"DataLoader state: version {state.get('version')!r}, expected {_STATE_VERSION}")
        if state["seq_len"] != self.seq_len:
            raise ValueError(
                f"DataLoader state: seq_len changed from {state['seq_len']} (parent) to {self.seq_len} (now); a "
                "branch continues the parent's position in sequences, so it needs the same seq_len"
            )
        step = self._check_position(state)
        now = self.fingerprint()
        carried = {
            name: int(state["draws"][name])
            for name in self.names
            if state["seed"] == self.seed
            and name in state["sources"]
            and operator.eq(*_comparable(state["sources"][name], now[name]))
        }
        parent_keys = state.get("window_keys") or {name: i for i, name in enumerate(sorted(state["draws"]))}
        fresh = iter(range(max(parent_keys.values(), default=-1) + 1, 1 << 62))
        self.close()
        self._micro = 0
        self._start_step = step
        self._window_keys = tuple(int(parent_keys[n]) if n in carried else next(fresh) for n in self.names)
        self._consumed = _Position(
            sample=int(state["sample"]), step=step, draws=tuple(carried.get(name, 0) for name in self.names)
        )
        return carried

    def _check_position(self, state: dict) -> int:
        """The step of a saved position, checked to be where this loader's batch sizes put that step's start."""
        sample = int(state["sample"])
        step = int(state["step"]) if "step" in state else sample // int(state["global_batch"])
        if self._sample_after(step) != sample:
            raise ValueError(
                f"DataLoader state: step {step} starts at global sample {sample} in the checkpoint, but at sample "
                f"{self._sample_after(step)} with this run's batch sizes (train.global_batch_tokens, "
                "train.batch_stages); keep the batches of the steps before it as they were"
            )
        return step

    def fingerprint(self) -> dict[str, dict[str, list]]:
        """Fingerprint of each source: its shard file names and token counts."""
        return {name: s.fingerprint() for name, s in zip(self.names, self._streams, strict=True)}

    def stats(self) -> dict[str, dict[str, int]]:
        """Per source: tokens, windows, unused tail tokens, draws and completed epochs.

        Draws and epochs count the optimizer steps handed out in full (those a checkpoint would resume after).
        """
        out = {}
        for i, (name, stream) in enumerate(zip(self.names, self._streams, strict=True)):
            n = int(self._windows[i])
            draws = self._consumed.draws[i]
            out[name] = {
                "tokens": stream.total,
                "windows": n,
                "unused_tail_tokens": stream.total - n * (self.seq_len + 1),
                "draws": draws,
                "epochs": draws // n,
            }
        return out

    def close(self) -> None:
        """Stop the prefetch thread; iterating again restarts it from the last handed-out batch."""
        if self._thread is not None:
            assert self._stop is not None
            self._stop.set()
            self._thread.join()
        self._thread = self._queue = self._stop = None
        self._batches = None

    def _start_thread(self) -> None:
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_produce,
            args=(self._generate(self._consumed, self._micro), self._queue, self._stop),
            name="llamita-dataloader",
            daemon=True,
        )
        self._thread.start()

    def _plan_step(self, pos: _Position) -> tuple[np.ndarray, np.ndarray, _Position]:
        """Source and window of each global position of the step starting at ``pos``; the next position."""
        batch = self._step_batch(pos.sample)
        weights = self.mixture.weights(pos.step - self._start_step)
        cum = np.cumsum([weights[name] for name in self.names])
        cum[-1] = 1.0  # rounding must not leave a gap above the last source
        g = np.arange(pos.sample, pos.sample + batch, dtype=np.uint64)
        u = (_mix64(g ^ np.uint64(self._pick_key)) >> np.uint64(11)).astype(np.float64) * 2.0**-53
        src = np.searchsorted(cum, u, side="right")
        window = np.empty(batch, dtype=np.int64)
        draws = list(pos.draws)
        for i in range(len(self.names)):
            where = np.flatnonzero(src == i)
            if where.size == 0:
                continue
            n = int(self._windows[i])
            c = draws[i] + np.arange(where.size, dtype=np.int64)
            epoch = c // n
            for e in np.unique(epoch):
                sel = epoch == e
                key = _key(self.seed, _TAG_WINDOW_PERM, self._window_keys[i], int(e))
                window[where[sel]] = feistel_permute(c[sel] % n, n, key)
            draws[i] += where.size
        return src, window, _Position(sample=pos.sample + batch, step=pos.step + 1, draws=tuple(draws))

    def _generate(self, pos: _Position, skip: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, _Position | None]]:
        """Yield this rank's micro-batches from step boundary ``pos`` on, less the first ``skip``.

        Each step's last micro-batch carries the position of the next step boundary; the others carry None.
        """
        span = self.seq_len + 1
        while True:
            src, window, nxt = self._plan_step(pos)
            mine = np.arange(self.rank, src.shape[0], self.world_size)
            micro_steps = src.shape[0] // (self.micro_batch * self.world_size)
            for m in range(skip, micro_steps):
                buf = np.empty((self.micro_batch, span), dtype=np.int64)
                for row, p in enumerate(mine[m * self.micro_batch : (m + 1) * self.micro_batch]):
                    self._streams[src[p]].read(int(window[p]) * span, buf[row])
                inputs = torch.from_numpy(np.ascontiguousarray(buf[:, :-1]))
                targets = torch.from_numpy(np.ascontiguousarray(buf[:, 1:]))
                if self.pin_memory:
                    inputs, targets = inputs.pin_memory(), targets.pin_memory()
                yield inputs, targets, nxt if m == micro_steps - 1 else None
            pos, skip = nxt, 0


def _produce(batches: Iterator, out: queue.Queue, stop: threading.Event) -> None:
    """Background thread body: move batches into ``out`` until told to stop; forward any error."""
    try:
        for item in batches:
            if not _put(out, item, stop):
                return
    except BaseException as e:  # re-raised in the consumer's thread
        _put(out, e, stop)


def _put(out: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Put ``item`` unless stopped first (a full queue must not block ``close()``); True if it was put."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _comparable(saved: dict, now: dict) -> tuple[dict, dict]:
    """A source's fingerprint in a checkpoint and now, as values that compare equal when the shards are the same.

    A checkpoint round trip may turn lists into tuples. Checksums are compared when both sides have them
    (checkpoints written before they were recorded have none).
    """
    old = {"shards": list(saved["shards"]), "tokens": [int(t) for t in saved["tokens"]]}
    new = {"shards": list(now["shards"]), "tokens": list(now["tokens"])}
    if "sha256" in saved and "sha256" in now:
        old["sha256"], new["sha256"] = list(saved["sha256"]), list(now["sha256"])
    return old, new


def _diff(saved: dict, now: dict) -> str:
    """Which shards differ, as name:tokens[:sha256 prefix]."""

    def entries(fp: dict) -> list[str]:
        sums = fp.get("sha256") or [""] * len(fp["shards"])
        return [f"{n}:{t}" + (f":{h[:12]}" if h else "") for n, t, h in zip(fp["shards"], fp["tokens"], sums)]

    a, b = entries(saved), entries(now)
    gone = [e for e in a if e not in b]
    new = [e for e in b if e not in a]
    return f"shard:tokens:sha256 only in checkpoint {gone[:5]}, only now {new[:5]}"


def eval_batches(
    shards: list[Path],
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    vocab_size: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic sequential (inputs, targets) batches from validation shards.

    The shards are read as one stream cut into non-overlapping windows of ``seq_len + 1`` tokens; window i
    goes to rank ``i % world_size``. Every rank gets the same number of windows (the few left over are
    dropped), so every rank yields the same number of batches; the last batch may be smaller.

    Args:
        shards: Validation shard files, in stream order.
        seq_len: Tokens per sequence.
        batch_size: Sequences per batch.
        max_batches: Stop after this many batches per rank (None: all).
        rank: This rank's index.
        world_size: Number of data-parallel ranks.
        vocab_size: If given, shards are checked against it.

    Yields:
        (inputs, targets) int64 tensors of shape [batch, seq_len].
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"eval_batches: seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"eval_batches: rank must be in [0, {world_size}), got {rank}")
    stream = _TokenStream(shards, vocab_size)
    span = seq_len + 1
    per_rank = (stream.total // span) // world_size
    if per_rank == 0:
        raise ConfigError(
            f"{stream.total} tokens in {len(shards)} shard(s) give fewer than one window of seq_len + 1 = {span} per "
            f"rank ({world_size} rank(s)); add data or lower the sequence length"
        )
    n_batches = -(-per_rank // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        local = range(b * batch_size, min((b + 1) * batch_size, per_rank))
        buf = np.empty((len(local), span), dtype=np.int64)
        for row, j in enumerate(local):
            stream.read((j * world_size + rank) * span, buf[row])
        yield (
            torch.from_numpy(np.ascontiguousarray(buf[:, :-1])),
            torch.from_numpy(np.ascontiguousarray(buf[:, 1:])),
        )
