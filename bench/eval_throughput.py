"""Multiple-choice evaluation throughput: llamita's evaluator against lm-evaluation-harness's HF backend.

Both score the same model (a random TinyLlama-1.1B-shaped Llama in bf16, copied into a transformers
``LlamaForCausalLM``) on the same synthetic HellaSwag-format items (4 endings each, lengths like HellaSwag's
validation set), zero-shot, with the same number of continuations per forward pass, one after the other in this
process. Each system first runs a short warm-up on other items; the timed call is the whole evaluation, reading
and tokenizing included. Besides items/s the script reports how far the two disagree (bf16 arithmetic differs:
lm-eval takes bf16 log-softmax, llamita fp32) and the peak GPU memory of each.

    python bench/eval_throughput.py --tokenizer .benchdata/tokenizer      # on a CUDA GPU (about 2 minutes)
    python bench/eval_throughput.py --smoke                                # tiny model, 20 items, CPU

Needs lm-eval 0.4.x with transformers and accelerate (``pip install 'llamita[eval]'``). The tokenizer is any
Llama-style tokenizer directory, e.g. the 32000-token one `bench/train_throughput.py --prepare-data` trains on
the demo corpus; without one, a 32000-token tokenizer is trained on the demo corpus first (a few minutes).
The table is printed last; `--out` also writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WORDS = (
    "the a man woman person people child dog ball kitchen table water car road street house room door window "
    "then now after before while when she he they is are was were walks runs stands sits holds puts takes "
    "picks throws cuts pours mixes cleans washes paints plays shows talks smiles looks turns opens closes "
    "slowly quickly carefully again together around inside outside into onto under over through with without "
    "small large red blue green white black old new wooden metal plastic bright dark long short several many "
    "camera screen video game music guitar piano song dance team player coach field court board knife bowl"
).split()
ACTIVITIES = ("Cooking", "Washing face", "Playing guitar", "Doing a powerbomb", "Home and Garden", "Skateboarding")


def synthetic_hellaswag(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """HellaSwag-format records: context ~40 words, endings ~19 words, as in HellaSwag's validation set."""
    rng = random.Random(seed)

    def words(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    return [
        {
            "ind": i,
            "activity_label": rng.choice(ACTIVITIES),
            "ctx_a": words(15, 60).capitalize() + ".",
            "ctx_b": words(2, 8),
            "ctx": "",
            "endings": [words(8, 30) + "." for _ in range(4)],
            "source_id": f"synthetic~{i}",
            "split": "val",
            "split_type": "indomain",
            "label": rng.randrange(4),
        }
        for i in range(n)
    ]


def write_task(root: Path, records: list[dict[str, Any]]) -> tuple[Path, Path]:
    """hellaswag_val.jsonl for llamita and an lm-eval task YAML over the same file; (data dir, YAML dir)."""
    import lm_eval

    data = root / "hellaswag"
    data.mkdir(parents=True)
    (data / "hellaswag_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    hf_rows = data.parent / "hf_val.jsonl"  # the hub's schema: label as a string
    hf_rows.write_text("".join(json.dumps(r | {"label": str(r["label"])}) + "\n" for r in records), encoding="utf-8")
    yamls = root / "yamls"
    yamls.mkdir()
    base = Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "hellaswag.yaml"
    (yamls / "bench_hellaswag.yaml").write_text(
        f"include: {base}\ntask: bench_hellaswag\ntag: []\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    train: {hf_rows}\n    validation: {hf_rows}\n",
        encoding="utf-8",
    )
    return data, yamls


def load_tokenizer(path: str | None, smoke: bool, work: Path):
    from llamita.data.demo_corpus import write_demo_corpus
    from llamita.tokenizer import Tokenizer, train_tokenizer

    if path:
        return Tokenizer.load(path)
    if smoke:
        corpus = work / "words.txt"
        rng = random.Random(1)
        corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(20)) for _ in range(500)))
        return train_tokenizer([corpus], 512, work / "tokenizer")
    print("training a 32000-token tokenizer on the demo corpus (pass --tokenizer to skip) ...", flush=True)
    files = write_demo_corpus(work / "corpus", max_code_bytes=6_000_000, max_prose_bytes=3_000_000)
    return train_tokenizer(sorted(files.values()), 32000, work / "tokenizer")


def build_models(tokenizer, smoke: bool, device, dtype):
    """(llamita Llama, transformers LlamaForCausalLM with the same weights, transformers tokenizer)."""
    import dataclasses

    import torch
    import transformers

    from llamita.model import Llama, get_preset

    config = dataclasses.replace(get_preset("debug" if smoke else "tinyllama-1.1b"), vocab_size=tokenizer.vocab_size)
    if smoke:
        config = dataclasses.replace(config, max_seq_len=512)
    torch.manual_seed(0)
    with torch.device(device):
        model = Llama(config)
    model.to(dtype).eval()
    with torch.device(device):
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf_config_dict()))
    hf.load_state_dict(model.state_dict(), strict=True)
    hf.to(dtype).eval()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp)
    return model, hf, hf_tokenizer, config


def peak_memory_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run(args: argparse.Namespace) -> dict[str, Any]:
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from llamita.evaluate.harness import evaluate_tasks

    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    work = Path(tempfile.mkdtemp(prefix="eval_bench_"))
    os.environ.setdefault("HF_DATASETS_CACHE", str(work / "hf_datasets"))
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = load_tokenizer(args.tokenizer, args.smoke, work)
    items = args.items or (20 if args.smoke else 2000)
    warmup = max(4, min(64, items // 10))
    records = synthetic_hellaswag(items + warmup)
    data, yamls = write_task(work / "timed", records[warmup:])
    warm_data, warm_yamls = write_task(work / "warm", records[:warmup])
    model, hf, hf_tokenizer, config = build_models(tokenizer, args.smoke, device, dtype)

    def llamita_call(path: Path, batch_size: int) -> dict[str, Any]:
        return evaluate_tasks(model, tokenizer, {"hellaswag": path}, batch_size=batch_size, log_samples=True)

    def lm_eval_call(yaml_dir: Path, batch_size: int) -> dict[str, Any]:
        lm = HFLM(pretrained=hf, tokenizer=hf_tokenizer, batch_size=batch_size, max_length=config.max_seq_len)
        manager = TaskManager(include_path=str(yaml_dir), include_defaults=False)
        return lm_eval.simple_evaluate(model=lm, tasks=["bench_hellaswag"], task_manager=manager, log_samples=True)

    if args.profile:
        batch = args.batch_size[0]
        profile_llamita(lambda: llamita_call(data, batch), lambda: llamita_call(warm_data, batch), device)
        sys.exit(0)
    results: dict[str, Any] = {"items": items, "device": str(device), "runs": []}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name()
    results["model_params"] = config.num_params
    for batch in args.batch_size:
        outputs = {}
        for name, call, timed_arg, warm_arg in (
            ("llamita", llamita_call, data, warm_data),
            ("lm-eval hf", lm_eval_call, yamls, warm_yamls),
        ):
            call(warm_arg, batch)
            reset_peak(device)
            start = time.perf_counter()
            outputs[name] = call(timed_arg, batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            results["runs"].append(
                {
                    "system": name,
                    "batch_size": batch,
                    "seconds": seconds,
                    "items_per_s": items / seconds,
                    "peak_gib": peak_memory_gib(device),
                }
            )
        results["runs"][-2:] = compare(outputs, results["runs"][-2:], items)
        print(table(results), flush=True)
    return results


def compare(outputs: dict[str, Any], runs: list[dict[str, Any]], items: int) -> list[dict[str, Any]]:
    """Accuracy of each system, their per-request agreement and llamita's speedup, added to the two runs."""
    ours = {s["doc_id"]: s for s in outputs["llamita"]["samples"]["hellaswag"]}
    theirs = {s["doc_id"]: s for s in outputs["lm-eval hf"]["samples"]["bench_hellaswag"]}
    deltas = [abs(a - r[0][0]) for i, s in ours.items() for a, r in zip(s["loglikelihoods"], theirs[i]["resps"])]
    mine, peer = runs
    mine["acc_norm"] = outputs["llamita"]["results"]["hellaswag"]["acc_norm"]
    peer["acc_norm"] = outputs["lm-eval hf"]["results"]["bench_hellaswag"]["acc_norm,none"]
    mine["max_abs_loglik_delta"] = max(deltas)
    mine["mean_abs_loglik_delta"] = sum(deltas) / len(deltas)
    mine["same_acc_norm_prediction"] = sum(ours[i]["acc_norm"] == theirs[i]["acc_norm"] for i in ours) / items
    mine["speedup"] = mine["items_per_s"] / peer["items_per_s"]
    return [mine, peer]


def profile_llamita(call, warm, device) -> None:
    """Where llamita's evaluation time goes: Python (cProfile, by cumulative time) and kernels (torch.profiler)."""
    import cProfile
    import pstats

    import torch
    from torch.profiler import ProfilerActivity, profile

    warm()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    profiler = cProfile.Profile()
    profiler.enable()
    call()
    profiler.disable()
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"timed call under cProfile: {time.perf_counter() - start:.2f} s")
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=30))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def table(results: dict[str, Any]) -> str:
    def gib(value: float | None) -> str:
        return "" if value is None else f"{value:.1f}"

    lines = [
        f"HellaSwag-format, {results['items']} items x 4 endings, zero-shot, "
        f"{results.get('gpu', results['device'])}, {results['model_params'] / 1e6:.1f}M params",
        "",
        "| batch | system | seconds | items/s | peak GiB | acc_norm | speedup |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results["runs"]:
        speedup = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        lines.append(
            f"| {r['batch_size']} | {r['system']} | {r['seconds']:.1f} | {r['items_per_s']:.1f} | "
            f"{gib(r['peak_gib'])} | {r['acc_norm']:.4f} | {speedup} |"
        )
    lines.append("")
    for r in results["runs"]:
        if "speedup" in r:
            lines.append(
                f"batch {r['batch_size']}: log-likelihood |llamita - lm-eval| max {r['max_abs_loglik_delta']:.3g}, "
                f"mean {r['mean_abs_loglik_delta']:.3g}; same acc_norm outcome on "
                f"{100 * r['same_acc_norm_prediction']:.1f}% of items"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model, 20 items, CPU: checks the script end to end")
    parser.add_argument("--tokenizer", help="a Llama-style tokenizer directory (default: train one)")
    parser.add_argument("--items", type=int, default=0, help="timed items (default 2000; smoke 20)")
    parser.add_argument(
        "--batch-size",
        type=lambda text: [int(b) for b in text.split(",")],
        default=[64],
        help="continuations per forward pass, both systems; several comma-separated run one after the other",
    )
    parser.add_argument("--out", help="also write the numbers as JSON here")
    parser.add_argument("--profile", action="store_true", help="profile llamita's timed call instead of comparing")
    args = parser.parse_args()
    results = run(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(table(results), file=sys.stdout)


if __name__ == "__main__":
    main()
