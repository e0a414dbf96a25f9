"""Decode attention alone, one layer, TinyLlama-1.1B's heads (4 key/value heads of 64, 8 query heads each), bf16,
on one GPU: llamita's split-KV kernel (`llamita::decode_attention`) against SDPA's kernels as the engine calls
them (the G query heads of a key/value head as G queries, a boolean mask of each row's positions): cuDNN's (the
default on an H200) and the memory-efficient one. ARCHITECTURE.md: a hand-written Triton kernel must beat the
library one in a benchmark; this is that benchmark, before `bench/profile_decode.py --decode-attention triton`
times it inside the engine's step.

Cases: batch 1, 64 and 256 at 384 positions, every row full (the `infer_throughput` shape: prompt 128 + 256 new),
and batch 64 and 256 in 2048-position slots with ShareGPT-like lengths (`serve_load`'s requests halfway through
their answers), where SDPA reads every row to the read length and the kernel each row's own. Each call is
captured in a CUDA graph and replayed (as the engine's step is), timed with CUDA events; GB/s counts the keys and
values each kernel must read (the kernel: each row's own positions; SDPA: the whole read length).

    python bench/decode_attention.py [--sweep] --out $OUT
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from llamita.inference.graphs import capture  # noqa: E402
from llamita.model.decode_attention import BLOCK_N, _triton, decode_attention, reference  # noqa: E402

KV, G, D = 4, 8, 64
SCALE = D**-0.5
CASES = [(1, 384, "full"), (64, 384, "full"), (256, 384, "full"), (64, 2048, "mixed"), (256, 2048, "mixed")]
SWEEP = [(n, w, 2) for n in (32, 64, 128) for w in (2, 4, 8) if (n, w) != (BLOCK_N, 4)] + [
    (BLOCK_N, 4, 1),
    (BLOCK_N, 4, 3),
]
"""`--sweep`: the kernel's other tunings (positions per block, warps, stages), 10 of them; the default is
(BLOCK_N, 4, 2)."""


def _lengths(batch: int, read: int, kind: str) -> torch.Tensor:
    if kind == "full":
        return torch.full((batch,), read)
    from serve_load import SHAPE, sharegpt_like  # this folder

    requests = sharegpt_like(batch, 32000, {"prompt": [*SHAPE["prompt"][:3], read // 2], "output": SHAPE["output"]})
    return torch.tensor([min(len(r.prompt) + r.max_tokens // 2, read) for r in requests])


def _graphed_us(fn, iters: int) -> float:
    """Microseconds of one replay of fn's CUDA graph, captured as the engine captures its steps."""
    graph, _ = capture(fn, torch.cuda.graph_pool_handle(), torch.cuda.Stream())
    for _ in range(5):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--sweep", action="store_true",
                        help="also the kernel at 10 other tunings: positions per block, warps, stages")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("out/decode_attention"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/decode_attention.py times CUDA kernels: run it on a GPU")
    torch.manual_seed(0)
    rows = []
    for batch, read, kind in CASES:
        lengths = _lengths(batch, read, kind).cuda()
        q = torch.randn(batch, KV, G, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, KV, read, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        mask = (torch.arange(read, device="cuda") < lengths[:, None])[:, None, None].expand(batch, 1, G, read)

        def sdpa(backends, q=q, k=k, v=v, mask=mask):
            with sdpa_kernel(backends):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=SCALE)

        variants = {
            "sdpa (cuDNN)": lambda: sdpa([SDPBackend.CUDNN_ATTENTION]),
            "sdpa (efficient)": lambda: sdpa([SDPBackend.EFFICIENT_ATTENTION]),
            "llamita triton": lambda q=q, k=k, v=v, lengths=lengths: decode_attention(q, k, v, lengths, SCALE),
        }
        if args.sweep:
            for block_n, warps, stages in SWEEP:
                variants[f"llamita triton n{block_n} w{warps} s{stages}"] = (
                    lambda q=q, k=k, v=v, lengths=lengths, t=(block_n, warps, stages): _triton(
                        q, k, v, lengths, SCALE, *t
                    )
                )
        expected = reference(q.float(), k.float(), v.float(), lengths, SCALE)
        own_bytes = int(lengths.sum()) * KV * D * 2 * 2  # keys and values, bf16
        all_bytes = batch * read * KV * D * 2 * 2
        for name, fn in variants.items():
            row = {"batch": batch, "read": read, "lengths": kind, "mean_length": float(lengths.float().mean()),
                   "variant": name}  # fmt: skip
            try:
                with torch.no_grad():
                    error = float((fn().float() - expected).abs().max())
                    us = _graphed_us(fn, args.iters)
            except Exception as e:  # a backend that does not take the case: say so, go on
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                rows.append(row)
                print(row, flush=True)
                continue
            must_read = own_bytes if name.startswith("llamita") else all_bytes
            row |= {"us": us, "gb_s": must_read / us / 1e3, "max_abs_error": error}
            rows.append(row)
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    record = {"date": time.strftime("%Y-%m-%d"), "commit": commit.stdout.strip(),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.argv),
              "heads": {"kv": KV, "g": G, "d": D}, "rows": rows}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_attention.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [f"{record['date']}, {record['device']}, torch {record['torch']}, commit {record['commit']}", "",
             "| batch | read | lengths (mean) | variant | µs a layer | GB/s of what it must read | max abs error |",
             "|---:|---:|---|---|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        cells = [str(r["batch"]), str(r["read"]), f"{r['lengths']} ({r['mean_length']:.0f})", r["variant"]]
        if "error" in r:
            cells += [r["error"], "", ""]
        else:
            cells += [f"{r['us']:.1f}", f"{r['gb_s']:,.0f}", f"{r['max_abs_error']:.2e}"]
        lines.append("| " + " | ".join(cells) + " |")
    (args.out / "decode_attention.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
