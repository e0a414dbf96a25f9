"""Log-likelihoods of continuations given contexts, as lm-evaluation-harness's HF backend computes them, but faster.

Tokenization follows lm-eval's ``_encode_pair``: trailing whitespace of the context moves to the continuation,
``whole = encode(context + continuation)``, ``context = encode(context)``, ``continuation = whole[len(context):]``,
each encode starting with BOS as a Llama tokenizer does in transformers (none when the text already starts with
the BOS string). The model then reads ``(context + continuation)[-(max_len + 1):][:-1]`` and the continuation's
log-probabilities are summed.

Speed: requests are grouped by their (possibly left-truncated) context, so the choices of one question share
one copy of it: a *segment* is the context followed by each continuation (all but its last token), each
continuation attending to the context and to itself only, at the positions it has in its own full sequence.
Segments are packed into rows (first-fit, longest first) and a batch of rows runs in one forward pass with a
boolean attention mask; only the positions that predict a continuation token go through the output head. The
positions and the attended tokens are exactly those of the full sequences, so the numbers equal lm-eval's (to
float rounding), with the shared context computed once and no padding between requests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed.fsdp
from torch import Tensor

from llamita.model.llama import Llama, document_mask
from llamita.tokenizer import BOS, Tokenizer

TokenPair = tuple[Sequence[int], Sequence[int]]
"""(context token ids, continuation token ids)."""


def encode_pairs(tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """Token ids of (context, continuation) text pairs, split exactly as lm-eval's HF backend splits them.

    Raises:
        ValueError: a context is empty (lm-eval conditions those on BOS alone; no task here has one).
    """
    moved = []
    for context, continuation in pairs:
        if not context:
            raise ValueError(f"empty context for continuation {continuation!r}; every request needs a context")
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        moved.append((context, continuation))
    unique_contexts = list(dict.fromkeys(c for c, _ in moved))
    context_ids = dict(zip(unique_contexts, _encode_with_bos(tokenizer, unique_contexts)))
    wholes = _encode_with_bos(tokenizer, [c + k for c, k in moved])
    return [(context_ids[c], whole[len(context_ids[c]) :]) for (c, _), whole in zip(moved, wholes)]


def _encode_with_bos(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """transformers' ``tokenizer.encode(text)`` for a Llama tokenizer, including lm-eval's BOS-prefix check."""
    ids = tokenizer.encode_batch(texts)
    return [([] if text.startswith(BOS) else [tokenizer.bos_id]) + row for text, row in zip(texts, ids)]


def rolling_windows(tokens: Sequence[int], prefix_id: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's ``loglikelihood_rolling`` windows: the tokens cut into consecutive windows, each token predicted once.

    The first window predicts tokens[:max_len] after [prefix_id]; each later one predicts the next max_len tokens
    after the single token before them, and the last, shorter one after as many earlier tokens as fill max_len.
    A token thus sees the earlier tokens of its window. These are lm-eval's ``get_rolling_token_windows`` with
    ``context_len=1`` passed through ``make_disjoint_window``.

    Returns:
        (context, continuation) token pairs for `score_pairs`.
    """
    windows: list[tuple[list[int], list[int]]] = []
    if not tokens:
        return windows
    tokens = list(tokens)
    first = min(max_len, len(tokens))
    windows.append(([prefix_id], tokens[:first]))
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        window = tokens[end - max_len - 1 : end - 1]  # the max_len tokens the model reads; end > max_len here
        windows.append((window[: len(window) - (n - 1)], tokens[end - n : end]))
        done = end
    return windows


def _effective_context(pair: TokenPair, max_len: int) -> tuple[int, ...]:
    """The context tokens the model actually reads: lm-eval drops tokens from the left beyond max_len + 1."""
    context, continuation = pair
    if not context or not continuation:
        raise ValueError("a request needs at least one context token and one continuation token")
    if len(continuation) > max_len:
        raise ValueError(f"a continuation of {len(continuation)} tokens exceeds the model's context of {max_len}")
    full = [*context, *continuation]
    full = full[-(max_len + 1) :]
    return tuple(full[: len(full) - len(continuation)])


ROW_TOKENS = 512
"""Packed row length to aim for; a longer segment gets a row of its own length (attention cost grows as T^2)."""


@dataclass
class _Segment:
    """One context and the requests that continue it, laid out as context + each continuation[:-1]."""

    context: tuple[int, ...]
    requests: list[int]
    length: int


@dataclass
class _Row:
    segments: list[_Segment] = field(default_factory=list)
    length: int = 0


def _segments(pairs: Sequence[TokenPair], max_len: int, batch_size: int) -> list[_Segment]:
    """Requests grouped by effective context into segments of at most batch_size requests and max_len tokens."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, pair in enumerate(pairs):
        groups.setdefault(_effective_context(pair, max_len), []).append(i)
    segments = []
    for context, members in groups.items():
        current = _Segment(context, [], len(context))
        for i in members:
            extra = len(pairs[i][1]) - 1
            if current.requests and (len(current.requests) == batch_size or current.length + extra > max_len):
                segments.append(current)
                current = _Segment(context, [], len(context))
            current.requests.append(i)
            current.length += extra
        segments.append(current)
    return segments


def _plan_batches(pairs: Sequence[TokenPair], max_len: int, batch_size: int) -> list[list[_Row]]:
    """Batches of packed rows, at most batch_size requests each; segments longest first, rows filled first-fit."""
    batches: list[list[_Row]] = []
    rows: list[_Row] = []
    n_requests = 0
    for segment in sorted(_segments(pairs, max_len, batch_size), key=lambda g: -g.length):
        if rows and n_requests + len(segment.requests) > batch_size:
            batches.append(rows)
            rows, n_requests = [], 0
        row_len = max(ROW_TOKENS, rows[0].length if rows else segment.length)
        row = next((r for r in rows if r.length + segment.length <= row_len), None)
        if row is None:
            row = _Row()
            rows.append(row)
        row.segments.append(segment)
        row.length += segment.length
        n_requests += len(segment.requests)
    if rows:
        batches.append(rows)
    return batches


def _pack(rows: list[_Row], pairs: Sequence[TokenPair], device: torch.device) -> dict[str, Tensor]:
    """Token ids, positions, attention mask and the prediction index of one batch of packed rows.

    Returns:
        tokens, positions [R, T]; mask [R, 1, T, T] (None when every row holds one segment of one request,
        where the causal mask is exact); predict [N] flat indices into R * T of the positions whose next-token
        distribution is scored; target [N] the token each predicts; slot [N] the request it belongs to, numbered
        in packing order (row by row, segment by segment).
    """
    width = max(r.length for r in rows)
    width += -width % 8  # aligned rows suit the attention kernels
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)  # padding: documents of one token each
    branch_of = torch.zeros(len(rows), width, dtype=torch.long)  # 0: context, k: continuation k
    predict: list[int] = []
    target: list[int] = []
    slot: list[int] = []
    n_slots = 0
    for r, row in enumerate(rows):
        at = 0
        for segment in row.segments:
            n_ctx = len(segment.context)
            tokens[r, at : at + n_ctx] = torch.tensor(segment.context)
            positions[r, at : at + n_ctx] = torch.arange(n_ctx)
            start = at
            at += n_ctx
            for k, i in enumerate(segment.requests, start=1):
                cont = list(pairs[i][1])
                n = len(cont) - 1
                tokens[r, at : at + n] = torch.tensor(cont[:-1], dtype=torch.long)
                positions[r, at : at + n] = torch.arange(n_ctx, n_ctx + n)
                branch_of[r, at : at + n] = k
                # The last context token predicts cont[0]; cont[j] (j < n) predicts cont[j + 1].
                predict += [r * width + start + n_ctx - 1, *range(r * width + at, r * width + at + n)]
                target += cont
                slot += [n_slots] * len(cont)
                n_slots += 1
                at += n
    single = all(len(row.segments) == 1 and len(row.segments[0].requests) == 1 for row in rows)
    # Each segment is a tree (`document_mask`): its context, then its continuations as branches. Dense: the
    # blocks run eagerly here, where a FlexAttention mask would have no compiled kernel.
    mask = None if single else document_mask(positions.to(device), branch_of.to(device), blocks=False)
    as_tensor = lambda values: torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)  # noqa: E731
    return {
        "tokens": tokens.to(device),
        "positions": positions.to(device),
        "mask": mask,
        "predict": as_tensor(predict),
        "target": as_tensor(target),
        "slot": as_tensor(slot),
    }


LOGIT_ROWS = 8192
"""Predicted positions per output-head chunk: bounds the fp32 [rows, V] log-probabilities in memory."""


def _score_batch(
    model: Llama, rows: list[_Row], pairs: Sequence[TokenPair], autocast_dtype: torch.dtype | None
) -> list[tuple[int, float, bool]]:
    """(request index, log-likelihood, is greedy) for every request of one batch of packed rows."""
    device = model.lm_head.weight.device
    batch = _pack(rows, pairs, device)
    order = [i for row in rows for segment in row.segments for i in segment.requests]
    slot = batch["slot"]  # [N]: which request of `order` each scored position belongs to
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with autocast:
        if batch["mask"] is None:
            hidden = model.hidden_states(batch["tokens"])  # [R, T, D]: causal is exact for one request per row
        else:
            hidden = model.hidden_states(batch["tokens"], positions=batch["positions"], mask=batch["mask"])
    hidden = hidden.flatten(0, 1).index_select(0, batch["predict"])  # [N, D]
    total = torch.zeros(len(order), dtype=torch.float64, device=device)
    misses = torch.zeros(len(order), dtype=torch.long, device=device)
    for start in range(0, hidden.shape[0], LOGIT_ROWS):
        chunk = slice(start, start + LOGIT_ROWS)
        with autocast:
            logits = model.lm_head(hidden[chunk])  # [n, V]
        lp = logits.float().log_softmax(dim=-1)  # [n, V]
        tok = batch["target"][chunk]  # [n]
        total.index_add_(0, slot[chunk], lp.gather(1, tok[:, None]).squeeze(1).double())
        misses.index_add_(0, slot[chunk], (lp.argmax(dim=-1) != tok).long())
    return [(i, lp_i, m == 0) for i, lp_i, m in zip(order, total.tolist(), misses.tolist())]


@contextlib.contextmanager
def _whole_and_eager(model: Llama) -> Iterator[None]:
    """The model as one module for evaluation: FSDP2-sharded parameters gathered (every rank must then score the
    same requests, so that the blocks' own gathers line up), torch.compile'd blocks run eagerly (evaluation shapes
    change with every batch and would recompile them)."""
    sharded = torch.distributed.is_available() and isinstance(model, torch.distributed.fsdp.FSDPModule)
    if sharded:
        model.unshard()
    try:
        with torch.compiler.set_stance("force_eager"):
            yield
    finally:
        if sharded:
            model.reshard()


@torch.inference_mode()
def score_pairs(
    model: Llama,
    pairs: Sequence[TokenPair],
    *,
    batch_size: int,
    autocast_dtype: torch.dtype | None = None,
    on_batch: Callable[[list[int]], None] | None = None,
) -> list[tuple[float, bool]]:
    """Sum of log P(continuation | context) and whether greedy decoding would produce it, for each token pair.

    Args:
        model: The language model (any device; eval mode is the caller's business). An FSDP2-sharded model is
            gathered for the call, which every rank must then make with the same pairs.
        pairs: (context ids, continuation ids), each non-empty; contexts longer than the model's max_seq_len
            are cut from the left, as lm-eval does.
        batch_size: Most continuations scored in one forward pass.
        autocast_dtype: Run under torch.autocast in this dtype (bf16 on GPU); None runs in the weights' dtype.
        on_batch: Called with the indices of the requests of each finished batch (progress reporting).

    Returns:
        (log-likelihood, is_greedy) per pair, in the order given.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    with _whole_and_eager(model):
        for batch in _plan_batches(pairs, model.config.max_seq_len, batch_size):
            done = _score_batch(model, batch, pairs, autocast_dtype)
            for i, lp, greedy in done:
                results[i] = (lp, greedy)
            if on_batch is not None:
                on_batch([i for i, _, _ in done])
    return results
