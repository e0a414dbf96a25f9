"""Rendered conversations -> packed training rows with document boundaries, and the loader that serves them.

A conversation of L tokens becomes L inputs whose targets are the next token where that token is trainable
(assistant turns and their end-of-turn token, `chat.templates`) and -100 elsewhere; its last token predicts
nothing. Rows of `seq_len` tokens hold several conversations (best-fit decreasing, as TRL's `bfd` packing), each
with positions restarting at 0, so that `Llama.forward(..., positions=...)` lets every conversation attend only to
itself at the positions it would have alone: a packed batch's loss and gradients are those of the same
conversations unpacked. The rest of a row is padding: a document of its own whose targets are all -100, so no
padding token ever carries loss.

Preference pairs (DPO) are packed as trees (`pack_pairs`, `TreeRows`): the prompt once, then the chosen and the
rejected completion as two branches that attend to the prompt and to themselves at the positions of their own
sequences, so one forward pass scores both (the tree mask of `evaluate.scoring`'s shared contexts).

`PackedLoader` serves the rows of a finite dataset epoch after epoch, each epoch in its own deterministic order
(from `train.seed` and the epoch), with the same interface and exact resume as the pretraining loader.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, NamedTuple

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
        return _fingerprint((self.inputs, self.targets, self.positions))

    def batch(self, index: np.ndarray) -> tuple[torch.Tensor, ...]:
        """Rows `index` as the model's (inputs, targets, positions), each [len(index), seq_len]."""
        return tuple(torch.from_numpy(a[index]) for a in (self.inputs, self.targets, self.positions))


def _fingerprint(arrays: Sequence[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def fill_rows(lengths: Sequence[int], seq_len: int, packing: bool, sources: Sequence[str] = ()) -> list[list[int]]:
    """Which items go into which row of `seq_len` slots: best-fit decreasing (longest first, each into the row with
    the least room that still fits it, as TRL's `bfd` packing), or one item per row without `packing`.

    Args:
        lengths: each item's length, at most `seq_len`.
        seq_len: slots per row.
        packing: False puts every item in a row of its own.
        sources: the items' origins (file:line), named in the error.

    Returns:
        The items' indices, row by row, each row in placement order.

    Raises:
        ValueError: an item longer than `seq_len`.
    """
    too_long = [i for i, n in enumerate(lengths) if n > seq_len]
    if too_long:
        first = sources[too_long[0]] if sources else str(too_long[0])
        raise ValueError(f"{len(too_long)} item(s) longer than {seq_len} tokens, e.g. {first}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (free slots, row index)
    for i in order:
        need = lengths[i]
        at = bisect.bisect_left(room, (need, -1)) if packing else len(room)
        if at == len(room):
            rows.append([i])
            bisect.insort(room, (seq_len - need, len(rows) - 1))
        else:
            free, row = room.pop(at)
            rows[row].append(i)
            bisect.insort(room, (free - need, row))
    return rows


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
    fitting = list(examples)
    stats = PackStats(conversations=len(fitting))
    rows = fill_rows([len(ex) for ex in fitting], seq_len, packing, [ex.source for ex in fitting])
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


@dataclass(frozen=True)
class Pair:
    """One preference pair, tokenized: the prompt, and the chosen and rejected completions that follow it (each
    through its end-of-turn token), with the pair's id (its row in the stored reference log-probs)."""

    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]
    id: int
    source: str = ""
    """Where it came from (file:line), for reports."""

    def __len__(self) -> int:
        """Slots of its tree: the prompt but its last token, then each completion after that token."""
        return len(self.prompt) - 1 + len(self.chosen) + len(self.rejected)


def fit_pair(
    pair: Pair, max_length: int, max_prompt_length: int, over_length: Literal["drop", "truncate"]
) -> Pair | None:
    """`pair` if its prompt + longer answer fit `max_length` tokens; else None (`drop`), or TRL's DPO truncation
    (`truncate`, its default ``truncation_mode="keep_end"``): the prompt's last `max_prompt_length` tokens, and,
    if that is still too long, both answers cut to their first `max_length - max_prompt_length` tokens."""
    longer = max(len(pair.chosen), len(pair.rejected))
    if len(pair.prompt) + longer <= max_length:
        return pair
    if over_length == "drop":
        return None
    prompt = pair.prompt[-max_prompt_length:]
    chosen, rejected = pair.chosen, pair.rejected
    if len(prompt) + longer > max_length:
        keep = max_length - max_prompt_length
        chosen, rejected = chosen[:keep], rejected[:keep]
    return Pair(prompt, chosen, rejected, pair.id, pair.source)


class TreeBatch(NamedTuple):
    """A micro-batch of preference trees (`TreeRows.batch`): B rows of T slots holding n pairs, N scored tokens."""

    inputs: torch.Tensor
    """[B, T] token ids."""
    targets: torch.Tensor
    """[B, T] the completion token each position predicts; -100 in prompts and padding."""
    positions: torch.Tensor
    """[B, T] each token's position in its own sequence (prompt + one completion)."""
    branches: torch.Tensor
    """[B, T] 0 prompt (and padding), 1 chosen, 2 rejected."""
    predict: torch.Tensor
    """[N] flat indices into B * T of the positions that predict a completion token."""
    sequence: torch.Tensor
    """[N] the sequence each scored token belongs to: 2 * (the pair's slot in `pair_ids`) + (0 chosen, 1 rejected)."""
    pair_ids: torch.Tensor
    """[n] the ids of the batch's pairs, row by row (a row drawn twice holds its pairs twice)."""
    lengths: torch.Tensor
    """[n, 2] completion tokens of each pair's chosen and rejected answers."""


@dataclass(frozen=True)
class TreeRows:
    """Rows of `seq_len` slots holding preference pairs as trees, each array [rows, seq_len] int64.

    A pair of prompt x (P tokens) and completions y_w (C), y_l (R) takes P - 1 + C + R slots: x[:-1] (branch 0),
    then x[-1] + y_w[:-1] (branch 1) and x[-1] + y_l[:-1] (branch 2), each branch at positions P - 1 onwards and
    attending to the prompt and to itself only (`model.llama.document_mask` with branches). The prompt's last
    token stands at the head of both branches, so every completion token is predicted from exactly the tokens and
    positions of its own sequence x + y: one forward pass gives both completions' log-probabilities, the prompt
    computed once. The rest of a row is padding, a document of its own with pair id -1.
    """

    inputs: np.ndarray
    targets: np.ndarray
    positions: np.ndarray
    branches: np.ndarray
    pairs: np.ndarray
    """The id of the pair every slot belongs to; -1 for padding."""

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def pair_ids(self) -> np.ndarray:
        """The ids of the pairs the rows hold, ascending."""
        return np.unique(self.pairs[self.pairs >= 0])

    def fingerprint(self) -> str:
        """sha256 of the rows (their tokens, layout and pair ids)."""
        return _fingerprint((self.inputs, self.targets, self.positions, self.branches, self.pairs))

    def batch(self, index: np.ndarray) -> TreeBatch:
        """Rows `index` with what scoring their completions needs (`TreeBatch`), computed here on the host."""
        targets = self.targets[index]  # [B, T]
        predict = np.flatnonzero(targets.ravel() != IGNORE)  # [N]
        pair = self.pairs[index].ravel()[predict]  # [N]
        branch = self.branches[index].ravel()[predict]  # [N]: 1 or 2
        # A pair is keyed by its row in the batch too: a row drawn twice (an epoch's end and the next one's start in
        # one micro-batch) holds two copies of its pairs, each summed on its own.
        n_ids = int(self.pairs.max()) + 1
        keys, slot = np.unique(predict // targets.shape[1] * n_ids + pair, return_inverse=True)  # [n], [N]
        pair_ids = keys % n_ids  # [n]
        sequence = 2 * slot + branch - 1  # [N]
        lengths = np.bincount(sequence, minlength=2 * len(pair_ids)).reshape(-1, 2)  # [n, 2]
        return TreeBatch(
            *(torch.from_numpy(a) for a in (self.inputs[index], targets, self.positions[index], self.branches[index])),
            *(torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)) for a in (predict, sequence, pair_ids)),
            torch.from_numpy(lengths.astype(np.int64)),
        )


def pack_pairs(pairs: Sequence[Pair], seq_len: int, *, pad_id: int, packing: bool = True) -> tuple[TreeRows, PackStats]:
    """Place preference pairs as trees (`TreeRows`) into rows of `seq_len` slots, best-fit decreasing.

    Args:
        pairs: the pairs, each a prompt of at least 2 tokens and non-empty completions, at most `seq_len` slots.
        seq_len: slots per row.
        pad_id: input id of padding.
        packing: False puts one pair in each row.

    Returns:
        The rows and what packing did (`PackStats`: its `conversations` are pairs, `trained_tokens` the
        completion tokens scored).

    Raises:
        ValueError: a pair too long for a row, or with a prompt under 2 tokens or an empty completion.
    """
    bad = [p.source or str(p.id) for p in pairs if len(p.prompt) < 2 or not p.chosen or not p.rejected]
    if bad:
        raise ValueError(f"{len(bad)} pair(s) with a prompt under 2 tokens or an empty completion, e.g. {bad[0]}")
    stats = PackStats(conversations=len(pairs))
    rows = fill_rows([len(p) for p in pairs], seq_len, packing, [p.source for p in pairs])
    shape = (len(rows), seq_len)
    inputs = np.full(shape, pad_id, dtype=np.int64)
    targets = np.full(shape, IGNORE, dtype=np.int64)
    positions = np.zeros(shape, dtype=np.int64)
    branches = np.zeros(shape, dtype=np.int64)
    ids = np.full(shape, -1, dtype=np.int64)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            pair = pairs[i]
            n_prompt = len(pair.prompt)
            inputs[r, at : at + n_prompt - 1] = pair.prompt[:-1]
            positions[r, at : at + n_prompt - 1] = np.arange(n_prompt - 1)
            ids[r, at : at + len(pair)] = pair.id
            at += n_prompt - 1
            for branch, completion in ((1, pair.chosen), (2, pair.rejected)):
                n = len(completion)
                inputs[r, at : at + n] = (pair.prompt[-1], *completion[:-1])
                targets[r, at : at + n] = completion
                positions[r, at : at + n] = np.arange(n_prompt - 1, n_prompt - 1 + n)
                branches[r, at : at + n] = branch
                at += n
                stats.trained_tokens += n
            stats.tokens += len(pair)
        positions[r, at:] = np.arange(seq_len - at)  # padding: a document of its own, never scored
    stats.rows = len(rows)
    return TreeRows(inputs, targets, positions, branches, ids), stats


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
    """Rows hold different numbers of what the loss averages over (targets; pairs for trees): the trainer weights
    micro-batches by their share of them (its objective's `count`)."""

    def __init__(
        self,
        rows: PackedRows | TreeRows,
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
                batch = self.rows.batch(self._stream_rows(first, self.micro_batch))
                if m == self.micro_steps_per_step - 1:
                    self.consumed = step_start + self.global_batch
                yield batch  # PackedRows: (inputs, targets, positions), each [micro_batch, seq_len]

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
    """Held-out packed rows, scored on their trained targets (the assistant tokens).

    Rank r scores rows r, r + world, ..., so every row is scored once whatever the number of ranks. Every rank runs
    the same number of forward passes, as FSDP2's gathers need: a rank a batch short runs a padding batch instead, a
    row whose targets are all -100, which scores nothing (the objectives sum over targets and pairs, then divide).
    """

    rows: PackedRows | TreeRows

    def batches(self, batch_size: int, max_batches: int | None, rank: int, world: int) -> Iterator:
        mine = np.arange(rank, len(self.rows), world)
        n_batches = math.ceil(math.ceil(len(self.rows) / world) / batch_size)
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        for b in range(n_batches):
            index = mine[b * batch_size : (b + 1) * batch_size]
            yield self.rows.batch(index) if len(index) else self._padding()

    def _padding(self) -> tuple[torch.Tensor, ...]:
        """A batch of one row that scores nothing: row 0 with every target -100."""
        row = {f.name: getattr(self.rows, f.name)[:1] for f in fields(self.rows)}
        row["targets"] = np.full_like(row["targets"], IGNORE)
        return type(self.rows)(**row).batch(np.zeros(1, dtype=np.int64))
