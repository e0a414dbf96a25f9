"""A Llama-architecture decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP, blocks, static KV cache.

Single-device math only. Module names are transformers' LlamaForCausalLM's, and RoPE uses its rotate-half
layout, so `Llama(cfg).state_dict()` loads into `LlamaForCausalLM` with strict=True and vice versa.

Shapes: B batch, T new tokens, S cached positions, D dim, H query heads, KV key/value heads, hd head dim,
I intermediate size, V vocab.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from llamita.model.config import ModelConfig
from llamita.model.decode_attention import decode_attention
from llamita.model.loss import chunked_cross_entropy, token_logprobs


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back: exactly transformers' LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()  # [..., D]: squares of bf16 activations need fp32
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # [..., D]
        return self.weight * x32.to(x.dtype)  # [..., D]


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of the RoPE angles in fp32, rotate-half layout, on the default device.

    Args:
        head_dim: Size of one attention head (even).
        max_seq_len: Number of positions to cover.
        theta: RoPE base.

    Returns:
        (cos, sin), each [max_seq_len, head_dim]; the two halves of a head share the same angles.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # [hd/2]
    positions = torch.arange(max_seq_len, dtype=torch.float32)  # [S]
    angles = positions[:, None] * inv_freq[None, :]  # [S, hd/2]
    angles = torch.cat([angles, angles], dim=-1)  # [S, hd]
    return angles.cos(), angles.sin()  # [S, hd] each


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate query or key heads by their positions' angles.

    Args:
        x: [B, heads, T, hd].
        cos: [T, hd] rows of `rope_tables` for x's positions, or [B, 1, T, hd] when each sequence has its own.
        sin: likewise.

    Returns:
        [B, heads, T, hd], in x's dtype (the tables are cast to it, as transformers does).
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # [T, hd] each
    x1, x2 = x.chunk(2, dim=-1)  # [B, heads, T, hd/2] each
    rotated = torch.cat([-x2, x1], dim=-1)  # [B, heads, T, hd]
    return x * cos + rotated * sin  # [B, heads, T, hd]


def document_mask(
    positions: Tensor, branches: Tensor | None = None, *, blocks: bool | None = None
) -> Tensor | BlockMask:
    """The attention mask of packed documents: causal within each document, nothing across documents.

    With `branches`, a document is a tree: a shared prefix (branch 0) followed by branches 1, 2, ... (e.g. one
    prompt and two completions), each branch attending to the prefix and to itself only. A branch's positions
    continue the prefix's, so every token sees exactly what it would see in its own sequence (prefix + branch).

    Args:
        positions: [B, T] position of every token in its own document; each document starts at position 0.
        branches: [B, T] branch of every token (0: the document's shared prefix); None: no branches.
        blocks: a FlexAttention `BlockMask` (default on CUDA: its kernel skips the blocks no query may see, where
            SDPA with a dense mask has no flash kernel) instead of the dense mask (default elsewhere).

    Returns:
        [B, 1, T, T] boolean, True where query i may see key j; or the same as a `BlockMask`.
    """
    doc = (positions == 0).cumsum(dim=1)  # [B, T]: document index of every token
    B, T = positions.shape
    if blocks if blocks is not None else positions.is_cuda:

        def same_document_causal(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
            visible = (doc[b, q] == doc[b, k]) & (k <= q)
            if branches is None:
                return visible
            return visible & ((branches[b, k] == 0) | (branches[b, k] == branches[b, q]))

        # Compiled: building the block table eagerly costs milliseconds per micro-batch at 2048 tokens.
        return create_block_mask(
            same_document_causal, B, None, T, T, device=positions.device, _compile=positions.is_cuda
        )
    causal = torch.ones(T, T, dtype=torch.bool, device=positions.device).tril()  # [T, T]
    visible = (doc[:, :, None] == doc[:, None, :]) & causal  # [B, T, T]
    if branches is not None:
        visible &= (branches[:, None, :] == 0) | (branches[:, None, :] == branches[:, :, None])  # [B, T, T]
    return visible[:, None]  # [B, 1, T, T]


DECODE_BLOCK = 128
"""Key positions per block of `decode_block_mask` (FlexAttention's default block size)."""


def decode_block_mask(positions: Tensor, attend: int, block: int = DECODE_BLOCK) -> BlockMask:
    """The FlexAttention mask of a decode step through a cache: row b's one query (every head's) sees cached
    positions 0 .. positions[b], within the `attend` read.

    Built from block counts rather than by evaluating a mask everywhere (`create_block_mask`): a few small tensor
    ops, no host sync, so it goes into a captured CUDA graph. The blocks a row cannot see are skipped by the
    kernel: a row reads its own length, not `attend`. A row past `attend` (an idle row at its scratch position)
    sees all of it, as the dense mask's does.

    Args:
        positions: [B, 1] (or [B]) position of each row's one token.
        attend: Cached positions the step reads at most (the mask's key length).
        block: Key positions per block.

    Returns:
        A BlockMask of shape (B, 1, 1, attend): one query a row, the same for every head. FlexAttention's decoding
        kernel takes the query heads that share a key/value head together (`enable_gqa`), so each row's keys and
        values are read once per key/value head.
    """
    pos = positions.reshape(-1)  # [B]
    B, n = pos.shape[0], -(-attend // block)
    seen = (pos + 1).clamp(max=attend)  # [B]: keys each row sees
    blocks = torch.arange(n, device=pos.device, dtype=torch.int32)  # [n]
    full = (seen // block).to(torch.int32)[:, None, None]  # [B, 1, 1]: blocks seen whole
    partial = (seen % block != 0).to(torch.int32)[:, None, None]  # [B, 1, 1]: one block seen in part, or none
    # The partial block first (the one after the full ones); the rest of the row is never read.
    partial_at = (blocks + full[:, :, :, None]) % n  # [B, 1, 1, n]

    def visible(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return k <= pos[b]

    return BlockMask.from_kv_blocks(
        partial, partial_at, full, blocks.expand(B, 1, 1, n), BLOCK_SIZE=block, mask_mod=visible,
        seq_lengths=(1, attend),
    )  # fmt: skip


class KVCache:
    """Preallocated keys and values for incremental decoding: one [B, KV, max_len, hd] pair per layer.

    `Llama.forward(tokens, cache, start_pos)` writes positions start_pos .. start_pos + T - 1 and attends
    to everything before them; `Llama.hidden_states(tokens, cache, positions=...)` does the same at each
    sequence's own positions. Entries past a sequence's length are never read: every forward writes its
    positions before attending, and a query sees only keys at or before its own position.

    A view (`view`) can narrow what a forward reads without narrowing where it writes: its `attend` first
    positions are all attention reads (so it costs what they hold, not what the buffers hold), while writes may go
    to any of the max_len positions; and its rows can be a slice (a view of the buffers) or an index tensor of
    any rows, written in place and read as one gathered copy of their first `attend` positions.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Allocate zeroed caches.

        Args:
            config: The model's config.
            batch_size: Number of sequences decoded together.
            max_len: Positions to hold; defaults to (and may not exceed) `config.max_seq_len`.
            device: Where to allocate; use the model's device.
            dtype: Element type; use the model's parameter dtype.
        """
        max_len = config.max_seq_len if max_len is None else max_len
        if not 0 < max_len <= config.max_seq_len:
            raise ValueError(f"KVCache max_len must be in 1..max_seq_len ({config.max_seq_len}), got {max_len}")
        self.batch_size = batch_size
        self.max_len = max_len
        self.attend = max_len
        self.index: Tensor | None = None
        self.decode = "sdpa"
        """How decode steps (one token a row) attend: "sdpa", all `attend` positions of every row through SDPA with
        a mask; "flex", each row's own positions only, through FlexAttention's block sparsity (`decode_block_mask`);
        "triton", each row's own positions only, through `decode_attention.decode_attention`."""
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]

    def view(self, rows: slice | Tensor, length: int | None = None, *, attend: int | None = None) -> KVCache:
        """The same buffers for sequences `rows`: no copy.

        Args:
            rows: Which sequences: a slice of the batch (the buffers' view), or a [B] index tensor of rows
                (written in place through the index; each layer's reads gather its rows).
            length: Positions to keep (writes included), with a slice; attention then costs only what it reads.
            attend: Positions attention reads (default: all that are kept); writes may still go to any kept
                position past them, where a row that must not disturb the others (an idle one) writes.

        Returns:
            A KVCache whose batch is the rows selected.
        """
        out = copy.copy(self)
        if isinstance(rows, Tensor):
            if length is not None:
                raise ValueError("KVCache.view: an index of rows keeps every position; narrow reads with attend")
            out.index, out.batch_size = rows, rows.shape[0]
        else:
            length = self.max_len if length is None else length
            out.k = [k[rows, :, :length] for k in self.k]
            out.v = [v[rows, :, :length] for v in self.v]
            out.batch_size, out.max_len = out.k[0].shape[0], length
        out.attend = min(out.max_len if attend is None else attend, out.max_len)
        return out

    def layer(self, i: int) -> LayerKV:
        """Layer i's buffers and rows: what its attention writes and reads (`LayerKV.update`)."""
        return LayerKV(self.k[i], self.v[i], self.index, self.decode)


@dataclass
class LayerKV:
    """One layer's part of a `KVCache` view. A layer gets its own buffers rather than (cache, layer index), and its
    read length comes from its mask's shape rather than an int attribute, so that a compiled block sees the same
    kind of input at every layer and read length: one compilation (dynamic shapes) serves them all."""

    k: Tensor
    """[B or all rows, KV, max_len, hd] keys."""
    v: Tensor
    """[B or all rows, KV, max_len, hd] values."""
    index: Tensor | None
    """[B] rows of the buffers that the batch's sequences are; None: all of them, in order."""
    decode: str = "sdpa"
    """`KVCache.decode`: how a forward of one token a row attends."""

    def update(self, k: Tensor, v: Tensor, write_at: Tensor, attend: int) -> tuple[Tensor, Tensor]:
        """Write the layer's new keys and values at their positions; return what attention reads.

        Args:
            k: [B, KV, T, hd] new keys.
            v: [B, KV, T, hd] new values.
            write_at: [B, T] cache position of each of them.
            attend: Positions attention reads (the cache view's `attend`, its mask's last size).

        Returns:
            The layer's keys and values at positions 0 .. attend - 1 of the rows, [B, KV, attend, hd] each; for one
            token a row through an index with the "triton" decode, all the buffers' rows and positions instead (the
            kernel reads each row's own slot and positions: no gathered copy).
        """
        k_buf, v_buf = self.k, self.v  # [B or all rows, KV, max_len, hd]
        # An index_put_, not a scatter_: Inductor writes an index_put_ into a compiled graph's input in place,
        # while a scatter_ into one becomes a copy of the whole buffer, scattered, then copied back (torch 2.11-2.13:
        # at 256 slots of 2048 positions that made a decode step 4x slower).
        index = torch.arange(k.shape[0], device=k.device) if self.index is None else self.index
        rows = index[:, None]  # [B, 1], broadcast against write_at's [B, T]
        k_buf[rows, :, write_at] = k.transpose(1, 2)  # [B, T, KV, hd] into (row, position) pairs
        v_buf[rows, :, write_at] = v.transpose(1, 2)
        if self.index is None:
            return k_buf[:, :, :attend], v_buf[:, :, :attend]
        if self.decode == "triton" and k.shape[2] == 1:  # the kernel reads each row's slot through the index
            return k_buf, v_buf
        return k_buf[:, :, :attend].index_select(0, self.index), v_buf[:, :, :attend].index_select(0, self.index)


_NOT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
"""SDPA's backends without per-shape plans (with a mask on CUDA: the memory-efficient kernel; on a CPU: its flash)."""


class Attention(nn.Module):
    """Causal grouped-query self-attention through F.scaled_dot_product_attention."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        kv: LayerKV | None = None,
        write_at: Tensor | None = None,
        mask: Tensor | BlockMask | None = None,
    ) -> Tensor:
        """Attend from x's T positions to themselves and, with a cache, to the cached positions `mask` allows.

        Args:
            x: [B, T, D] normed hidden states.
            cos: [T, hd] RoPE table rows for x's positions, or [B, 1, T, hd] when each sequence has its own.
            sin: likewise.
            kv: This layer's part of the cache (`LayerKV.update` writes and reads it).
            write_at: [B, T] cache position of each of x's tokens, where its key and value go (with `kv`).
            mask: [B, 1, T, T] boolean, True where query i may see key j, replacing the causal mask (packed
                sequences), or the same as a FlexAttention `BlockMask`; with `kv`, [B, 1, T, S]: which of the
                S = `attend` cached positions each query sees, or for one token a row a `decode_block_mask`.

        Returns:
            [B, T, D].
        """
        B, T, _ = x.shape
        if hasattr(self, "qkv_proj"):  # fused for inference (`fuse_projections`)
            q, k, v = self.qkv_proj(x).split(self._qkv_sizes, dim=-1)  # [B, T, H * hd], [B, T, KV * hd] x 2
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, KV, T, hd]
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, KV, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # [B, H, T, hd], [B, KV, T, hd]

        gqa = self.n_kv_heads != self.n_heads
        if kv is not None:
            k_cache, v_cache = kv.update(k, v, write_at, mask.shape[-1])  # [B, KV, S, hd] each
            if kv.decode == "triton" and T == 1:  # one token a row, each row reading its own positions
                # Row b sees positions 0 .. its own (the dense mask's rule): an idle row at its scratch position,
                # past the read, sees all of it.
                lengths = (write_at[:, 0] + 1).clamp(max=k_cache.shape[2])  # [B]
                if kv.index is not None:
                    # Rows of any slots (a packed prefill's tokens, each in its sequence's slot): the kernel reads
                    # through the index. Padding rows sit at the scratch position and read one position, not all.
                    lengths = torch.where(write_at[:, 0] == k_cache.shape[2] - 1, 1, lengths)
                grouped = q.reshape(B, self.n_kv_heads, self.n_heads // self.n_kv_heads, self.head_dim)
                scale = self.head_dim**-0.5
                y = decode_attention(grouped, k_cache, v_cache, lengths, scale, kv.index)  # [B, KV, G, hd]
            elif isinstance(mask, BlockMask):  # one token a row, each row reading its own length (`decode_block_mask`)
                # One query a row, the heads grouped by the kernel (`enable_gqa`), not G queries of a key/value
                # head as below: with a query length of G the compiled kernel crashed on an H200 (an illegal memory
                # access, TinyLlama-1.1B shape, torch 2.11), as pytorch#174923 reports for short queries.
                y = flex_attention(q, k_cache, v_cache, block_mask=mask, enable_gqa=gqa)  # [B, H, 1, hd]
            else:
                # The G query heads that share a key/value head attend as G * T queries of that head, so SDPA's
                # fused kernels take the mask; its grouped-query path would repeat the whole cache for every head.
                G, S = self.n_heads // self.n_kv_heads, k_cache.shape[2]
                grouped = q.reshape(B, self.n_kv_heads, G * T, self.head_dim)  # [B, KV, G * T, hd]
                mask = mask[:, :, None].expand(B, 1, G, T, S).reshape(B, 1, G * T, S)  # [B, 1, G * T, S]
                # Several tokens a row (a prefill, a speculative verification): not cuDNN's kernel, which builds an
                # execution plan for every new shape (55-400 ms each), and prefill shapes change with every batch
                # of prompts. One token a row (decoding) keeps it: the engine's shapes there are few and captured.
                with sdpa_kernel(_NOT_CUDNN) if T > 1 else contextlib.nullcontext():
                    y = F.scaled_dot_product_attention(grouped, k_cache, v_cache, attn_mask=mask)  # [B, KV, G*T, hd]
            y = y.reshape(B, self.n_heads, T, self.head_dim)  # [B, H, T, hd]
        elif isinstance(mask, BlockMask):  # packed documents on a GPU (`document_mask`)
            y = flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)  # [B, H, T, hd]
        else:  # an explicit mask (packed sequences) replaces the causal one
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # [B, T, H * hd]
        return self.o_proj(y)  # [B, T, D]

    def fuse_projections(self) -> None:
        """Replace q_proj, k_proj and v_proj by one `qkv_proj` whose weight stacks theirs (inference: one matmul
        reading the three weights instead of three; see `Llama.fuse_projections`)."""
        self._qkv_sizes = [self.n_heads * self.head_dim] + [self.n_kv_heads * self.head_dim] * 2
        self.qkv_proj = _stacked(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "gate_up_proj"):  # fused for inference (`fuse_projections`)
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [B, T, I] each
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)  # [B, T, D]

    def fuse_projections(self) -> None:
        """Replace gate_proj and up_proj by one `gate_up_proj` whose weight stacks theirs (`Llama.fuse_projections`)."""
        self.gate_up_proj = _stacked(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj


def _stacked(*linears: nn.Linear) -> nn.Linear:
    """One bias-free Linear whose output is the outputs of `linears` side by side (their weights stacked)."""
    weight = torch.cat([m.weight.detach() for m in linears])  # [sum of out, in]
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    out.weight = nn.Parameter(weight, requires_grad=False)
    return out


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        kv: LayerKV | None = None,
        write_at: Tensor | None = None,
        mask: Tensor | BlockMask | None = None,
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, write_at, mask)  # [B, T, D]
        return x + self.mlp(self.post_attention_layernorm(x))  # [B, T, D]


class Llama(nn.Module):
    """Llama-architecture causal LM with transformers' LlamaForCausalLM parameter names.

    `Llama(cfg)` is initialised and ready to train. To build big models without allocating twice:
    `with torch.device("meta"): m = Llama(cfg)`, then `m.to_empty(device=...)` and `m.init_weights()`.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(
            {
                "embed_tokens": nn.Embedding(config.vocab_size, config.dim),
                "layers": nn.ModuleList(Block(config) for _ in range(config.n_layers)),
                "norm": RMSNorm(config.dim, config.norm_eps),
            }
        )
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Non-persistent: derived from the config, and keeps state_dict() identical to transformers'.
        self.register_buffer("rope_cos", torch.empty(config.max_seq_len, config.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(config.max_seq_len, config.head_dim), persistent=False)
        self.init_weights()

    def unfusable(self) -> str | None:
        """Why `fuse_projections` cannot fuse this model (None: it can): what a stacked weight cannot carry, a LoRA
        adapter's update, a bias, a quantized weight."""
        for block in self.model.layers:
            a, m = block.self_attn, block.mlp
            if hasattr(a, "qkv_proj"):
                continue  # fused already
            for linear in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
                weight = type(linear.weight.detach())
                if type(linear) is not nn.Linear or linear.bias is not None or weight is not torch.Tensor:
                    return (
                        f"fuse_projections stacks plain bias-free Linear weights, not a {type(linear).__name__} "
                        f"with a {weight.__name__} weight: merge LoRA adapters first (`merge_lora`), and quantize "
                        "after fusing"
                    )
        return None

    @torch.no_grad()
    def fuse_projections(self) -> Llama:
        """For inference: every block's q/k/v projections as one matmul (`qkv_proj`), and gate/up as one
        (`gate_up_proj`), each weight the stack of the ones it replaces (the same outputs; the old weights are
        freed). A decode step then reads the same bytes in 4 matmuls a block instead of 7 (vLLM's QKVParallelLinear
        and MergedColumnParallelLinear; gpt-fast's wqkv).

        The model then trains no more and saves under other names than Hugging Face's: fuse a model to serve it,
        not one to save. Done in place; returns the model.
        """
        why = self.unfusable()
        if why is not None:
            raise ValueError(why)
        blocks = [b for b in self.model.layers if not hasattr(b.self_attn, "qkv_proj")]
        for block in blocks:
            block.self_attn.fuse_projections()
            block.mlp.fuse_projections()
        return self

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """TinyLlama's initialisation, the RoPE tables and embedding tying; call it after `to_empty()`.

        Embedding and linear weights ~ N(0, sqrt(2 / (5 * dim))); the residual-branch outputs (o_proj,
        down_proj) ~ N(0, 1 / sqrt(dim) / n_layers); norm weights = 1.

        Args:
            generator: Random source for reproducible weights; must be on the parameters' device.
        """
        if self.config.tie_embeddings:
            # to_empty() from the meta device gives each module a fresh Parameter, which unties them.
            self.lm_head.weight = self.model.embed_tokens.weight
        std = math.sqrt(2.0 / (5 * self.config.dim))
        residual_std = 1.0 / math.sqrt(self.config.dim) / self.config.n_layers
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module_std = residual_std if name.endswith(("o_proj", "down_proj")) else std
                nn.init.normal_(module.weight, mean=0.0, std=module_std, generator=generator)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        # to_empty() leaves buffers uninitialised too, so the tables are rebuilt here, in fp32.
        with torch.device(self.rope_cos.device):
            cos, sin = rope_tables(self.config.head_dim, self.config.max_seq_len, self.config.rope_theta)
        self.rope_cos, self.rope_sin = cos, sin

    def hidden_states(
        self,
        tokens: Tensor,
        cache: KVCache | None = None,
        start_pos: int = 0,
        *,
        positions: Tensor | None = None,
        mask: Tensor | BlockMask | None = None,
        layer_fn: Callable[..., Tensor] | None = None,
    ) -> Tensor:
        """Final-normed hidden states (the lm_head's input).

        Args:
            tokens: [B, T] token ids at positions start_pos .. start_pos + T - 1.
            cache: KV cache to read earlier positions from and write these into; None for training.
            start_pos: Position of the first token; must be 0 without a cache.
            positions: [B, T] explicit position of every token: with `mask` and no cache, the positions of packed
                sequences; with a cache, where each sequence's tokens go, so that sequences of different lengths
                are decoded together (no start_pos then).
            mask: [B, 1, T, T] boolean attention mask, True where query i may see key j (packed sequences: with
                `positions`, no cache).
            layer_fn: Runs each block as `layer_fn(block, x, cos, sin, kv, write_at, mask)` (default: the block
                itself): the inference engine's compiled `block_step`, one compilation for every layer.

        Returns:
            [B, T, D].
        """
        packed = cache is None and positions is not None
        if packed != (mask is not None) or (positions is not None and start_pos):
            raise ValueError(
                "positions and mask go together without a cache (packed sequences); with a cache, positions "
                "replace start_pos and take no mask"
            )
        B, T = tokens.shape
        end = start_pos + T
        if positions is not None:
            # Checked on the host only where that costs no device sync; on a GPU an index out of the tables raises.
            if not positions.is_cuda and not torch.compiler.is_compiling():
                limit = self.config.max_seq_len if cache is None else min(cache.max_len, self.config.max_seq_len)
                if int(positions.max()) >= limit:
                    raise ValueError(f"a position exceeds the model's max_seq_len or the cache ({limit} positions)")
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]  # [B, 1, T, hd] each
        else:
            if end > self.config.max_seq_len:
                raise ValueError(
                    f"positions {start_pos}..{end - 1} exceed the model's max_seq_len "
                    f"({self.config.max_seq_len}); pass shorter sequences"
                )
            cos, sin = self.rope_cos[start_pos:end], self.rope_sin[start_pos:end]  # [T, hd] each
        if cache is None and start_pos != 0:
            raise ValueError(f"start_pos={start_pos} needs a KVCache holding the earlier positions")
        write_at = None
        if cache is not None:
            if B != cache.batch_size or end > cache.max_len:
                raise ValueError(
                    f"batch of {B} sequences up to position {end - 1} does not fit a KVCache of batch "
                    f"{cache.batch_size} and max_len {cache.max_len}; allocate a larger cache"
                )
            if positions is None:
                positions = torch.arange(start_pos, end, device=tokens.device).expand(B, T)  # [B, T]
            write_at = positions
            if cache.decode == "flex" and T == 1:
                mask = decode_block_mask(positions, cache.attend)
            else:
                keys = torch.arange(cache.attend, device=tokens.device)  # [S]: the positions attention reads
                mask = (keys <= positions[:, :, None])[:, None]  # [B, 1, T, S]: each query sees its own past
        x = self.model.embed_tokens(tokens)  # [B, T, D]
        for i, block in enumerate(self.model.layers):
            kv = None if cache is None else cache.layer(i)
            if layer_fn is None:
                x = block(x, cos, sin, kv, write_at, mask)  # [B, T, D]
            else:
                x = layer_fn(block, x, cos, sin, kv, write_at, mask)  # [B, T, D]
        return self.model.norm(x)  # [B, T, D]

    def forward(
        self,
        tokens: Tensor,
        cache: KVCache | None = None,
        start_pos: int = 0,
        targets: Tensor | None = None,
        positions: Tensor | None = None,
        branches: Tensor | None = None,
        predict: Tensor | None = None,
    ) -> Tensor:
        """Next-token logits at every position, or with `targets` the mean cross-entropy against them.

        The loss is computed here, through the output head's weight in row chunks (`chunked_cross_entropy`), so
        the [B, T, V] logits never exist whole; it being inside forward also means that a wrapper which gathers
        parameters around forward (FSDP2) has gathered lm_head for it.

        Args:
            tokens: [B, T] token ids at positions start_pos .. start_pos + T - 1.
            cache: KV cache for incremental decoding; None for training.
            start_pos: Position of the first token; must be 0 without a cache.
            targets: [B, T] next-token ids (-100 to skip a position); None for logits.
            positions: [B, T] positions of packed documents (each restarting at 0, see `document_mask`): every
                document attends only to itself, at the positions it would have alone; no cache.
            branches: [B, T] with `positions`: packed trees, a shared prefix (0) and branches attending to it and
                to themselves (`document_mask`), e.g. a prompt with two completions.
            predict: [N] with `targets`: flat indices into B * T of the positions to score; only they go through
                the output head, and their log-probabilities are returned instead of the mean loss.

        Returns:
            [B, T, V] logits; with `targets` the scalar fp32 mean loss, or with `predict` the [N] fp32
            log-probabilities of `targets` at those positions.
        """
        mask = None if positions is None else document_mask(positions, branches)  # [B, 1, T, T]
        h = self.hidden_states(tokens, cache, start_pos, positions=positions, mask=mask)  # [B, T, D]
        if targets is None:
            return self.lm_head(h)  # [B, T, V]
        if predict is not None:
            scored = h.flatten(0, 1).index_select(0, predict)  # [N, D]
            return token_logprobs(scored, self.lm_head.weight, targets.flatten().index_select(0, predict))  # [N]
        return chunked_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.flatten())  # scalar
