"""Sampling on the device, every request of a batch with its own settings, with no host sync.

A request's settings are `SamplingParams`; a batch's are the same fields as [B] tensors (`SamplingTensors`), so one
step samples every sequence at once and a CUDA graph can hold it. Randomness is counter-based: the noise of a draw
is a hash of (request seed, position of the token drawn, vocabulary id), so a seed gives the same tokens whatever
else is in the batch, and no generator state has to live anywhere. A draw is the Gumbel-max trick: the argmax of
the processed logits plus Gumbel noise is an exact sample of their softmax.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from llamita.config import ConfigError

_MASK32 = 0xFFFFFFFF
_UNIFORM_BITS = 23  # float32 holds (k + 0.5) / 2^23 exactly, so a uniform is never 0 or 1


@dataclass(frozen=True)
class SamplingParams:
    """How to continue one prompt; the names are vLLM's where they mean the same."""

    max_tokens: int = 256
    """New tokens at most; fewer where the sequence reaches the end of its cache slot (the model's context)."""
    temperature: float = 1.0
    """Divides the logits; 0 means greedy (always the most likely token)."""
    top_k: int | None = None
    """Sample among the k most likely tokens only (None: no limit)."""
    top_p: float = 1.0
    """Then keep the smallest set of most likely tokens whose probability reaches top_p (nucleus sampling)."""
    min_p: float = 0.0
    """Then drop the tokens less likely than min_p times the most likely one."""
    repetition_penalty: float = 1.0
    """Above 1, tokens of the prompt and the output so far are made less likely (CTRL's rule, as transformers)."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token the output holds already (OpenAI's rule; -2 .. 2)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time the output holds it (OpenAI's rule; -2 .. 2)."""
    seed: int | None = None
    """Makes the draws reproducible, whatever else is in the batch (used modulo 2^32); None: a fresh seed."""
    stop_token_ids: tuple[int, ...] = ()
    """Finish after generating any of these ids (it is part of the output)."""
    stop: tuple[str, ...] = ()
    """Finish once the text contains any of these strings; the text ends before it (needs the tokenizer)."""
    ignore_eos: bool = False
    """Keep generating after the tokenizer's end-of-sequence id."""
    logprobs: int | None = None
    """Also return each new token's log-probability and the logprobs most likely ones' (0: the chosen only)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", tuple(self.stop))
        problems = [
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (0 <= self.temperature < math.inf, f"temperature must be >= 0 (0: greedy), got {self.temperature}"),
            (self.top_k is None or self.top_k >= 1, f"top_k must be >= 1 (or unset for no limit), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1] (1: no nucleus), got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0 (1: none), got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.logprobs is None or self.logprobs >= 0, f"logprobs must be >= 0 (or unset), got {self.logprobs}"),
            (all(s for s in self.stop), "stop strings must not be empty"),
        ]
        for ok, message in problems:
            if not ok:
                raise ConfigError(f"SamplingParams: {message}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalizes(self) -> bool:
        """Whether any penalty is on: they need the tokens seen so far, which speculation does not track."""
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def filters(self) -> bool:
        """Whether top-k or top-p are on: they need the logits sorted, which the other settings do not."""
        return self.top_k is not None or self.top_p < 1


@dataclass
class SamplingTensors:
    """The settings of a batch of requests, one row each, on the device; rows of unused slots are never read."""

    temperature: Tensor
    """[B] float32."""
    top_k: Tensor
    """[B] int64; the vocabulary size for no limit."""
    top_p: Tensor
    """[B] float32."""
    min_p: Tensor
    """[B] float32."""
    repetition_penalty: Tensor
    """[B] float32."""
    presence_penalty: Tensor
    """[B] float32."""
    frequency_penalty: Tensor
    """[B] float32."""
    seed: Tensor
    """[B] int64, below 2^32."""

    @classmethod
    def empty(cls, batch: int, device: torch.device | str) -> SamplingTensors:
        """Rows for `batch` requests, greedy until `set_row` fills them."""
        f32, i64 = {"dtype": torch.float32, "device": device}, {"dtype": torch.int64, "device": device}
        return cls(
            torch.zeros(batch, **f32), torch.ones(batch, **i64), torch.ones(batch, **f32), torch.zeros(batch, **f32),
            torch.ones(batch, **f32), torch.zeros(batch, **f32), torch.zeros(batch, **f32), torch.zeros(batch, **i64),
        )  # fmt: skip

    @classmethod
    def of(
        cls, params: Sequence[SamplingParams], seeds: Sequence[int], vocab_size: int, device: torch.device | str
    ) -> SamplingTensors:
        """The rows of `params`, each with its resolved seed."""
        rows = cls.empty(len(params), device)
        for i, (p, seed) in enumerate(zip(params, seeds)):
            rows.set_row(i, p, seed, vocab_size)
        return rows

    def set_row(self, row: int, params: SamplingParams, seed: int, vocab_size: int) -> None:
        """Write one request's settings into row `row` (a few small host-to-device writes, no sync)."""
        self.temperature[row] = params.temperature
        self.top_k[row] = vocab_size if params.top_k is None else min(params.top_k, vocab_size)
        self.top_p[row] = params.top_p
        self.min_p[row] = params.min_p
        self.repetition_penalty[row] = params.repetition_penalty
        self.presence_penalty[row] = params.presence_penalty
        self.frequency_penalty[row] = params.frequency_penalty
        self.seed[row] = seed & _MASK32

    def rows(self, stop: int) -> SamplingTensors:
        """Rows 0 .. stop - 1, as views (the same memory, as a captured CUDA graph needs)."""
        return SamplingTensors(*(getattr(self, f.name)[:stop] for f in fields(self)))

    def take(self, index: Tensor) -> SamplingTensors:
        """Rows `index` (a copy), e.g. each row repeated for several draft positions."""
        return SamplingTensors(*(getattr(self, f.name)[index] for f in fields(self)))


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (multiply-xorshift rounds) of an int64 tensor holding values in [0, 2^32)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32  # the product stays below 2^59: no int64 overflow
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def uniform(seed: Tensor, position: Tensor, n: int, stream: int = 0) -> Tensor:
    """Counter-based uniforms in (0, 1): the same (seed, position, stream) always gives the same row.

    Args:
        seed: [B] int64 seeds below 2^32.
        position: [B] int64 position of the token each row draws.
        n: Uniforms per row (the vocabulary size for a draw).
        stream: Separates independent uses at one position (a draw, an acceptance test, a residual draw).

    Returns:
        [B, n] float32.
    """
    key = _mix32(_mix32(_mix32(seed) ^ (position & _MASK32)) ^ stream)  # [B]
    index = torch.arange(n, device=seed.device)  # [n]
    bits = _mix32(_mix32(key[:, None] ^ index))  # [B, n]
    return ((bits >> (32 - _UNIFORM_BITS)).float() + 0.5) * 2.0**-_UNIFORM_BITS  # [B, n]


def gumbel(seed: Tensor, position: Tensor, n: int, stream: int = 0) -> Tensor:
    """[B, n] standard Gumbel noise from `uniform`: argmax(logits + noise) samples softmax(logits)."""
    return -torch.log(-torch.log(uniform(seed, position, n, stream)))


def penalize(logits: Tensor, t: SamplingTensors, seen: Tensor, counts: Tensor | None = None) -> Tensor:
    """The penalties, in vLLM's order: CTRL's repetition penalty as transformers applies it (seen tokens' logits
    divided if > 0, else multiplied), then OpenAI's frequency and presence penalties over the output's tokens.

    Args:
        logits: [B, V] float32.
        t: The rows' settings (penalties 1 and 0: none, exactly).
        seen: [B, V] bool, True for the tokens of the prompt and the output so far.
        counts: [B, V] float32, how often each token is in the output so far (None: no frequency or presence
            penalty in this batch).

    Returns:
        [B, V].
    """
    factor = t.repetition_penalty[:, None]  # [B, 1]
    penalized = torch.where(logits > 0, logits / factor, logits * factor)  # [B, V]
    logits = torch.where(seen, penalized, logits)  # [B, V]
    if counts is not None:
        logits = logits - counts * t.frequency_penalty[:, None] - (counts > 0) * t.presence_penalty[:, None]
    return logits  # [B, V]


def processed_logits(
    logits: Tensor, t: SamplingTensors, seen: Tensor | None, filters: bool, counts: Tensor | None = None
) -> Tensor:
    """The logits whose softmax is each row's sampling distribution: -inf for every token it may not draw.

    Order as transformers': penalties, temperature, top-k, top-p, min-p. A greedy row keeps only its
    argmax (logit 0), so that greedy and sampled rows share one formula for drawing and for speculative decoding.

    Args:
        logits: [B, V] float32 model logits.
        t: The rows' settings.
        seen: [B, V] bool tokens seen so far, for the penalties (None: no penalty in this batch).
        filters: Apply top-k and top-p (they sort the logits); False when no row uses them.
        counts: [B, V] float32 output token counts, for the frequency and presence penalties (`penalize`).

    Returns:
        [B, V] float32.
    """
    if seen is not None:
        logits = penalize(logits, t, seen, counts)  # [B, V]
    greedy = t.temperature == 0  # [B]
    scaled = logits / torch.where(greedy, 1.0, t.temperature)[:, None]  # [B, V]
    if filters:
        ordered, order = torch.sort(scaled, dim=-1, descending=True)  # [B, V] each
        rank = torch.arange(scaled.shape[-1], device=scaled.device)  # [V]
        ordered = ordered.masked_fill(rank >= t.top_k[:, None], -math.inf)  # [B, V]: top-k
        probs = ordered.softmax(dim=-1)  # [B, V]
        # Drop a token once the tokens ranked above it already reach top_p; the best token always stays.
        drop = probs.cumsum(dim=-1) - probs >= t.top_p[:, None]  # [B, V]
        ordered = ordered.masked_fill(drop, -math.inf)  # [B, V]
        scaled = torch.empty_like(scaled).scatter_(-1, order, ordered)  # [B, V] back in vocabulary order
    best = scaled.max(dim=-1, keepdim=True).values  # [B, 1]
    scaled = scaled.masked_fill(scaled < best + torch.log(t.min_p)[:, None], -math.inf)  # [B, V]: min-p
    argmax = torch.full_like(scaled, -math.inf).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 0.0)  # [B, V]
    return torch.where(greedy[:, None], argmax, scaled)  # [B, V]


def draw(processed: Tensor, t: SamplingTensors, position: Tensor, stream: int = 0) -> Tensor:
    """One token per row of `processed_logits`, as `sample`, at positions `position` ([B]); returns [B] int64."""
    return (processed + gumbel(t.seed, position, processed.shape[-1], stream)).argmax(dim=-1)  # [B]


def sample(
    logits: Tensor,
    t: SamplingTensors,
    seen: Tensor | None,
    position: Tensor,
    filters: bool,
    counts: Tensor | None = None,
) -> Tensor:
    """One token per row, each row by its own settings and seed.

    Args:
        logits: [B, V] float32 model logits.
        t: The rows' settings.
        seen: [B, V] bool tokens seen so far (None: no penalty in this batch).
        position: [B] int64 position of the token each row draws (the counter of the noise).
        filters: Whether any row uses top-k or top-p.
        counts: [B, V] float32 output token counts (None: no frequency or presence penalty in this batch).

    Returns:
        [B] int64 token ids.
    """
    return draw(processed_logits(logits, t, seen, filters, counts), t, position)


def logprobs(logits: Tensor, chosen: Tensor, top: int) -> tuple[Tensor, Tensor, Tensor]:
    """The model's log-probabilities (before any sampling setting) of the chosen tokens and of the top ones.

    Args:
        logits: [B, V] float32 model logits.
        chosen: [B] the tokens drawn.
        top: How many of the most likely tokens to return (0: none).

    Returns:
        ([B] chosen log-probabilities, [B, top] most likely ids, [B, top] their log-probabilities).
    """
    logp = logits.log_softmax(dim=-1)  # [B, V]
    best = logp.topk(top, dim=-1)  # [B, top] each
    return logp.gather(-1, chosen[:, None])[:, 0], best.indices, best.values
