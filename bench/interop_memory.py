"""Peak memory of `llamita export hf`, `import hf` and `export gguf` against the model's size on disk.

Builds a random checkpoint of a preset (meta-device build, then init on the CPU; a zero AdamW state so the
checkpoint has an optimizer part as a training run's does) through `train.checkpoint.save_checkpoint`, then runs
each conversion as its own `llamita` process and reads that process's peak resident set size. The conversions
stream one tensor at a time, so the target is a peak below twice the model's size on disk.

    python bench/interop_memory.py                        # tinyllama-1.1b: ~13 GB checkpoint, ~25 GB of disk
    python bench/interop_memory.py --preset demo --out /tmp/r.md   # the script end to end in seconds

The work directory is deleted afterwards unless --keep is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

# The wrapper runs one command and prints the peak RSS of its children (that command alone), in KiB on Linux.
_MEASURE = (
    "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)"
)


def build_checkpoint(preset: str, run: Path) -> dict:
    """A random checkpoint of `preset` at <run>/checkpoints/step_00000001 with the demo tokenizer's vocabulary."""
    import torch

    from llamita.config import RunConfig, to_dict
    from llamita.model import Llama, get_preset
    from llamita.tokenizer import train_tokenizer
    from llamita.train import checkpoint as ckpt

    config = get_preset(preset)
    corpus = run / "corpus.txt"
    run.mkdir(parents=True)
    corpus.write_text(
        "\n".join(f"the checkpoint {i} of a benchmark model, written for memory {i * 7}" for i in range(3000))
    )
    tokenizer = train_tokenizer([corpus], min(config.vocab_size, 512), run / "tokenizer")
    assert tokenizer.vocab_size <= config.vocab_size
    with torch.device("meta"):
        model = Llama(config)
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():  # the state a step would create, without the gradients' memory
        optimizer.state[p] = {
            "step": torch.tensor(1.0),
            "exp_avg": torch.zeros_like(p),
            "exp_avg_sq": torch.zeros_like(p),
        }
    state = {"step": 1, "tokens": 0, "model_config": dataclasses.asdict(config), "run_config": to_dict(RunConfig())}
    folder = ckpt.save_checkpoint(ckpt.checkpoint_path(run, 1), model, optimizer, state)
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if config.tie_embeddings:
        model_bytes -= model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    return {"folder": folder, "model_bytes": model_bytes, "params": config.num_params}


def measure(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in bytes, wall seconds) of one command."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return int(proc.stdout.strip().splitlines()[-1]) * 1024, seconds


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tinyllama-1.1b", help="model preset")
    parser.add_argument("--workdir", default="bench/.interop_memory", help="scratch directory (deleted after)")
    parser.add_argument("--out", default="bench/results/2026-11-24-interop-memory.md", help="results file")
    parser.add_argument("--machine", default="CPU 2 cores 24 GB", help="machine description for the results")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    run = work / "run"
    try:
        start = time.perf_counter()
        built = build_checkpoint(args.preset, run)
        build_s = time.perf_counter() - start
        ckpt_bytes = dir_bytes(built["folder"])
        llamita = [sys.executable, "-m", "llamita.cli"]
        steps = [
            (
                "export hf (fp32)",
                [*llamita, "export", "hf", "--checkpoint", str(run), "--out", str(work / "hf")],
                work / "hf",
            ),
            (
                "import hf",
                [*llamita, "import", "hf", "--model", str(work / "hf"), "--out", str(work / "imported")],
                work / "imported" / "checkpoints",
            ),
            (
                "export gguf (f16)",
                [*llamita, "export", "gguf", "--checkpoint", str(run), "--out", str(work / "m.gguf")],
                work / "m.gguf",
            ),
        ]
        baseline, _ = measure([sys.executable, "-c", "import llamita.interop, llamita.cli, torch, safetensors, gguf"])
        rows = []
        for name, cmd, output in steps:
            peak, seconds = measure(cmd)
            rows.append({"step": name, "peak_rss": peak, "seconds": seconds, "output_bytes": dir_bytes(output)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    gb = 1e9
    lines = [
        f"# Interop memory: export hf, import hf, export gguf ({args.preset})",
        "",
        f"- date: {time.strftime('%Y-%m-%d')}",
        f"- machine: {args.machine} ({platform.machine()}, Python {platform.python_version()})",
        f"- commit: {commit} (with the working tree's interop changes)",
        f"- command: `python bench/interop_memory.py --preset {args.preset}`",
        f"- model: {built['params'] / 1e9:.3f} B parameters; model tensors {built['model_bytes'] / gb:.2f} GB (fp32), "
        f"whole checkpoint with AdamW state {ckpt_bytes / gb:.2f} GB (built in {build_s:.0f} s)",
        f"- baseline: a Python process importing torch, safetensors, gguf and llamita.interop peaks at "
        f"{baseline / gb:.2f} GB",
        "",
        "Each conversion runs as its own `llamita` process; peak RSS is `ru_maxrss` of that process (RUSAGE_CHILDREN "
        "of a wrapper). Target: peak RSS < 2x the model's size on disk.",
        "",
        "| step | peak RSS (GB) | peak / model size | output size (GB) | wall time (s) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["peak_rss"] / built["model_bytes"]
        cells = [r["step"], f"{r['peak_rss'] / gb:.2f}", f"{ratio:.2f}x", f"{r['output_bytes'] / gb:.2f}"]
        lines.append("| " + " | ".join([*cells, f"{r['seconds']:.0f}"]) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
