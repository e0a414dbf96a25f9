"""The engine: batched prefill and decode steps over cache slots, with continuous batching and CUDA graphs.

Every generation in llamita runs through `Engine.step`: the `LLM` API, `llamita generate` and `chat`, the lm-eval
adapter's generate_until and speculative decoding. A step decodes one token for every sequence past its prompt
(rows 0 .. b - 1 of the slots: a slice of the cache, padded rows idle), prefills the next prompt chunks, and copies
the new token ids to the host once; that copy is the step's only sync. On CUDA the decode step is compiled and
replayed from CUDA graphs; on a CPU the same function runs eagerly. What is compiled is one transformer block
(`block_step`), which every layer of the model's own forward calls: one compilation serves all the layers, where a
compilation of the whole forward would trace each of them again.

Per-slot state lives on the device between steps: the token each slot feeds next, its position, its sampling
settings, the tokens it has seen (for the repetition penalty) and how often its output holds each token (for the
frequency and presence penalties), so a decode step needs nothing from the host.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx.experimental._config
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from llamita.config import ConfigError
from llamita.inference import sampling
from llamita.inference.cache import SlotCache, attend_buckets, count_slots, slot_bytes
from llamita.inference.graphs import CapturedSteps, LazyGraphs, capture_sizes
from llamita.inference.sampling import SamplingParams, SamplingTensors
from llamita.inference.scheduler import Chunk, Scheduler, Sequence
from llamita.inference.speculative import Speculator
from llamita.model.decode_attention import kernel_takes
from llamita.model.llama import Block, KVCache, LayerKV, Llama

DECODE_ATTENTION = ("sdpa", "flex", "triton")
"""The values of `EngineConfig.decode_attention`."""


@dataclass(frozen=True)
class EngineConfig:
    """How the engine holds and schedules sequences."""

    max_batch: int | None = None
    """Sequences decoded together at most: the cache's slots (fewer where memory or max_cache_tokens say so);
    None: 256 on a GPU, 16 on a CPU (where larger batches gain little)."""
    max_seq_len: int | None = None
    """Positions per sequence, prompt and output together; None: the model's context."""
    max_cache_tokens: int | None = None
    """Positions over all slots at most; None: as many as `memory_fraction` of the free GPU memory holds."""
    memory_fraction: float = 0.9
    """Share of the free memory (GPU, or the host's for a CPU; after the weights) the KV cache may take."""
    prefill_tokens: int | None = None
    """Prompt tokens prefilled per step, over all sequences; longer prompts are prefilled in chunks. None: 8192 on
    a GPU (vLLM's chunk budget: a prefill forward costs about its kernel launches below that, so fewer larger
    chunks start a batch of prompts sooner), 512 on a CPU."""
    prefill_interval: int = 1
    """While sequences decode, new prompt chunks are prefilled every this many steps at most (a prompt waits at
    most interval - 1 steps, and prompts that arrive meanwhile join its prefill), or at once when the prompt tokens
    waiting fill `prefill_tokens`; with nothing decoding, at once. A prefill forward (compiled, not graphed) costs
    on a GPU about its kernel launches whatever its size: waiting a few steps spreads that cost over more prompts
    (TGI's `max_waiting_tokens` does the same), for a longer time to first token. 1: every step."""
    prefix_cache: bool = False
    """Reuse the keys and values of a prompt prefix (whole blocks) that another sequence's slot still holds."""
    prefix_block: int = 16
    """Block size of the prefix cache, in tokens."""
    cuda_graphs: bool = True
    """On CUDA, replay the decode step from CUDA graphs (one per batch size the scheduler can reach and read
    length, `cache.attend_buckets`)."""
    prefill_graphs: bool | None = None
    """Replay small prefill forwards from CUDA graphs too (on CUDA, with `cuda_graphs`). A group of prompt chunks
    is padded to a bucket: rows a decode batch size, width a power of two (at least 16), read length one of
    `attend_buckets`; a bucket's graph is captured the first time a prefill meets it (about 0.1 s, once). A
    compiled prefill forward outside a graph costs about 15 ms of launches whatever its size; replayed, one of 1-3
    prompts of 100-400 tokens takes 4-8 ms (`bench/results/2026-12-01-engine-r3.md`). None: on wherever CUDA
    graphs are; on a CPU (True) the padded forwards run eagerly, with the same results."""
    prefill_graph_tokens: int = 2048
    """The largest padded prefill (rows x width) replayed from a graph. Larger groups are bound by their arithmetic,
    not their launches, and padding them costs more than the launches it saves (8 prompts of ~530 tokens: 61 ms
    padded to 8 x 1024 and replayed, 29 ms unpadded and compiled): they run compiled at their own size."""
    packed_prefill: bool | None = None
    """A step's prompt chunks go through one forward of one token a row, every token a row in its sequence's slot
    (vLLM's flattened varlen batch): no padding between prompts of different lengths, and one forward for all of
    them, not one per group of similar lengths. Each token attends to its slot's positions up to its own through
    llamita's decode kernel (`decode_attention="triton"`, which reads the slots through an index), and the rows are
    padded to a bucket (`packed_rows`) for a CUDA graph. None: on on CUDA wherever decode attention is "triton"
    (the default there); it needs it (a ConfigError otherwise). On a CPU, where the kernel's op runs its reference
    (a gathered copy of every token's slot), only when set. Measured on an H200 at the TinyLlama-1.1B shape with
    ShareGPT-like requests (`bench/serve_load.py`, `bench/results/2026-12-04-engine-r8.md`), the engine offline at
    256 in flight made 31,240 tokens/s against 24,669 with padded groups, p99 time to first token 405 ms against
    773."""
    single_row: bool | None = None
    """On CUDA with `compile`, also capture a decode step of one row, compiled apart with Inductor's
    coordinate-descent tuning. A batch of one otherwise replays the graph of two, whose matmuls are cuBLAS GEMMs
    of two rows. Compiled for exactly one row, each Linear becomes a matrix-vector product that Inductor writes as
    a Triton reduction over the weights and tunes (`torch/_inductor/decomposition.py`, `mm`; gpt-fast's setting).
    It costs one more compilation, with autotuning, at start-up. None: on wherever the decode step is compiled and
    captured; measured on an H200, TinyLlama-1.1B shape, a step of one row took 1.62 ms against 2.31 ms for the
    graph of two (`bench/results/2026-12-02-engine-r5.md`)."""
    decode_attention: str | None = None
    """How a decode step attends. "triton": each row reads only its own positions, through llamita's split-KV
    decode kernel (`llamita.model.decode_attention`; on a CPU its reference, SDPA with the mask, runs). "sdpa": every
    row reads the first `attend` positions of its slot (the bucket of the batch's longest sequence) through SDPA
    with a mask. "flex": each row reads its own positions through FlexAttention's block sparsity
    (`llama.decode_block_mask`); experimental on CUDA, with a warning: at the TinyLlama-1.1B shape its compiled
    kernel crashed with an illegal memory access on an H200 (torch 2.11, `bench/results/2026-12-02-engine-r6.md`).
    None: "triton" on CUDA for heads of a power of 2 of at least 16 dimensions, else "sdpa". Measured on an H200 at
    the TinyLlama-1.1B shape (`bench/results/2026-12-03-engine-r7.md`), a layer's decode attention took 31 µs
    against cuDNN's 69 µs at 256 rows of 384 positions, 40 µs against 267 µs with serving's mixed lengths in
    2048-position slots; end to end, batch 256 decoded 83,950 tokens/s against 66,624 with SDPA."""
    overlap: bool | None = None
    """Launch each step before the host reads the last one's tokens: the host's work on step k (appending tokens,
    stops, releasing slots, streaming) then runs while the device computes k + 1, instead of the device waiting for
    it. The next token is fed on the device (a decode step's and a prefill's first token alike), so nothing needs
    the host's copy first. A sequence that finished in step k is decoded once more in k + 1 and that token is
    dropped, and its slot is free one step later. While a request asks for logprobs, steps run in order. With
    speculative decoding, a draft model's step is launched ahead of the draft step before it (it drafts from the
    tokens on the device: the token before each row's current one is kept there too); a step of prompt lookup,
    which drafts from the host's tokens, or the first speculative step after plain ones, lands the step pending
    first. The outputs are the same (tested). None: on on CUDA without speculation (whole steps 4-14% shorter on
    an H200 at batch 1 to 256, `bench/results/2026-12-02-engine-r5.md`) and with a draft model (1,119 tokens/s
    against 1,098 in order at batch 1 on an H100, `bench/results/2026-12-06-engine-r9.md`), off with prompt lookup
    (each of its steps lands the one pending first) and on a CPU, where a step's work is done by the time it is
    launched."""
    compile: bool = True
    """On CUDA, compile the model's transformer block (`block_step`, which the decode step and the prefill forward
    run for every layer) and the decode step's sampling, with dynamic shapes (but the sampling's vocabulary,
    `_static_vocabulary`), when the engine starts."""
    compile_backend: str | None = None
    """torch.compile backend of `compile`; None: Inductor, on CUDA only (a CPU runs the steps eagerly). A backend
    named here compiles on any device too: "eager" runs the compiled path on a CPU (dynamo's graphs, no code
    generation), which is how the tests check it."""
    speculate: str | None = None
    """Speculative decoding: "draft" (a draft model, given to the engine) or "ngram" (prompt lookup); None: off."""
    gamma: int = 6
    """Tokens drafted per speculative step. With a trained 2-layer draft of a TinyLlama-1.1B-shaped target at batch
    1 on an H100, 6 made 1.97x plain decoding's tokens/s against 1.78x with 4 (acceptance 77% and 82%,
    `bench/results/2026-12-06-engine-r9.md`). Prompt lookup is measured at 4 only (2.58x at 98% acceptance on an
    H200, `bench/results/2026-12-03-engine-r7.md`); at 6 its verifying forward reads two more positions a row."""
    ngram: int = 3
    """Longest n-gram prompt lookup matches (it tries n, n - 1, ..., 1)."""
    speculate_max_batch: int = 4
    """Speculate only while at most this many sequences decode; larger batches are faster without."""

    def __post_init__(self) -> None:
        checks = [
            (self.max_batch is None or self.max_batch >= 1, f"max_batch must be >= 1, got {self.max_batch}"),
            (self.max_seq_len is None or self.max_seq_len >= 2, f"max_seq_len must be >= 2, got {self.max_seq_len}"),
            (self.max_cache_tokens is None or self.max_cache_tokens >= 1, "max_cache_tokens must be >= 1"),
            (0 < self.memory_fraction <= 1, f"memory_fraction must be in (0, 1], got {self.memory_fraction}"),
            (
                self.prefill_tokens is None or self.prefill_tokens >= 1,
                f"prefill_tokens must be >= 1 (or unset), got {self.prefill_tokens}",
            ),
            (self.prefix_block >= 1, f"prefix_block must be >= 1, got {self.prefix_block}"),
            (self.prefill_graph_tokens >= 16, f"prefill_graph_tokens must be >= 16, got {self.prefill_graph_tokens}"),
            (self.prefill_interval >= 1, f"prefill_interval must be >= 1, got {self.prefill_interval}"),
            (self.speculate in (None, "draft", "ngram"), f"speculate is draft, ngram or unset, not {self.speculate!r}"),
            (
                self.decode_attention in (None, *DECODE_ATTENTION),
                f"decode_attention is sdpa, flex, triton or unset, not {self.decode_attention!r}",
            ),
            (self.gamma >= 1, f"gamma must be >= 1, got {self.gamma}"),
            (self.ngram >= 1, f"ngram must be >= 1, got {self.ngram}"),
            (self.speculate_max_batch >= 1, f"speculate_max_batch must be >= 1, got {self.speculate_max_batch}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"EngineConfig: {message}")


@dataclass
class EngineStats:
    """Counters since the engine started."""

    steps: int = 0
    decode_steps: int = 0
    prefill_steps: int = 0
    """Steps that ran a prefill forward."""
    prefill_tokens: int = 0
    reused_tokens: int = 0
    """Prompt tokens taken from the prefix cache instead of prefilled."""
    generated_tokens: int = 0
    ahead_steps: int = 0
    """Steps launched before the host read the step before's tokens (`EngineConfig.overlap`)."""
    target_steps: int = 0
    """Speculative steps: one forward of the target each."""
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    speculative_tokens: int = 0
    """Tokens the speculative steps produced (accepted drafts and one token of the target each)."""

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else None

    @property
    def tokens_per_target_step(self) -> float | None:
        return self.speculative_tokens / self.target_steps if self.target_steps else None


def _no_duck_sizing():
    """Dynamo's shape symbols without duck sizing (sizes equal at the first call are not taken for one symbol);
    torch.fx.experimental._config.use_duck_shape: private, but long-standing (diffusers sets it too)."""
    config = torch.fx.experimental._config
    if not hasattr(config, "use_duck_shape"):  # a later torch without it: at worst a recompilation more
        return contextlib.nullcontext()
    return config.patch(use_duck_shape=False)


def _compile_own(fn: Callable, backend: str) -> Callable:
    """`fn` compiled for one engine: a copy of it, with a code object of its own. Dynamo keeps a function's
    compilations on its code object, at most `recompile_limit` (8) for all its callers, and an engine compiles a
    block several times (prefill, decode, a read of all positions, flex attention, a dtype): two engines of other
    models or settings in one process would use them up, and the third fail to compile (fullgraph). Each engine's
    compilations go with it."""
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    own.__kwdefaults__, own.__doc__ = fn.__kwdefaults__, fn.__doc__
    return torch.compile(own, fullgraph=True, dynamic=True, backend=backend)


def _static_vocabulary(sample: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """The compiled `sampling.sample` with the vocabulary's size static. Compiled with every size dynamic
    (`dynamic=True`, so that one compilation serves every batch size), nothing in the sampling ties the vocabulary
    to a constant, as the weights do in a block, and Inductor writes its reductions over the vocabulary for a
    symbolic length. On an H200 that one kernel took 0.8-1.2 ms of every decode step, where the same sampling
    compiled with the vocabulary static took 0.12-0.17 ms in all (`bench/results/2026-12-02-engine-r5.md`)."""

    def call(logits: Tensor, t: SamplingTensors, seen: Tensor | None, position: Tensor, filters: bool,
             counts: Tensor | None = None) -> Tensor:  # fmt: skip
        for x in (logits, seen, counts):
            if x is not None:
                torch._dynamo.mark_static(x, 1)  # [B, V]: V
        return sample(logits, t, seen, position, filters, counts)

    return call


def block_step(
    block: Block, x: Tensor, cos: Tensor, sin: Tensor, kv: LayerKV, write_at: Tensor, mask: Tensor | BlockMask
) -> Tensor:
    """One transformer block through its layer's cache: what the engine compiles, once for every layer (the
    blocks are alike and each layer passes its own buffers, `LayerKV`), batch size and read length."""
    return block(x, cos, sin, kv, write_at, mask)  # [B, T, D]


def model_logits(
    model: Llama, cache: KVCache, tokens: Tensor, positions: Tensor, layer_fn: Callable[..., Tensor] | None = None
) -> Tensor:
    """Every position's fp32 next-token logits, each sequence at its own positions, through the cache.

    Args:
        model: The language model.
        cache: Its cache rows, one per sequence.
        tokens: [B, T] ids.
        positions: [B, T] their positions.
        layer_fn: What runs each block (`Llama.hidden_states`): the compiled `block_step`; None: the block.

    Returns:
        [B, T, V] float32.
    """
    return model.lm_head(cached_hidden(model, cache, tokens, positions, layer_fn)).float()  # [B, T, V]


def cached_hidden(
    model: Llama, cache: KVCache, tokens: Tensor, positions: Tensor, layer_fn: Callable[..., Tensor] | None = None
) -> Tensor:
    """[B, T, D] hidden states of tokens fed through the cache rows they go to (written there): the prefill
    forward, and the decode step's before its output head."""
    return model.hidden_states(tokens, cache, positions=positions, layer_fn=layer_fn)


@dataclass
class _Launch:
    """A step launched on the device whose tokens the host has not applied yet."""

    decoders: list[Sequence]
    slots: list[int]
    """The decoders' slots at launch (a sequence released since has none)."""
    batch: int
    """Rows of the decode step: its tokens come first in `tokens`."""
    speculating: bool
    completing: list[Sequence]
    """Sequences whose prompts the step's prefill completed: their first tokens come next."""
    tokens: Tensor | None
    """[batch + len(completing)] on the device (a speculative step: the speculator's pieces first)."""
    logprob_rows: list[tuple[Sequence, Tensor, Tensor]]


class Engine:
    """A model, its cache slots, the slot state on the device and the scheduler; `step` advances everything."""

    def __init__(
        self,
        model: Llama,
        config: EngineConfig | None = None,
        *,
        eos_id: int | None = None,
        draft: Llama | None = None,
    ) -> None:
        """Allocate the cache (and on CUDA capture the decode step) for `model`, which stays where it is.

        Args:
            model: The model, on its device and in its dtype.
            config: Cache size, scheduling, graphs and speculation.
            eos_id: End-of-sequence id, a stop id of every request that does not ignore it.
            draft: The draft model of `speculate="draft"`: same vocabulary, on the same device.

        Raises:
            ConfigError: Settings that do not fit the model (max_seq_len past its context, a draft of another
                vocabulary, speculate="draft" without a draft), or a cache with no room for one sequence.
        """
        self.config = config = config or EngineConfig()
        self.model = model.eval()
        weight = model.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        context = model.config.max_seq_len
        if config.max_seq_len is not None and config.max_seq_len > context:
            raise ConfigError(f"EngineConfig: max_seq_len {config.max_seq_len} exceeds the model's context {context}")
        self.seq_len = config.max_seq_len or context
        self.vocab_size = model.config.vocab_size
        self.eos_id = eos_id
        if (config.speculate == "draft") != (draft is not None):
            raise ConfigError("speculate='draft' needs a draft model, and a draft model needs speculate='draft'")
        if draft is not None and draft.config.vocab_size != self.vocab_size:
            raise ConfigError(
                f"the draft model's vocabulary has {draft.config.vocab_size} ids, the target's {self.vocab_size}: "
                "a draft must share the target's tokenizer"
            )
        if draft is not None and draft.config.max_seq_len < self.seq_len:
            raise ConfigError(
                f"the draft model's context ({draft.config.max_seq_len}) is shorter than the engine's max_seq_len "
                f"({self.seq_len}); set max_seq_len to at most {draft.config.max_seq_len}"
            )

        models = [model] + ([draft] if draft is not None else [])
        per_slot = sum(slot_bytes(m.config, self.seq_len, self.dtype) for m in models)
        max_batch = config.max_batch or (256 if weight.is_cuda else 16)
        # Left free for the steps: the decode step's [batch, vocab] sampling tensors (logits, sort values and
        # indices, noise) and the prefill's activations; an estimate with room to spare.
        d = model.config
        prefill_tokens = config.prefill_tokens or (8192 if weight.is_cuda else 512)
        reserve = 2**29 + max_batch * d.vocab_size * 48 + prefill_tokens * (d.intermediate_size + d.dim) * 16
        n_slots = count_slots(
            per_slot, self.seq_len, self.device, max_batch=max_batch, max_cache_tokens=config.max_cache_tokens,
            memory_fraction=config.memory_fraction, reserve=reserve,
        )  # fmt: skip
        self.n_slots = n_slots
        self.cache = SlotCache(model.config, n_slots, self.seq_len, device=self.device, dtype=self.dtype,
                               decode=config.decode_attention)  # fmt: skip
        self.scheduler = Scheduler(
            n_slots, self.seq_len, prefill_tokens, config.prefix_block if config.prefix_cache else None,
            prefill_interval=config.prefill_interval,
        )  # fmt: skip
        # The slot state. An idle slot sits at its scratch position, the last one (see cache.py).
        self.tokens = torch.zeros(n_slots, dtype=torch.long, device=self.device)
        self.positions = torch.full((n_slots,), self.seq_len - 1, dtype=torch.long, device=self.device)
        self.sampling = SamplingTensors.empty(n_slots, self.device)
        self.seen = torch.zeros(n_slots, self.vocab_size, dtype=torch.bool, device=self.device)
        self.counts = torch.zeros(n_slots, self.vocab_size, dtype=torch.float32, device=self.device)
        # Where every decode step leaves its logits: one buffer that all the captured graphs write, rather than
        # [batch, vocab] outputs of their own that each graph would keep alive (with read lengths: 8 variants of
        # every batch size, some 2 GB at a 32000-token vocabulary and 256 slots).
        self.step_logits = torch.empty(n_slots, self.vocab_size, dtype=torch.float32, device=self.device)
        self.stats = EngineStats()
        self._ids = itertools.count()
        self.speculator = Speculator(self, draft) if config.speculate else None
        # `overlap`: the step launched ahead, whose tokens the host has not read yet (with the host buffer they
        # land in and the event after that copy), two such buffers in turn, and the requests that ask for logprobs
        # (while any runs, steps run in order).
        self._ahead: tuple[_Launch, Tensor, torch.cuda.Event | None] | None = None
        pinned = self.device.type == "cuda"
        self.overlap = config.overlap if config.overlap is not None else pinned and config.speculate != "ngram"
        """Whether steps are launched ahead (`EngineConfig.overlap`, resolved)."""
        # A step's tokens: a plain step's (batch) or a speculative one's (rows x (gamma + 2)), and the first tokens.
        most = n_slots + max(n_slots, min(config.speculate_max_batch, n_slots) * (config.gamma + 2))
        self._landing = [torch.empty(most, dtype=torch.long, pin_memory=pinned) for _ in range(2 * self.overlap)]
        self._logprob_requests: set[int] = set()

        # Compiled on CUDA: the model's transformer block, and the sampling without top-k/top-p. The sampling with
        # them stays eager (inside the same CUDA graph): Inductor (torch 2.11) fails to generate the split scan of
        # top-p's cumsum over the vocabulary once the batch size is dynamic. Around the compiled blocks, the
        # forward's few other operators (embedding, RoPE rows, mask, final norm, lm_head) run eagerly: inside a
        # CUDA graph they cost nothing more, and a prefill forward pays their launches only.
        compiled = config.compile and (self.device.type == "cuda" or config.compile_backend is not None)
        backend = config.compile_backend or "inductor"
        flex = self.cache.kv.decode == "flex"
        if flex and compiled and backend == "inductor" and self.device.type == "cpu":
            raise ConfigError(
                "EngineConfig: decode_attention='flex' does not compile with Inductor on a CPU (its C++ "
                "FlexAttention template fails with dynamic shapes, torch 2.13): use compile_backend='eager', or "
                "decode_attention='sdpa'"
            )
        if flex and compiled and backend == "inductor" and model.config.head_dim < 16:
            raise ConfigError(
                f"EngineConfig: decode_attention='flex' compiles with Inductor only for heads of at least 16 "
                f"dimensions (its Triton kernel), and this model's have {model.config.head_dim}: use "
                "decode_attention='sdpa'"
            )
        hd = model.config.head_dim
        if self.cache.kv.decode == "triton" and self.device.type == "cuda" and not kernel_takes(hd):
            raise ConfigError(
                f"EngineConfig: decode_attention='triton' takes heads of a power of 2 of at least 16 dimensions, and "
                f"this model's have {hd}: use decode_attention='sdpa'"
            )
        if flex and compiled and backend == "inductor":
            warnings.warn(
                "EngineConfig: decode_attention='flex' is experimental on CUDA: at the TinyLlama-1.1B shape its "
                "compiled decoding kernel crashed with an illegal memory access on an H200 (torch 2.11; "
                "bench/results/2026-12-02-engine-r6.md, pytorch#174923), while small models decode correctly; "
                "the default on CUDA is llamita's kernel, decode_attention='triton'",
                stacklevel=2,
            )
        t0 = time.perf_counter()
        self.startup_s: dict[str, float] = {}
        # Dynamic shapes from the start: one compilation covers every batch size and read length (a static first
        # one would be compiled again, dynamic, at the second size).
        block = _compile_own(block_step, backend) if compiled else None
        self._logits = functools.partial(model_logits, layer_fn=block)
        self._hidden = functools.partial(cached_hidden, layer_fn=block)
        # The draft model's blocks compile apart (their shapes are the draft's); a speculative step's forwards
        # (the draft's and the verifying one of the target) run the compiled blocks as the decode step does.
        draft_block = _compile_own(block_step, backend) if compiled and draft is not None else None
        self._draft_hidden = functools.partial(cached_hidden, layer_fn=draft_block)
        self._sample_plain = _static_vocabulary(_compile_own(sampling.sample, backend)) if compiled else sampling.sample
        # Read lengths of the decode step: each is a set of captured graphs on CUDA, so fewer there.
        self.buckets = attend_buckets(self.seq_len, 256 if weight.is_cuda and config.cuda_graphs else 16)
        self.graphs: CapturedSteps | None = None
        self.prefill_graphs: LazyGraphs | None = None
        graphed = self.device.type == "cuda" and config.cuda_graphs
        self.padded_prefill = graphed if config.prefill_graphs is None else config.prefill_graphs
        """Whether prefill groups are padded to buckets (`EngineConfig.prefill_graphs`)."""
        draft_cache = None if self.speculator is None else self.speculator.cache
        decodes = {self.cache.kv.decode} | ({draft_cache.kv.decode} if draft_cache is not None else set())
        triton = decodes == {"triton"}
        if config.packed_prefill and not triton:
            raise ConfigError(
                "EngineConfig: packed_prefill needs decode_attention='triton' (llamita's kernel reads each packed "
                f"token's slot) for the model and any draft, and this engine's are {sorted(decodes)}: set "
                "decode_attention='triton', or packed_prefill=False"
            )
        # Not by default on a CPU, where the op runs its reference: a gathered copy of every token's slot.
        packed = triton and self.device.type == "cuda"
        self.packed_prefill = packed if config.packed_prefill is None else config.packed_prefill
        """Whether a step's prompt chunks go through one packed forward (`EngineConfig.packed_prefill`)."""
        if self.padded_prefill and graphed:
            # Where a replayed prefill leaves its rows' last logits.
            self.prefill_logits = torch.empty(n_slots, self.vocab_size, dtype=torch.float32, device=self.device)

            def step(key: tuple, *inputs: Tensor) -> Tensor:  # key: (rows, chunks) packed, else (rows, width, reads)
                if self.packed_prefill:
                    return self.prefill_logits[: key[1]].copy_(self._packed_logits(*inputs))
                return self.prefill_logits[: key[0]].copy_(self._last_logits(key[2], *inputs))

            self.prefill_graphs = LazyGraphs(step)
        # Everything compiles now, before any sequence holds a slot (every row touched is idle: it writes its
        # scratch position), and without duck sizing: dynamo would otherwise give sizes that happen to be equal
        # at the first call (a batch of 256 and a read length of 256, a read length and the model's dim) one
        # symbol, and compile again at the first batch where they differ. A block compiles once for the prefill
        # (its rows are an index) and for the decode step once, or with Inductor twice (its caches guard reading
        # all of the slots' positions apart from reading a prefix, which is all a prefill ever reads).
        with torch.no_grad(), _no_duck_sizing():
            if compiled and n_slots > 2:
                # Not at the full batch: the cache rows would then be the whole cache, whose size dynamo keeps
                # static, and the next batch size would compile the step again.
                for attend in dict.fromkeys((self.buckets[0], self.seq_len)):
                    self._decode_rows(*self._decode_inputs(n_slots - 1, attend), False)
            if self.device.type == "cuda" and config.cuda_graphs:
                import torch._inductor.config as inductor_config

                single = config.single_row is not False and compiled and n_slots > 1

                def decode_step(batch: int, v: tuple[int, bool]) -> tuple[Tensor, Tensor]:
                    # The graph of one row compiles (its first run) under coordinate-descent tuning.
                    one_row = single and batch == 1
                    with inductor_config.patch(coordinate_descent_tuning=True) if one_row else contextlib.nullcontext():
                        return self._decode_rows(*self._decode_inputs(batch, v[0]), v[1])

                self.graphs = CapturedSteps(
                    decode_step,
                    [1, *capture_sizes(n_slots)] if single else capture_sizes(n_slots),
                    variants=tuple((attend, filters) for attend in self.buckets for filters in (False, True)),
                )
                self.startup_s["decode_graphs"] = time.perf_counter() - t0  # compilation included
                if self.speculator is not None:
                    t1 = time.perf_counter()
                    self.speculator.capture()
                    self.startup_s["speculative_graphs"] = time.perf_counter() - t1
            if compiled:  # the prefill's shape, never specialised to one row
                if self.packed_prefill:  # 16 tokens of one slot, one a row
                    slots, attend = torch.zeros(16, dtype=torch.long, device=self.device), self.seq_len
                    tokens = torch.zeros(16, 1, dtype=torch.long, device=self.device)
                    positions = torch.arange(16, device=self.device)[:, None]
                else:  # a batch or chunk is padded to at least 2 (see `_prefill`)
                    slots, attend = torch.arange(min(2, n_slots), device=self.device)[[0, -1]], 16
                    tokens = torch.zeros(2, 16, dtype=torch.long, device=self.device)
                    # Not expanded: a stride of 0 would be compiled apart from the prefill's real positions.
                    positions = torch.arange(16, device=self.device).repeat(2, 1)
                self._hidden(self.model, self.cache.gather(slots, attend), tokens, positions)
                self.startup_s["prefill_compile"] = time.perf_counter() - t0 - self.startup_s.get("decode_graphs", 0.0)

    # ------------------------------------------------------------------------------------------ requests
    def add(self, prompt: list[int], params: SamplingParams) -> Sequence:
        """Queue a request; it starts in the step that finds it a free slot.

        Raises:
            ConfigError: The prompt is empty, holds ids outside the vocabulary, or leaves no room in a slot.
        """
        bad = [i for i in prompt if not 0 <= i < self.vocab_size]
        if bad:
            raise ConfigError(f"prompt ids {bad[:5]} are outside the vocabulary 0..{self.vocab_size - 1}")
        max_new = self.scheduler.check(prompt, params)
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**32, ()))
        stops = set(params.stop_token_ids)
        if self.eos_id is not None and not params.ignore_eos:
            stops.add(self.eos_id)
        seq = Sequence(next(self._ids), list(prompt), params, seed, frozenset(stops), max_new)
        self.scheduler.add(seq)
        if params.logprobs is not None:
            self._logprob_requests.add(seq.id)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Stop a request now (finish reason "abort" unless it had one); its slot is free for the next step."""
        if seq.finish_reason is None:
            seq.finish_reason = "abort"
        self._release(seq)

    def has_work(self) -> bool:
        return self._ahead is not None or self.scheduler.has_work()

    # ---------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self) -> list[tuple[Sequence, list[int]]]:
        """Admit waiting requests, decode the running ones, prefill the next prompt chunks.

        Returns:
            Each sequence that got tokens in this step, with them; a finished sequence has its finish_reason and
            has already left its slot. With `overlap`, a step run ahead returns the tokens of the step before.
        """
        ahead = self.overlap and not self._logprob_requests and not self._lands_first()
        emitted = [] if ahead else self._take_ahead()
        launch = self._launch()
        if launch.tokens is None:  # nothing launched (no sequence decodes or completes its prompt): none pending
            return emitted + self._take_ahead()
        if not ahead:
            return emitted + self._land(launch, launch.tokens.tolist())
        landing = self._landing[self.stats.steps % 2][: launch.tokens.numel()]  # not the pending step's buffer
        landing.copy_(launch.tokens, non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        emitted = self._take_ahead()  # while the device runs this step
        self._ahead = (launch, landing, event)
        self.stats.ahead_steps += 1
        return emitted

    def _launch(self) -> _Launch:
        """Launch a step on the device: admit, decode, prefill; its tokens stay on the device."""
        admitted, copies = self.scheduler.admit()
        for src, dst, n in copies:
            self.cache.copy_prefix(src, dst, n)
            if self.speculator is not None:
                self.speculator.copy_prefix(src, dst, n)
        for seq in admitted:
            self._admit(seq)
            self.stats.reused_tokens += seq.reused
        decoders = self.scheduler.decoding()
        chunks = self.scheduler.prefill_chunks(decoding=bool(decoders))

        pieces: list[Tensor] = []
        logprob_rows: list[tuple[Sequence, Tensor, Tensor]] = []
        speculating = self.speculator is not None and self.speculator.applies(decoders)
        batch = decoders[-1].slot + 1 if decoders else 0
        if decoders and speculating:
            pieces += self.speculator.step(decoders)
        elif decoders:
            filters = any(s.params.filters for s in decoders)
            # With a step pending (`overlap`), each sequence's tokens of it are not in its length yet: this step
            # feeds the last, and reads them.
            longest = min(self.seq_len, max(s.length for s in decoders) + self.pending_tokens())
            new, logits = self._decode(batch, self.attend(longest), filters)
            pieces.append(new)
            logprob_rows += [(s, logits[s.slot], new[s.slot]) for s in decoders if s.params.logprobs is not None]
            self.stats.decode_steps += 1
        completing, first, first_logits = self._prefill(chunks) if chunks else ([], None, None)
        self.stats.prefill_steps += bool(chunks)
        if first is not None:
            pieces.append(first)
            logprob_rows += [
                (s, first_logits[i], first[i]) for i, s in enumerate(completing) if s.params.logprobs is not None
            ]
        for chunk in chunks:
            self.scheduler.prefilled(chunk)
            self.stats.prefill_tokens += chunk.n
        self.stats.steps += 1
        tokens = torch.cat(pieces) if pieces else None
        return _Launch(decoders, [s.slot for s in decoders], batch, speculating, completing, tokens, logprob_rows)

    def _land(self, launch: _Launch, host: list[int]) -> list[tuple[Sequence, list[int]]]:
        """Apply a launched step's tokens, read to the host (`host`): append them up to each sequence's finish,
        releasing it then. A sequence that finished before they landed (`overlap`: in the step before, or
        aborted) drops its token."""
        logprobs = self._logprobs(launch.logprob_rows)
        out: list[tuple[Sequence, list[int]]] = []
        if launch.speculating:
            out += self.speculator.accept(launch.decoders, launch.slots, host)  # type: ignore[union-attr]
            del host[: self.speculator.host_len(launch.batch)]  # type: ignore[union-attr]
        elif launch.decoders:
            out += [(s, [host[slot]]) for s, slot in zip(launch.decoders, launch.slots) if not s.finished]
            del host[: launch.batch]
        out += [(s, [token]) for s, token in zip(launch.completing, host) if not s.finished]
        emitted = []
        for seq, tokens in out:
            kept = []
            for token in tokens:
                kept.append(token)
                if seq.params.logprobs is not None:  # one token per step (speculation does not take these)
                    seq.logprobs.append(logprobs[id(seq)])
                if seq.append(token):
                    break
            self.stats.generated_tokens += len(kept)
            if seq.finished:
                self._release(seq)
            emitted.append((seq, kept))
        return emitted

    def pending_tokens(self) -> int:
        """Tokens a row may get from the step pending (`overlap`), which the host has not read: 0 without one."""
        if self._ahead is None:
            return 0
        return self.config.gamma + 1 if self._ahead[0].speculating else 1

    def _lands_first(self) -> bool:
        """Whether the step pending must land before the next is launched: that one speculates (as the decoding
        sequences now say), and either drafts from the host's tokens (prompt lookup) or follows a plain step (the
        draft model then catches up from the host's tokens)."""
        if self._ahead is None or self.speculator is None:
            return False
        follows = self.speculator.draft is not None and self._ahead[0].speculating
        return not follows and self.speculator.applies(self.scheduler.decoding())

    def _take_ahead(self) -> list[tuple[Sequence, list[int]]]:
        """Wait for the step launched ahead (`overlap`), if any, and apply its tokens."""
        if self._ahead is None:
            return []
        launch, landing, event = self._ahead
        self._ahead = None
        if event is not None:
            event.synchronize()
        return self._land(launch, landing.tolist())

    # ---------------------------------------------------------------------------------------- internals
    def upload(self, values: Tensor | list) -> Tensor:
        """Host values on the engine's device without a sync: through pinned memory, copied asynchronously."""
        host = values if isinstance(values, Tensor) else torch.tensor(values)
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def _admit(self, seq: Sequence) -> None:
        """Write a newly admitted sequence's settings into its slot (small host-to-device writes, no sync)."""
        self.sampling.set_row(seq.slot, seq.params, seq.seed, self.vocab_size)
        if seq.params.repetition_penalty != 1:
            self.seen[seq.slot] = False
            self.seen[seq.slot, self.upload(seq.prompt)] = True
        if seq.params.presence_penalty != 0 or seq.params.frequency_penalty != 0:
            self.counts[seq.slot] = 0  # other rows' counts are multiplied by penalties of 0: never reset

    def _release(self, seq: Sequence) -> None:
        self._logprob_requests.discard(seq.id)
        if seq.slot is not None:
            self.positions[seq.slot] = self.seq_len - 1  # back to its scratch position
        if self.speculator is not None:
            self.speculator.release(seq)
        self.scheduler.release(seq)

    def attend(self, length: int) -> int:
        """The positions a step reads for sequences of at most `length` tokens: the bucket that holds them."""
        return next(b for b in self.buckets if b >= length)

    def _decode_inputs(self, batch: int, attend: int) -> tuple:
        """Views of rows 0 .. batch - 1 of the cache (their first `attend` positions read) and the slot state: the
        decode step's inputs."""
        return (
            self.cache.rows(0, batch, attend), self.tokens[:batch], self.positions[:batch], self.sampling.rows(batch),
            self.seen[:batch], self.counts[:batch],
        )  # fmt: skip

    def _decode_rows(
        self,
        cache: KVCache,
        tokens: Tensor,
        positions: Tensor,
        t: SamplingTensors,
        seen: Tensor,
        counts: Tensor,
        filters: bool,
    ) -> tuple[Tensor, Tensor]:
        """One decode step of every row, in place on the slot state: feed each row's token, draw the next.

        Returns:
            ([B] new token ids, [B, V] fp32 logits they were drawn from).
        """
        logits = self._logits(self.model, cache, tokens[:, None], positions[:, None])[:, 0]  # [B, V]
        sample = sampling.sample if filters else self._sample_plain
        new = sample(logits, t, seen, positions + 1, filters, counts)  # [B]
        # A padded row (idle, or admitted and still prefilling) sits at its scratch position: its draw is junk, and
        # must not mark what its sequence has seen or said.
        live = (positions < self.seq_len - 1)[:, None]  # [B, 1]
        tokens.copy_(new)
        positions.copy_((positions + 1).clamp_(max=self.seq_len - 1))  # an idle row stays at its scratch position
        seen.scatter_(1, new[:, None], seen.gather(1, new[:, None]) | live)
        counts.scatter_add_(1, new[:, None], live.float())
        out = self.step_logits[: logits.shape[0]]
        out.copy_(logits)
        return new, out

    def _decode(self, batch: int, attend: int, filters: bool) -> tuple[Tensor, Tensor]:
        if self.graphs is not None:
            return self.graphs(batch, (attend, filters))  # type: ignore[return-value]
        return self._decode_rows(*self._decode_inputs(batch, attend), filters)

    def _prefill(self, chunks: list[Chunk]) -> tuple[list[Sequence], Tensor | None, Tensor | None]:
        """Run the chunks through the model (and the draft); draw the first token of each prompt completed.

        Chunks of similar lengths go through one forward wherever their slots are (`_batches`): their slots are
        written through an index and read as a gathered copy of the positions the chunks reach. The rows are
        right-padded to the longest; padding writes only positions past its sequence's chunk (written again before
        anything reads them).

        Returns:
            The K sequences whose prompts this completes (by slot), [K] their first tokens and [K, V] the logits
            those were drawn from; (no sequences, None, None) when none completes.
        """
        done, logits = [], []
        packed = self.packed_prefill
        for group in [chunks] if packed else _batches(chunks, self.seq_len):
            last = self._prefill_packed(group) if packed else self._prefill_padded(group, *self._shape(group))
            completing = [row for row, c in enumerate(group) if c.completes]
            if completing:
                logits.append(last[self.upload(completing)])  # [k, V], a copy (the next group reuses the buffer)
                done += [group[row].seq for row in completing]
        if not done:
            return [], None, None
        logits = torch.cat(logits)  # [K, V]
        slots, draw_at = self.upload([s.slot for s in done]), self.upload([len(s.prompt) for s in done])
        filters = any(s.params.filters for s in done)
        # The first token: no output yet, so no frequency or presence penalty.
        new = sampling.sample(logits, self.sampling.take(slots), self.seen[slots], draw_at, filters)  # [K]
        if self.speculator is not None:
            self.speculator.prompts_done(slots, [s.prompt[-1] for s in done])
        self.tokens[slots] = new
        self.positions[slots] = draw_at
        self.seen[slots, new] = True
        self.counts[slots, new] += 1
        return done, new, logits

    def _shape(self, group: list[Chunk]) -> tuple[int, int, int, bool]:
        """A group's prefill forward: (rows, width, read length, whether a bucket). At least 2 x 2 and the group's
        own size; with padded prefills (`prefill_graphs`), its bucket where that holds at most
        `prefill_graph_tokens`: rows a decode batch size, width a power of two (at least 16), reads a length of
        `attend_buckets`."""
        reach, widest = max(c.start + c.n for c in group), max(c.n for c in group)
        if self.padded_prefill:
            rows = next(b for b in capture_sizes(self.n_slots) if b >= max(len(group), min(2, self.n_slots)))
            width = min(max(16, 1 << (widest - 1).bit_length()), self.seq_len)
            if rows * width <= self.config.prefill_graph_tokens:
                return rows, width, self.attend(reach), True
        return max(2, len(group)), max(2, widest), max(2, reach), False  # the padding reads nothing it needs

    def _prefill_padded(self, group: list[Chunk], rows: int, width: int, attend: int, bucket: bool) -> Tensor:
        """One forward of a group's chunks (and the draft's), in the shape `_shape` gives: the first chunk repeated
        to fill the rows (it writes the same values to the same places), each row right-padded to the width (the
        padding's positions run on past its chunk, written again before anything reads them, and stop at the slot's
        scratch position), and reads of the first `attend` positions. A bucket's forward is replayed from its CUDA
        graph where there are prefill graphs.

        Returns:
            [len(group), V] fp32 logits of each chunk's last token.
        """
        padded = group + group[:1] * (rows - len(group))
        tokens = torch.zeros(rows, width, dtype=torch.long)
        for row, c in enumerate(padded):
            tokens[row, : c.n] = torch.tensor(c.seq.prompt[c.start : c.start + c.n])
        starts = torch.tensor([c.start for c in padded])
        positions = (starts[:, None] + torch.arange(width)).clamp_(max=self.seq_len - 1)  # [rows, width]
        inputs = [self.upload(t) for t in (tokens, positions, torch.tensor([c.seq.slot for c in padded]),
                                              torch.tensor([c.n - 1 for c in padded]))]  # fmt: skip
        if self.speculator is not None:
            self.speculator.prefill(inputs[2], attend, inputs[0], inputs[1])
        if bucket and self.prefill_graphs is not None:
            self.prefill_graphs((rows, width, attend), inputs)
            return self.prefill_logits[: len(group)]
        return self._last_logits(attend, *inputs)[: len(group)]

    def _prefill_packed(self, group: list[Chunk]) -> Tensor:
        """One forward of all the chunks as one token a row (`packed_prefill`), each row written to and reading its
        sequence's slot; with prefill graphs the rows padded to their bucket (`packed_rows`; padding rows write the
        first chunk's slot's scratch position, and read one position) and replayed from its CUDA graph.

        Returns:
            [len(group), V] fp32 logits of each chunk's last token.
        """
        n = sum(c.n for c in group)
        graphed = self.prefill_graphs is not None
        rows = packed_rows(n, self.scheduler.prefill_tokens) if self.padded_prefill else n
        chunks = min(rows, self.n_slots) if graphed else len(group)  # logits rows the forward computes
        pad = rows - n
        tokens = [t for c in group for t in c.seq.prompt[c.start : c.start + c.n]] + [0] * pad
        positions = [p for c in group for p in range(c.start, c.start + c.n)] + [self.seq_len - 1] * pad
        slots = [c.seq.slot for c in group for _ in range(c.n)] + [group[0].seq.slot] * pad
        last = list(itertools.accumulate(c.n for c in group)) + [1] * (chunks - len(group))
        inputs = [self.upload(torch.tensor(tokens)[:, None]), self.upload(torch.tensor(positions)[:, None]),
                  self.upload(slots), self.upload(torch.tensor(last) - 1)]  # fmt: skip
        if self.speculator is not None:
            self.speculator.prefill(inputs[2], self.seq_len, inputs[0], inputs[1])
        if graphed:
            self.prefill_graphs((rows, chunks), inputs)
            return self.prefill_logits[: len(group)]
        return self._packed_logits(*inputs)[: len(group)]

    def _packed_logits(self, tokens: Tensor, positions: Tensor, slots: Tensor, last: Tensor) -> Tensor:
        """[K, V] fp32 logits at rows `last` of a packed forward: tokens [R, 1] at positions [R, 1] of slots [R]."""
        hidden = self._hidden(self.model, self.cache.gather(slots, self.seq_len), tokens, positions)  # [R, 1, D]
        return self.model.lm_head(hidden[last, 0]).float()

    def _last_logits(self, attend: int, tokens: Tensor, positions: Tensor, slots: Tensor, last: Tensor) -> Tensor:
        """[R, V] fp32 logits at each row's `last` position: the rows' tokens fed through their slots."""
        hidden = self._hidden(self.model, self.cache.gather(slots, attend), tokens, positions)  # [R, W, D]
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        return self.model.lm_head(hidden[rows, last]).float()

    def _logprobs(self, rows: list[tuple[Sequence, Tensor, Tensor]]) -> dict[int, dict[str, object]]:
        """The log-probabilities the sequences asked for, copied to the host together."""
        if not rows:
            return {}
        top = max(s.params.logprobs for s, _, _ in rows)
        chosen, ids, values = sampling.logprobs(
            torch.stack([r[1] for r in rows]), torch.stack([r[2] for r in rows]), top
        )
        chosen, ids, values = chosen.tolist(), ids.tolist(), values.tolist()
        return {
            id(s): {"logprob": chosen[i], "top": list(zip(ids[i], values[i]))[: s.params.logprobs]}
            for i, (s, _, _) in enumerate(rows)
        }


def packed_rows(n: int, most: int) -> int:
    """Rows of a packed prefill of n tokens (`EngineConfig.packed_prefill`): the bucket whose CUDA graph it replays,
    16, 32, ... 512, then every multiple of 256 (padding at most 256 rows past 512: a forward of more is bound by
    its arithmetic), at most `most` (the step's budget, `prefill_tokens`)."""
    rows = max(16, 1 << (n - 1).bit_length()) if n <= 512 else -(-n // 256) * 256
    return max(n, min(rows, most))


def _batches(chunks: list[Chunk], seq_len: int, waste: float = 0.25) -> list[list[Chunk]]:
    """Chunks that go through one forward, padded to the longest: longest first, a chunk joins the current batch
    while the padding stays within `waste` of the real tokens and inside every slot."""
    batches: list[list[Chunk]] = []
    for c in sorted(chunks, key=lambda c: -c.n):
        if batches:
            batch = batches[-1]
            width, real = batch[0].n, sum(b.n for b in batch) + c.n
            if (len(batch) + 1) * width <= (1 + waste) * real and c.start + width <= seq_len:
                batch.append(c)
                continue
        batches.append([c])
    return batches
