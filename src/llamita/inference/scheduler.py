"""Continuous batching: requests queue, take a cache slot as soon as one is free, prefill in chunks, then decode.

Between two engine steps requests join (`add`) and leave (`release`, the moment they finish): nothing waits for
a whole batch to end. A full cache is back-pressure, not an error: requests wait in the queue, first come first
served, and every request admitted can finish (`Sequence.max_new` fits its slot), so the queue always drains.
With a prefix cache, a prompt that starts with blocks another prompt's slot still holds (a system prompt) takes
those keys and values instead of recomputing them: the very slot when it is free, a device copy when it is in use.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from llamita.config import ConfigError
from llamita.inference.sampling import SamplingParams


@dataclass(eq=False)
class Sequence:
    """One request through the engine: its prompt, settings and output so far."""

    id: int
    prompt: list[int]
    params: SamplingParams
    seed: int
    """The resolved seed of its draws."""
    stops: frozenset[int]
    """Token ids that finish it (the settings' stop ids and, unless ignored, end-of-sequence)."""
    max_new: int
    """New tokens it may make: max_tokens, or fewer where its slot ends."""
    output: list[int] = field(default_factory=list)
    logprobs: list[dict[str, object]] = field(default_factory=list)
    """Per new token, when asked: {"logprob": float, "top": [(id, logprob), ...]}."""
    slot: int | None = None
    cached: int = 0
    """Prompt tokens whose keys and values are in its slot."""
    reused: int = 0
    """Of those, how many came from the prefix cache."""
    finish_reason: str | None = None
    """None while running; "stop" (a stop id or string), "length" (max_new) or "abort"."""

    @property
    def prefilled(self) -> bool:
        return self.cached == len(self.prompt)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        """Tokens so far, prompt and output."""
        return len(self.prompt) + len(self.output)

    def append(self, token: int) -> bool:
        """Add a new token; returns whether the sequence is finished with it."""
        self.output.append(token)
        if token in self.stops:
            self.finish_reason = "stop"
        elif len(self.output) >= self.max_new:
            self.finish_reason = "length"
        return self.finished


@dataclass(frozen=True)
class Chunk:
    """Prompt tokens start .. start + n - 1 of one sequence, prefilled in this step."""

    seq: Sequence
    start: int
    n: int

    @property
    def completes(self) -> bool:
        """Whether it ends the prompt, so that its last logits give the first new token."""
        return self.start + self.n == len(self.seq.prompt)


class PrefixIndex:
    """Which slot holds the keys and values of which block-aligned prompt prefix."""

    def __init__(self, block: int) -> None:
        self.block = block
        self.owner: dict[tuple[int, ...], int] = {}
        self.held: dict[int, list[tuple[int, ...]]] = {}

    def lookup(self, prompt: list[int]) -> tuple[int, int] | None:
        """(slot, n) of the longest held prefix of `prompt`, leaving at least one token to prefill."""
        for n in range((len(prompt) - 1) // self.block * self.block, 0, -self.block):
            slot = self.owner.get(tuple(prompt[:n]))
            if slot is not None:
                return slot, n
        return None

    def register(self, slot: int, prompt: list[int]) -> None:
        """`slot` now holds every block-aligned prefix of `prompt`."""
        for n in range(self.block, len(prompt) + 1, self.block):
            key = tuple(prompt[:n])
            if key not in self.owner:
                self.owner[key] = slot
                self.held.setdefault(slot, []).append(key)

    def forget(self, slot: int, keep: int) -> None:
        """`slot` is overwritten from position `keep` on: its longer prefixes are gone."""
        kept = []
        for key in self.held.pop(slot, []):
            if len(key) <= keep:
                kept.append(key)
            else:
                del self.owner[key]
        if kept:
            self.held[slot] = kept


class Scheduler:
    """The queue, the slots and who is in which, the prefill plan of each step and the prefix cache."""

    def __init__(
        self, n_slots: int, seq_len: int, prefill_tokens: int, prefix_block: int | None, prefill_interval: int = 1
    ) -> None:
        """
        Args:
            n_slots: Sequences the cache holds.
            seq_len: Positions per slot: prompt and output together fit in it.
            prefill_tokens: Prompt tokens prefilled per step, over all sequences (longer prompts take several).
            prefix_block: Block size of the prefix cache, in tokens; None turns it off.
            prefill_interval: While sequences decode, prefill at most every this many steps (`prefill_chunks`).
        """
        self.seq_len = seq_len
        self.prefill_tokens = prefill_tokens
        self.prefill_interval = prefill_interval
        self.postponed = 0  # steps in a row whose prefill waited
        self.waiting: deque[Sequence] = deque()
        self.slots: list[Sequence | None] = [None] * n_slots
        self.free = list(range(n_slots))  # a heap: the lowest free slot first keeps decode batches short
        self.prefilling: list[Sequence] = []
        self.prefix = PrefixIndex(prefix_block) if prefix_block else None

    def check(self, prompt: list[int], params: SamplingParams) -> int:
        """The new tokens a request may make (`Sequence.max_new`).

        Raises:
            ConfigError: The prompt is empty, or leaves no room for one new token in a slot.
        """
        if not prompt:
            raise ConfigError("the prompt is empty; generation needs at least one token (e.g. the BOS id)")
        if len(prompt) >= self.seq_len:
            raise ConfigError(
                f"the prompt has {len(prompt)} tokens but a sequence may hold {self.seq_len} (the model's context "
                f"or the engine's max_seq_len); shorten the prompt to at most {self.seq_len - 1} tokens"
            )
        return min(params.max_tokens, self.seq_len - len(prompt))

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def running(self) -> list[Sequence]:
        return [s for s in self.slots if s is not None]

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.slots)

    def admit(self) -> tuple[list[Sequence], list[tuple[int, int, int]]]:
        """Give free slots to waiting requests, in order.

        Returns:
            The sequences admitted, and the prefix copies to make first: (source slot, target slot, positions).
        """
        admitted, copies = [], []
        while self.waiting and self.free:
            seq = self.waiting.popleft()
            hit = self.prefix.lookup(seq.prompt) if self.prefix else None
            if hit is not None and self.slots[hit[0]] is None:  # a free slot that still holds the prefix: take it
                self.free.remove(hit[0])
                heapq.heapify(self.free)
                seq.slot = hit[0]
            else:
                seq.slot = heapq.heappop(self.free)
                if hit is not None:
                    copies.append((hit[0], seq.slot, hit[1]))
            seq.cached = seq.reused = 0 if hit is None else hit[1]
            if self.prefix:
                self.prefix.forget(seq.slot, keep=seq.cached if hit and hit[0] == seq.slot else 0)
            self.slots[seq.slot] = seq
            self.prefilling.append(seq)
            admitted.append(seq)
        return admitted, copies

    def decoding(self) -> list[Sequence]:
        """The sequences past their prompt, by slot."""
        return [s for s in self.slots if s is not None and s.prefilled]

    def prefill_chunks(self, decoding: bool = False) -> list[Chunk]:
        """This step's prompt pieces: the oldest prompts first, `prefill_tokens` in all.

        With `decoding` (sequences decode in this step) and a `prefill_interval` above 1, none until the prompts
        have waited interval - 1 steps or their tokens fill the budget.
        """
        pending = sum(len(s.prompt) - s.cached for s in self.prefilling)
        if pending == 0:
            self.postponed = 0
            return []
        if decoding and self.postponed + 1 < self.prefill_interval and pending < self.prefill_tokens:
            self.postponed += 1
            return []
        self.postponed = 0
        chunks, budget = [], self.prefill_tokens
        for seq in self.prefilling:
            if budget == 0:
                break
            n = min(len(seq.prompt) - seq.cached, budget)
            chunks.append(Chunk(seq, seq.cached, n))
            budget -= n
        return chunks

    def prefilled(self, chunk: Chunk) -> None:
        """Record a chunk as in the cache; a finished prompt's prefixes become reusable."""
        seq = chunk.seq
        seq.cached = chunk.start + chunk.n
        if seq.prefilled:
            self.prefilling.remove(seq)
            if self.prefix:
                self.prefix.register(seq.slot, seq.prompt)

    def release(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted): its slot is free at once; its prefixes stay reusable."""
        if seq.slot is None:
            self.waiting.remove(seq)
            return
        self.slots[seq.slot] = None
        heapq.heappush(self.free, seq.slot)
        if seq in self.prefilling:
            self.prefilling.remove(seq)
        seq.slot = None
