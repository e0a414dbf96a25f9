"""Compare the loss curves of two `llamita pretrain` runs (bf16 and fp8) from their metrics.jsonl files.

The criterion of the Speed-and-scale issue: over a 300-step run on real shards, the fp8 curve stays within 1% of
the bf16 curve. Per-step losses are noisy (each step sees a different batch, and the two runs drift apart), so the
curves are compared as moving averages over `--window` steps, after warmup.

    python bench/fp8_convergence.py RUN_BF16 RUN_FP8 [--window 20] [--skip 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _moving_average(values: list[float], window: int) -> list[float]:
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def compare(bf16: Path, fp8: Path, window: int, skip: int) -> dict:
    """Relative gap between the moving-average loss curves, and each run's speed and validation loss."""
    runs = {"bf16": _rows(bf16), "fp8": _rows(fp8)}
    train = {k: [r for r in rows if "loss" in r] for k, rows in runs.items()}
    steps = min(len(v) for v in train.values())
    curves = {k: _moving_average([r["loss"] for r in v[:steps]], window) for k, v in train.items()}
    gaps = [abs(f - b) / b for b, f in zip(curves["bf16"][skip:], curves["fp8"][skip:], strict=True)]
    out: dict = {
        "steps": steps,
        "window": window,
        "skip": skip,
        "max_rel_gap": max(gaps),
        "mean_rel_gap": statistics.fmean(gaps),
    }
    for k, v in train.items():
        rates = sorted(r["tokens_per_s"] for r in v[10:])
        val = [r["val_loss"] for r in runs[k] if "val_loss" in r]
        out[k] = {
            "median_tokens_per_s": rates[len(rates) // 2],
            "final_loss_avg": curves[k][-1],
            "val_loss": val,
            "max_memory_gib": max((r.get("max_memory_gib", 0.0) for r in v), default=None),
        }
    out["checkpoints"] = {
        k: sorted(p.name for p in (run / "checkpoints").iterdir()) for k, run in (("bf16", bf16), ("fp8", fp8))
    }
    out["curve_every_25"] = [
        {"step": i + 1, "bf16": round(curves["bf16"][i], 4), "fp8": round(curves["fp8"][i], 4)}
        for i in range(24, steps, 25)
    ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bf16", type=Path)
    parser.add_argument("fp8", type=Path)
    parser.add_argument("--window", type=int, default=20, help="moving-average window (steps)")
    parser.add_argument("--skip", type=int, default=30, help="steps left out at the start (warmup)")
    args = parser.parse_args()
    result = compare(args.bf16, args.fp8, args.window, args.skip)
    print(json.dumps(result, indent=1))
    print("\n| step | bf16 (avg) | fp8 (avg) |\n|---:|---:|---:|")
    for row in result["curve_every_25"]:
        print(f"| {row['step']} | {row['bf16']:.4f} | {row['fp8']:.4f} |")
    print(
        f"\nmax relative gap of {args.window}-step averages after step {args.skip}: {100 * result['max_rel_gap']:.2f}% "
        f"(mean {100 * result['mean_rel_gap']:.2f}%); tokens/s bf16 {result['bf16']['median_tokens_per_s']:,.0f}, "
        f"fp8 {result['fp8']['median_tokens_per_s']:,.0f}"
    )


if __name__ == "__main__":
    main()
