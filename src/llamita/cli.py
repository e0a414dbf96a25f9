"""The `llamita` command: a table of subcommands, each parsing its arguments and calling one entry function."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any

from llamita.config import ConfigError, RunConfig, iter_fields, to_dict


def _type_name(tp: object) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "|".join(map(str, typing.get_args(tp)))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


@functools.cache
def _config_help() -> str:
    """The config keys with their types, defaults and docs: the epilog of pretrain, sft and dpo (built once)."""
    defaults = to_dict(RunConfig())
    lines = ["config keys (override any with --KEY VALUE, e.g. --optim.lr 3e-4; defaults before the recipe's):"]
    for key, tp, doc in iter_fields():
        default: object = defaults
        for part in key.split("."):
            default = default[part]  # type: ignore[index]
        lines.append(f"  --{key} ({_type_name(tp)}, default {json.dumps(default)}): {doc}")
    return "\n".join(lines)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option with a default ends its help with it; descriptions and epilogs keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        default = action.default
        shown = not (default is None or default is False or default is argparse.SUPPRESS or action.required)
        return f"{help} (default: %(default)s)" if shown and "%(default)" not in help else help


def parse_overrides(args: list[str]) -> dict[str, str]:
    """Turn ["--optim.lr", "3e-4", "--train.max_steps=10"] into {"optim.lr": "3e-4", "train.max_steps": "10"}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key value")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} has no value")
            value = args[i + 1]
            i += 2
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------ commands
def cmd_train_tokenizer(args: argparse.Namespace) -> None:
    from llamita.data.sources import expand_inputs
    from llamita.tokenizer import train_tokenizer

    existing = Path(args.out) / "tokenizer.json"
    if existing.is_file() and not args.force:
        raise FileExistsError(
            f"{existing} already exists (data prepared with it would no longer match); choose another --out, or "
            "pass --force to replace it"
        )
    found = expand_inputs(args.input)
    if found.skipped_total:
        print(f"llamita train-tokenizer: {found.skipped_summary()}", file=sys.stderr)
    tok = train_tokenizer(found.files, args.vocab_size, Path(args.out), text_field=args.text_field)
    print(f"trained a {tok.vocab_size}-token BPE tokenizer on {len(found.files)} file(s) -> {args.out}")


def cmd_prepare(args: argparse.Namespace) -> None:
    from llamita.data.prepare import prepare_source

    manifest = prepare_source(
        args.name,
        args.input,
        Path(args.tokenizer),
        Path(args.out),
        text_field=args.text_field,
        shard_tokens=args.shard_tokens,
        val_fraction=args.val_fraction,
        workers=args.workers,
        seed=args.seed,
    )
    totals = manifest["totals"]
    print(json.dumps(totals, indent=1))


def cmd_train(args: argparse.Namespace, extra: list[str]) -> None:
    """`pretrain`, `sft` and `dpo`: a recipe plus dotted overrides, one entry function each."""
    from llamita.config import load_config

    if args.command == "sft":
        from llamita.sft import sft as entry
    elif args.command == "dpo":
        from llamita.dpo import dpo as entry
    else:
        from llamita.pretrain import pretrain as entry

    cfg = load_config(args.config, parse_overrides(extra))
    result = entry(cfg)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every process returns the same result
        print(json.dumps(result, indent=1))


def _sampling_llm(args: argparse.Namespace, **engine: Any) -> tuple[Any, Any]:
    """`generate`'s and `chat`'s engine (an `LLM`) and sampling settings; the settings are checked before it loads."""
    from llamita.inference import LLM, SamplingParams
    from llamita.train.parallel import pick_device

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    params = SamplingParams(
        max_tokens=args.max_new_tokens,
        temperature=0.0 if args.greedy else args.temperature,
        top_k=args.top_k,
        top_p=1.0 if args.top_p is None else args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
    )
    device = pick_device(args.device, option="--device")
    llm = LLM(args.checkpoint, device=device, compile=args.compile, quantize=args.quantize, fuse=args.fuse, **engine)
    return llm, params


def cmd_chat(args: argparse.Namespace) -> None:
    from llamita.inference.chat import ChatSession, run_terminal

    llm, params = _sampling_llm(args, max_batch=1)
    session = ChatSession(llm, params, system=args.system)
    if args.prompt is None:
        run_terminal(session)
        return
    for piece in session.reply(args.prompt):
        print(piece, end="", flush=True)
    print()


def cmd_evaluate(args: argparse.Namespace) -> None:
    from llamita.evaluate import run
    from llamita.evaluate.report import compare
    from llamita.train.parallel import pick_device

    if args.compare:
        print(compare(*args.compare))
        return
    if not args.checkpoint:
        raise ConfigError("--checkpoint is required (or --compare A.json B.json)")
    if args.tasks and args.text:
        raise ConfigError("--tasks and --text are separate evaluations; run them one at a time")
    for flag, value in [("--num-fewshot", args.num_fewshot), ("--batches", args.batches),
                        ("--batch-size", args.batch_size), ("--seq-len", args.seq_len)]:  # fmt: skip
        if value < 0:
            raise ConfigError(f"{flag} must be >= 0, got {value}")
    if args.limit is not None and not args.limit > 0:
        raise ConfigError(f"--limit must be > 0 (below 1: a fraction of each task), got {args.limit}")
    task_data = dict(item.split("=", 1) for item in args.data or [] if "=" in item)
    shard_dirs = [item for item in args.data or [] if "=" not in item]
    if (args.tasks and shard_dirs) or (not args.tasks and task_data):
        raise ConfigError("--data takes TASK=PATH with --tasks, and prepared source directories without it")
    device = pick_device(args.device, option="--device")
    if args.tasks:
        markdown = run.run_tasks(
            args.checkpoint,
            run.task_paths([t for t in args.tasks.split(",") if t], task_data),
            device=device,
            dtype=run.resolve_dtype(args.dtype, device),
            num_fewshot=args.num_fewshot,
            limit=args.limit or None,
            batch_size=args.batch_size or 32,
            out=args.out,
        )
        print(markdown)
    elif args.text:
        dtype = run.resolve_dtype(args.dtype, device)
        result = run.run_text(
            args.checkpoint, args.text, device=device, dtype=dtype, batch_size=args.batch_size or 8, out=args.out
        )
        print(json.dumps(result, indent=1))
    else:
        result = run.run_shards(
            args.checkpoint,
            shard_dirs,
            device=device,
            split=args.split,
            seq_len=args.seq_len,
            batch_size=args.batch_size or 8,
            batches=args.batches,
            out=args.out,
        )
        print(json.dumps(result, indent=1))


def cmd_generate(args: argparse.Namespace) -> None:
    from llamita.inference.prompts_file import generate_file

    if (args.prompt is None) == (args.prompts is None):
        raise ConfigError("give --prompt TEXT (streamed to stdout) or --prompts FILE.jsonl (a JSONL of completions)")
    engine = _engine_settings(args)
    if args.prompt is not None:
        engine["max_batch"] = 1
    elif args.max_batch is not None:
        engine["max_batch"] = args.max_batch
    llm, params = _sampling_llm(args, draft=args.draft, **engine)
    if args.prompts is not None:
        generate_file(llm, params, Path(args.prompts), Path(args.out) if args.out else None)
    else:
        _generate_one(llm, params, args.prompt)
    stats = llm.engine.stats
    if stats.target_steps:
        print(
            f"llamita generate: speculative decoding kept {stats.acceptance_rate:.0%} of the drafted tokens, "
            f"{stats.tokens_per_target_step:.2f} tokens per step of the model",
            file=sys.stderr,
        )


def _engine_settings(args: argparse.Namespace) -> dict[str, Any]:
    """`generate`'s and `serve`'s --draft, --speculate, --gamma, --overlap and --single-row as engine settings."""
    if args.draft and args.speculate == "ngram":
        raise ConfigError("--draft and --speculate ngram are two kinds of speculative decoding; choose one")
    engine: dict[str, Any] = {"gamma": args.gamma, "overlap": args.overlap, "single_row": args.single_row}
    if args.draft or args.speculate:
        engine["speculate"] = "draft" if args.draft else "ngram"
    return engine


def cmd_serve(args: argparse.Namespace) -> None:
    if args.api_server_count < 1:
        raise ConfigError(f"--api-server-count must be >= 1, got {args.api_server_count}")
    if args.api_server_count == 1:
        _serve(args)
        return
    import shutil
    import tempfile

    # The HTTP processes add their metrics up through files here (prometheus_client's multiprocess mode), which
    # it reads when it is imported: before the server's modules are.
    shared = tempfile.mkdtemp(prefix="llamita-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = shared
    try:
        _serve(args)
    finally:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
        shutil.rmtree(shared, ignore_errors=True)


def _serve(args: argparse.Namespace) -> None:
    try:
        from llamita.inference.server import ServerConfig, serve
    except ImportError as e:
        if e.name not in ("fastapi", "starlette", "uvicorn", "prometheus_client", "pydantic"):
            raise
        raise ConfigError(
            f"serving needs the serve extra ({e.name} is not installed): pip install 'llamita[serve]'"
        ) from None
    from llamita.inference import LLM
    from llamita.train.parallel import pick_device

    config = ServerConfig(
        host=args.host, port=args.port, model_name=args.served_model_name or args.checkpoint, api_key=args.api_key,
        max_queue=args.max_queue, request_timeout=args.request_timeout, shutdown_grace=args.shutdown_grace,
        stream_interval=args.stream_interval, log_level=args.log_level,
    )  # fmt: skip
    engine = _engine_settings(args)
    for flag, value in [("--max-batch", args.max_batch), ("--max-seq-len", args.max_seq_len)]:
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    device = pick_device(args.device, option="--device")
    settings = dict(
        device=device, dtype=args.dtype, draft=args.draft, compile=args.compile,
        max_batch=args.max_batch, max_seq_len=args.max_seq_len, prefix_cache=args.prefix_cache,
        quantize=args.quantize, fuse=args.fuse,
        prefill_interval=args.prefill_interval, prefill_graphs=args.prefill_graphs,
        packed_prefill=args.packed_prefill, decode_attention=args.decode_attention, **engine,
    )  # fmt: skip
    if args.engine_process or args.api_server_count > 1:
        from llamita.inference.engine_process import EngineProcess

        llm = {"model": args.checkpoint, **settings}
        serve(EngineProcess(llm, stream_interval=args.stream_interval, fronts=args.api_server_count), config)
    else:
        serve(LLM(args.checkpoint, **settings), config)


def _generate_one(llm: Any, params: Any, prompt: str) -> None:
    """One prompt: its text, then the continuation streamed as it is sampled, to stdout."""
    prompt_ids = llm.tokenizer.encode(prompt, bos=True)
    context = llm.engine.seq_len
    if len(prompt_ids) >= context:
        raise ConfigError(
            f"--prompt is {len(prompt_ids)} tokens long but the model's context is {context} tokens (one is "
            "needed for the continuation); shorten it"
        )
    new: list[int] = []

    def tokens() -> Any:
        for token in llm.stream(prompt_ids, params):
            new.append(token)
            yield token

    from llamita.inference.text import text_pieces

    # Decoding prompt and continuation together keeps the space a continuation starts with (as transformers does).
    for piece in text_pieces(llm.tokenizer, tokens(), prefix=prompt_ids, show_prefix=True):
        print(piece, end="", flush=True)
    print()
    if len(new) < params.max_tokens and new[-1] != llm.tokenizer.eos_id:
        print(
            f"llamita generate: stopped after {len(new)} of {params.max_tokens} new tokens: the prompt "
            f"({len(prompt_ids)} tokens) and the continuation filled the model's context of {context} tokens",
            file=sys.stderr,
        )


def cmd_demo(args: argparse.Namespace) -> None:
    from llamita.demo import run_demo

    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    if args.corpus_mb is not None and not args.corpus_mb > 0:
        raise ConfigError(f"--corpus-mb must be > 0, got {args.corpus_mb}")
    run_demo(Path(args.out), max_steps=args.steps, corpus_mb=args.corpus_mb)


def cmd_export_hf(args: argparse.Namespace) -> None:
    from llamita.interop import export_hf

    if args.max_shard_gb <= 0:
        raise ConfigError(f"--max-shard-gb must be > 0, got {args.max_shard_gb}")
    if args.adapter:
        from llamita.chat.lora import export_run_adapter

        out = export_run_adapter(args.checkpoint, args.out, args.dtype, force=args.force)
        print(f"wrote a peft LoRA adapter directory ({args.dtype}) -> {out} (its base: the run's init.from)")
        return
    out = export_hf(
        args.checkpoint, args.out, args.dtype, max_shard_bytes=int(args.max_shard_gb * 10**9), force=args.force
    )
    print(f"wrote a Hugging Face LlamaForCausalLM directory ({args.dtype}) -> {out}")


def cmd_export_gguf(args: argparse.Namespace) -> None:
    from llamita.interop import export_gguf

    out = export_gguf(args.checkpoint, args.out, args.dtype, force=args.force)
    print(f"wrote a llama.cpp GGUF file ({args.dtype}) -> {out}")


def cmd_import_hf(args: argparse.Namespace) -> None:
    from llamita.interop import import_hf

    folder = import_hf(args.model, args.out)
    print(f"imported {args.model} -> {folder} (use --checkpoint {args.out})")


def cmd_plan(args: argparse.Namespace) -> None:
    from llamita.plan import laws, questions

    q = args.question
    if q == "optimal":
        title, answer = (
            "compute-optimal model",
            questions.optimal(laws.get_law(args.law), flops=args.flops, loss=args.loss),
        )
    elif q == "inference":
        title = f"inference-aware model for {args.inference_tokens:g} inference tokens"
        answer = questions.inference(
            laws.get_law(args.law), inference_tokens=args.inference_tokens, loss=args.loss, params=args.params
        )
    elif q == "cost":
        model = questions.model_of(args.preset, args.params)
        tokens_per_s, source = _plan_throughput(args, model)
        title = "training time and cost"
        answer = questions.cost(
            model,
            tokens=args.tokens,
            gpus=args.gpus,
            tokens_per_s_per_gpu=tokens_per_s,
            throughput_source=source,
            price_per_gpu_hour=args.price,
            seq_len=args.seq_len,
        )
    elif q == "memory":
        title = f"memory per GPU ({args.preset}, seq {args.seq_len}, micro-batch {args.micro_batch})"
        answer = questions.memory(
            questions.model_of(args.preset, None),
            gpu=args.gpu,
            seq_len=args.seq_len,
            micro_batch=args.micro_batch,
            fsdp_degree=args.fsdp,
            activation_checkpoint=args.activation_checkpoint,
            float8=args.float8,
            compile=not args.eager,
        )
    elif q == "serve":
        title = "serving cost"
        answer = questions.serve(args.tokens_per_s, price_per_gpu_hour=args.price, gpus=args.gpus)
    elif q == "fit":
        title = f"scaling law fitted to {len(args.runs)} run(s)"
        answer = questions.fit(args.runs, args.out, bootstrap=args.bootstrap)
    else:  # plot
        law = laws.get_law(args.law)
        planned = tuple(map(float, args.planned.split(","))) if args.planned else None
        if planned is not None and len(planned) != 2:
            raise ConfigError(f"--planned takes N,D (parameters,tokens), got {args.planned!r}")
        out = laws.iso_loss_plot(law, args.out, planned=planned, inference_tokens=args.inference_tokens)
        title, answer = "iso-loss plot", {"law": law.name, "plot": str(out)}
    print(json.dumps(answer, indent=1, default=str) if args.json else questions.render(title, answer))


def _plan_throughput(args: argparse.Namespace, model: object) -> tuple[float, str]:
    """The per-GPU tokens/s of `plan cost`: stated, read from a bench results file, or measured here."""
    given = [x for x in (args.tokens_per_s, args.throughput, args.measure or None) if x is not None]
    if len(given) != 1:
        raise ConfigError("give the throughput one way: --tokens-per-s X, --throughput BENCH.json, or --measure")
    if args.tokens_per_s is not None:
        return args.tokens_per_s, "stated (--tokens-per-s)"
    if args.throughput is not None:
        from llamita.plan.cost import throughput_from_bench
        from llamita.plan.gpus import parse_gpus

        found = throughput_from_bench(args.throughput, args.system)
        if not args.gpus.strip().isdigit():
            family = parse_gpus(args.gpus)[1].name.split("-")[0]
            if family not in found.device:
                raise ConfigError(
                    f"--throughput: {found.run} was measured on {found.device}, not on {family}; a throughput does "
                    f"not carry over between GPUs: give --tokens-per-s measured on {family}, or --gpus with its count"
                )
        return found.tokens_per_s, f"{found.path}: {found.run} ({found.device})"
    if args.preset is None:
        raise ConfigError("--measure runs a preset's shape: give --preset")
    from llamita.plan.measure import measure_throughput

    found = measure_throughput(args.preset, seq_len=args.seq_len or 2048, micro_batch=args.micro_batch)
    return found.tokens_per_s, f"measured here ({found.device}, {found.steps} steps of llamita pretrain)"


def user_errors() -> tuple[type[Exception], ...]:
    """Errors caused by input or configuration: printed as one line, without a traceback."""
    from llamita.data.shards import ShardError
    from llamita.data.sources import SourceError
    from llamita.interop.gguf import GGUFExportError
    from llamita.interop.hf import HFFormatError
    from llamita.plan.errors import PlanError
    from llamita.train.checkpoint import CheckpointError

    return (
        PlanError,
        ConfigError,
        FileNotFoundError,
        FileExistsError,
        SourceError,
        ShardError,
        CheckpointError,
        HFFormatError,
        GGUFExportError,
    )


# ------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llamita",
        description="Train, evaluate and sample small Llama-architecture language models.",
        epilog="pipeline: train-tokenizer -> prepare -> pretrain -> evaluate / generate; `llamita demo` runs it all",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = _HelpFormatter

    p = sub.add_parser(
        "train-tokenizer", formatter_class=fmt, help="train a Llama-style BPE tokenizer (byte fallback) on text files"
    )
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="files, directories or globs (.txt[.gz|.zst], .jsonl[.gz|.zst], .parquet)",
    )
    p.add_argument("--vocab-size", type=int, default=32000, help="vocabulary size including special and byte tokens")
    p.add_argument("--text-field", default="text", help="JSON/parquet field holding the text")
    p.add_argument("--out", required=True, help="output directory (loadable by transformers.AutoTokenizer)")
    p.add_argument("--force", action="store_true", help="replace a tokenizer already in --out")
    p.set_defaults(func=cmd_train_tokenizer)

    p = sub.add_parser(
        "prepare",
        formatter_class=fmt,
        help="tokenize a source into token shards with a manifest and a validation split (rerun to resume)",
    )
    p.add_argument("--name", required=True, help="source name used in the mixture (e.g. slimpajama)")
    p.add_argument("--input", nargs="+", required=True, help="files, directories or globs")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory")
    p.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    p.add_argument("--text-field", default="text", help="JSON/parquet field holding the text (Starcoderdata: content)")
    p.add_argument("--shard-tokens", type=int, default=2**24, help="tokens per shard")
    p.add_argument("--val-fraction", type=float, default=0.001, help="fraction of documents held out for validation")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser(
        "pretrain",
        formatter_class=fmt,
        help="pretrain a model from a YAML recipe plus --section.key overrides",
        epilog=_config_help(),
    )
    p.add_argument("--config", help="recipe file or bundled recipe name (demo, debug, tinyllama-1.1b)")
    p.set_defaults(func=cmd_train, takes_overrides=True)

    p = sub.add_parser(
        "sft",
        formatter_class=fmt,
        help="fine-tune a model on conversations (chat template, packed rows, optional LoRA)",
        description="Supervised fine-tuning of --init.from (a llamita run or checkpoint, or an HF Llama directory) on "
        "the conversations of --sft.data, through the pretraining trainer: every `pretrain` key applies, plus the "
        "sft.* and lora.* keys below.",
        epilog=_config_help(),
    )
    p.add_argument("--config", help="recipe file or bundled recipe name (sft-zephyr, sft-debug)")
    p.set_defaults(func=cmd_train, takes_overrides=True)

    p = sub.add_parser(
        "dpo",
        formatter_class=fmt,
        help="preference-tune a model on chosen/rejected pairs (DPO, IPO, hinge, SimPO; reference log-probs once)",
        description="Preference tuning of --init.from (an SFT run, a checkpoint or an HF Llama directory) on the pairs "
        "of --dpo.data, through the pretraining trainer: every `pretrain` key applies, plus the dpo.* and lora.* keys "
        "below.",
        epilog=_config_help(),
    )
    p.add_argument("--config", help="recipe file or bundled recipe name (dpo-zephyr, dpo-debug)")
    p.set_defaults(func=cmd_train, takes_overrides=True)

    p = sub.add_parser(
        "chat",
        formatter_class=fmt,
        help="chat with a fine-tuned model in the terminal (streamed, multi-turn), or answer one --prompt",
    )
    p.add_argument("--checkpoint", required=True, help="run directory (latest checkpoint) or checkpoint folder")
    p.add_argument("--prompt", help="answer this one message and exit (for scripts)")
    p.add_argument("--system", help="system message")
    _add_sampling_options(p, max_new_tokens=256, temperature=0.7)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "evaluate",
        formatter_class=fmt,
        help="zero-shot tasks (lm-eval-exact), text perplexity / bits per byte, or validation loss on shards",
        description="Without --tasks or --text: validation loss and perplexity on held-out shards (the run's own "
        "sources by default). --tasks scores TinyLlama's suite exactly as lm-evaluation-harness 0.4 does, from "
        "local files. --compare prints two --out results side by side.",
        epilog="task data: --data TASK=PATH, a directory holding the dataset's published files (e.g. "
        "hellaswag_val.jsonl, ARC-Easy-Test.jsonl, MMLU's data/ with test/ and dev/) or Hugging Face datasets "
        "files (validation-*.parquet, save_to_disk folders); default data/eval/TASK. Nothing is downloaded.",
    )
    p.add_argument("--checkpoint", help="llamita run directory or checkpoint folder, or a Hugging Face Llama directory")
    p.add_argument(
        "--tasks", help="comma-separated: hellaswag,openbookqa,winogrande,arc_easy,arc_challenge,boolq,piqa,mmlu"
    )
    p.add_argument(
        "--num-fewshot", type=int, default=0, help="solved examples before each question (lm-eval's seed 1234)"
    )
    p.add_argument("--limit", type=float, default=None, help="documents per task (below 1: a fraction), for quick runs")
    p.add_argument(
        "--text", nargs="+", help="raw text files, directories or globs (as prepare): loss, perplexity, bits per byte"
    )
    p.add_argument(
        "--data", nargs="*", help="TASK=PATH for --tasks; otherwise prepared source directories (default: the run's)"
    )
    p.add_argument("--split", default="val", choices=["val", "train"], help="which shards to score")
    p.add_argument("--batches", type=int, default=0, help="shard batches to score (0: all)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help="sequences per batch (default 8); continuations for --tasks (default 32)",
    )
    p.add_argument("--seq-len", type=int, default=0, help="shard window length (default: the run's data.seq_len)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="weights for --tasks/--text (auto: bf16 on GPU)",
    )
    p.add_argument("--out", help="also write the result JSON here (and for --tasks a Markdown table beside it)")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="print two --out results side by side")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "generate",
        formatter_class=fmt,
        help="continue a prompt (streamed) or a JSONL file of prompts (batched), through the inference engine",
        description="One --prompt is streamed to stdout. --prompts FILE.jsonl takes one JSON object per line with a "
        '"prompt" string (its other fields are copied) and writes one per line with "completion", "finish_reason" '
        'and "new_tokens" added; bad lines are skipped and reported with their line numbers.',
    )
    p.add_argument(
        "--checkpoint", required=True, help="run directory, checkpoint folder, or Hugging Face Llama directory"
    )
    p.add_argument("--prompt", help="text to continue")
    p.add_argument("--prompts", help="a JSONL file of prompts, generated as one continuous batch")
    p.add_argument("--out", help="where --prompts writes its completions (default: stdout)")
    p.add_argument("--max-batch", type=int, default=None, help="sequences decoded together (default: 256 GPU, 16 CPU)")
    _add_engine_options(p)
    _add_sampling_options(p, max_new_tokens=100, temperature=0.8)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "serve",
        formatter_class=fmt,
        help="an OpenAI-compatible HTTP server on the engine (completions, chat, streaming; a chat page at /)",
        description="Serves /v1/models, /v1/completions, /v1/chat/completions (the checkpoint's chat template), "
        "/health, /metrics (Prometheus) and a chat page at /, with every request batched continuously in one "
        "engine. Needs the serve extra: pip install 'llamita[serve]'. SIGTERM shuts down gracefully.",
    )
    p.add_argument(
        "--checkpoint", required=True, help="run directory, checkpoint folder, or Hugging Face Llama directory"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument(
        "--api-key",
        default=os.environ.get("LLAMITA_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $LLAMITA_API_KEY; unset: no key)",
    )
    p.add_argument("--served-model-name", help="the model's id in the API (default: the --checkpoint path)")
    p.add_argument("--max-queue", type=int, default=1000, help="sequences that may wait for a slot; more: 429")
    p.add_argument(
        "--request-timeout", type=float, default=None, help="seconds a request may take, queueing included (408)"
    )
    p.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds in-flight requests get after SIGTERM")
    p.add_argument(
        "--stream-interval", type=int, default=1, help="new tokens per streamed chunk (first and last at once)"
    )
    p.add_argument(
        "--prefill-graphs", action=argparse.BooleanOptionalAction, default=None,
        help="replay small prefill forwards from CUDA graphs, by padded bucket (default: on a GPU with CUDA graphs)",
    )  # fmt: skip
    p.add_argument(
        "--packed-prefill", action=argparse.BooleanOptionalAction, default=None,
        help="prefill a step's prompts as one forward of one token a row, each in its own slot, through llamita's "
        "decode kernel: no padding between prompts (default: on a GPU with the kernel, --decode-attention's default)",
    )  # fmt: skip
    p.add_argument(
        "--decode-attention", choices=["sdpa", "flex", "triton"], default=None,
        help="triton: each decoding sequence reads only its own positions, through llamita's split-KV kernel; "
        "sdpa: its batch's longest, through SDPA; flex: its own, through FlexAttention, experimental on CUDA (it "
        "crashed at the TinyLlama-1.1B shape on torch 2.11) (default: triton on a GPU, sdpa on a CPU)",
    )  # fmt: skip
    p.add_argument("--max-batch", type=int, default=None, help="sequences decoded together (default: 256 GPU, 16 CPU)")
    p.add_argument("--max-seq-len", type=int, default=None, help="positions per sequence (default: the model's)")
    p.add_argument("--prefix-cache", action="store_true", help="reuse the KV of shared prompt prefixes (system prompt)")
    p.add_argument(
        "--prefill-interval", type=int, default=1,
        help="while sequences decode, prefill new prompts every N steps at most (they wait up to N - 1 steps)",
    )  # fmt: skip
    _add_engine_options(p)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="weights (auto: bf16 GPU)"
    )
    _add_quantize_option(p)
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=True, help="on a GPU, compile the decode step"
    )
    p.add_argument(
        "--engine-process", action=argparse.BooleanOptionalAction, default=False,
        help="run the engine in a process of its own, so that HTTP and the engine do not share a GIL (off until it "
        "is measured on a GPU: bench/serve_load.py --engine-process)",
    )  # fmt: skip
    p.add_argument(
        "--api-server-count", type=int, default=1,
        help="HTTP processes that share the port and one engine process (vLLM's option; above 1 the engine runs "
        "in a process of its own, as with --engine-process): more streams than one event loop can send",
    )  # fmt: skip
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "demo",
        formatter_class=fmt,
        help="the whole pipeline on the embedded corpus (Python's stdlib code and docs), CPU",
    )
    p.add_argument("--out", default="runs/demo", help="run directory")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo recipe's)")
    p.add_argument("--corpus-mb", type=float, default=None, help="cap the corpus size in MB (default: demo's)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "export", formatter_class=fmt, help="write a checkpoint as a Hugging Face directory or a llama.cpp GGUF file"
    )
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    q = formats.add_parser(
        "hf", formatter_class=fmt, help="a transformers LlamaForCausalLM directory (safetensors, config, tokenizer)"
    )
    q.add_argument("--checkpoint", required=True, help="run directory (latest checkpoint) or checkpoint folder")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weight dtype (fp32: lossless)")
    q.add_argument(
        "--max-shard-gb", type=float, default=5.0, help="largest safetensors file in GB; larger models are sharded"
    )
    q.add_argument("--force", action="store_true", help="replace a model already in --out")
    q.add_argument(
        "--adapter", action="store_true", help="a LoRA run: its adapters as a peft adapter directory (default: merged)"
    )
    q.set_defaults(func=cmd_export_hf)
    q = formats.add_parser("gguf", formatter_class=fmt, help="a llama.cpp GGUF file (weights, metadata and tokenizer)")
    q.add_argument("--checkpoint", required=True, help="run directory (latest checkpoint) or checkpoint folder")
    q.add_argument("--out", required=True, help="output .gguf file")
    q.add_argument("--dtype", default="f16", choices=["f16", "q8_0", "q4_0"], help="matrix storage type")
    q.add_argument("--force", action="store_true", help="replace --out if it exists")
    q.set_defaults(func=cmd_export_gguf)

    p = sub.add_parser(
        "import", formatter_class=fmt, help="convert a Hugging Face Llama directory into a llamita run directory"
    )
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    q = formats.add_parser(
        "hf", formatter_class=fmt, help="a transformers Llama directory (config.json, safetensors or .bin, tokenizer)"
    )
    q.add_argument("--model", required=True, help="Hugging Face model directory")
    q.add_argument("--out", required=True, help="run directory to create (a step-0 checkpoint and the tokenizer)")
    q.set_defaults(func=cmd_import_hf)
    _add_plan_parser(sub, fmt)
    return parser


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    """The options of `generate` and `serve` that `_engine_settings` reads."""
    p.add_argument("--draft", help="speculative decoding with this draft model (same tokenizer; a smaller checkpoint)")
    p.add_argument("--speculate", choices=["ngram"], help="speculative decoding by prompt lookup, no draft model")
    p.add_argument("--gamma", type=int, default=6, help="tokens drafted per speculative step")
    p.add_argument(
        "--overlap", action=argparse.BooleanOptionalAction, default=None,
        help="launch each step before the host reads the last one's tokens (EngineConfig.overlap; default: on a "
             "GPU, but with --speculate ngram)",
    )  # fmt: skip
    p.add_argument(
        "--single-row", action=argparse.BooleanOptionalAction, default=None,
        help="a decode step of one row compiled and captured apart (EngineConfig.single_row; default: on a GPU)",
    )  # fmt: skip


def _add_sampling_options(p: argparse.ArgumentParser, *, max_new_tokens: int, temperature: float) -> None:
    """The options of `generate` and `chat` that `_sampling_llm` reads."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=temperature, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling probability mass")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens less likely than this times the best one")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="above 1: seen tokens made less likely")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="-2..2, OpenAI's: subtracted from the logit "
                   "of every token the output holds")  # fmt: skip
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="-2..2, OpenAI's: subtracted once per "
                   "time the output holds the token")  # fmt: skip
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    _add_quantize_option(p)
    p.add_argument("--compile", action="store_true", help="on a GPU, compile the decode step first (pays in long runs)")


def _add_quantize_option(p: argparse.ArgumentParser) -> None:
    """`generate`'s, `chat`'s and `serve`'s --quantize and --fuse (the `LLM` options on the weights)."""
    p.add_argument(
        "--quantize", choices=["int8"], default=None,
        help="weight-only int8 Linear layers, the output head included (torchao: pip install 'llamita[quant]')",
    )  # fmt: skip
    p.add_argument(
        "--fuse", action=argparse.BooleanOptionalAction, default=None,
        help="q/k/v and gate/up as one matmul each, fewer per decode step (default: on a GPU, where the model can be)",
    )  # fmt: skip


def _add_plan_parser(sub: argparse._SubParsersAction, fmt: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser(
        "plan",
        formatter_class=fmt,
        help="how big, how long, on what, for how much: scaling laws, memory, GPU-hours and dollars",
        description="Each question prints a table (--json: the numbers). Laws: hoffmann (Chinchilla approach 3), "
        "besiroglu (its 2024 refit), or a JSON file written by `llamita plan fit`.",
    )
    questions = p.add_subparsers(dest="question", required=True, metavar="QUESTION")

    def question(name: str, help: str, law: bool = False) -> argparse.ArgumentParser:
        q = questions.add_parser(name, formatter_class=fmt, help=help)
        if law:
            q.add_argument("--law", default="hoffmann", help="hoffmann, besiroglu, or a law file from `plan fit`")
        q.add_argument("--json", action="store_true", help="print the answer as JSON")
        q.set_defaults(func=cmd_plan)
        return q

    q = question("optimal", "compute-optimal parameters and tokens for a FLOP budget or a target loss", law=True)
    q.add_argument("--flops", type=float, help="training FLOP budget (C = 6·N·D)")
    q.add_argument("--loss", type=float, help="target loss (nats/token) instead of a budget")
    q = question("inference", "least training + inference FLOPs for a loss and an inference volume", law=True)
    q.add_argument("--inference-tokens", type=float, required=True, help="tokens the model will generate or read")
    q.add_argument("--loss", type=float, help="the loss the model must reach")
    q.add_argument("--params", type=float, help="or: the loss of the compute-optimal model of this many parameters")
    q = question("cost", "GPU-hours, wall-clock hours and dollars of a run")
    q.add_argument("--preset", help="model preset (or --params)")
    q.add_argument("--params", type=float, help="parameter count, for a model that is no preset (6·N FLOPs/token)")
    q.add_argument("--tokens", type=float, required=True, help="training tokens")
    q.add_argument("--gpus", default="1", help="COUNTxGPU such as 16xA100-40G, or a count")
    q.add_argument("--tokens-per-s", type=float, help="measured training tokens/s per GPU")
    q.add_argument("--throughput", help="or: a bench/results JSON of bench/train_throughput.py")
    q.add_argument("--system", help="the run of that JSON to take (default: llamita bf16)")
    q.add_argument("--measure", action="store_true", help="or: time a short llamita pretrain of --preset here")
    q.add_argument("--seq-len", type=int, help="sequence length (attention FLOPs; --measure's shape, default 2048)")
    q.add_argument("--micro-batch", type=int, default=8, help="--measure's sequences per step")
    q.add_argument("--price", type=float, help="dollars per GPU-hour")
    q = question("memory", "memory per GPU of a training step; which GPUs it fits and the largest micro-batch")
    q.add_argument("--preset", required=True, help="model preset")
    q.add_argument("--seq-len", type=int, default=2048, help="sequence length")
    q.add_argument("--micro-batch", type=int, default=8, help="sequences per GPU per forward")
    q.add_argument("--fsdp", type=int, default=1, help="GPUs that shard weights, gradients and optimizer state")
    q.add_argument(
        "--activation-checkpoint", default="none", choices=["none", "selective", "full"], help="recomputation"
    )
    q.add_argument("--float8", action="store_true", help="float8 linears (torchao)")
    q.add_argument("--eager", action="store_true", help="blocks not compiled (parallel.compile false)")
    q.add_argument("--gpu", help="check one GPU (default: every GPU of the catalogue)")
    q = question("serve", "dollars per million generated tokens at a measured throughput")
    q.add_argument("--tokens-per-s", type=float, required=True, help="measured generation tokens/s of the GPUs")
    q.add_argument("--price", type=float, required=True, help="dollars per GPU-hour")
    q.add_argument("--gpus", type=int, default=1, help="GPUs serving")
    q = question("fit", "fit L(N, D) to your runs' validation losses (Hoffmann's approach 3, bootstrap intervals)")
    q.add_argument("runs", nargs="+", help="llamita pretrain run directories")
    q.add_argument("--out", required=True, help="law file to write (JSON; --law takes it)")
    q.add_argument("--bootstrap", type=int, default=200, help="bootstrap refits for the intervals")
    q = question("plot", "iso-loss contours with the compute-optimal line (PNG)", law=True)
    q.add_argument("--out", required=True, help="PNG file")
    q.add_argument("--planned", help="your planned point N,D (parameters,tokens)")
    q.add_argument("--inference-tokens", type=float, help="also mark the inference-aware optimum")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if getattr(args, "takes_overrides", False):
            args.func(args, extra)
        else:
            if extra:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            args.func(args)
    except user_errors() as e:
        print(f"llamita {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":  # `python -m llamita.cli`, as torchrun's `-m` launches it
    main()
