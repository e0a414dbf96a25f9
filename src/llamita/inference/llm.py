"""The Python API, in the shape of vLLM's offline one: `LLM(checkpoint).generate(prompts, SamplingParams(...))`.

    from llamita.inference import LLM, SamplingParams

    llm = LLM("runs/demo")  # a llamita run or checkpoint, a Hugging Face Llama directory, or a Llama
    for out in llm.generate(["def add(a, b):", "The river"], SamplingParams(temperature=0.8, max_tokens=64)):
        print(out.text, out.finish_reason)
    for piece in llm.stream_text("Once upon a time", SamplingParams(max_tokens=32)):
        print(piece, end="", flush=True)

Every call runs through one `Engine`, so requests of one `generate` call are batched together, continuously.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llamita.config import ConfigError
from llamita.inference.engine import Engine, EngineConfig
from llamita.inference.sampling import SamplingParams
from llamita.inference.scheduler import Sequence as EngineSequence
from llamita.inference.text import TextStream, follow
from llamita.model.llama import Llama
from llamita.tokenizer import Tokenizer

log = logging.getLogger("llamita.inference")

Prompt = str | list[int]
"""Text (encoded with BOS) or token ids."""


@dataclass
class Completion:
    """One prompt's result: vLLM's RequestOutput and its one CompletionOutput in one object."""

    prompt: str | None
    """The prompt's text, when it was given as text."""
    prompt_token_ids: list[int]
    text: str
    """The new text as it continues the prompt (its leading space kept); ends before a stop string."""
    token_ids: list[int]
    """The new token ids, a stop id included."""
    finish_reason: str
    """"stop" (a stop id or string) or "length" (max_tokens, or the end of the sequence's slot)."""
    logprobs: list[dict[str, Any]] | None
    """With SamplingParams.logprobs: per new token {"logprob": float, "top": [(id, logprob), ...]}."""


def load(path: str | Path, device: torch.device, dtype: str | torch.dtype) -> tuple[Llama, Tokenizer, Path]:
    """Model, tokenizer and checkpoint folder of a llamita run or checkpoint, or of a Hugging Face Llama directory."""
    from llamita.evaluate.load_model import load_model

    loaded = load_model(path, device, resolve_dtype(dtype, device))
    return loaded.model, loaded.tokenizer, loaded.source


def _auto_fuse(model: Llama, given: bool, gpu: bool) -> bool:
    """`LLM(fuse=None)`: fuse a loaded (not `given`) model on a GPU where it can be fused; say why where not."""
    if given or not gpu:
        return False
    why = model.unfusable()
    if why is not None:
        log.info("projections not fused: %s", why)
    return why is None


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU, fp32 elsewhere; or float32, bfloat16, float16, or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    named = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}  # fmt: skip
    if dtype not in named:
        raise ConfigError(f"dtype must be one of {', '.join(named)}, got {dtype!r}")
    return named[dtype]


class LLM:
    """A model behind the engine, with its tokenizer: batched `generate`, and `stream` for one prompt."""

    def __init__(
        self,
        model: str | Path | Llama,
        tokenizer: Tokenizer | None = None,
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        draft: str | Path | Llama | None = None,
        quantize: str | None = None,
        fuse: bool | None = None,
        config: EngineConfig | None = None,
        **engine: Any,
    ) -> None:
        """Load (or take) a model and start its engine.

        Args:
            model: A llamita run directory or checkpoint folder, a Hugging Face Llama directory, or a `Llama`
                (used where it is, in its dtype).
            tokenizer: The tokenizer of a `Llama` given directly (None: prompts and outputs are token ids only).
            device: Where a loaded model goes: auto, cpu, cuda, cuda:N.
            dtype: A loaded model's weights: auto (bf16 on a GPU), float32, bfloat16, float16.
            draft: A draft model for speculative decoding (path or `Llama`, same tokenizer); sets speculate="draft".
            quantize: "int8": the model's Linear layers as weight-only int8 (torchao, `pip install 'llamita[quant]'`;
                `llamita.inference.quantize`), before the engine sizes its cache from the memory left; a `Llama`
                given is quantized in place. None: the weights as they are. The draft model stays as it is.
            fuse: Fuse each block's q/k/v and gate/up projections into one matmul each (`Llama.fuse_projections`),
                in place, the draft's too: fewer, larger matmuls per decode step (on an H200 a decode step of
                TinyLlama-1.1B took 1.52 ms fused against 1.84 at batch 1, 2.83 against 3.13 at batch 256). None:
                fused on a GPU where the model can be (`Llama.unfusable`: no LoRA adapters, biases or quantized
                weights), except a `Llama` given, which is changed only when asked (True).
            config: The engine's settings; or give them as keywords (max_batch=..., prefix_cache=True, ...).
            **engine: `EngineConfig` fields, when `config` is not given.
        """
        from llamita.inference.quantize import check_method, quantize_weights
        from llamita.train.parallel import pick_device

        check_method(quantize)  # before anything is loaded
        self.source: Path | None = None
        """The checkpoint folder (or Hugging Face directory) the model came from; None for a `Llama` given."""
        if isinstance(model, Llama):
            self.model, self.tokenizer = model, tokenizer
        else:
            self.model, self.tokenizer, self.source = load(model, pick_device(str(device), option="device"), dtype)
        auto = fuse is None
        if auto:
            fuse = _auto_fuse(self.model, given=isinstance(model, Llama), gpu=self.model.lm_head.weight.is_cuda)
        if fuse:
            self.model.fuse_projections()  # before quantizing: the fused weights get their own per-row scales
        if quantize is not None:
            quantize_weights(self.model, quantize)
        weight = self.model.lm_head.weight  # a quantized weight keeps its device and (activation) dtype
        given_draft = not isinstance(draft, (str, Path))
        if not given_draft:
            draft, draft_tokenizer, _ = load(draft, weight.device, weight.dtype)
            if self.tokenizer is not None and draft_tokenizer.fingerprint() != self.tokenizer.fingerprint():
                raise ConfigError("the draft model's tokenizer differs from the target's; a draft must share it")
        if draft is not None and (_auto_fuse(draft, given_draft, weight.is_cuda) if auto else fuse):
            draft.fuse_projections()
        if draft is not None and "speculate" not in engine and config is None:
            engine["speculate"] = "draft"
        config = config or EngineConfig(**engine)
        eos = None if self.tokenizer is None else self.tokenizer.eos_id
        self.engine = Engine(self.model, config, eos_id=eos, draft=draft)

    # -------------------------------------------------------------------------------------------- batch
    def generate(
        self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[Completion]:
        """Continue every prompt, all through the engine at once; results in the prompts' order.

        Args:
            prompts: One prompt or several (text, or token ids).
            params: One setting for all, one per prompt, or None (the defaults).

        Raises:
            ConfigError: A text prompt without a tokenizer, or a prompt the engine refuses (empty, too long, ids
                outside the vocabulary); nothing has been generated then.
        """
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        prompts = [prompts] if single else list(prompts)  # type: ignore[list-item]
        params = params if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ConfigError(f"{len(params)} SamplingParams for {len(prompts)} prompts; give one, or one each")
        ids = [self._encode(p) for p in prompts]
        for p in params:
            self._check_stop_strings(p)
        seqs = [self.engine.add(i, p) for i, p in zip(ids, params)]
        texts = {s.id: self._text(s) for s in seqs}
        while self.engine.has_work():
            for seq, new in self.engine.step():
                if texts.get(seq.id) is not None:
                    follow(self.engine, seq, new, texts[seq.id])
        return [self._completion(p, s, texts[s.id]) for p, s in zip(prompts, seqs)]

    # ----------------------------------------------------------------------------------------- streaming
    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[int]:
        """The new token ids of one prompt as the engine makes them (a stop id included).

        Leaving the loop early aborts the request. Other requests in the engine advance with it.
        """
        for new, _ in self._follow(prompt, params):
            yield from new

    def stream_text(self, prompt: Prompt, params: SamplingParams | None = None, *, echo: bool = False) -> Iterator[str]:
        """The new text of one prompt, piece by piece (a `TextStream`: never half a character, never a part of a
        stop string); with `echo`, the prompt's text first."""
        ids = self._encode(prompt)
        if echo:
            yield self._need_tokenizer().decode(ids)
        for _, piece in self._follow(ids, params, need_text=True):
            if piece:
                yield piece

    # ---------------------------------------------------------------------------------------- internals
    def _follow(
        self, prompt: Prompt, params: SamplingParams | None, need_text: bool = False
    ) -> Iterator[tuple[list[int], str]]:
        """One request through the engine: each step's new ids of it, and the text they add."""
        params = params or SamplingParams()
        self._check_stop_strings(params)
        if need_text:
            self._need_tokenizer()
        seq = self.engine.add(self._encode(prompt), params)
        text = self._text(seq)
        try:
            while not seq.finished:
                for other, new in self.engine.step():
                    if other is seq:
                        yield new, "" if text is None else follow(self.engine, seq, new, text)
        finally:
            if not seq.finished:
                self.engine.abort(seq)

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ConfigError("text prompts and outputs need a tokenizer: pass LLM(model, tokenizer)")
        return self.tokenizer

    def _encode(self, prompt: Prompt) -> list[int]:
        return self._need_tokenizer().encode(prompt, bos=True) if isinstance(prompt, str) else list(prompt)

    def _check_stop_strings(self, params: SamplingParams) -> None:
        if params.stop:
            self._need_tokenizer()

    def _text(self, seq: EngineSequence) -> TextStream | None:
        """A sequence's text stream (None without a tokenizer: token ids only)."""
        return None if self.tokenizer is None else TextStream(self.tokenizer, seq.prompt, seq.params.stop)

    def _completion(self, prompt: Prompt, seq: EngineSequence, text: TextStream | None) -> Completion:
        return Completion(
            prompt=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=seq.prompt,
            text="" if text is None else text.text,
            token_ids=list(seq.output),
            finish_reason=seq.finish_reason,
            logprobs=seq.logprobs if seq.params.logprobs is not None else None,
        )
