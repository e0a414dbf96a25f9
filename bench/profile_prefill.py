"""Where a prefill step of the engine spends its time, TinyLlama-1.1B shape, random bf16 weights, on one GPU.

Under serving load (`bench/serve_load.py`) a prefill step of one or two ~200-token prompts took about 20 ms,
against about 1 ms of arithmetic. This script separates the candidates: for batches of K prompts of n tokens it
times `Engine.step` (the prefill forward and the first token, nothing decoding; more than one step where the
prompts exceed the prefill budget) between syncs, for a shape seen for the first time and for the same shape again
(a per-shape cost: recompilation, an attention plan, autotuning), and counts Dynamo's compilations before and after
(a recompilation, or the compile limit and a fall-back to eager, shows there). Then one prefill under
torch.profiler: host time against GPU time, and the kernels. A prefill forward is compiled but not graphed: if its
host time is the launches of 22 blocks' kernels through Inductor's Python wrapper, `--cpp-wrapper` shows what
launching them from C++ saves, and `--no-compile` what the eager path costs.

    python bench/profile_prefill.py --out $OUT
    python bench/profile_prefill.py --preset debug --seq-len 128 --max-batch 8 --shapes 3 --out /tmp/p  # CPU smoke
    TORCH_LOGS=recompiles python bench/profile_prefill.py --out $OUT     # with the reasons of any recompilation
    python bench/profile_prefill.py --cpp-wrapper --out $OUT             # kernels launched from C++
    python bench/profile_prefill.py --prefill-graphs --out $OUT          # replayed from CUDA graphs (by bucket)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tinyllama-1.1b")
    parser.add_argument("--seq-len", type=int, default=2048, help="slot length (the serving benchmark's)")
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--shapes", type=int, default=24, help="prefill batches of new (K, n) each")
    parser.add_argument("--no-compile", action="store_true", help="the engine's eager path (launch-bound)")
    parser.add_argument("--cpp-wrapper", action="store_true", help="Inductor's compiled code launching from C++")
    parser.add_argument("--fuse", action="store_true", help="q/k/v and gate/up fused (`LLM(fuse=True)`)")
    parser.add_argument("--prefill-graphs", action="store_true", help="EngineConfig.prefill_graphs: padded buckets")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    args = parser.parse_args()
    if args.cpp_wrapper:
        import torch._inductor.config as inductor

        inductor.cpp_wrapper = True

    from torch._dynamo.utils import counters

    from llamita.inference import Engine, EngineConfig, SamplingParams
    from llamita.model import Llama, get_preset

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else lambda: None
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Llama(get_preset(args.preset))
    model.to_empty(device="cuda" if cuda else "cpu")
    model.init_weights()
    model = model.to(torch.bfloat16 if cuda else torch.float32).eval()
    if args.fuse:
        model.fuse_projections()
    t0 = time.perf_counter()
    config = EngineConfig(max_batch=args.max_batch, max_seq_len=args.seq_len, compile=not args.no_compile,
                          prefill_graphs=args.prefill_graphs)  # fmt: skip
    engine = Engine(model, config)
    print(f"engine started in {time.perf_counter() - t0:.1f} s: {engine.startup_s}", flush=True)
    vocab = model.config.vocab_size
    rng = random.Random(0)
    first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)  # prefill + the first token only

    def prefill(k: int, n: int) -> float:
        for _ in range(k):
            engine.add([rng.randrange(vocab) for _ in range(n)], first)
        sync()
        t = time.perf_counter()
        while engine.has_work():  # one step, or more where the prompts exceed the prefill budget (chunks)
            engine.step()
        sync()
        return (time.perf_counter() - t) * 1e3

    rows = []
    for i in range(args.shapes):
        k, n = rng.choice([1, 1, 2, 2, 3, 4, 8]), rng.randint(60, min(700, args.seq_len - 2))
        graphs = counters["stats"]["unique_graphs"]
        new = prefill(k, n)
        again = prefill(k, n)
        rows.append({"k": k, "n": n, "first_ms": new, "again_ms": again,
                     "compiled_graphs": counters["stats"]["unique_graphs"] - graphs})  # fmt: skip
        r = rows[-1]
        print(f"{i:>3} K={k:<2} n={n:<4} first {new:8.2f} ms  again {again:8.2f} ms  "
              f"new graphs {r['compiled_graphs']}", flush=True)  # fmt: skip

    width = min(256, args.seq_len // 2)
    prefill(2, width)
    activities = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * cuda
    with torch.profiler.profile(activities=activities) as prof:
        wall = prefill(2, width)
    events = prof.key_averages()
    gpu_ms = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    table = events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
    print(f"== one prefill of 2 x {width} tokens: {wall:.2f} ms wall, {gpu_ms:.2f} ms of kernels, {launches} launches\n"
          f"{table}", flush=True)  # fmt: skip

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"fused": args.fuse, "preset": args.preset, "seq_len": args.seq_len, "max_batch": args.max_batch,
              "compile": not args.no_compile, "cpp_wrapper": args.cpp_wrapper, "prefill_graphs": args.prefill_graphs,
              "startup_phases_s": engine.startup_s, "device": torch.cuda.get_device_name() if cuda else "cpu",
              "torch": torch.__version__, "rows": rows, "profiled": {"wall_ms": wall, "kernel_ms": gpu_ms,
              "launches": launches, "table": table}, "dynamo": {k: dict(v) for k, v in counters.items()}}  # fmt: skip
    (out / "profile_prefill.json").write_text(json.dumps(record, indent=1, default=str))
    firsts, agains = [r["first_ms"] for r in rows], [r["again_ms"] for r in rows]
    print(f"prefill steps: first of a shape median {sorted(firsts)[len(firsts) // 2]:.2f} ms, the same shape again "
          f"median {sorted(agains)[len(agains) // 2]:.2f} ms; graphs compiled while serving: "
          f"{sum(r['compiled_graphs'] for r in rows)}")  # fmt: skip


if __name__ == "__main__":
    main()
