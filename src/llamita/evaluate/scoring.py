"""Log-likelihoods of continuations given contexts, as lm-evaluation-harness's HF backend computes them, but faster.

Tokenization follows lm-eval's ``_encode_pair``: trailing whitespace of the context moves to the continuation,
``whole = encode(context + continuation)``, ``context = encode(context)``, ``continuation = whole[len(context):]``,
each encode starting with BOS as a Llama tokenizer does in transformers (none when the text already starts with
the BOS string). The model then reads ``(context + continuation)[-(max_len + 1):][:-1]`` and the continuation's
log-probabilities are summed.

Speed: requests are grouped by their (possibly left-truncated) context, so the choices of one question share a
single pass over it: the contexts of a batch run once into a KV cache, which is copied to one row per
continuation, and all continuations then run together from it. The positions and attention are exactly those of
the full sequences, so the numbers equal lm-eval's (to float rounding). Batches hold contexts of one length,
longest first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed.fsdp
from torch import Tensor

from llamita.model.llama import KVCache, Llama
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


def _plan_batches(
    pairs: Sequence[TokenPair], max_len: int, batch_size: int
) -> list[list[tuple[tuple[int, ...], list[int]]]]:
    """Batches of (context, request indices): one context length each, at most batch_size requests, longest first."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, pair in enumerate(pairs):
        groups.setdefault(_effective_context(pair, max_len), []).append(i)

    def longest_first(item: tuple[tuple[int, ...], list[int]]) -> tuple[int, int]:
        context, members = item
        return -len(context), -max(len(pairs[i][1]) for i in members)

    batches: list[list[tuple[tuple[int, ...], list[int]]]] = []
    batch: list[tuple[tuple[int, ...], list[int]]] = []
    rows = 0
    for context, members in sorted(groups.items(), key=longest_first):
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            if batch and (len(batch[0][0]) != len(context) or rows + len(chunk) > batch_size):
                batches.append(batch)
                batch, rows = [], 0
            batch.append((context, chunk))
            rows += len(chunk)
    if batch:
        batches.append(batch)
    return batches


def _run(model: Llama, tokens: Tensor, cache: KVCache, start_pos: int, autocast_dtype: torch.dtype | None) -> Tensor:
    device_type = tokens.device.type
    with torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext():
        return model.hidden_states(tokens, cache, start_pos)  # [B, T, D]


def _log_probs(model: Llama, hidden: Tensor, autocast_dtype: torch.dtype | None) -> Tensor:
    with torch.autocast(hidden.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext():
        logits = model.lm_head(hidden)  # [N, V]
    return logits.float().log_softmax(dim=-1)  # [N, V]


def _score_batch(
    model: Llama,
    batch: list[tuple[tuple[int, ...], list[int]]],
    pairs: Sequence[TokenPair],
    autocast_dtype: torch.dtype | None,
) -> list[tuple[int, float, bool]]:
    """(request index, log-likelihood, is greedy) for every request of one batch."""
    weight = model.lm_head.weight
    device = weight.device
    cache_dtype = autocast_dtype or weight.dtype
    n_ctx, ctx_len = len(batch), len(batch[0][0])
    rows = [(g, i) for g, (_, members) in enumerate(batch) for i in members]
    conts = [list(pairs[i][1]) for _, i in rows]
    max_cont = max(len(c) for c in conts)

    # 1. Each distinct context once: [G, P] into a G-row cache; its last position predicts continuation token 0.
    contexts = torch.tensor([list(c) for c, _ in batch], dtype=torch.long, device=device)  # [G, P]
    context_cache = KVCache(model.config, n_ctx, ctx_len, device=device, dtype=cache_dtype)
    last = _run(model, contexts, context_cache, 0, autocast_dtype)[:, -1]  # [G, D]
    first_lp = _log_probs(model, last, autocast_dtype)  # [G, V]
    group = torch.tensor([g for g, _ in rows], device=device)  # [R]
    first_tok = torch.tensor([c[0] for c in conts], device=device)  # [R]
    rows_lp = first_lp.index_select(0, group)  # [R, V]
    total = rows_lp.gather(1, first_tok[:, None]).squeeze(1).double()  # [R]
    greedy = rows_lp.argmax(dim=-1) == first_tok  # [R]

    # 2. The rest of every continuation together, from a per-row copy of its context's cache.
    if max_cont > 1:
        n_rows, width = len(rows), max_cont - 1
        cache = KVCache(model.config, n_rows, ctx_len + width, device=device, dtype=cache_dtype)
        for k_all, v_all, k_ctx, v_ctx in zip(cache.k, cache.v, context_cache.k, context_cache.v):
            k_all[:, :, :ctx_len] = k_ctx.index_select(0, group)  # [R, KV, P, hd]
            v_all[:, :, :ctx_len] = v_ctx.index_select(0, group)  # [R, KV, P, hd]
        inputs = torch.zeros(n_rows, width, dtype=torch.long)  # [R, C-1]; right padding, never attended to
        targets = torch.full((n_rows, width), -1, dtype=torch.long)  # [R, C-1]
        for r, cont in enumerate(conts):
            inputs[r, : len(cont) - 1] = torch.tensor(cont[:-1])
            targets[r, : len(cont) - 1] = torch.tensor(cont[1:])
        inputs, targets = inputs.to(device), targets.to(device)
        valid = targets >= 0  # [R, C-1]
        hidden = _run(model, inputs, cache, ctx_len, autocast_dtype)[valid]  # [N, D]: real positions only
        lp = _log_probs(model, hidden, autocast_dtype)  # [N, V]
        tok = targets[valid]  # [N]
        row_of = valid.nonzero()[:, 0]  # [N]
        total.index_add_(0, row_of, lp.gather(1, tok[:, None]).squeeze(1).double())
        hits = (lp.argmax(dim=-1) == tok).long()  # [N]
        misses = torch.zeros(n_rows, dtype=torch.long, device=device).index_add_(0, row_of, 1 - hits)  # [R]
        greedy &= misses == 0
    return [(i, lp_i, g_i) for (_, i), lp_i, g_i in zip(rows, total.tolist(), greedy.tolist())]


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
