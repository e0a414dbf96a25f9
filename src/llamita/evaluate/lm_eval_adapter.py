"""lm-evaluation-harness model adapter: any lm-eval task on a llamita (or Hugging Face Llama) checkpoint.

Registered as ``llamita`` when imported. lm-eval 0.4 discovers models only through its own registry (it has no
entry-point plugin group), so something must import this module first:

    python -m llamita.evaluate.lm_eval_cli run --model llamita --model_args checkpoint=runs/tl --tasks arc_easy

or, from Python, ``import llamita.evaluate.lm_eval_adapter`` before ``lm_eval.simple_evaluate(model="llamita", ...)``.

``--model_args``: ``checkpoint=PATH`` (required), ``batch_size=N``, ``device=cpu|cuda|auto``,
``dtype=auto|float32|bfloat16``, ``add_bos_token=true|false``. Tokenization and BOS follow lm-eval's HF backend
for a Llama tokenizer, so results equal ``--model hf`` on the exported model; log-likelihoods are computed by
`llamita.evaluate.scoring` (shared contexts run once).

Chat models: lm-eval's ``--apply_chat_template`` (with ``--system_instruction`` and ``--fewshot_as_multiturn``)
renders every request with the model's own template (its tokenizer's ``chat_template``, which `llamita sft` and
`llamita dpo` save) through `llamita.chat.templates`, as the HF backend asks transformers to.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from llamita.evaluate.load_model import load_model
from llamita.evaluate.run import resolve_dtype
from llamita.evaluate.scoring import TokenPair, rolling_windows, score_pairs
from llamita.tokenizer import BOS, EOS
from llamita.train.parallel import pick_device

DEFAULT_BATCH_SIZE = 32
MAX_GEN_TOKS = 256
"""lm-eval's HF backend default for generate_until."""
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
"""transformers' marker of where the final message ends, for ``continue_final_message``."""


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
        self._llm: Any = None  # the inference engine, started by the first generate_until

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

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The model's chat template for ``--apply_chat_template`` (None when it is off).

        Raises:
            ValueError: the model's tokenizer has no chat template.
        """
        if chat_template is False or chat_template is None:
            return None
        if self.llamita_tokenizer.chat_template is None:
            raise ValueError(
                "--apply_chat_template: this model's tokenizer has no chat_template (a base model); a model from "
                "`llamita sft` or `llamita dpo`, or an HF directory whose tokenizer_config.json has one, does"
            )
        return self.llamita_tokenizer.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's template renders it, as lm-eval's HF backend has transformers (5) render
        it: with the assistant's generation prompt, or (``add_generation_prompt=False``) ending inside the final
        message so that the model continues it; a template that refuses a system message gets the conversation
        without it."""
        from llamita.chat.templates import render

        template = self.chat_template(True)
        if not add_generation_prompt:  # transformers' continue_final_message: render with a tag, cut at the tag
            *before, final = chat_history
            chat_history = [*before, {**final, "content": final["content"] + CONTINUE_TAG}]

        def text(history: list[dict[str, str]]) -> str:
            rendered = render(history, template, self.llamita_tokenizer, add_generation_prompt=add_generation_prompt,
                              train_on="all")  # fmt: skip
            return rendered.text

        try:
            rendered = text(chat_history)
        except ValueError:
            rendered = text([m for m in chat_history if m["role"] != "system"])
        if add_generation_prompt:
            return rendered
        at = rendered.rindex(CONTINUE_TAG.strip())
        return rendered[:at] if rendered[at : at + len(CONTINUE_TAG)] == CONTINUE_TAG else rendered[:at].rstrip()

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """transformers' ``encode`` of a Llama tokenizer as lm-eval's HF backend calls it: BOS unless told not, and
        special-token strings (the ``</s>`` a chat template writes) as their ids."""
        if add_special_tokens is None:
            add = self.add_bos_token if self.add_bos_token is not None else True
            add_special_tokens = add and not string.startswith(BOS)
        ids, _ = self.llamita_tokenizer.encode_rendered(string)
        return [self.prefix_token_id, *ids] if add_special_tokens else ids

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

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Every request through the inference engine at once, with lm-eval's handling of ``until``, ``max_gen_toks``
        and context truncation; the text is the continuation's own decoding, cut before a stop string."""
        from llamita.inference import LLM, SamplingParams

        if self._llm is None:
            self._llm = LLM(self.model, self.llamita_tokenizer, max_batch=self.batch_size)
        contexts, params, stops = [], [], []
        for context, gen_kwargs in [req.args for req in requests]:
            gen = normalize_gen_kwargs(gen_kwargs, MAX_GEN_TOKS)
            stop = handle_stop_sequences(gen.pop("until", None), eos=EOS)
            max_new = gen.pop("max_gen_toks")
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for a context in {self.max_length} positions")
            contexts.append(self.tok_encode(context)[-(self.max_length - max_new) :])
            sample = bool(gen.get("do_sample"))
            params.append(
                SamplingParams(
                    max_tokens=max_new,
                    temperature=float(gen.get("temperature", 1.0)) if sample else 0.0,
                    top_k=gen.get("top_k") if sample else None,
                    top_p=float(gen.get("top_p") or 1.0) if sample else 1.0,
                    stop=tuple(stop),
                )
            )
            stops.append(stop)
        out = []
        with tqdm(total=len(requests), disable=disable_tqdm, desc="llamita generate") as bar:
            completions = self._llm.generate(contexts, params)
            bar.update(len(requests))
        for req, completion, stop in zip(requests, completions, stops):
            text = postprocess_generated_text(self.tok_decode(completion.token_ids), stop, None)
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out
