"""Where a decode step of the engine spends its time, TinyLlama-1.1B shape, random bf16 weights, on one GPU.

For each batch size: the step replayed from its CUDA graph (what the engine runs), the model's forward alone and
the sampling alone (both eager and compiled, outside graphs), timed with CUDA events over many steps; then the
kernels of one compiled step (those its graph replays) by GPU time (torch.profiler), so that a change to the step
can be aimed and checked. Last, the whole `Engine.step` at each batch size (the graph's replay with the scheduler,
the landing of the tokens and the host's bookkeeping: what a user's generate pays per token) under torch.profiler:
its wall time, the GPU's busy time in it and the host's top operators, so that the step's wall time can be split
into the device's work and the host's.

    python bench/profile_decode.py --batches 1 64 256 [--no-overlap] [--no-single-row] --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def _events_ms(fn, steps: int) -> float:
    """Mean GPU milliseconds of fn() over `steps` calls, after 3 untimed ones."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def main() -> None:
    from llamita.inference.engine import DECODE_ATTENTION

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--preset", default="tinyllama-1.1b")
    parser.add_argument("--seq-len", type=int, default=384, help="slot length (prompt 128 + 256 new, as the benchmark)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--fuse", action="store_true", help="q/k/v and gate/up fused (`LLM(fuse=True)`)")
    parser.add_argument("--mixed-lengths", action="store_true",
                        help="rows of ShareGPT-like prompt lengths (median 200, up to half the slot) instead of "
                             "all 128: what a serving batch reads, where flex reads each row's own")  # fmt: skip
    parser.add_argument("--single-row", action=argparse.BooleanOptionalAction, default=None,
                        help="EngineConfig.single_row: a graph of one row (default: the engine's)")  # fmt: skip
    parser.add_argument("--decode-attention", choices=DECODE_ATTENTION, default=None,
                        help="EngineConfig.decode_attention; with flex or triton a row reads its own positions, "
                             "whatever the read length (the 'all reads' column)")  # fmt: skip
    parser.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                        help="EngineConfig.overlap, for the whole steps (default: the engine's)")  # fmt: skip
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    args = parser.parse_args()

    from llamita.inference import Engine, EngineConfig, SamplingParams, sampling
    from llamita.inference.engine import model_logits
    from llamita.model import Llama, get_preset

    torch.manual_seed(0)
    with torch.device("meta"):
        model = Llama(get_preset(args.preset))
    model.to_empty(device="cuda")
    model.init_weights()
    model = model.to(torch.bfloat16).eval()
    if args.fuse:
        model.fuse_projections()
    t0 = time.perf_counter()
    config = EngineConfig(max_batch=max(args.batches), max_seq_len=args.seq_len, compile=not args.no_compile,
                          decode_attention=args.decode_attention, single_row=args.single_row,
                          overlap=args.overlap)  # fmt: skip
    engine = Engine(model, config)
    startup = time.perf_counter() - t0
    print(f"engine started in {startup:.1f} s: {engine.startup_s}", flush=True)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = [torch.randint(0, vocab, (128,), generator=g).tolist() for _ in range(max(args.batches))]
    if args.mixed_lengths:  # serve_load's ShareGPT-like prompts, at most half a slot
        from serve_load import SHAPE, sharegpt_like  # this folder

        shape = {"prompt": [*SHAPE["prompt"][:3], args.seq_len // 2], "output": SHAPE["output"]}
        prompts = [r.prompt for r in sharegpt_like(max(args.batches), vocab, shape)]
    for prompt in prompts:
        params = SamplingParams(temperature=0.0, max_tokens=args.seq_len - len(prompt) - 2, ignore_eos=True)
        engine.add(prompt, params)
    while len(engine.scheduler.decoding()) < max(args.batches):
        engine.step()

    rows, kernels = [], {}
    for batch in args.batches:
        positions = engine.positions[:batch]
        attend = engine.attend(int(positions.max()) + 1)  # the read length the engine's step takes
        cache, tokens, positions, t, seen, counts = engine._decode_inputs(batch, attend)
        positions_copy = positions.clone()

        def graph(batch=batch, positions=positions, positions_copy=positions_copy, attend=attend):
            engine._decode(batch, attend, False)
            positions.copy_(positions_copy)  # stay at the same length: every step costs the same

        def forward(cache=cache, tokens=tokens, positions=positions):
            return model_logits(model, cache, tokens[:, None], positions[:, None])

        def forward_compiled(cache=cache, tokens=tokens, positions=positions):
            return engine._logits(model, cache, tokens[:, None], positions[:, None])

        logits = forward()[:, 0]
        plain = lambda logits=logits, t=t, seen=seen, counts=counts, positions=positions: sampling.sample(  # noqa: E731
            logits, t, seen, positions + 1, False, counts
        )
        compiled_sample = torch.compile(plain)
        engine_sample = lambda logits=logits, t=t, seen=seen, counts=counts, positions=positions: (  # noqa: E731
            engine._sample_plain(logits, t, seen, positions + 1, False, counts)
        )
        with torch.no_grad():
            row = {
                "batch": batch,
                "attend": attend,
                "mean_position": float(positions.float().mean()),
                "graph_step_ms": _events_ms(graph, args.steps),
                # The same step reading every position of the slots (what it did before read lengths).
                "graph_step_full_ms": _events_ms(lambda g=graph: g(attend=args.seq_len), args.steps),
                "forward_eager_ms": _events_ms(forward, args.steps // 5),
                "forward_compiled_ms": _events_ms(forward_compiled, args.steps // 5),
                "sample_eager_ms": _events_ms(plain, args.steps),
                "sample_compiled_ms": _events_ms(compiled_sample, args.steps),
                # The engine's own compiled sampling (dynamic shapes, compiled once at start-up for every batch
                # size), outside the graph: in session 12's whole steps its kernel took 0.8-1.2 ms of every step
                # against 0.12-0.17 ms for the sampling compiled at the batch's own size (the column before).
                "sample_engine_ms": _events_ms(engine_sample, args.steps),
            }
            # The kernels the graph replays: the compiled forward and sampling, run outside the graph.
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                forward_compiled()
                compiled_sample()
                torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        row["step_kernels"] = sum(e.count for e in events)
        row["step_kernel_ms"] = sum(e.self_device_time_total for e in events) / 1e3
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
        kernels[batch] = table
        row["tok_s_graph"] = batch / row["graph_step_ms"] * 1e3
        rows.append(row)
        print(
            f"== batch {batch}: kernels of one compiled forward + sampling (what the graph replays): "
            f"{row['step_kernels']} kernels, {row['step_kernel_ms']:.3f} ms\n{table}",
            flush=True,
        )

    whole = {batch: _whole_steps(engine, prompts[:batch], args.steps) for batch in args.batches}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"fused": args.fuse, "decode_attention": args.decode_attention, "single_row": engine.graphs.sizes[0] == 1,
              "mixed_lengths": args.mixed_lengths,
              "preset": args.preset, "seq_len": args.seq_len, "compile": not args.no_compile,
              "startup_s": startup, "startup_phases_s": engine.startup_s, "buckets": engine.buckets,
              "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "overlap": engine.overlap, "rows": rows, "whole_steps": whole, "kernels": kernels}  # fmt: skip
    (out / "profile_decode.json").write_text(json.dumps(record, indent=2))
    print(f"engine start-up (graphs{'' if args.no_compile else ' + compile'}): {startup:.1f} s {engine.startup_s}")
    print(f"{'batch':>5} {'reads':>5} {'graph step ms':>13} {'all reads ms':>12} {'tok/s':>9} {'fwd eager ms':>12} "
          f"{'fwd comp ms':>11} {'sample eager':>12} {'sample comp':>11} {'sample engine':>13}")  # fmt: skip
    for r in rows:
        print(
            f"{r['batch']:>5} {r['attend']:>5} {r['graph_step_ms']:>13.3f} {r['graph_step_full_ms']:>12.3f} "
            f"{r['tok_s_graph']:>9.0f} {r['forward_eager_ms']:>12.3f} "
            f"{r['forward_compiled_ms']:>11.3f} {r['sample_eager_ms']:>12.3f} {r['sample_compiled_ms']:>11.3f} "
            f"{r['sample_engine_ms']:>13.3f}"
        )

    print(f"{'batch':>5} {'step wall ms':>12} {'gpu busy ms':>11} {'steps ahead':>11}  host's top ops (ms a step)")
    for batch, w in whole.items():
        top = ", ".join(f"{name} {ms:.3f}" for name, _, ms in w["host_self_top_ms"][:6])
        print(f"{batch:>5} {w['step_wall_ms']:>12.3f} {w['gpu_busy_ms']:>11.3f} {w['steps_ahead']:>11}  {top}")


def _whole_steps(engine, prompts: list[list[int]], steps: int) -> dict:
    """`Engine.step` as generate runs it, with `len(prompts)` sequences decoding: the sequences there are aborted,
    these prompts admitted and prefilled, then `steps` steps profiled (wall, GPU busy, the host's operators)."""
    from train_throughput import _profile_breakdown  # this folder

    from llamita.inference import SamplingParams

    for seq in list(engine.scheduler.running):
        engine.abort(seq)
    while engine.has_work():
        engine.step()
    for prompt in prompts:
        engine.add(prompt, SamplingParams(temperature=0.0, max_tokens=2 * steps + 16, ignore_eos=True))
    while len(engine.scheduler.decoding()) < len(prompts):
        engine.step()
    before = engine.stats.ahead_steps

    def run_steps(n: int) -> None:
        for _ in range(n):
            engine.step()

    run_steps(5)
    result = _profile_breakdown(run_steps, steps, host=True)
    result["steps_ahead"] = engine.stats.ahead_steps - before
    return result


if __name__ == "__main__":
    main()
