"""Rendered conversations -> packed training rows with document boundaries, and the loader that serves them.

A conversation of L tokens becomes L inputs whose targets are the next token where that token is trainable
(assistant turns and their end-of-turn token, `chat.templates`) and -100 elsewhere; its last token predicts
nothing. Rows of `seq_len` tokens hold several conversations (best-fit decreasing, as TRL's `bfd` packing), each
with positions restarting at 0, so that `Llama.forward(..., positions=...)` lets every conversation attend only to
itself at the positions it would have alone: a packed batch's loss and gradients are those of the same
conversations unpacked. The rest of a row is padding: a document of its own whose targets are all -100, so no
padding token ever carries loss.

`PackedLoader` serves the rows of a finite dataset epoch after epoch, each epoch in its own deterministic order
(from `train.seed` and the epoch), with the same interface and exact resume as the pretraining loader.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

IGNORE = -100
"""The target of a position that carries no loss."""


@dataclass(frozen=True)
class Example:
    """One conversation, tokenized: its ids and, per id, whether predicting it is trained."""

    ids: tuple[int, ...]
    trainable: tuple[bool, ...]
    source: str = ""
    """Where it came from (file:line), for reports."""

    def __len__(self) -> int:
        return len(self.ids)


def fit_length(example: Example, seq_len: int, over_length: Literal["drop", "truncate"]) -> Example | None:
    """`example` if it fits a row; else None (`drop`) or its longest prefix ending a trained turn (`truncate`)."""
    if len(example) <= seq_len:
        return example
    return truncate_at_turn(example, seq_len) if over_length == "truncate" else None


def truncate_at_turn(example: Example, max_len: int) -> Example | None:
    """The longest prefix of `example` of at most `max_len` tokens that ends with a trained turn's last token.

    Returns None when no trained turn ends within `max_len` tokens.
    """
    if len(example) <= max_len:
        return example
    ends = [t for t in range(min(max_len, len(example))) if example.trainable[t] and not example.trainable[t + 1]]
    if not ends:
        return None
    end = ends[-1] + 1
    return Example(example.ids[:end], example.trainable[:end], example.source)


@dataclass
class PackStats:
    """What packing did: conversations packed, dropped or truncated for length, and how full the rows are."""

    conversations: int = 0
    rows: int = 0
    tokens: int = 0
    """Conversation tokens placed in rows (the rest of the rows' slots are padding)."""
    trained_tokens: int = 0
    """Targets that carry loss."""

    def efficiency(self, seq_len: int) -> float:
        """Share of the rows' slots that hold conversation tokens."""
        return self.tokens / max(1, self.rows * seq_len)


@dataclass(frozen=True)
class PackedRows:
    """Rows of `seq_len` tokens: inputs, targets and positions, each [rows, seq_len] int64 arrays."""

    inputs: np.ndarray
    targets: np.ndarray
    positions: np.ndarray

    def __len__(self) -> int:
        return len(self.inputs)

    def fingerprint(self) -> str:
        """sha256 of the rows: same rows, same fingerprint (a resume checks that its data did not change)."""
        digest = hashlib.sha256()
        for array in (self.inputs, self.targets, self.positions):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()


def pack(
    examples: Sequence[Example], seq_len: int, *, pad_id: int, packing: bool = True
) -> tuple[PackedRows, PackStats]:
    """Place conversations into rows of `seq_len` tokens (best-fit decreasing), padding the rest of each row.

    Args:
        examples: the conversations, each at most `seq_len` tokens (`fit_length` makes them so).
        seq_len: tokens per row.
        pad_id: input id of padding (its targets are -100 whatever it is).
        packing: False puts one conversation in each row.

    Returns:
        The rows and what packing did (`PackStats`).

    Raises:
        ValueError: a conversation longer than `seq_len`.
    """
    too_long = [ex.source or str(i) for i, ex in enumerate(examples) if len(ex) > seq_len]
    if too_long:
        raise ValueError(f"{len(too_long)} conversation(s) longer than {seq_len} tokens, e.g. {too_long[0]}")
    fitting = list(examples)
    stats = PackStats(conversations=len(fitting))
    # Best-fit decreasing: longest first, each into the row with the least room that still fits it.
    order = sorted(range(len(fitting)), key=lambda i: -len(fitting[i]))
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (free slots, row index)
    for i in order:
        need = len(fitting[i])
        at = bisect.bisect_left(room, (need, -1)) if packing else len(room)
        if at == len(room):
            rows.append([i])
            free = seq_len - need
        else:
            free, row = room.pop(at)
            rows[row].append(i)
            free -= need
            bisect.insort(room, (free, row))
            continue
        bisect.insort(room, (free, len(rows) - 1))
    inputs = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    targets = np.full((len(rows), seq_len), IGNORE, dtype=np.int64)
    positions = np.zeros((len(rows), seq_len), dtype=np.int64)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            ex = fitting[i]
            n = len(ex)
            ids = np.asarray(ex.ids, dtype=np.int64)
            inputs[r, at : at + n] = ids
            trained = np.asarray(ex.trainable[1:], dtype=bool)  # [n - 1]: is ids[t + 1] a trained target
            targets[r, at : at + n - 1] = np.where(trained, ids[1:], IGNORE)
            positions[r, at : at + n] = np.arange(n)
            stats.tokens += n
            stats.trained_tokens += int(trained.sum())
            at += n
        positions[r, at:] = np.arange(seq_len - at)  # padding: a document of its own, never trained
    stats.rows = len(rows)
    return PackedRows(inputs, targets, positions), stats


def _epoch_order(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The rows' order in one epoch: a permutation drawn from (seed, epoch) alone."""
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


class PackedLoader:
    """This rank's micro-batches of packed rows, epoch after epoch; state in every checkpoint (exact resume).

    Every optimizer step consumes `global_batch` consecutive rows of the epoch-ordered stream; rank r's micro-batch
    m of a step is rows ``m * world * micro_batch + r * micro_batch`` onwards of that step's rows. An epoch's last
    rows that do not fill a step go to the next step, which then takes the rest from the next epoch's order.

    Args:
        rows: the packed training rows.
        micro_batch: rows per micro-batch on one rank.
        global_batch: rows per optimizer step over all ranks (a multiple of micro_batch x world_size).
        rank, world_size: this rank and the number of ranks.
        seed: the epochs' orders come from it.
    """

    token_weighted = True
    """Rows hold different numbers of targets: the trainer weights micro-batches by their share of them."""

    def __init__(
        self,
        rows: PackedRows,
        *,
        micro_batch: int,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        if global_batch % (micro_batch * world_size):
            raise ValueError(f"global_batch {global_batch} is not a multiple of {micro_batch} x {world_size}")
        if len(rows) == 0:
            raise ValueError("no training rows: every conversation was rejected or dropped")
        self.rows = rows
        self.micro_batch = micro_batch
        self.global_batch = global_batch
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.micro_steps_per_step = global_batch // (micro_batch * world_size)
        self.consumed = 0  # rows of the stream taken by completed micro-batches of all ranks, in steps
        self._fingerprint = rows.fingerprint()
        self._order: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))  # (epoch, its row order)

    @property
    def epoch(self) -> float:
        """Epochs of the training rows consumed so far."""
        return self.consumed / len(self.rows)

    def _stream_rows(self, start: int, count: int) -> np.ndarray:
        """Row indices `start` .. `start + count - 1` of the epoch-ordered stream."""
        n = len(self.rows)
        out = np.empty(count, dtype=np.int64)
        for k in range(count):
            epoch, within = divmod(start + k, n)
            if self._order[0] != epoch:
                self._order = (epoch, _epoch_order(n, self.seed, epoch))
            out[k] = self._order[1][within]
        return out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        per_micro = self.micro_batch * self.world_size
        while True:
            step_start = self.consumed
            for m in range(self.micro_steps_per_step):
                first = step_start + m * per_micro + self.rank * self.micro_batch
                index = self._stream_rows(first, self.micro_batch)
                batch = tuple(torch.from_numpy(a[index]) for a in (self.rows.inputs, self.rows.targets,
                                                                     self.rows.positions))  # fmt: skip
                if m == self.micro_steps_per_step - 1:
                    self.consumed = step_start + self.global_batch
                yield batch  # (inputs, targets, positions), each [micro_batch, seq_len]

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "packed", "consumed": self.consumed, "rows": len(self.rows), "fingerprint": self._fingerprint}

    def load_state_dict(self, state: dict[str, Any], allow_data_change: bool = False) -> None:
        """Continue where `state` stopped.

        Raises:
            ValueError: the state is not a packed loader's, or the rows differ (other conversations, template,
                tokenizer or sequence length) and `allow_data_change` is off.
        """
        if state.get("kind") != "packed":
            raise ValueError("the checkpoint's data state is not a chat (packed rows) loader's")
        if state["fingerprint"] != self._fingerprint and not allow_data_change:
            raise ValueError(
                f"the packed rows differ from the checkpoint's ({state['rows']} rows then, {len(self.rows)} now): "
                "the conversations, template, tokenizer or data.seq_len changed; resume with the same data, or "
                "set checkpoint.allow_data_change=true"
            )
        self.consumed = int(state["consumed"])

    def close(self) -> None:
        """Nothing runs in the background."""


@dataclass(frozen=True)
class PackedValidation:
    """Held-out packed rows, scored on their trained targets (the assistant tokens); rank r scores rows r, r + world,
    ... of an equal share, so the result does not depend on the number of ranks beyond the dropped remainder."""

    rows: PackedRows

    def batches(self, batch_size: int, max_batches: int | None, rank: int, world: int) -> Iterator:
        per_rank = len(self.rows) // world
        mine = np.arange(rank, per_rank * world, world)
        n_batches = -(-per_rank // batch_size)
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        for b in range(n_batches):
            index = mine[b * batch_size : (b + 1) * batch_size]
            yield tuple(torch.from_numpy(a[index]) for a in (self.rows.inputs, self.rows.targets, self.rows.positions))
