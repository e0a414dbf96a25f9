"""TinyLlama v1.1's three stages at toy scale, on a CPU: a base on prose, a branch that ramps code in, a cooldown by
a 4x batch, and the controls without the branch and without the cooldown; per-source validation loss throughout.

The embedded demo corpus (the running Python's stdlib docs as `prose`, its code as `code`, a 1024-token BPE) and the
`sweep-s` preset (0.40M parameters), one cosine (2e-3 -> 2e-4, 20 warmup steps) over all 4.19M tokens, 128-token
sequences, 4,096 tokens per step:

    base              prose only, steps 1-512 (0 -> 2.10M tokens)
     ├─ prose-s2      prose only, steps 513-1024 (-> 4.19M): the control without the branch
     │   └─ prose-cooldown   from prose-s2's step 768 (3.15M), batch x4 (16,384 tokens/step) to 4.19M
     └─ code-s2       prose:code ramping from 100:0 to 70:30 over its first 32 steps, then 70:30, to 4.19M:
         │            the branch, and the control without the cooldown
         └─ code-cooldown    from code-s2's step 768 (3.15M), batch x4 to 4.19M

Every run is a real `llamita pretrain` (`init.branch_from`, `train.batch_stages`, `optim.schedule_tokens`,
`eval.per_source`). The table and the plot are written to --results (.md and .png); the runs stay in --out.

    PYTHONPATH=src python3 bench/v11_replication.py            # about 4 minutes on 2 idle CPU cores
    PYTHONPATH=src python3 bench/v11_replication.py --smoke    # seconds: a 0.3 MB corpus and 1/16 of the steps
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llamita.config import load_config  # noqa: E402
from llamita.demo import prepare_demo_data  # noqa: E402
from llamita.pretrain import pretrain  # noqa: E402
from llamita.train import checkpoint as ckpt  # noqa: E402
from llamita.train.metrics import read_metrics  # noqa: E402

VOCAB = 1024
SEQ = 128
BATCH = 4096
"""Tokens per step: 32 sequences of 128; the cooldown takes 4x."""
STEPS = {"base": 512, "stage2": 256, "tail": 256, "ramp": 32}
"""Steps of the base, of stage 2 up to the cooldown's branch point, after it (at the first batch), and of the ramp."""
RUNS = ["base", "prose-s2", "code-s2", "prose-cooldown", "code-cooldown"]
PARENT = {"prose-s2": "base", "code-s2": "base", "prose-cooldown": "prose-s2", "code-cooldown": "code-s2"}


def settings(tok_dir: Path, total_tokens: int) -> dict[str, str]:
    """The overrides every run shares: the model, the one cosine over the whole lineage, CPU, validation."""
    return {
        "data.tokenizer": str(tok_dir),
        "data.seq_len": str(SEQ),
        "model.preset": "sweep-s",
        "optim.lr": "2e-3",
        "optim.min_lr": "2e-4",
        "optim.warmup_steps": "20",
        "optim.schedule_tokens": str(total_tokens),
        "train.global_batch_tokens": str(BATCH),
        "train.micro_batch": "32",
        "train.max_steps": "0",
        "train.device": "cpu",
        "train.dtype": "fp32",
        "train.seed": "0",
        "eval.per_source": "true",
        "eval.batches": "8",
        "eval.batch_size": "16",
        "checkpoint.keep_last": "0",
        "log.interval": "64",
        "log.tensorboard": "false",
        "log.progress": "false",
    }


def sources(data: dict[str, Path], prose: float, code: float) -> str:
    """Both sources in every run (a weight of 0 is never drawn), so that every run validates on both."""
    weights = {"prose": prose, "code": code}
    return "[" + ", ".join(f"{{name: {n}, path: '{data[n]}', weight: {w}}}" for n, w in weights.items()) + "]"


def run_all(out: Path, scale: int) -> tuple[dict[str, Path], tuple[int, int, int], float]:
    """Prepare the corpus and train the five runs; their directories, the token counts at the ends of the three
    stages, and the training seconds."""
    tok_dir, data = prepare_demo_data(out / "data", corpus_mb=0.3 if scale > 1 else None, vocab_size=VOCAB)
    steps = {k: max(1, v // scale) for k, v in STEPS.items()}
    t1 = BATCH * steps["base"]
    t2 = t1 + BATCH * steps["stage2"]
    t3 = t2 + BATCH * steps["tail"]
    every = max(1, steps["base"] // 8)  # about 8 validations per stage; each stage ends on one
    common = settings(tok_dir, t3)
    dirs = {name: out / "runs" / name for name in RUNS}
    ramp = (
        f"[{{steps: {steps['ramp']}, weights: {{prose: 1, code: 0}}, end_weights: {{prose: 0.7, code: 0.3}}}}, "
        "{weights: {prose: 0.7, code: 0.3}}]"
    )
    stage = {"eval.interval": str(every), "checkpoint.interval": str(every)}
    plan = {
        "base": {"data.sources": sources(data, 1.0, 0.0), "train.max_tokens": str(t1), **stage},
        "prose-s2": {"init.branch_from": str(dirs["base"]), "data.sources": sources(data, 1.0, 0.0)},
        "code-s2": {
            "init.branch_from": str(dirs["base"]),
            "data.sources": sources(data, 0.7, 0.3),
            "data.stages": ramp,
        },
    }
    for name in ("prose-s2", "code-s2"):
        plan[name] |= {"train.max_tokens": str(t3), **stage}
    for name in ("prose-cooldown", "code-cooldown"):  # from the stage-2 run's checkpoint at t2
        parent = PARENT[name]
        plan[name] = {
            "init.branch_from": str(ckpt.checkpoint_path(dirs[parent], steps["base"] + steps["stage2"])),
            "data.sources": plan[parent]["data.sources"],
            "train.batch_stages": f"[{{from_tokens: {t2}, global_batch_tokens: {4 * BATCH}}}]",
            "train.max_tokens": str(t3),
            "eval.interval": str(max(1, every // 4)),
            "checkpoint.interval": "0",
        }
    t0 = time.perf_counter()
    for name in RUNS:
        cfg = load_config(None, {"out_dir": str(dirs[name]), **common, **plan[name]})
        t = time.perf_counter()
        result = pretrain(cfg)
        print(f"{name}: step {result['step']}, {result['tokens']:,} tokens in {time.perf_counter() - t:.1f} s")
    return dirs, (t1, t2, t3), time.perf_counter() - t0


def curves(run: Path) -> list[dict]:
    """The validation rows of a run (tokens, val_loss/prose, val_loss/code, ...)."""
    return [r for r in read_metrics(run / "metrics.jsonl") if "val_loss/prose" in r]


def at(dirs: dict[str, Path], name: str, tokens: int) -> dict | None:
    """The validation row of a run at `tokens`; before a branch's start, its parent's (the same model); None past
    the run's end."""
    row = next((r for r in curves(dirs[name]) if r["tokens"] == tokens), None)
    if row is None and name in PARENT and tokens < curves(dirs[name])[0]["tokens"]:
        return at(dirs, PARENT[name], tokens)
    return row


def table(dirs: dict[str, Path], marks: tuple[int, int, int]) -> str:
    """Per-source validation loss at the end of each stage, and what the branch and the cooldown changed."""
    head = " | ".join(f"prose @ {t / 1e6:.2f}M | code @ {t / 1e6:.2f}M" for t in marks)
    lines = [f"| run | branches from | {head} |", "|---|---|" + "---:|" * 6]
    for name in RUNS:
        rows = [at(dirs, name, t) for t in marks]
        cells = [f"{row[f'val_loss/{s}']:.4f}" if row else "" for row in rows for s in ("prose", "code")]
        parent = PARENT.get(name, "-") + (" @ stage-2 end" if "cooldown" in name else "")
        lines.append(f"| {name} | {parent} | " + " | ".join(cells) + " |")
    end = marks[-1]
    lines += [
        "",
        f"What each change did at {end / 1e6:.2f}M tokens (difference in validation loss; negative is better):",
        "",
        "| change | prose | code |",
        "|---|---:|---:|",
    ]
    pairs = [
        ("the branch, without the cooldown (code-s2 - prose-s2)", "code-s2", "prose-s2"),
        ("the branch, with the cooldown (code-cooldown - prose-cooldown)", "code-cooldown", "prose-cooldown"),
        ("the cooldown, prose only (prose-cooldown - prose-s2)", "prose-cooldown", "prose-s2"),
        ("the cooldown, with the branch (code-cooldown - code-s2)", "code-cooldown", "code-s2"),
    ]
    for label, a, b in pairs:
        diff = [at(dirs, a, end)[f"val_loss/{s}"] - at(dirs, b, end)[f"val_loss/{s}"] for s in ("prose", "code")]
        lines.append(f"| {label} | {diff[0]:+.4f} | {diff[1]:+.4f} |")
    return "\n".join(lines)


def history(dirs: dict[str, Path], name: str) -> list[dict]:
    """A run's validation rows, a branch's led by its parent's at the branch point (where the branch starts)."""
    rows = curves(dirs[name])
    start = [r["tokens"] for r in read_metrics(dirs[name] / "metrics.jsonl") if "branched_from" in r]
    return [row for t in start if (row := at(dirs, PARENT[name], t))] + rows


def plot(dirs: dict[str, Path], png: Path, marks: tuple[int, int, int]) -> None:
    """Validation loss per source against tokens seen, one line per run; the middle panel zooms on prose after the
    base stage, where the runs differ by hundredths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    styles = {"base": "k-", "prose-s2": "C0-", "code-s2": "C1-", "prose-cooldown": "C0--", "code-cooldown": "C1--"}
    panels = [
        ("prose", "validation loss on prose", 0),
        ("prose", "prose, stages 2 and 3", marks[0]),
        ("code", "validation loss on code", 0),
    ]
    for ax, (source, title, since) in zip(axes, panels, strict=True):
        for name in RUNS:
            rows = [r for r in history(dirs, name) if r["tokens"] >= since]
            xs, ys = [r["tokens"] / 1e6 for r in rows], [r[f"val_loss/{source}"] for r in rows]
            ax.plot(xs, ys, styles[name], label=name)
        for t in marks[:2]:
            ax.axvline(t / 1e6, color="0.7", lw=0.8)
        ax.set_title(title)
        ax.set_xlabel("tokens seen (M)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cross-entropy (nats/token)")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "v11-replication", help="run folder")
    parser.add_argument(
        "--results", type=Path, default=ROOT / "bench" / "results" / "2026-12-01-v11-replication.md", help="table"
    )
    parser.add_argument("--smoke", action="store_true", help="a 0.3 MB corpus and 1/16 of the steps (seconds)")
    args = parser.parse_args()
    dirs, marks, seconds = run_all(args.out, 16 if args.smoke else 1)
    text = table(dirs, marks)
    png = args.results.with_suffix(".png")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    plot(dirs, png, marks)
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True).stdout.strip()
    import torch

    header = (
        f"{time.strftime('%Y-%m-%d')}, CPU ({platform.machine()}, {torch.get_num_threads()} threads), commit "
        f"{commit or 'unknown'}{' with uncommitted changes' if dirty else ''}, torch {torch.__version__}: "
        f"`python3 bench/v11_replication.py{' --smoke' if args.smoke else ''}` ({seconds:.0f} s of training)"
    )
    setup = __doc__.split("\n\n")[1:3]  # the runs, as the docstring draws them
    body = "\n\n".join(["# TinyLlama v1.1 at toy scale (issue 16)", header, *setup])
    args.results.write_text(f"{body}\n\n{text}\n\n![per-source validation loss]({png.name})\n")
    print(f"{header}\n\n{text}")


if __name__ == "__main__":
    main()
