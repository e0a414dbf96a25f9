"""Speculative decoding: draft gamma tokens cheaply, verify them in one forward of the target, keep a prefix.

Two drafters: a smaller draft model with the target's vocabulary (its own cache slots, beside the target's), or
prompt lookup (the tokens that followed the latest earlier occurrence of the sequence's last n-gram; no model).
The acceptance rule is Leviathan et al. 2023 / Chen et al. 2023: draft token d, drawn from the draft's
distribution q, is kept with probability min(1, p(d) / q(d)) under the target's p; at the first rejection the
token is drawn from max(0, p - q) renormalised, and when all gamma are kept one more is drawn from p. The output
is then distributed exactly as the target's own sampling; greedy rows (p and q one-hot) reproduce greedy decoding.
A prompt-lookup draft is a q that is one-hot.

Drafts and their distributions stay on the device; the step's one host copy carries the kept tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from llamita.inference import sampling
from llamita.inference.cache import SlotCache
from llamita.inference.graphs import CapturedSteps, capture_sizes
from llamita.inference.scheduler import Sequence
from llamita.model.llama import Llama

if TYPE_CHECKING:
    from llamita.inference.engine import Engine

_ACCEPT, _RESIDUAL, _DRAFT = 1, 2, 3  # noise streams (`sampling.uniform`), apart from a plain draw's 0


def ngram_draft(tokens: list[int], gamma: int, max_n: int) -> list[int]:
    """Prompt lookup: the `gamma` tokens after the latest earlier occurrence of the longest matching suffix n-gram.

    Args:
        tokens: The sequence so far, prompt and output.
        gamma: Tokens to propose.
        max_n: Longest suffix to match; shorter ones are tried down to one token.

    Returns:
        `gamma` token ids; where no n-gram recurs (or the continuation is short) the last token fills the rest.
    """
    for n in range(min(max_n, len(tokens) - 1), 0, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                follow = tokens[start + n : start + n + gamma]
                return follow + [follow[-1]] * (gamma - len(follow))
    return [tokens[-1]] * gamma


def accept(
    p: Tensor, q: Tensor, drafts: Tensor, t: sampling.SamplingTensors, position: Tensor
) -> tuple[Tensor, Tensor]:
    """The acceptance rule over a batch: which drafts to keep and the token after them.

    Args:
        p: [B, G + 1, V] the target's sampling distribution at each draft position and one past the last.
        q: [B, G, V] the draft's distribution each draft was drawn from (one-hot for a deterministic drafter).
        drafts: [B, G] the draft tokens.
        t: The rows' settings (their seeds).
        position: [B] position of the first draft token.

    Returns:
        ([B, G + 1] tokens: the kept drafts, then the drawn token, then filler; [B] how many drafts were kept).
    """
    B, G = drafts.shape
    p_draft = p[:, :G].gather(-1, drafts[..., None])[..., 0]  # [B, G]
    q_draft = q.gather(-1, drafts[..., None])[..., 0]  # [B, G]
    u = sampling.uniform(t.seed, position, G, _ACCEPT)  # [B, G]
    kept = (u * q_draft <= p_draft).long().cumprod(dim=-1)  # [B, G]: u <= p / q, until the first rejection
    n = kept.sum(dim=-1)  # [B]
    rows = torch.arange(B, device=p.device)
    q_past = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)  # [B, G + 1, V]: nothing drafted past the end
    residual = (p[rows, n] - q_past[rows, n]).clamp_(min=0)  # [B, V]
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[rows, n])  # [B, V]: p = q exactly
    noise = sampling.gumbel(t.seed, position + n, residual.shape[-1], _RESIDUAL)  # [B, V]
    last = (residual.log() + noise).argmax(dim=-1)  # [B]
    tokens = torch.cat([drafts, drafts[:, :1]], dim=1)  # [B, G + 1]
    tokens[rows, n] = last
    return tokens, n


class Speculator:
    """Runs the engine's speculative steps: drafting, one verifying forward of the target, acceptance.

    The step's device part (`_device_step`: the draft model's forwards and draws, or the prompt-lookup drafts'
    one-hot distributions; the verifying forward; acceptance; the slot state's update) has fixed shapes for a batch
    size, read length and sampling variant, so on CUDA it is captured in CUDA graphs like the plain decode step
    (`capture`) and replayed: eager, its ~gamma + 2 forwards would cost their operator launches, several times what
    speculation saves. Its forwards run the engine's compiled blocks (`Engine._hidden`, the draft's
    `Engine._draft_hidden`, compiled apart): with eager blocks inside the graphs, a step with n-gram drafts cost 4.5
    ms on an H200 against 1.3 ms for a plain step (`bench/results/2026-12-02-engine-r6.md`). The host fills its
    inputs first: the prompt-lookup drafts; for the draft model, after feeding it eagerly whatever it has fallen
    behind on (the steps in which speculation stood aside), the token before each row's current one (the draft
    re-feeds it: after a step that kept every draft it has not seen it, otherwise it rewrites the same keys). The
    device step keeps that token too, so that a draft step can be launched before the host has read the one before
    (`EngineConfig.overlap`): it then needs nothing from the host.
    """

    def __init__(self, engine: Engine, draft: Llama | None) -> None:
        self.engine = engine
        self.gamma = engine.config.gamma
        self.draft = None if draft is None else draft.eval()
        self.cache = (
            None
            if draft is None
            else SlotCache(
                draft.config,
                engine.n_slots,
                engine.seq_len,
                device=engine.device,
                dtype=engine.dtype,
                decode=engine.config.decode_attention,
            )  # fmt: skip
        )
        self.draft_cached: dict[int, int] = {}  # sequence id -> positions of it the draft's cache holds
        # The device step's host-filled inputs: lookup drafts, and the token before each row's current one.
        self.lookup = torch.zeros(engine.n_slots, self.gamma, dtype=torch.long, device=engine.device)
        self.previous = torch.zeros(engine.n_slots, dtype=torch.long, device=engine.device)
        self.graphs: CapturedSteps | None = None

    def capture(self) -> None:
        """Capture the device step in CUDA graphs for every batch size speculation takes, read length and sampling
        variant; the engine calls it once it has its own graphs, while no sequence holds a slot."""
        e = self.engine
        sizes = capture_sizes(min(e.config.speculate_max_batch, e.n_slots))
        variants = tuple((attend, filters) for attend in e.buckets for filters in (False, True))
        with torch.no_grad():
            self.graphs = CapturedSteps(lambda b, v: self._device_step(b, *v), sizes, variants)

    def applies(self, decoders: list[Sequence]) -> bool:
        """Speculate at small batches only (the rows a step runs, slots 0 .. the last decoder's, at most
        `speculate_max_batch`: the sizes captured), and for requests that need no per-token state it does not
        keep."""
        return (
            bool(decoders)
            and decoders[-1].slot < self.engine.config.speculate_max_batch
            and all(not s.params.penalizes and s.params.logprobs is None for s in decoders)
        )

    def release(self, seq: Sequence) -> None:
        self.draft_cached.pop(seq.id, None)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        if self.cache is not None:
            self.cache.copy_prefix(src, dst, n)

    def prompts_done(self, slots: Tensor, last: list[int]) -> None:
        """Sequences whose prompts are prefilled: the token before their first one is the prompt's last."""
        if self.draft is not None:
            self.previous[slots] = self.engine.upload(last)

    def prefill(self, slots: Tensor, attend: int, tokens: Tensor, positions: Tensor) -> None:
        """The draft model prefills the same prompt chunks as the target, into its own slots."""
        if self.draft is not None:
            self.engine._draft_hidden(self.draft, self.cache.gather(slots, attend), tokens, positions)

    # ------------------------------------------------------------------------------------------ the step
    def step(self, decoders: list[Sequence]) -> list[Tensor]:
        """Draft, verify and accept for rows 0 .. b - 1; updates the slot state on the device.

        Returns:
            What the host copies: [b * (gamma + 1)] tokens and [b] counts of kept drafts.
        """
        e, G = self.engine, self.gamma
        b = decoders[-1].slot + 1
        filters = any(s.params.filters for s in decoders)
        # Reads reach the last verified position, length - 1 + G, and past the tokens of a step pending.
        attend = e.attend(min(max(s.length for s in decoders) + G + e.pending_tokens(), e.seq_len))
        if self.draft is None:
            drafts = torch.zeros(b, G, dtype=torch.long)
            for seq in decoders:
                drafts[seq.slot] = torch.tensor(ngram_draft(seq.prompt + seq.output, G, e.config.ngram))
            self.lookup[:b].copy_(e.upload(drafts), non_blocking=True)
        elif not e.pending_tokens():  # with a draft step pending the device holds all the draft needs
            self._catch_up(decoders, b)
        if self.graphs is not None:
            tokens, n = self.graphs(b, (attend, filters))
        else:
            tokens, n = self._device_step(b, attend, filters)
        return [tokens.flatten(), n]

    def host_len(self, b: int) -> int:
        """Tokens the host copies of a step of rows 0 .. b - 1."""
        return b * (self.gamma + 2)

    def accept(self, decoders: list[Sequence], slots: list[int], host: list[int]) -> list[tuple[Sequence, list[int]]]:
        """Each row's kept tokens from the host copy (`slots`: the decoders' at launch); the drafter's bookkeeping
        and the statistics."""
        G, b = self.gamma, slots[-1] + 1
        counts = host[b * (G + 1) : b * (G + 2)]
        out = []
        stats = self.engine.stats
        for seq, slot in zip(decoders, slots):
            if seq.finished:  # in the step before (`overlap`: it was decoded once more), or aborted
                continue
            n = counts[slot]
            start = slot * (G + 1)
            out.append((seq, host[start : start + n + 1]))
            # The draft fed positions up to length - 1 + G - 1; those up to its last kept draft hold the right keys.
            self.draft_cached[seq.id] = seq.length + min(n, G - 1)
            stats.drafted_tokens += G
            stats.accepted_tokens += n
            stats.speculative_tokens += n + 1
        stats.target_steps += 1
        return out

    def _catch_up(self, decoders: list[Sequence], b: int) -> None:
        """Feed the draft, eagerly, the tokens it has not seen but the last two (which the device step feeds), and
        set `previous`: each row's second-to-last token."""
        e = self.engine
        previous = torch.zeros(b, dtype=torch.long)
        behind: dict[int, tuple[int, list[int]]] = {}
        for seq in decoders:
            tokens = seq.prompt + seq.output
            previous[seq.slot] = tokens[-2]
            start = self.draft_cached.get(seq.id, len(seq.prompt))
            if start < len(tokens) - 2:
                behind[seq.slot] = (start, tokens[start:-2])
        self.previous[:b].copy_(e.upload(previous), non_blocking=True)
        if not behind:
            return
        # Right-padded; padding and the rows not behind write their scratch position.
        width = max(len(feed) for _, feed in behind.values())
        tokens = torch.zeros(b, width, dtype=torch.long)
        positions = torch.full((b, width), e.seq_len - 1, dtype=torch.long)
        for slot, (start, feed) in behind.items():
            tokens[slot, : len(feed)] = torch.tensor(feed)
            positions[slot, : len(feed)] = start + torch.arange(len(feed))
        reach = max(start + len(feed) for start, feed in behind.values())
        cache = self.cache.rows(0, b, e.attend(reach))
        e._draft_hidden(self.draft, cache, e.upload(tokens), e.upload(positions))

    def _device_step(self, b: int, attend: int, filters: bool) -> tuple[Tensor, Tensor]:
        """Draft (from the host-filled inputs), verify and accept for rows 0 .. b - 1, all on the device, in place
        on the slot state; the whole step has fixed shapes for (b, attend, filters).

        Returns:
            ([b, G + 1] tokens: the kept drafts, then the drawn token, then filler; [b] how many were kept).
        """
        e, G = self.engine, self.gamma
        t = e.sampling.rows(b)
        positions = e.positions[:b]  # [b]: where each row's current token goes
        if self.draft is None:
            drafts = self.lookup[:b]
            q = torch.zeros(b, G, e.vocab_size, device=e.device).scatter_(2, drafts[..., None], 1.0)  # one-hot
        else:
            drafts, q = self._draft(b, t, filters, attend)
        verify = torch.cat([e.tokens[:b, None], drafts], dim=1)  # [b, G + 1]
        at = (positions[:, None] + torch.arange(G + 1, device=e.device)).clamp_(max=e.seq_len - 1)  # [b, G + 1]
        cache = e.cache.rows(0, b, attend)
        logits = e.model.lm_head(e._hidden(e.model, cache, verify, at)).float()  # [b, G + 1, V]
        rows = torch.arange(b, device=e.device).repeat_interleave(G + 1)
        p = sampling.processed_logits(logits.flatten(0, 1), t.take(rows), None, filters).softmax(-1)  # [b(G+1), V]
        tokens, n = accept(p.view(b, G + 1, -1), q, drafts, t, positions + 1)
        each = torch.arange(b, device=e.device)
        if self.draft is not None:  # the token before each row's next one: its last kept draft, or its current
            self.previous[:b] = torch.where(n > 0, tokens[each, (n - 1).clamp(min=0)], e.tokens[:b])
        e.tokens[:b] = tokens[each, n]
        e.positions[:b] = (positions + n + 1).clamp_(max=e.seq_len - 1)
        return tokens, n

    def _draft(self, b: int, t: sampling.SamplingTensors, filters: bool, attend: int) -> tuple[Tensor, Tensor]:
        """G tokens of the draft model per row, drawn with each row's settings, and their distributions.

        The draft first reads each row's previous and current token (positions length - 2 and length - 1; an idle
        row feeds its scratch position twice), then each draft in turn.
        """
        e, G = self.engine, self.gamma
        scratch = e.seq_len - 1
        at = e.positions[:b]  # [b]: the current token's position
        tokens = torch.stack([self.previous[:b], e.tokens[:b]], dim=1)  # [b, 2]
        positions = torch.stack([torch.where(at == scratch, at, at - 1), at], dim=1)  # [b, 2]
        cache = self.cache.rows(0, b, attend)
        logits = self.draft.lm_head(e._draft_hidden(self.draft, cache, tokens, positions)[:, 1]).float()
        drafts, q = [], []
        for i in range(G):
            processed = sampling.processed_logits(logits, t, None, filters)  # [b, V]
            token = sampling.draw(processed, t, at + 1, _DRAFT)  # [b]
            drafts.append(token)
            q.append(processed.softmax(-1))
            if i + 1 < G:
                at = (at + 1).clamp(max=scratch)
                hidden = e._draft_hidden(self.draft, cache, token[:, None], at[:, None])[:, 0]  # [b, D]
                logits = self.draft.lm_head(hidden).float()
        return torch.stack(drafts, dim=1), torch.stack(q, dim=1)  # [b, G], [b, G, V]
