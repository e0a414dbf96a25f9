"""What weight-only int8 decoding (`LLM(quantize="int8")`, `--quantize int8`) costs in quality, on held-out text.

The model is scored on a run's validation shards as `llamita evaluate` reads them (`held_out_shards` and
`ShardValidation`: full windows of the run's data.seq_len, the run's own sources unless `--data` names others), in
its dtype as `LLM` runs it (bf16 on a GPU, fp32 on a CPU, no autocast), against the same weights in int8
(`llamita.inference.quantize`: every Linear, the output head included) and in int8 with the head kept in the
model's dtype (and, for an fp32 model, in bf16: the yardstick of a rounding every GPU run makes). Measured, per
weights:
* perplexity on the shards, and its change against the model in its dtype;
* top-1 agreement: the share of positions where the argmax of the int8 model is the argmax of the model in its dtype
  (teacher-forced on the text, so one flip does not carry into the next positions);
* the mean KL divergence KL(p_dtype || p_int8) per position, in nats;
* top-1 accuracy against the text itself, and the weights' bytes;
* greedy decoding through the engine (`LLM.generate`, compiled and in CUDA graphs on a GPU): `--prompts` prompts
  (the first `--prompt-tokens` of held-out windows) continued by `--new-tokens`, against the model in its dtype:
  identical continuations and their mean common prefix.

    python bench/quant_quality.py --checkpoint runs/demo                     # the run's own validation shards
    python bench/quant_quality.py --checkpoint runs/demo --data runs/demo/data/code --batches 8 --out /tmp/q

Writes `quant_quality.json` and `quant_quality.md` (the table, with date, machine, commit and command) to `--out`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from llamita.evaluate.load_model import load_model
from llamita.evaluate.perplexity import ShardValidation
from llamita.evaluate.run import held_out_shards
from llamita.inference import LLM, SamplingParams
from llamita.inference.llm import resolve_dtype
from llamita.inference.quantize import quantize_weights, weight_bytes
from llamita.model import Llama
from llamita.train.parallel import pick_device

REFERENCE = "dtype"
"""The row of the model in its own dtype, which the int8 rows are compared with."""


def variants(model: Llama) -> dict[str, Llama]:
    """The model in its dtype, and copies of it in int8: every Linear, and every Linear but the output head; for an
    fp32 model also in bf16, as a yardstick (the rounding a GPU's usual dtype makes)."""
    models = {
        REFERENCE: model,
        "int8": quantize_weights(copy.deepcopy(model), "int8"),
        "int8, head in dtype": quantize_weights(copy.deepcopy(model), "int8", head=False),
    }
    if model.lm_head.weight.dtype == torch.float32:
        models["bfloat16 (yardstick)"] = copy.deepcopy(model).to(torch.bfloat16)
    return models


@torch.no_grad()
def score(models: dict[str, Llama], batches: Any, device: torch.device) -> dict[str, dict[str, float]]:
    """Perplexity, top-1 agreement with the reference, KL from it and top-1 accuracy of each model on `batches`."""
    sums = {name: {"nll": 0.0, "agree": 0, "kl": 0.0, "correct": 0} for name in models}
    positions = 0
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)  # [B, T] each; full windows, no -100
        reference = None
        for name, model in models.items():
            logprobs = model(inputs).float().log_softmax(-1)  # [B, T, V]
            top = logprobs.argmax(-1)  # [B, T]
            s = sums[name]
            s["nll"] -= logprobs.gather(-1, targets[..., None]).sum().item()
            s["correct"] += (top == targets).sum().item()
            if reference is None:
                reference = logprobs, top
                continue
            s["agree"] += (top == reference[1]).sum().item()
            s["kl"] += (reference[0].exp() * (reference[0] - logprobs)).sum().item()  # KL(reference || this)
        positions += targets.numel()
    if not positions:
        raise SystemExit("no validation windows in the shards: pass --data with other sources or a lower --seq-len")
    out = {}
    for name, s in sums.items():
        loss = s["nll"] / positions
        out[name] = {"loss": loss, "perplexity": math.exp(loss), "top1_accuracy":
                     s["correct"] / positions, "positions": positions}  # fmt: skip
        if name != REFERENCE:
            out[name] |= {"top1_agreement": s["agree"] / positions, "kl": s["kl"] / positions}
    return out


def greedy(models: dict[str, Llama], prompts: list[list[int]], new: int, device: torch.device) -> dict[str, dict]:
    """Greedy continuations through the engine; each int8 model's against the reference's."""
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    outputs = {}
    for name, model in models.items():
        llm = LLM(model, max_batch=len(prompts), max_seq_len=len(prompts[0]) + new, compile=device.type == "cuda")
        outputs[name] = [c.token_ids for c in llm.generate(prompts, params)]
        del llm
    result = {}
    for name, outs in outputs.items():
        prefixes = [_common_prefix(a, b) for a, b in zip(outs, outputs[REFERENCE])]
        result[name] = {"identical": sum(p == new for p in prefixes), "prompts": len(prompts),
                        "mean_common_prefix": sum(prefixes) / len(prefixes), "new_tokens": new}  # fmt: skip
    return result


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def table(result: dict) -> str:
    rows = [
        "| weights | weight MB | perplexity | change | top-1 agreement | KL (nats/position) | top-1 accuracy | "
        "greedy identical | mean common prefix |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = result["scores"][REFERENCE]["perplexity"]
    for name, s in result["scores"].items():
        g = result["greedy"].get(name)
        reference = name == REFERENCE
        cells = [
            f"{name} ({result['dtype']})" if reference else name,
            f"{result['weight_bytes'][name] / 1e6:.1f}",
            f"{s['perplexity']:.4f}",
            "—" if reference else f"{100 * (s['perplexity'] / base - 1):+.3f}%",
            "—" if reference else f"{100 * s['top1_agreement']:.2f}%",
            "—" if reference else f"{s['kl']:.2e}",
            f"{100 * s['top1_accuracy']:.2f}%",
            "—" if g is None or reference else f"{g['identical']}/{g['prompts']}",
            "—" if g is None or reference else f"{g['mean_common_prefix']:.1f}/{g['new_tokens']}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="llamita run or checkpoint folder, or a Hugging Face dir")
    parser.add_argument("--data", nargs="*", default=[], help="prepared source directories (default: the run's)")
    parser.add_argument("--split", default="val", choices=["val", "train"], help="which shards to score")
    parser.add_argument("--seq-len", type=int, default=0, help="window length (default: the run's data.seq_len)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    parser.add_argument("--batches", type=int, default=0, help="batches to score (0: every window of the shards)")
    parser.add_argument("--prompts", type=int, default=8, help="greedy prompts through the engine (0: none)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="tokens of a held-out window each prompt takes")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--dtype", default="auto", help="the model's dtype (auto: bf16 on a GPU, fp32 on a CPU)")
    parser.add_argument("--machine", default="", help="machine description for the results (default: platform)")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/out"), help="results folder")
    args = parser.parse_args()

    device = pick_device(args.device, option="--device")
    dtype = resolve_dtype(args.dtype, device)
    shards, seq_len = held_out_shards(args.checkpoint, args.data, args.split, args.seq_len)
    loaded = load_model(args.checkpoint, device, dtype)
    models = variants(loaded.model)
    held_out = ShardValidation(shards, seq_len, loaded.model.config.vocab_size)
    t0 = time.perf_counter()
    scores = score(models, held_out.batches(args.batch_size, args.batches or None, 0, 1), device)
    greedy_result = {}
    if args.prompts:
        windows = next(iter(held_out.batches(args.prompts, 1, 0, 1)))[0]  # [prompts, seq_len]
        prompts = windows[:, : args.prompt_tokens].tolist()
        greedy_result = greedy(models, prompts, args.new_tokens, device)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": args.machine or f"{where} ({platform.machine()}, Python {platform.python_version()})",
        "torch": torch.__version__,
        "commit": commit,
        "command": shlex.join(["python", *sys.argv]),
        "checkpoint": str(loaded.source),
        "step": loaded.step,
        "parameters": loaded.model.config.num_params,
        "tied_embeddings": loaded.model.config.tie_embeddings,
        "dtype": str(dtype).removeprefix("torch."),
        "shards": [str(p) for p in shards],
        "seq_len": seq_len,
        "seconds": time.perf_counter() - t0,
        "weight_bytes": {name: weight_bytes(m) for name, m in models.items()},
        "scores": scores,
        "greedy": greedy_result,
    }
    text = table(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant_quality.json").write_text(json.dumps(result, indent=1) + "\n")
    header = [
        "# Weight-only int8 decoding: quality on held-out text",
        "",
        f"- date: {result['date']}",
        f"- machine: {result['machine']}, torch {result['torch']}",
        f"- commit: {commit}",
        f"- command: `{result['command']}`",
        f"- model: {result['checkpoint']} (step {result['step']}, {result['parameters'] / 1e6:.1f} M parameters, "
        f"{'tied' if result['tied_embeddings'] else 'untied'} embeddings), {result['dtype']}",
        f"- held out: {len(shards)} {args.split} shard(s), {scores[REFERENCE]['positions']:,} positions in windows "
        f"of {seq_len}",
    ]
    (out / "quant_quality.md").write_text("\n".join(header) + "\n\n" + text + "\n")
    print(text)


if __name__ == "__main__":
    main()
