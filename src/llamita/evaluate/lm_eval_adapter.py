"""lm-evaluation-harness model adapter: any lm-eval task on a llamita (or Hugging Face Llama) checkpoint.

Registered as ``llamita`` when imported. lm-eval 0.4 discovers models only through its own registry (it has no
entry-point plugin group), so something must import this module first:

    python -m llamita.evaluate.lm_eval_cli run --model llamita --model_args checkpoint=runs/tl --tasks arc_easy

or, from Python, ``import llamita.evaluate.lm_eval_adapter`` before ``lm_eval.simple_evaluate(model="llamita", ...)``.

``--model_args``: ``checkpoint=PATH`` (required), ``batch_size=N``, ``device=cpu|cuda|auto``,
``dtype=auto|float32|bfloat16``, ``add_bos_token=true|false``. Tokenization and BOS follow lm-eval's HF backend
for a Llama tokenizer, so results equal ``--model hf`` on the exported model; log-likelihoods are computed by
`llamita.evaluate.scoring` (shared contexts run once).
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from llamita.evaluate.load_model import load_model
from llamita.evaluate.run import resolve_dtype
from llamita.evaluate.scoring import TokenPair, rolling_windows, score_pairs
from llamita.generate import decode_one, prefill, sample
from llamita.model.llama import KVCache
from llamita.tokenizer import BOS, EOS
from llamita.train.parallel import pick_device

DEFAULT_BATCH_SIZE = 32
MAX_GEN_TOKS = 256
"""lm-eval's HF backend default for generate_until."""


@register_model("llamita")
class LlamitaLM(TemplateLM):
    """A llamita model behind lm-eval's LM interface: loglikelihood, loglikelihood_rolling, generate_until."""

    def __init__(
        self,
        checkpoint: str,
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        device: str | None = "auto",
        dtype: str = "auto",
        add_bos_token: bool | None = None,
        max_batch_size: int | None = None,
    ) -> None:
        """Load `checkpoint` (llamita run / checkpoint folder / Hugging Face Llama directory).

        Args:
            checkpoint: Where the model is.
            batch_size: Continuations per forward pass; lm-eval's "auto" means the default (32).
            device: cpu, cuda, cuda:N or auto.
            dtype: Weights' dtype; auto is bf16 on a GPU, fp32 elsewhere.
            add_bos_token: As lm-eval's HF backend: None follows the tokenizer (Llama's adds BOS).
            max_batch_size: Accepted for lm-eval's interface; unused.
        """
        super().__init__()
        self._device = pick_device(device or "auto", option="--model_args device")
        loaded = load_model(checkpoint, self._device, resolve_dtype(dtype, self._device))
        self.model = loaded.model
        self.llamita_tokenizer = loaded.tokenizer
        self.add_bos_token = add_bos_token
        auto = batch_size is None or str(batch_size).startswith("auto")
        self.batch_size = DEFAULT_BATCH_SIZE if auto else int(batch_size)  # type: ignore[arg-type]

    @property
    def eot_token_id(self) -> int:
        return self.llamita_tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.llamita_tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self.model.config.max_seq_len

    @property
    def tokenizer_name(self) -> str:
        return self.llamita_tokenizer.fingerprint()

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """transformers' ``encode`` of a Llama tokenizer as lm-eval's HF backend calls it (BOS unless told not)."""
        if add_special_tokens is None:
            add = self.add_bos_token if self.add_bos_token is not None else True
            add_special_tokens = add and not string.startswith(BOS)
        return self.llamita_tokenizer.encode(string, bos=add_special_tokens)

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.llamita_tokenizer.decode(tokens)

    def _score(self, pairs: list[TokenPair], disable_tqdm: bool) -> list[tuple[float, bool]]:
        with tqdm(total=len(pairs), disable=disable_tqdm, desc="llamita loglikelihood") as bar:
            return score_pairs(
                self.model, pairs, batch_size=self.batch_size, on_batch=lambda done: bar.update(len(done))
            )

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        answers = self._score([(context, continuation) for _, context, continuation in requests], disable_tqdm)
        for (request, _, _), answer in zip(requests, answers):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return answers

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each string's log-likelihood in lm-eval's rolling windows (tokens encoded as the HF backend does)."""
        windows, owners = [], []
        for k, (string,) in enumerate(req.args for req in requests):
            for window in rolling_windows(self.tok_encode(string), self.prefix_token_id, self.max_length):
                windows.append(window)
                owners.append(k)
        totals = [0.0] * len(requests)
        for k, (logprob, _) in zip(owners, self._score(windows, disable_tqdm)):
            totals[k] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    @torch.inference_mode()
    def _generate(self, context: list[int], stop: list[str], max_new: int, gen: dict[str, Any]) -> str:
        """Decode from `context` until a stop string, EOS or max_new tokens; the text before the stop."""
        temperature = float(gen.get("temperature", 0.0)) if gen.get("do_sample") else 0.0
        device = self.model.lm_head.weight.device
        n_new = min(max_new, self.max_length - len(context) + 1)
        cache = KVCache(
            self.model.config, 1, len(context) + n_new - 1, device=device, dtype=self.model.lm_head.weight.dtype
        )

        def pick(logits: torch.Tensor) -> torch.Tensor:
            return sample(logits, temperature, gen.get("top_k"), gen.get("top_p"))

        token = pick(prefill(self.model, torch.tensor([context], device=device), cache))
        new = [int(token)]
        while new[-1] != self.eot_token_id and len(new) < n_new:
            if any(s in self.tok_decode(new) for s in stop):
                break
            token = pick(decode_one(self.model, token.view(1, 1), cache, len(context) + len(new) - 1))
            new.append(int(token))
        return postprocess_generated_text(self.tok_decode(new), stop, None)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Generation per request, with lm-eval's handling of ``until``, ``max_gen_toks`` and context truncation."""
        out = []
        for context, gen_kwargs in tqdm([req.args for req in requests], disable=disable_tqdm, desc="llamita generate"):
            gen = normalize_gen_kwargs(gen_kwargs, MAX_GEN_TOKS)
            stop = handle_stop_sequences(gen.pop("until", None), eos=EOS)
            max_new = gen.pop("max_gen_toks")
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for a context in {self.max_length} positions")
            ids = self.tok_encode(context)[-(self.max_length - max_new) :]
            text = self._generate(ids, stop, max_new, gen)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out
