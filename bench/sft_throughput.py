"""SFT training throughput: llamita's packed chat rows against its own pretraining rows and TRL's SFTTrainer.

TinyLlama-1.1B shape, rows of 2048 tokens, micro-batch 8, bf16, loss on assistant tokens only, on synthetic
conversations with UltraChat-200k-like turn lengths (`conversations`: 1 + Poisson(2.3) exchanges, capped at 8;
user turns lognormal around 80 tokens, assistant turns around 250, sigma 0.7 / 0.6; about 1,350 tokens per
conversation, as UltraChat-200k's ~1.4k with Llama's tokenizer). Every system trains the same conversations from
the same initial weights; each runs in its own process.

    PYTHONPATH=src python3 bench/sft_throughput.py --out out/sft            # one GPU: llamita (+ TRL if installed)
    PYTHONPATH=src python3 bench/sft_throughput.py --smoke --out /tmp/sft   # a CPU check of the script

TRL (trl, datasets and their missing dependencies) is carried as wheels; see bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
SEED = 0
MARK = 4  # per turn: role marker and newline before the text, end-of-turn and newline after it (zephyr-like)


def conversations(n: int, vocab: int, scale: float = 1.0, seed: int = SEED) -> list[tuple[list[int], list[bool]]]:
    """Synthetic conversations: token ids and, per id, whether it is an assistant token (trained); `scale` shrinks
    the turns (the CPU smoke run)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids: list[int] = []
        trained: list[bool] = []
        for _ in range(min(8, 1 + rng.poisson(2.3))):
            for role, median, sigma in (("user", 80, 0.7), ("assistant", 250, 0.6)):
                n_text = int(np.clip(scale * rng.lognormal(np.log(median), sigma), 4, 1500))
                turn = rng.integers(10, vocab, n_text + MARK).tolist()
                ids += turn
                trained += [False] * 2 + [role == "assistant"] * (n_text + 2)  # text + end-of-turn are trained
        out.append((ids, trained))
    return out


def run_llamita(spec: dict) -> dict:
    """llamita as `llamita sft` runs it (packed rows with document masks) or as pretraining runs (plain rows)."""
    import torch

    from llamita.chat.packing import Example, fit_length, pack
    from llamita.config import OptimConfig, ParallelConfig
    from llamita.model import get_preset
    from llamita.pretrain import build_model
    from llamita.train.copies import ComputeCopies
    from llamita.train.optim import build_optimizer, clipped_step, gradient_norm
    from llamita.train.parallel import parallelize

    device = torch.device(spec["device"])
    config = get_preset(spec["preset"])
    seq, batch = spec["seq_len"], spec["batch"]
    convs = conversations(spec["conversations"], config.vocab_size, spec["seq_len"] / 2048)
    examples = [fit_length(Example(tuple(i), tuple(t)), seq, "truncate") for i, t in convs]
    rows, stats = pack([e for e in examples if e is not None], seq, pad_id=2)
    model = build_model(config, device, SEED)
    parallelize(model, ParallelConfig(fsdp="off", compile=spec["compile"]), None, device, param_dtype=torch.bfloat16)
    copies = ComputeCopies(model, torch.bfloat16) if device.type == "cuda" else None
    optimizer = build_optimizer(model, OptimConfig(lr=2e-5, weight_decay=0.0), device, copies)
    no_skip = torch.zeros((), device=device)
    packed = spec["mode"] == "packed"
    steps = spec["warmup"] + spec["steps"]
    index = torch.arange(steps * batch) % len(rows)
    tensors = [torch.from_numpy(a) for a in (rows.inputs, rows.targets, rows.positions)]
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if copies is None
        else torch.autocast(device.type, enabled=False)
    )

    def step(i: int) -> torch.Tensor:
        inputs, targets, positions = (t[index[i * batch : (i + 1) * batch]].to(device) for t in tensors)
        if not packed:  # pretraining rows: every next token a target, no document boundaries
            targets = torch.roll(inputs, -1, dims=1)
        with autocast:
            loss = model(inputs, targets=targets, positions=positions if packed else None)
        loss.backward()
        clipped_step(optimizer, gradient_norm(optimizer), 1.0, no_skip)
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return _timed(step, spec, device) | {
        "packing_efficiency": stats.efficiency(seq),
        "trained_token_share": stats.trained_tokens / max(1, stats.tokens),
        "rows": len(rows),
    }


def run_trl(spec: dict) -> dict:
    """TRL's SFTTrainer on the same conversations (pre-tokenized; packing `bfd` or `wrapped`; assistant tokens)."""
    import datasets
    import torch
    import transformers
    import trl

    from llamita.model import get_preset
    from llamita.pretrain import build_model

    device = torch.device(spec["device"])
    config = get_preset(spec["preset"])
    convs = conversations(spec["conversations"], config.vocab_size, spec["seq_len"] / 2048)
    data = datasets.Dataset.from_dict(
        {"input_ids": [i for i, _ in convs], "completion_mask": [[int(t) for t in m] for _, m in convs]}
    )
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf_config_dict()))
    hf.load_state_dict(build_model(config, torch.device("cpu"), SEED).state_dict(), strict=False)
    hf = hf.to(device)
    args = trl.SFTConfig(
        output_dir=spec["tmp"], per_device_train_batch_size=spec["batch"], max_length=spec["seq_len"],
        packing=True, packing_strategy=spec["packing"], completion_only_loss=True, bf16=device.type == "cuda",
        learning_rate=2e-5, max_steps=spec["warmup"] + spec["steps"], logging_steps=1000, save_strategy="no",
        report_to=[], dataloader_num_workers=0, use_cpu=device.type != "cuda",
    )  # fmt: skip
    times: list[float] = []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    # The data is tokenized already; TRL still wants a tokenizer (padding id, saving): a word-level stand-in.
    import tokenizers

    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t2", eos_token="t2", bos_token="t1")
    trainer = trl.SFTTrainer(model=hf, args=args, train_dataset=data, processing_class=tok, callbacks=[Clock()])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    timed = times[spec["warmup"] :]
    seconds = timed[-1] - timed[0]
    out = {"tokens_per_s": (len(timed) - 1) * spec["batch"] * spec["seq_len"] / seconds, "steps_timed": len(timed) - 1}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out["versions"] = {"trl": trl.__version__, "transformers": transformers.__version__}
    return out


def _timed(step: Any, spec: dict, device: Any) -> dict:
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(spec["warmup"]):
        step(i)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(spec["warmup"], spec["warmup"] + spec["steps"]):
        loss = step(i)
    sync()
    seconds = time.perf_counter() - t0
    out = {"tokens_per_s": spec["steps"] * spec["batch"] * spec["seq_len"] / seconds, "loss_last": float(loss)}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def _isolated(name: str, spec: dict, run: Callable[[dict], dict], queue: Any) -> None:
    try:
        queue.put((name, run(spec)))
    except Exception as e:  # a peer that cannot run here is reported in the table, not fatal
        queue.put((name, {"error": f"{type(e).__name__}: {e}"[:500], "trace": traceback.format_exc()[-2000:]}))


def _runner(name: str) -> Callable[[dict], dict]:
    return run_trl if name.startswith("trl") else run_llamita


def run_systems(
    names: list[str], specs: dict[str, dict], runner: Callable[[str], Callable[[dict], dict]], shape: dict, out: Path
) -> dict:
    """Run each named system in a fresh spawned process (its own GPU memory and compile caches) with its spec,
    printing each result as it comes; write the record (date, commit, shape, results) to `out` and return it."""
    results = {}
    ctx = mp.get_context("spawn")
    for name in names:
        queue = ctx.Queue()
        proc = ctx.Process(target=_isolated, args=(name, specs[name], runner(name), queue))
        proc.start()
        proc.join()
        results[name] = queue.get()[1] if not queue.empty() else {"error": f"exit code {proc.exitcode}"}
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "trace"}), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    record = {"date": time.strftime("%Y-%m-%d"), "commit": commit.strip(), "shape": shape, "results": results}
    out.write_text(json.dumps(record, indent=1) + "\n")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="the debug preset on a CPU, 2 steps each")
    parser.add_argument("--systems", default="pretrain-rows,sft-packed,trl-bfd,trl-wrapped")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = {"preset": "tinyllama-1.1b", "seq_len": 2048, "batch": 8, "warmup": 5, "steps": 20, "conversations": 3000,
            "device": "cuda", "compile": True, "tmp": str(args.out / "trl")}  # fmt: skip
    if args.smoke:
        base |= {"preset": "debug", "seq_len": 128, "batch": 2, "warmup": 1, "steps": 2, "conversations": 40,
                 "device": "cpu", "compile": False}  # fmt: skip
    specs = {
        "pretrain-rows": base | {"mode": "rows"},
        "sft-packed": base | {"mode": "packed"},
        "trl-bfd": base | {"packing": "bfd"},
        "trl-wrapped": base | {"packing": "wrapped"},
    }
    record = run_systems(args.systems.split(","), specs, _runner, base, args.out / "sft_throughput.json")
    print(table(record))


def table(record: dict) -> str:
    rows = record["results"]
    ref = rows.get("pretrain-rows", {}).get("tokens_per_s")
    lines = [
        "| system | tokens/s | vs llamita pretraining | peak GiB | packing efficiency |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:120]} | | | |")
            continue
        tps = r["tokens_per_s"]
        lines.append(
            f"| {name} | {tps:,.0f} | {f'{tps / ref:.3f}x' if ref else '-'} | {r.get('peak_gib', float('nan')):.1f} | "
            f"{r.get('packing_efficiency', float('nan')):.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
