"""A small scaling sweep for `llamita plan fit`: sizes x token counts of the sweep presets on the demo corpus.

Every point is a real `llamita pretrain` run (recipe `recipes/plan-sweep.yaml`: the demo recipe's mixture and
optimizer, its own cosine schedule over its own length, validation at the end); the law is then fitted to the runs'
final validation losses exactly as `llamita plan fit RUNS...` fits a user's own runs, and the table, the law (JSON)
and the iso-loss plot are written to --out.

    # on one GPU (about 5 minutes for the default 16 runs on an H200), or --smoke on a CPU (seconds)
    PYTHONPATH=src python3 bench/plan_sweep.py --out out/sweep
    llamita plan optimal --law out/sweep/law.json --flops 1e17    # the fitted law answers the planning questions

With the sweep's 1024-token vocabulary the demo corpus holds about 3M training tokens (the stdlib's docs and code
of the Python that runs it), so the largest token count, 4M, reads it about 1.4 times; up to 4 passes train about
as well as unique data (Muennighoff et al. 2023), so the D term is not bent by the repeats.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llamita.config import load_config  # noqa: E402
from llamita.demo import demo_sources, prepare_demo_data  # noqa: E402
from llamita.plan.laws import fit_law, iso_loss_plot, optimal_for_flops, save_law  # noqa: E402
from llamita.plan.runs import read_run_points  # noqa: E402
from llamita.pretrain import pretrain  # noqa: E402

PRESETS = ["sweep-xs", "sweep-s", "sweep-m", "sweep-l"]
TOKENS = [524_288, 1_048_576, 2_097_152, 4_194_304]
VOCAB = 1024
"""A small vocabulary, so that the embedding does not dominate the small models' parameters."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs, the law and the table")
    parser.add_argument("--presets", default=",".join(PRESETS), help="model presets, comma-separated")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="training tokens per run")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap refits for the intervals")
    parser.add_argument("--smoke", action="store_true", help="2 tiny runs per preset on a 0.3 MB corpus (CPU check)")
    args = parser.parse_args()
    presets = args.presets.split(",")
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.smoke:
        presets, tokens = ["sweep-xs", "sweep-s", "sweep-m"], [16_384, 32_768]
    data_root = args.out / "data"
    tok_dir, data_dirs = prepare_demo_data(data_root, corpus_mb=0.3 if args.smoke else None, vocab_size=VOCAB)

    t0 = time.perf_counter()
    runs = []
    for preset in presets:
        for n_tokens in tokens:
            run = args.out / "runs" / f"{preset}-{n_tokens}"
            overrides = {
                "out_dir": str(run),
                "data.tokenizer": str(tok_dir),
                "data.sources": demo_sources(data_dirs),
                "model.preset": preset,
                "train.max_tokens": str(n_tokens),
            }
            if args.smoke:
                overrides |= {"train.device": "cpu", "train.dtype": "fp32", "eval.batches": "2"}
            cfg = load_config(str(ROOT / "recipes" / "plan-sweep.yaml"), overrides)
            t = time.perf_counter()
            result = pretrain(cfg)
            print(f"{preset} {n_tokens:,} tokens: val loss {result['val_loss']:.4f} in {time.perf_counter() - t:.1f} s")
            runs.append(run)
    sweep_seconds = time.perf_counter() - t0

    points = read_run_points(runs)
    law = fit_law([(p.n_params, p.n_tokens, p.loss) for p in points], n_bootstrap=args.bootstrap, name="plan-sweep")
    save_law(law, args.out / "law.json")
    iso_loss_plot(law, args.out / "iso_loss.png")
    rows = [
        {
            "run": Path(p.run).name,
            "params": p.n_params,
            "tokens": p.n_tokens,
            "val_loss": p.loss,
            "fitted": float(law.loss(p.n_params, p.n_tokens)),
        }  # fmt: skip
        for p in points
    ]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    device = "cpu"
    import torch

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "device": device,
        "commit": commit.strip(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join(["python3", "bench/plan_sweep.py", *sys.argv[1:]]),
        "sweep_seconds": round(sweep_seconds, 1),
        "runs": rows,
        "law": law.constants(),
        "intervals": law.fit.intervals if law.fit else None,
        "optimum_1e17": optimal_for_flops(law, 1e17).as_dict(),
    }
    (args.out / "plan_sweep.json").write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))


def table(result: dict) -> str:
    """The sweep's runs and the fitted law as Markdown."""
    lines = [
        f"{result['date']}, {result['device']}, commit {result['commit']}, torch {result['torch']}: "
        f"`{result['command']}` ({result['sweep_seconds']} s of training)",
        "",
        "| run | params | tokens | val loss | fitted law | error |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['run']} | {r['params'] / 1e6:.2f}M | {r['tokens'] / 1e6:.2f}M | {r['val_loss']:.4f} | "
            f"{r['fitted']:.4f} | {100 * (r['fitted'] / r['val_loss'] - 1):+.2f}% |"
        )
    lines += ["", "| constant | fitted | 95% bootstrap interval |", "|---|---:|---|"]
    for name, value in result["law"].items():
        low, high = (result["intervals"] or {}).get(name, (float("nan"), float("nan")))
        lines.append(f"| {name} | {value:.4g} | {low:.4g} .. {high:.4g} |")
    opt = result["optimum_1e17"]
    lines += ["", f"compute-optimal at 1e17 FLOPs: {opt['n_params'] / 1e6:.1f}M params, {opt['n_tokens'] / 1e6:.0f}M "
              f"tokens, loss {opt['loss']:.3f}"]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
