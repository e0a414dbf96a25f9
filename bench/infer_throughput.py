"""Inference throughput of llamita's engine against its peers on one GPU, TinyLlama-1.1B shape (see bench/README.md).

Group `throughput`: every system continues the same random prompts (128 tokens) by 256 greedy tokens with the same
random bf16 weights, at batch 1, 8, 64 and 256; tokens/s = batch x new tokens / wall time, prefill included, after
one untimed warm-up run at that batch (compilation and CUDA-graph capture are not timed). Systems: llamita's
`LLM.generate` (decode step compiled and replayed from CUDA graphs) in the weights' dtype and as `llamita-int8` with
weight-only int8 Linear layers (`quantize="int8"`, torchao), transformers' `generate` eager with its
dynamic cache and with its static cache + torch.compile, and gpt-fast's own `generate` from a checkout given with
`--gpt-fast PATH` (its public source; never committed here: without the path it is reported as missing). Each
system runs in its own subprocess. The bandwidth limit is the weights read once per decode step at `--bandwidth`
(for llamita-int8 its int8 weights and scales, the embedding in bf16: `llamita.inference.quantize.weight_bytes`).
llamita runs as `LLM` runs a loaded checkpoint: on a GPU with q/k/v and gate/up fused into one matmul each
(`LLM(fuse=True)`); `--systems llamita-unfused` adds it without (`fuse=False`), the A/B of that fusion, and
`llamita-in-order` with the engine's former defaults, steps in order (`overlap=False`) and batch 1 in the graph
of two rows (`single_row=False`), the A/B of both; `llamita-flex` decodes with `decode_attention="flex"` (each row
reads its own positions through FlexAttention) and `llamita-sdpa` with `decode_attention="sdpa"` (every row the
batch's longest, through SDPA; the engine's default on a GPU is llamita's split-KV kernel), the A/Bs of the decode
attention; `llamita-unpacked` prefills prompts in padded groups (`packed_prefill=False`), the A/B of the packed
prefill.
`--systems llamita-int8-tuned` adds llamita-int8 built under Inductor's coordinate-descent tuning, with which
Inductor turns a matrix-vector product (batch 1) into a reduction that reads the int8 weights directly instead of
casting them to bf16 in a kernel of their own (`torch/_inductor/decomposition.py`, `mm`); it compiles longer.

Group `speculative`: trains, within the same call, a target of the tinyllama-1.1b shape and a much smaller draft
(two narrow layers: at this scale a step costs about its kernel count, not its parameter count) on the prepared
benchmark corpus (`bench/train_throughput.py --prepare-data .benchdata`) with `llamita pretrain`, then decodes at
batch 1 held-out code prompts plainly, with the draft and with n-gram prompt lookup (on prompts that ask for code
to be repeated): tokens/s, speedup, acceptance, tokens per target step, and whether greedy output is identical.

    python bench/infer_throughput.py --gpt-fast ~/gpt-fast                      # throughput, on a CUDA GPU
    python bench/infer_throughput.py --groups speculative --data .benchdata     # speculative decoding
    python bench/infer_throughput.py --smoke                                    # tiny shapes on a CPU, end to end
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SHAPE = {"preset": "tinyllama-1.1b", "prompt": 128, "new": 256, "batches": [1, 8, 64, 256], "device": "cuda",
         "dtype": "bfloat16", "train_seq": 512, "target_steps": 80, "draft_steps": 150, "batch_tokens": 131072,
         "micro_batch": 16, "spec_prompts": 16, "spec_new": 128, "draft": {"dim": 512, "n_layers": 2, "n_heads": 8,
         "n_kv_heads": 4, "intermediate_size": 1536}}  # fmt: skip
SMOKE = {"preset": "debug", "prompt": 12, "new": 8, "batches": [1, 4], "device": "cpu", "dtype": "float32",
         "train_seq": 64, "target_steps": 3, "draft_steps": 3, "batch_tokens": 256, "micro_batch": 4,
         "spec_prompts": 2, "spec_new": 8, "draft": {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1,
         "intermediate_size": 64}}  # fmt: skip
SYSTEMS = ["llamita", "llamita-int8", "hf-eager", "hf-static-compile", "gpt-fast"]
EXTRA_SYSTEMS = [
    "llamita-int8-tuned",
    "llamita-unfused",
    "llamita-in-order",
    "llamita-flex",
    "llamita-sdpa",
    "llamita-unpacked",
]
"""Run only when `--systems` names them."""
REPEAT = "\n\n# The same code again, unchanged:\n"


# ------------------------------------------------------------------------------------------ workers
def _model(shape: dict) -> Any:
    """The preset's model with TinyLlama's random init (seed 0), on the device in the shape's dtype."""
    import torch

    from llamita.model import Llama, get_preset

    torch.manual_seed(0)
    with torch.device("meta"):
        model = Llama(get_preset(shape["preset"]))
    model.to_empty(device=shape["device"])
    model.init_weights()
    return model.to(getattr(torch, shape["dtype"])).eval()


def _timed(fn: Any, device: str) -> tuple[float, float, Any]:
    """(seconds, peak GiB, result) of fn() after one untimed warm-up call."""
    import torch

    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return seconds, peak, result


def _llamita(
    shape: dict, model: Any, prompts: Any, out: _Progress, quantize: str | None, tuned: bool, fuse: bool, settings: dict
) -> dict:
    import contextlib

    import torch._inductor.config as inductor

    from llamita.inference import LLM, SamplingParams
    from llamita.inference.quantize import weight_bytes

    cuda = shape["device"] == "cuda"
    with inductor.patch(coordinate_descent_tuning=True) if tuned else contextlib.nullcontext():
        llm = LLM(model, max_batch=max(shape["batches"]), max_seq_len=shape["prompt"] + shape["new"], compile=cuda,
                  quantize=quantize, fuse=fuse, **settings)  # fmt: skip
        out.weight_bytes = weight_bytes(llm.model)  # what a decode step reads
        params = SamplingParams(temperature=0.0, max_tokens=shape["new"], ignore_eos=True)
        for batch in shape["batches"]:
            ids = prompts[:batch].tolist()
            seconds, peak, done = _timed(lambda ids=ids: llm.generate(ids, params), shape["device"])
            assert all(len(c.token_ids) == shape["new"] for c in done)
            out[batch] = {"seconds": seconds, "peak_gib": peak}
    out["uncaptured_steps"] = llm.engine.graphs.uncaptured if llm.engine.graphs else None
    out["steps_ahead"] = f"{llm.engine.stats.ahead_steps} of {llm.engine.stats.steps}"  # EngineConfig.overlap
    return out


def _hf(shape: dict, model: Any, prompts: Any, static: bool, out: dict) -> dict:
    import torch
    import transformers

    config = transformers.LlamaConfig(**model.config.to_hf_config_dict())
    hf = transformers.LlamaForCausalLM(config).to(device=shape["device"], dtype=getattr(torch, shape["dtype"]))
    hf.load_state_dict(model.state_dict())
    hf.eval()
    kwargs: dict[str, Any] = {"max_new_tokens": shape["new"], "min_new_tokens": shape["new"], "do_sample": False,
                              "pad_token_id": 0}  # fmt: skip
    if static:
        # transformers compiles the decoding forward itself when the cache is static (its compile_config).
        kwargs["cache_implementation"] = "static"
    for batch in shape["batches"]:
        ids = prompts[:batch]

        def run(ids: Any = ids) -> Any:
            with torch.no_grad():
                return hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)

        seconds, peak, done = _timed(run, shape["device"])
        assert done.shape[1] == shape["prompt"] + shape["new"]
        out[batch] = {"seconds": seconds, "peak_gib": peak}
    return out


def _gpt_fast(shape: dict, model: Any, prompts: Any, path: str, out: dict) -> dict:
    """gpt-fast's own `generate` with its settings: decode compiled reduce-overhead + fullgraph, its inductor flags."""
    import inspect

    import torch
    import torch._inductor.config as inductor

    sys.path.insert(0, path)
    import generate as gf  # gpt-fast's generate.py

    from model import ModelArgs, Transformer  # gpt-fast's model.py

    inductor.coordinate_descent_tuning = True
    inductor.triton.unique_kernel_names = True
    inductor.fx_graph_cache = True
    c = model.config
    args = ModelArgs(block_size=c.max_seq_len, vocab_size=c.vocab_size, n_layer=c.n_layers, n_head=c.n_heads,
                     dim=c.dim, intermediate_size=c.intermediate_size, n_local_heads=c.n_kv_heads,
                     rope_base=c.rope_theta, norm_eps=c.norm_eps)  # fmt: skip
    with torch.device("meta"):
        theirs = Transformer(args)
    theirs = theirs.to_empty(device=shape["device"]).to(getattr(torch, shape["dtype"])).eval()
    gf.decode_one_token = torch.compile(gf.decode_one_token, mode="reduce-overhead", fullgraph=True)
    batched = "batch_size" in inspect.signature(gf.generate).parameters
    for batch in shape["batches"]:
        if batch > 1 and not batched:
            out[batch] = {"skipped": "this gpt-fast checkout's generate has no batch_size"}
            continue

        def run(batch: int = batch) -> Any:
            extra = {"batch_size": batch} if batched else {}
            return gf.generate(theirs, prompts[0], shape["new"], interactive=False, draft_model=None,
                               temperature=1e-5, top_k=None, **extra)  # fmt: skip

        seconds, peak, _ = _timed(run, shape["device"])
        out[batch] = {"seconds": seconds, "peak_gib": peak}
    return out


class _Progress(dict):
    """A system's results by batch, written to `path` as each batch is done: a system stopped at its time limit
    still reports the batches it finished."""

    def __init__(self, path: str, spec: dict, weight_bytes: int) -> None:
        super().__init__()
        self.path, self.spec, self.weight_bytes = path, spec, weight_bytes

    def __setitem__(self, batch: Any, r: Any) -> None:
        if isinstance(r, dict) and "seconds" in r:
            new = self.spec["shape"]["new"]
            r["tokens_per_s"] = batch * new / r["seconds"]
            r["ms_per_token"] = 1000 * r["seconds"] / new
            limit = batch * self.spec["bandwidth"] / self.weight_bytes  # every decode step reads the weights once
            r["bandwidth_share"] = r["tokens_per_s"] / limit
        super().__setitem__(batch, r)
        if self.path:
            Path(self.path).write_text(json.dumps({"partial": {str(k): v for k, v in self.items()}}))


def run_worker(spec: dict, result_path: str = "") -> dict:
    import torch

    shape = spec["shape"]
    model = _model(shape)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, model.config.vocab_size, (max(shape["batches"]), shape["prompt"]), generator=g)
    prompts = prompts.to(shape["device"])
    system = spec["system"]
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    progress = _Progress(result_path, spec, weight_bytes)
    if system.startswith("llamita"):
        quantize = "int8" if system.startswith("llamita-int8") else None
        # The random model is a `Llama` given, which LLM fuses only when asked: ask as it fuses a loaded one.
        tuned, fuse = system.endswith("-tuned"), system != "llamita-unfused" and shape["device"] == "cuda"
        settings = {"llamita-in-order": {"overlap": False, "single_row": False},
                    "llamita-flex": {"decode_attention": "flex"},
                    "llamita-sdpa": {"decode_attention": "sdpa"},
                    "llamita-unpacked": {"packed_prefill": False}}.get(system, {})  # fmt: skip
        result = _llamita(shape, model, prompts.cpu(), progress, quantize, tuned=tuned, fuse=fuse, settings=settings)
    elif system in ("hf-eager", "hf-static-compile"):
        result = _hf(shape, model, prompts, system == "hf-static-compile", progress)
    else:
        result = _gpt_fast(shape, model, prompts, spec["gpt_fast"], progress)
    result = dict(result)
    result["weight_gb"] = progress.weight_bytes / 1e9
    return {str(k): v for k, v in result.items()}


def _run_isolated(name: str, spec: dict, log: Path, timeout: float) -> dict:
    """One system in a fresh interpreter (clean GPU memory and dynamo caches); its result comes back as JSON."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = Path(f.name)
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec), "--result", str(result_path)]
    t0 = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n===== {name}: {json.dumps(spec)}\n")
        out.flush()
        try:
            rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    done = json.loads(result_path.read_text()) if result_path.stat().st_size else {}
    if rc == 0:
        result = done
    else:  # the batches it finished, and why it stopped
        result = {"error": f"exit {rc}", "log_tail": log.read_text().splitlines()[-12:]} | done.get("partial", {})
    result_path.unlink(missing_ok=True)
    result["wall_s"] = time.perf_counter() - t0
    print(f"[{name}] {'FAILED ' + result['error'] if 'error' in result else 'done'} ({result['wall_s']:.0f} s)")
    return result


# ----------------------------------------------------------------------------------------- speculative
def _pretrain(out: Path, shape: dict, data: Path, steps: int, init: Path | None) -> None:
    """A short `llamita pretrain` of the target (its preset) or of the draft (`init` weights) on the bench corpus."""
    prose, code = data / "prose", data / "code"
    sources = f"[{{name: prose, path: '{prose}', weight: 0.5}}, {{name: code, path: '{code}', weight: 0.5}}]"
    cmd = [sys.executable, "-m", "llamita.cli", "pretrain", "--config", "tinyllama-1.1b", "--out_dir", str(out),
           "--data.tokenizer", str(data / "tokenizer"), f"--data.sources={sources}",
           "--data.seq_len", str(shape["train_seq"]), "--train.global_batch_tokens", str(shape["batch_tokens"]),
           "--train.micro_batch", str(shape["micro_batch"]), "--train.max_steps", str(steps), "--train.max_tokens", "0",
           "--optim.warmup_steps", str(max(steps // 10, 1)), "--optim.lr", "1e-3", "--optim.min_lr", "1e-4",
           "--eval.interval", "0", "--checkpoint.interval", str(steps), "--log.interval", "10",
           "--log.progress", "false", "--model.preset", shape["preset"]]  # fmt: skip
    if init is not None:
        cmd += ["--init.from", str(init)]
    if shape["device"] == "cpu":
        cmd += ["--train.device", "cpu", "--train.dtype", "fp32", "--parallel.compile", "false"]
    subprocess.run(cmd, check=True)


def _draft_init(out: Path, shape: dict, vocab_size: int) -> Path:
    """A freshly initialised small model as a Hugging Face directory, for the draft's `init.from`."""
    import torch
    import transformers

    from llamita.model import Llama, ModelConfig

    config = ModelConfig(vocab_size=vocab_size, max_seq_len=shape["train_seq"], **shape["draft"])
    torch.manual_seed(0)
    model = Llama(config)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf_config_dict()))
    hf.load_state_dict(model.state_dict())
    hf.save_pretrained(out)
    return out


def _held_out_code(data: Path, n: int, length: int, bos: int) -> list[list[int]]:
    """`n` prompts of `length` tokens from the code source's validation split: each document's windows of
    2 x `length` tokens in turn, a prompt the first half of one (BOS, then the window's tokens). A split of few
    long files then still gives `n` prompts, each followed in its file by as much code as it holds."""
    import numpy as np

    from llamita.data.prepare import shard_paths
    from llamita.data.shards import read_shard

    tokens = np.concatenate([np.asarray(read_shard(p)) for p in shard_paths(data / "code", "val")])
    starts = np.flatnonzero(tokens == bos)
    prompts = []
    for a, b in zip(starts, [*starts[1:], len(tokens)]):
        for w in range(a, b - 2 * length + 1, 2 * length):
            prompts.append([bos, *tokens[w + 1 : w + length].tolist()])
    if len(prompts) < n:
        raise SystemExit(f"{data / 'code'}: its validation split gives {len(prompts)} prompts of {length} tokens, "
                         f"not {n}: prepare the data again (bench/train_throughput.py --prepare-data)")  # fmt: skip
    return prompts[:n]


def run_speculative(args: argparse.Namespace, shape: dict, out: Path, save: Any = None) -> dict:
    """The speculative group; `save(partial)` is called after the training and after each run, so that a call stopped
    from outside keeps what finished."""
    from llamita.tokenizer import Tokenizer

    data = Path(args.data) if args.data else _smoke_data(out / "data")
    tokenizer = Tokenizer.load(data / "tokenizer")
    # The trained runs (4.4 GB of target checkpoint) go outside --out, whose files a GPU call brings back.
    runs = Path(args.runs) if args.runs else Path(tempfile.mkdtemp(prefix="infer-speculative-"))
    try:
        return _speculative(args, shape, data, tokenizer, runs, save or (lambda partial: None))
    finally:
        if not args.runs:
            shutil.rmtree(runs, ignore_errors=True)


def _speculative(args: argparse.Namespace, shape: dict, data: Path, tokenizer: Any, runs: Path, save: Any) -> dict:
    import torch

    from llamita.inference import LLM, SamplingParams

    t0 = time.perf_counter()
    _pretrain(runs / "target", shape, data, shape["target_steps"], None)
    t1 = time.perf_counter()
    _pretrain(
        runs / "draft", shape, data, shape["draft_steps"], _draft_init(runs / "draft-init", shape, tokenizer.vocab_size)
    )
    t2 = time.perf_counter()
    device = torch.device(shape["device"])
    prompts = _held_out_code(data, shape["spec_prompts"], shape["prompt"], tokenizer.bos_id)
    repeat = [tokenizer.encode(tokenizer.decode(p[: shape["prompt"] // 2]) + REPEAT, bos=True) for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=shape["spec_new"])
    seq = shape["train_seq"]
    cuda = shape["device"] == "cuda"
    configs: dict[str, dict] = {"plain": {}}
    for kind in args.speculators.split(","):
        for i, gamma in enumerate(args.gamma or [None]):  # the first gamma's runs are named plainly, the others by it
            engine = {"draft": runs / "draft"} if kind.startswith("draft") else {"speculate": "ngram"}
            if kind == "draft-in-order":  # draft steps not launched ahead of the host (EngineConfig.overlap)
                engine["overlap"] = False
            configs[kind if i == 0 else f"{kind}-g{gamma}"] = engine | ({"gamma": gamma} if gamma else {})
    results: dict[str, Any] = {"train_s": {"target": t1 - t0, "draft": t2 - t1}}
    save(results)
    outputs: dict[tuple[str, str], list[list[int]]] = {}
    for name, engine in configs.items():
        llm = LLM(runs / "target", device=device, dtype=shape["dtype"], max_batch=8, max_seq_len=seq, compile=cuda,
                  **engine)  # fmt: skip
        for kind, ps in (("code", prompts), ("repeat", repeat)):
            if name.startswith("draft") and kind == "repeat" or name.startswith("ngram") and kind == "code":
                continue
            llm.generate(ps[0], params)  # warm-up
            before = llm.engine.stats.__dict__.copy()
            t = time.perf_counter()
            outs = [llm.generate(p, params)[0].token_ids for p in ps]  # batch 1, one prompt after another
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t
            s = llm.engine.stats
            drafted, kept = s.drafted_tokens - before["drafted_tokens"], s.accepted_tokens - before["accepted_tokens"]
            steps = s.target_steps - before["target_steps"]
            made = s.speculative_tokens - before["speculative_tokens"]
            results[f"{name}/{kind}"] = {
                "tokens_per_s": sum(map(len, outs)) / seconds,
                "acceptance": kept / drafted if drafted else None,
                "tokens_per_target_step": made / steps if steps else None,
            }
            outputs[name, kind] = outs
            if name != "plain":
                plain = results.get(f"plain/{kind}")
                r = results[f"{name}/{kind}"]
                r["speedup"] = r["tokens_per_s"] / plain["tokens_per_s"] if plain else None
                r["greedy_identical"] = outs == outputs.get(("plain", kind))
            # All prompts at once: past speculate_max_batch the engine decodes plainly by itself.
            t = time.perf_counter()
            total = sum(len(c.token_ids) for c in llm.generate(ps, params))
            results[f"{name}/{kind}"][f"batch_{len(ps)}_tokens_per_s"] = total / (time.perf_counter() - t)
            save(results)
    return results


def _smoke_data(out: Path) -> Path:
    """A small prepared corpus for --smoke: demo prose and code, a 512-token tokenizer."""
    from llamita.data.demo_corpus import write_demo_corpus
    from llamita.data.prepare import prepare_source
    from llamita.tokenizer import train_tokenizer

    if (out / "code" / "manifest.json").is_file():
        return out
    corpus = write_demo_corpus(out / "corpus", max_code_bytes=300_000, max_prose_bytes=100_000)
    train_tokenizer(sorted(corpus.values()), 512, out / "tokenizer")
    for name, path in corpus.items():
        prepare_source(name, [str(path)], out / "tokenizer", out / name, shard_tokens=2**16, val_fraction=0.05,
                       workers=1, progress=False)  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------- tables
def _fmt(x: Any, spec: str) -> str:
    return "—" if x is None or (isinstance(x, float) and x != x) else format(x, spec)


def tables(results: dict) -> str:
    lines = []
    shape = results["shape"]
    if "throughput" in results:
        batches = shape["batches"]
        title = f"tokens/s ({shape['prompt']}-token prompts, {shape['new']} new tokens, greedy, prefill included)"
        lines += [title, "",
                  "| system | " + " | ".join(f"batch {b}" for b in batches) + " |",
                  "|---|" + "---:|" * len(batches)]  # fmt: skip
        detail = [
            "",
            "| system | batch | tokens/s | ms/token | peak GiB | share of bandwidth limit |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for system, r in results["throughput"].items():
            finished = [b for b in batches if "tokens_per_s" in r.get(str(b), {})]
            if "skipped" in r or ("error" in r and not finished):
                lines.append(f"| {system} | {r.get('skipped') or r['error']} |")
                continue
            cells = [_fmt(r.get(str(b), {}).get("tokens_per_s"), ",.0f") for b in batches]
            if "error" in r:  # stopped after some batches: the others are marked with why
                cells = [c if b in finished else r["error"] for c, b in zip(cells, batches)]
            lines.append(f"| {system} | " + " | ".join(cells) + " |")
            for b in batches:
                x = r.get(str(b), {})
                detail.append(f"| {system} | {b} | {_fmt(x.get('tokens_per_s'), ',.0f')} | "
                              f"{_fmt(x.get('ms_per_token'), '.2f')} | {_fmt(x.get('peak_gib'), '.1f')} | "
                              f"{_fmt(x.get('bandwidth_share'), '.0%')} |")  # fmt: skip
        lines += detail
    if "speculative" in results:
        s = results["speculative"]
        lines += ["", f"speculative decoding, batch 1 (target trained {s['train_s']['target']:.0f} s, draft "
                  f"{s['train_s']['draft']:.0f} s)", "",
                  "| run | tokens/s | speedup | acceptance | tokens per target step | greedy identical |",
                  "|---|---:|---:|---:|---:|---|"]  # fmt: skip
        for name, r in s.items():
            if name == "train_s":
                continue
            lines.append(f"| {name} | {_fmt(r['tokens_per_s'], ',.0f')} | {_fmt(r.get('speedup'), '.2f')} | "
                         f"{_fmt(r['acceptance'], '.0%')} | {_fmt(r['tokens_per_target_step'], '.2f')} | "
                         f"{r.get('greedy_identical', '')} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on a CPU: every part of the script, briefly")
    parser.add_argument("--groups", default="throughput,speculative", help="comma list of throughput, speculative")
    known = SYSTEMS + EXTRA_SYSTEMS
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma list of " + ", ".join(known))
    parser.add_argument("--gpt-fast", default="", help="a checkout of github.com/pytorch-labs/gpt-fast")
    parser.add_argument("--data", default="", help="prepared corpus (bench/train_throughput.py --prepare-data)")
    parser.add_argument("--gamma", type=int, nargs="+", default=None,
                        help="tokens drafted per speculative step (default: the engine's); several: each drafter runs "
                             "at each")  # fmt: skip
    parser.add_argument("--speculators", default="draft,ngram",
                        help="comma list of draft, draft-in-order (its steps not launched ahead), ngram")  # fmt: skip
    parser.add_argument("--runs", default="", help="keep the speculative group's trained runs here (default: deleted)")
    parser.add_argument("--bandwidth", type=float, default=4.3e12, help="memory bandwidth in bytes/s (H200: 4.3e12)")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/out"), help="results folder")
    parser.add_argument("--timeout", type=float, default=400.0, help="seconds for one system")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        Path(args.result).write_text(json.dumps(run_worker(json.loads(args.worker), args.result)))
        return
    unknown = sorted(set(args.systems.split(",")) - set(known))
    if unknown:
        parser.error(f"unknown --systems {', '.join(unknown)}; choose from {', '.join(known)}")
    shape = SMOKE if args.smoke else SHAPE
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "infer_throughput.log"
    results: dict[str, Any] = {"shape": shape, "command": " ".join(sys.argv)}
    groups = args.groups.split(",")
    if "throughput" in groups:
        results["throughput"] = {}
        for system in args.systems.split(","):
            if system == "gpt-fast" and not (args.gpt_fast and (Path(args.gpt_fast) / "generate.py").is_file()):
                why = (
                    f"missing: no gpt-fast checkout at {args.gpt_fast!r}"
                    if args.gpt_fast
                    else "missing: pass --gpt-fast PATH"
                )
                results["throughput"][system] = {"skipped": why}
                print(f"[gpt-fast] {why}")
                continue
            spec = {"system": system, "shape": shape, "gpt_fast": args.gpt_fast, "bandwidth": args.bandwidth}
            results["throughput"][system] = _run_isolated(system, spec, log, args.timeout)
            _write(out, results)  # after every system: a call stopped from outside keeps what finished
    if "speculative" in groups:
        if not args.data and not args.smoke:
            parser.error("the speculative group trains on the prepared corpus: pass --data (see --help)")

        def save(partial: dict) -> None:
            results["speculative"] = partial
            _write(out, results)

        results["speculative"] = run_speculative(args, shape, out, save)
    print(_write(out, results))


def _write(out: Path, results: dict) -> str:
    """The results so far as JSON and as the markdown tables; returns the tables."""
    (out / "infer_throughput.json").write_text(json.dumps(results, indent=1))
    text = tables(results)
    (out / "infer_throughput.md").write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
