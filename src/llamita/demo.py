"""`llamita demo`: the whole pipeline on the embedded corpus, on a laptop CPU, with no download.

corpus (stdlib docs as prose, stdlib code as code) -> tokenizer -> shards -> pretrain the `demo` preset with a
7:3 prose:code mixture -> validation loss -> a generated sample -> loss plot -> a chat model (SFT) -> its
preferences tuned (DPO). Every stage skips work that a previous run of the demo finished, and training resumes
from the last checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path

from llamita.config import load_config
from llamita.data.demo_corpus import demo_corpus_stats, write_demo_corpus
from llamita.data.prepare import prepare_source
from llamita.tokenizer import Tokenizer, train_tokenizer

DEMO_VOCAB = 4096
DEMO_CORPUS_MB = {"prose": 3.0, "code": 6.0}
PROMPTS = ["The list type", "def read_file(path):"]


def prepare_demo_data(
    out: Path, *, corpus_mb: float | None = None, vocab_size: int = DEMO_VOCAB
) -> tuple[Path, dict[str, Path]]:
    """The demo's corpus, tokenizer and prepared sources below `out` (stages 1-3; finished work is kept).

    Returns:
        The tokenizer directory and {source name: prepared directory} for `prose` and `code`.
    """
    out.mkdir(parents=True, exist_ok=True)
    caps = {k: int(1e6 * (corpus_mb or v)) for k, v in DEMO_CORPUS_MB.items()}
    corpus = write_demo_corpus(out / "corpus", max_code_bytes=caps["code"], max_prose_bytes=caps["prose"])
    stats = demo_corpus_stats(corpus)
    print(f"[1/7] corpus: {stats}")

    tok_dir = out / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        tokenizer = Tokenizer.load(tok_dir)
        print(f"[2/7] tokenizer: {tok_dir} exists ({tokenizer.vocab_size} tokens), kept")
    else:
        tokenizer = train_tokenizer(sorted(corpus.values()), vocab_size, tok_dir)
        print(f"[2/7] tokenizer: trained {tokenizer.vocab_size} tokens -> {tok_dir}")

    data_dirs = {}
    for name, path in corpus.items():
        data_dirs[name] = out / "data" / name
        m = prepare_source(
            name, [str(path)], tok_dir, data_dirs[name], shard_tokens=2**20, val_fraction=0.02, workers=1
        )
        print(f"[3/7] prepared {name}: {m['totals']}")
    return tok_dir, data_dirs


def demo_sources(data_dirs: dict[str, Path]) -> str:
    """The `data.sources` override that mixes the demo's prose and code 7:3, as TinyLlama mixes its sources."""
    return (
        f"[{{name: prose, path: '{data_dirs['prose']}', weight: 0.7}}, "
        f"{{name: code, path: '{data_dirs['code']}', weight: 0.3}}]"
    )


def run_demo(
    out: Path,
    *,
    max_steps: int | None = None,
    corpus_mb: float | None = None,
    vocab_size: int = DEMO_VOCAB,
    overrides: dict[str, str] | None = None,
    chat_stage: bool = True,
    chat_overrides: dict[str, str] | None = None,
    dpo_overrides: dict[str, str] | None = None,
) -> dict:
    """Run the demo pipeline into `out`; return the final training metrics plus timings.

    Args:
        out: run directory (corpus/, tokenizer/, data/, checkpoints/, metrics.jsonl, tb/, loss.png).
        max_steps: optimizer steps (default: the demo recipe's).
        corpus_mb: cap per source in MB (default: all ~2.3 MB of prose, 6 MB of code).
        vocab_size: tokenizer vocabulary size.
        overrides: further dotted config overrides (used by the tests to shrink the run).
        chat_stage: also fine-tune the model into a chat model (`run_demo_chat`) and tune its preferences
            (`run_demo_dpo`).
        chat_overrides: dotted overrides of the chat stage's recipe (sft-demo).
        dpo_overrides: dotted overrides of the preference stage's recipe (dpo-demo).
    """
    from llamita.inference import LLM, SamplingParams
    from llamita.pretrain import pretrain
    from llamita.pretrained import load_pretrained
    from llamita.train.metrics import read_metrics
    from llamita.train.parallel import cpu_has_native_bf16

    t0 = time.perf_counter()
    tok_dir, data_dirs = prepare_demo_data(out, corpus_mb=corpus_mb, vocab_size=vocab_size)
    t_prep = time.perf_counter() - t0

    values = {
        "out_dir": str(out),
        "data.tokenizer": str(tok_dir),
        "data.sources": demo_sources(data_dirs),
        **({"train.max_steps": str(max_steps)} if max_steps else {}),
        **(overrides or {}),
    }
    if "train.dtype" not in values and not cpu_has_native_bf16():
        # The recipe computes in bf16, which only pays on CPUs with bf16 matrix instructions.
        values["train.dtype"] = "fp32"
        print("this CPU has no native bf16 matrix instructions (AVX512-BF16 or AMX): training in fp32")
    cfg = load_config("demo", values)
    print(f"[4/7] pretraining the {cfg.model.preset} preset for {cfg.train.max_steps} steps")
    t1 = time.perf_counter()
    result = pretrain(cfg)
    t_train = time.perf_counter() - t1

    pre = load_pretrained(out)
    print("[5/7] samples (temperature 0.8, top-k 50):")
    llm = LLM(pre.model, pre.tokenizer, max_batch=len(PROMPTS))
    params = [SamplingParams(temperature=0.8, top_k=50, max_tokens=60, seed=i) for i in range(len(PROMPTS))]
    for prompt, sample in zip(PROMPTS, llm.generate(PROMPTS, params)):
        # Decoded together with the prompt, the continuation keeps its leading space.
        print(f"--- {prompt!r}\n{pre.tokenizer.decode(sample.prompt_token_ids + sample.token_ids)}\n")

    t2 = time.perf_counter()
    chat = run_demo_chat(out, values, chat_overrides) if chat_stage else None
    t_chat = time.perf_counter() - t2
    t3 = time.perf_counter()
    preferences = run_demo_dpo(out, values, dpo_overrides) if chat_stage else None
    t_dpo = time.perf_counter() - t3

    rows = read_metrics(out / "metrics.jsonl")
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    train_rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    summary = {
        **result,
        "first_val_loss": val[0] if val else None,
        "final_val_loss": val[-1] if val else None,
        "median_tokens_per_s": sorted(train_rates)[len(train_rates) // 2] if train_rates else None,
        "prepare_seconds": round(t_prep, 1),
        "train_seconds": round(t_train, 1),
        "chat": chat,
        "chat_seconds": round(t_chat, 1),
        "preferences": preferences,
        "preferences_seconds": round(t_dpo, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    print(
        f"demo done in {summary['total_seconds'] / 60:.1f} min: val loss {summary['first_val_loss']:.3f} -> "
        f"{summary['final_val_loss']:.3f}; run folder {out} (checkpoints, metrics.jsonl, tb/, loss.png)"
        + (f"; chat model {out / 'chat'} (llamita chat --checkpoint {out / 'chat'})" if chat else "")
        + (f", preference-tuned {out / 'dpo'}" if preferences else "")
    )
    return summary


CHAT_QUESTIONS = ["What does json.dumps() do?", "What does os.path.join() do?"]


def run_demo_chat(out: Path, pretrain_values: dict[str, str], overrides: dict[str, str] | None = None) -> dict:
    """The demo's chat stage: the standard library's instruction set, SFT of the pretrained demo model, a chat."""
    from llamita.data.demo_corpus import write_demo_chat
    from llamita.inference import LLM, SamplingParams
    from llamita.inference.chat import ChatSession
    from llamita.pretrained import load_pretrained
    from llamita.sft import sft

    conversations = write_demo_chat(out / "corpus" / "chat.jsonl")
    values = {
        "out_dir": str(out / "chat"),
        "init.from": str(out),
        "sft.data": f"['{conversations}']",
        **{k: v for k, v in pretrain_values.items() if k == "train.dtype"},
        **(overrides or {}),
    }
    cfg = load_config("sft-demo", values)
    print(f"[6/7] chat: fine-tuning the demo model on {conversations} (zephyr template) for {cfg.sft.epochs:g} epochs")
    result = sft(cfg)
    pre = load_pretrained(out / "chat")
    llm = LLM(pre.model, pre.tokenizer, max_batch=1)
    for question in CHAT_QUESTIONS:
        session = ChatSession(llm, SamplingParams(temperature=0.0, max_tokens=60))
        print(f"you> {question}\nassistant> {''.join(session.reply(question))}")
    return {k: result[k] for k in ("step", "loss", "val_loss") if k in result}


DEMO_PAIRS = 600
"""Preference pairs of the demo's DPO stage: the first of `write_demo_preferences`' (about 1,300)."""


def run_demo_dpo(out: Path, pretrain_values: dict[str, str], overrides: dict[str, str] | None = None) -> dict:
    """The demo's preference stage: pairs from the standard library's documentation (chosen: what a function does,
    from its docstring; rejected: its call signature, which does not answer the question), DPO of the chat model,
    and its held-out preference accuracy (the share of held-out pairs whose chosen answer it finds likelier) before
    and after."""
    from llamita.chat.preference_objective import preference_accuracy
    from llamita.data.demo_corpus import write_demo_preferences
    from llamita.dpo import build_preference_data, dpo
    from llamita.pretrained import load_pretrained
    from llamita.sft import chat_tokenizer

    pairs = write_demo_preferences(out / "corpus" / "preferences.jsonl", max_pairs=DEMO_PAIRS)
    values = {
        "out_dir": str(out / "dpo"),
        "init.from": str(out / "chat"),
        "dpo.data": f"['{pairs}']",
        **{k: v for k, v in pretrain_values.items() if k == "train.dtype"},
        **(overrides or {}),
    }
    cfg = load_config("dpo-demo", values)
    quiet = lambda *args, **kwargs: None  # noqa: E731 - the entry reports the data itself
    tokenizer, template = chat_tokenizer(cfg, cfg.dpo.template, quiet)
    _, held_out, _ = build_preference_data(cfg, tokenizer, template, quiet)

    def accuracy(run: Path) -> float:
        model = load_pretrained(run).model
        return preference_accuracy(model, held_out, batch_size=16, device=model.lm_head.weight.device)

    before = accuracy(out / "chat")
    print(f"[7/7] preferences: DPO of the chat model on {pairs} ({cfg.dpo.loss} loss, beta {cfg.dpo.beta:g})")
    result = dpo(cfg)
    after = accuracy(out / "dpo")
    print(
        f"held-out preference accuracy (the chosen answer the likelier, {len(held_out.pair_ids)} pairs): "
        f"{100 * before:.1f}% -> {100 * after:.1f}%"
    )
    keys = ("step", "loss", "val_loss", "val_rewards/accuracies", "val_rewards/margins")
    return {**{k: result[k] for k in keys if k in result}, "accuracy_before": before, "accuracy_after": after}
