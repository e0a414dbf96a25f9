"""DPO training throughput and peak memory: llamita's tree-packed pairs against TRL's DPOTrainer, in one call.

TinyLlama-1.1B shape, bf16, DPO's sigmoid loss (beta 0.1), on synthetic preference pairs with UltraFeedback-like
lengths (`pairs`: prompt lognormal around 130 tokens, sigma 0.9; chosen around 280 and rejected around 230, sigma
0.7; an end-of-turn token closing each answer; fitted to max_length 1024 / max_prompt_length 512 as TRL truncates:
about 170 + 330 + 280 tokens per pair on average, as UltraFeedback-binarized's with Llama's tokenizer). Every system
trains the same pairs from the same initial weights; each runs in its own process. Tokens/s counts a pair's prompt
and both answers once (what the pair is, whatever a system computes for it: TRL runs the prompt twice and pads).

Systems (the table's second column says each one's activation checkpointing):
- ``llamita-precomputed``: `llamita dpo` as it runs by default: rows of 2048 slots holding pairs as trees (prompt
  once, both answers; only answer tokens through the head), the reference's log-probs computed in one pass first
  (timed on its own, `reference_seconds`), one model in memory; no activation checkpointing (bf16 compute copies).
- ``llamita-precomputed-ac``: the same with ``parallel.activation_checkpoint: full`` (``--ac selective`` for the
  selective mode): every block recomputed in backward, as TRL's gradient checkpointing recomputes every decoder
  layer. The copies cannot serve a recomputation, so `llamita dpo`'s plan (`plan_parallel`) puts FSDP2 on the one
  GPU instead, casting to bf16.
- ``llamita-lowmem``: ``llamita-precomputed-ac`` in the low-memory mode: ``train.weights: bf16`` (bf16 parameters
  and gradients, no fp32 master, updates rounded stochastically) and ``optim.name: adamw8bit`` (torchao's 8-bit
  moments): about 6 bytes of model state per parameter instead of 16, on one GPU without FSDP2 or copies.
- ``llamita-lowmem-selective``: the same with ``parallel.activation_checkpoint: selective``.
- ``llamita-lowmem-noac``, ``llamita-lowmem-noac-b1``: the low-memory mode without checkpointing, the step's rows
  as micro-batches of 2 rows (or 1) with gradient accumulation, so that the activations fit.
- ``llamita-lowmem-selective-2x4``: the low-memory mode with selective checkpointing in micro-batches of 2 rows.
- ``llamita-lowmem-noac-4x2``: the low-memory mode without checkpointing in micro-batches of 4 rows: against TRL
  without gradient checkpointing (``trl-precompute-noac``, 54.5 GiB), whose 60% leaves room for them.
- ``llamita-live``: ``llamita-precomputed`` with a frozen copy of the starting model run on every batch
  (`dpo.reference: live`; the frozen copy is never checkpointed: it runs no backward).
- ``trl-live``: TRL's DPOTrainer with a reference model (its default), bf16, pairs padded per batch, its default
  ``gradient_checkpointing=True``.
- ``trl-precompute``: TRL's DPOTrainer with ``precompute_ref_log_probs=True`` (its precomputation is timed on its
  own too), gradient checkpointing on (its default).
- ``trl-precompute-noac``: the same with ``gradient_checkpointing=False``.

Like for like in memory: ``llamita-precomputed-ac`` against ``trl-precompute``, ``llamita-precomputed`` against
``trl-precompute-noac``; ``llamita-lowmem`` against ``trl-precompute`` (TRL also loads the model in bf16).

    PYTHONPATH=src python3 bench/dpo_throughput.py --out out/dpo            # one GPU: llamita and TRL (if installed)
    PYTHONPATH=src python3 bench/dpo_throughput.py --smoke --out /tmp/dpo   # a CPU check of the script

TRL (trl, datasets and their missing dependencies) is carried as wheels; see bench/README.md; the low-memory
systems need torchao (`pip install 'llamita[quant]'`). The target (issue 14): >= 2x TRL's best tokens/s at <= 60% of
its peak memory.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sft_throughput import run_systems  # this folder: one runner for both benchmarks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
SEED = 0
EOS = 2
BETA = 0.1


def pairs(n: int, vocab: int, scale: float = 1.0, seed: int = SEED) -> list[tuple[list[int], list[int], list[int]]]:
    """Synthetic (prompt, chosen, rejected) token ids, fitted as TRL fits them; `scale` shrinks the lengths and the
    limits (the CPU smoke run)."""
    import numpy as np

    from llamita.chat.packing import Pair, fit_pair

    rng = np.random.default_rng(seed)
    max_length, max_prompt = int(1024 * scale), int(512 * scale)
    out = []
    for i in range(n):
        lengths = [int(np.clip(scale * rng.lognormal(np.log(m), s), 4, 4096)) for m, s in ((130, 0.9), (280, 0.7),
                                                                                         (230, 0.7))]  # fmt: skip
        prompt, chosen, rejected = (rng.integers(10, vocab, k).tolist() for k in lengths)
        pair = Pair(tuple(prompt), (*chosen[:-1], EOS), (*rejected[:-1], EOS), i)
        fitted = fit_pair(pair, max_length, max_prompt, "truncate")
        out.append((list(fitted.prompt), list(fitted.chosen), list(fitted.rejected)))
    return out


def _pair_tokens(data: list[tuple[list[int], ...]]) -> int:
    return sum(len(p) + len(c) + len(r) for p, c, r in data)


def run_llamita(spec: dict) -> dict:
    """llamita as `llamita dpo` runs it: trees packed in rows, the preference objective, stored or live reference;
    the model parallelized, and the live reference frozen, by `llamita dpo`'s own steps for one process."""
    import contextlib
    import copy

    import numpy as np
    import torch

    from llamita.chat.packing import Pair, pack_pairs
    from llamita.chat.preference_loss import PreferenceLoss
    from llamita.chat.preference_objective import PreferenceObjective
    from llamita.chat.reference_logps import compute_reference_logps
    from llamita.config import OptimConfig, ParallelConfig, RunConfig
    from llamita.dpo import frozen_reference
    from llamita.model import get_preset
    from llamita.pretrain import RunStart, build_model
    from llamita.sft import prepare_training
    from llamita.train.optim import clipped_step, gradient_norm
    from llamita.train.parallel import DistEnv, plan_parallel

    device = torch.device(spec["device"])
    config = get_preset(spec["preset"])
    data = pairs(spec["pairs"], config.vocab_size, spec["scale"])
    rows, stats = pack_pairs([Pair(tuple(p), tuple(c), tuple(r), i) for i, (p, c, r) in enumerate(data)],
                             spec["seq_len"], pad_id=EOS)  # fmt: skip
    cfg = RunConfig(
        out_dir=spec["tmp"],
        optim=OptimConfig(name=spec.get("optim", "adamw"), lr=5e-7, weight_decay=0.0),
        parallel=ParallelConfig(
            fsdp=spec.get("fsdp", "auto"), compile=spec["compile"], activation_checkpoint=spec["activation_checkpoint"]
        ),
    )
    cfg.train.device = spec["device"]
    cfg.train.weights = spec.get("weights", "fp32")
    # The plan `llamita dpo` makes on one GPU: bf16 compute copies, or, with activation checkpointing (which the
    # copies cannot recompute under), FSDP2 on one rank casting to bf16; on a CPU plain fp32; with bf16 weights
    # neither FSDP2 nor copies, on either.
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=device)
    start = RunStart(env, plan_parallel(cfg, env), Path(spec["tmp"]), resuming=False, branch=None)
    model = build_model(config, device, SEED)
    live = spec["mode"] == "live"
    reference = copy.deepcopy(model) if live else None
    optimizer = prepare_training(cfg, start, model)
    autocast = contextlib.nullcontext()
    if start.plan.autocast_dtype is not None:
        autocast = torch.autocast(device.type, dtype=start.plan.autocast_dtype)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if live:
        ref: Any = frozen_reference(cfg, start, reference)
        reference_seconds = 0.0
    else:
        ref = compute_reference_logps(model, [rows], len(data), batch_size=spec["batch"], device=device,
                                      autocast=autocast)  # fmt: skip
        if cuda:
            torch.cuda.synchronize()
        reference_seconds = time.perf_counter() - t0
    objective = PreferenceObjective(PreferenceLoss("sigmoid", BETA), ref)
    no_skip = torch.zeros((), device=device)
    order = np.random.default_rng(SEED).permutation(len(rows))
    batch, accum = spec["batch"], spec.get("accum", 1)
    tokens: list[int] = []

    def step(i: int) -> torch.Tensor:
        for micro in range(i * accum, (i + 1) * accum):  # `accum` forward/backward passes of `batch` rows a step
            index = order[np.arange(micro * batch, (micro + 1) * batch) % len(rows)]
            host = rows.batch(index)
            tokens.append(int((rows.pairs[index] >= 0).sum()) + int(host.pair_ids.numel()))  # +1 a pair: x[-1] twice
            with autocast:
                loss, _ = objective.loss(model, [t.to(device, non_blocking=True) for t in host])
            (loss / accum).backward()
        clipped_step(optimizer, gradient_norm(optimizer), 1.0, no_skip)
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    out = _timed(step, spec, device, lambda: sum(tokens[spec["warmup"] * accum :]))
    if spec.get("profile") and device.type == "cuda":  # where a step goes: GPU kernels by category, host waits
        from train_throughput import _profile_breakdown

        first = spec["warmup"] + spec["steps"]
        out["profile"] = _profile_breakdown(lambda n: [step(first + i) for i in range(n)], 2, host=True)
    return out | {
        "reference_seconds": reference_seconds,
        "packing_efficiency": stats.efficiency(spec["seq_len"]),
        "pairs_per_row": stats.conversations / max(1, stats.rows),
        "rows": stats.rows,
        "mean_pair_tokens": _pair_tokens(data) / len(data),
        "activation_checkpoint": spec["activation_checkpoint"],
        "micro_batch": batch,
        "accumulation": accum,
        "compute": "fsdp2" if start.plan.fsdp else "copies" if start.plan.copies else str(start.plan.compute_dtype),
        "weights": cfg.train.weights,
        "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
    }


def run_trl(spec: dict) -> dict:
    """TRL's DPOTrainer on the same pairs (as text of a word-level stand-in tokenizer whose words are the ids)."""
    import datasets
    import tokenizers
    import torch
    import transformers
    import trl

    from llamita.model import get_preset
    from llamita.pretrain import build_model

    device = torch.device(spec["device"])
    config = get_preset(spec["preset"])
    data = pairs(spec["pairs"], config.vocab_size, spec["scale"])

    def text(ids: list[int]) -> str:
        return "".join(f" t{i}" for i in ids)

    records = {"prompt": [text(p).lstrip() for p, _, _ in data], "chosen": [text(c) for _, c, _ in data],
               "rejected": [text(r) for _, _, r in data]}  # fmt: skip
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=f"t{EOS}", eos_token=f"t{EOS}",
                                               bos_token="t1")  # fmt: skip
    weights = build_model(config, torch.device("cpu"), SEED).state_dict()

    def hf_model() -> Any:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf_config_dict()))
        hf.load_state_dict(weights, strict=False)
        return hf.to(device)

    precompute = spec["mode"] == "precompute"
    cuda = device.type == "cuda"
    args = trl.DPOConfig(
        output_dir=spec["tmp"], per_device_train_batch_size=spec["trl_batch"], max_length=int(1024 * spec["scale"]),
        beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=precompute, bf16=cuda, learning_rate=5e-7,
        gradient_checkpointing=spec["activation_checkpoint"] == "full",
        max_steps=spec["warmup"] + spec["steps"], logging_steps=1000, save_strategy="no", report_to=[],
        dataloader_num_workers=0, use_cpu=not cuda, seed=SEED,
    )  # fmt: skip
    times: list[float] = []
    batches: list[int] = []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer = trl.DPOTrainer(
        model=hf_model(),
        ref_model=None if precompute else hf_model(),
        args=args,
        train_dataset=datasets.Dataset.from_dict(records),
        processing_class=tok,
        callbacks=[Clock()],
    )
    setup_seconds = time.perf_counter() - t0
    collate = trainer.data_collator

    def counting(examples: list[dict]) -> dict:
        batches.append(sum(len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples))
        return collate(examples)

    trainer.data_collator = counting
    trainer.train()
    timed = times[spec["warmup"] :]
    seconds = timed[-1] - timed[0]
    counted = sum(batches[spec["warmup"] + 1 : spec["warmup"] + len(timed)])  # the steps between the clock's ticks
    out = {"tokens_per_s": counted / seconds, "steps_timed": len(timed) - 1, "setup_seconds": setup_seconds}
    if cuda:
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out["mean_pair_tokens"] = _pair_tokens(data) / len(data)
    # What the model did, not only what was asked (transformers 5.2x renames the option activation_checkpointing).
    checkpointed = any(getattr(m, "gradient_checkpointing", False) is True for m in trainer.model.modules())
    if checkpointed != args.gradient_checkpointing:
        raise RuntimeError(f"TRL trained with gradient checkpointing {checkpointed}, asked for the opposite")
    out["activation_checkpoint"] = "full (gradient_checkpointing)" if checkpointed else "none"
    out["versions"] = {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__}
    return out


def _timed(step: Any, spec: dict, device: Any, counted: Any) -> dict:
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(spec["warmup"]):
        step(i)
    sync()
    t0 = time.perf_counter()
    for i in range(spec["warmup"], spec["warmup"] + spec["steps"]):
        loss = step(i)
    sync()
    seconds = time.perf_counter() - t0
    out = {"tokens_per_s": counted() / seconds, "steps_timed": spec["steps"], "loss_last": float(loss)}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


SYSTEMS = {  # name: (reference, activation checkpointing); TRL's DPOConfig checkpoints by default
    "llamita-precomputed": ("precomputed", "none"),
    "llamita-precomputed-ac": ("precomputed", "full"),
    "llamita-lowmem": ("precomputed", "full"),
    "llamita-lowmem-selective": ("precomputed", "selective"),
    "llamita-lowmem-noac": ("precomputed", "none"),
    "llamita-lowmem-noac-b1": ("precomputed", "none"),
    "llamita-lowmem-selective-2x4": ("precomputed", "selective"),
    "llamita-lowmem-noac-4x2": ("precomputed", "none"),
    "llamita-live": ("live", "none"),
    "trl-live": ("live", "full"),
    "trl-precompute": ("precompute", "full"),
    "trl-precompute-noac": ("precompute", "none"),
}


LOW_MEMORY = {"weights": "bf16", "optim": "adamw8bit"}
"""What the llamita-lowmem systems set: train.weights and optim.name."""


def _runner(name: str) -> Callable[[dict], dict]:
    return run_trl if name.startswith("trl") else run_llamita


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="the debug preset on a CPU, 2 steps each")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    ac_help = "llamita-precomputed-ac's parallel.activation_checkpoint (full recomputes every block, as TRL does)"
    parser.add_argument("--ac", choices=("full", "selective"), default="full", help=ac_help)
    parser.add_argument("--profile", action="store_true",
                        help="after timing, 2 llamita steps under torch.profiler (GPU): kernel time by category "
                             "against the wall, kernel launches and the host's waits for the GPU")  # fmt: skip
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    # llamita: 8 rows of 2048 slots per step (~2 pairs each); TRL: 8 pairs per step (its per-device batch).
    base = {"preset": "tinyllama-1.1b", "seq_len": 2048, "batch": 8, "trl_batch": 8, "warmup": 5, "steps": 20,
            "pairs": 800, "scale": 1.0, "device": "cuda", "compile": True, "tmp": str(args.out / "trl")}  # fmt: skip
    if args.smoke:
        base |= {"preset": "debug", "seq_len": 128, "batch": 2, "trl_batch": 2, "warmup": 1, "steps": 2,
                 "pairs": 24, "scale": 1 / 16, "device": "cpu", "compile": False}  # fmt: skip
    base["profile"] = args.profile
    specs = {name: base | {"mode": mode, "activation_checkpoint": ac} for name, (mode, ac) in SYSTEMS.items()}
    specs["llamita-precomputed-ac"]["activation_checkpoint"] = args.ac
    for name in [n for n in SYSTEMS if n.startswith("llamita-lowmem")]:
        specs[name] |= LOW_MEMORY
    # Without full recomputation, the activations of 8 rows do not fit the memory target: the same 8 rows a step,
    # as micro-batches of a quarter (2 rows), a half or one row, with gradient accumulation.
    splits = {"llamita-lowmem-noac": 4, "llamita-lowmem-noac-b1": base["batch"], "llamita-lowmem-selective-2x4": 4,
              "llamita-lowmem-noac-4x2": 2}  # fmt: skip
    for name, parts in splits.items():
        micro = base["batch"] // parts or 1
        specs[name] |= {"batch": micro, "accum": base["batch"] // micro}
    if args.smoke:  # the path the GPU run takes: FSDP2 on one rank (a CPU plain process would not shard)
        specs["llamita-precomputed-ac"]["fsdp"] = "on"
    record = run_systems(args.systems.split(","), specs, _runner, base, args.out / "dpo_throughput.json")
    print(table(record))


def table(record: dict) -> str:
    """The record's results as a markdown table: against TRL's fastest system, and against TRL's precomputing one
    at the same activation checkpointing (full or none), the like-for-like comparison of memory."""
    rows = record["results"]
    trl = {name: r for name, r in rows.items() if name.startswith("trl") and "error" not in r}
    best = max(trl.values(), key=lambda r: r["tokens_per_s"]) if trl else None
    same = {r["activation_checkpoint"].split()[0]: r for name, r in trl.items() if name.startswith("trl-precompute")}
    lines = [
        "| system | activation checkpointing | pair tokens/s | vs TRL's best | peak GiB | vs its peak "
        "| vs TRL precompute, same checkpointing: tokens/s, peak | one-off s (reference pass; TRL: set-up) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        ac = r.get("activation_checkpoint", "-")
        if "error" in r:
            lines.append(f"| {name} | {ac} | failed: {r['error'][:120]} | | | | | |")
            continue
        tps, peak = r["tokens_per_s"], r.get("peak_gib")
        ratios = []
        for other in (best, same.get(ac.split()[0])):
            speed = f"{tps / other['tokens_per_s']:.2f}x" if other else "-"
            memory = f"{peak / other['peak_gib']:.2f}" if other and peak and other.get("peak_gib") else "-"
            ratios.append((speed, memory))
        once = r.get("reference_seconds", r.get("setup_seconds"))
        micro = f", {r['micro_batch']} rows x {r['accumulation']}" if r.get("accumulation", 1) > 1 else ""
        lines.append(
            f"| {name} | {ac}{micro} | {tps:,.0f} | {ratios[0][0]} | {'-' if peak is None else f'{peak:.1f}'} | "
            f"{ratios[0][1]} | {ratios[1][0]}, {ratios[1][1]} | {'-' if once is None else f'{once:.1f}'} |"
        )
    for name, r in rows.items():  # --profile: where a step goes
        if "profile" in r:
            prof = r["profile"]
            host = ", ".join(f"{k} {n:.0f}x {ms:.1f} ms" for k, (n, ms) in prof["host_calls_per_step"].items())
            gpu = ", ".join(f"{k} {ms:.1f}" for k, ms in prof["categories_ms"].items())
            lines += ["", f"{name}, a step under torch.profiler: {prof['step_wall_ms']:.1f} ms wall, GPU busy "
                      f"{prof['gpu_busy_ms']:.1f} ms ({gpu}); host calls a step: {host or 'none'}"]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
