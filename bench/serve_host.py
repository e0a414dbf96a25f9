"""The serving engine loop's host work per step, on a CPU: what `llamita serve --engine-process` does for every step
besides `Engine.step` (the deltas, the pipe message), at 64 and 256 sequences decoding; and the text of a step's
deltas (each sequence's `TextStream`), which the HTTP side makes (`Server.text`) since 2026-12-06.

A GPU step at 256 sequences takes 2-3 ms (TinyLlama-1.1B shape, H200, `results/2026-12-04-engine-r8.md`). With
`overlap`, the host works on step k while the device runs k + 1, so the host's work per step (the engine's
bookkeeping and this loop's) is the step's time wherever it is the longer of the two. This measures the loop's part
on the machine it runs on, with a tiny model (so that `Engine.step`, which includes the CPU's own forward here, is
not comparable to a GPU's) and serve_load's word-level tokenizer (32,000 words; the ids drawn from the model's
512), requests that ignore EOS and ask for no stop strings (serve_load's).

    PYTHONPATH=src python bench/serve_host.py --out /tmp/serve_host
"""

from __future__ import annotations

import argparse
import json
import pickle
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def measure(batch: int, steps: int) -> dict:
    """ms per step of `EngineThread._step` at `batch` sequences: all of it, `Engine.step`'s part, and the rest."""
    import torch
    from serve_load import word_tokenizer

    from llamita.inference import Engine, EngineConfig, SamplingParams
    from llamita.inference.engine_process import wire
    from llamita.inference.engine_thread import EngineThread, Job
    from llamita.inference.text import TextStream, step_text
    from llamita.model import Llama, ModelConfig

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=512, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, intermediate_size=64,
                         max_seq_len=1024)  # fmt: skip
    engine = Engine(Llama(config).eval(), EngineConfig(max_batch=batch, prefill_tokens=8192))
    tokenizer = word_tokenizer(32000)
    sent, delivered = [], []

    def deliver(deltas: list) -> None:
        sent.append(len(pickle.dumps(wire(deltas))))
        delivered.append(deltas)

    thread = EngineThread(engine, deliver=deliver)
    g = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=steps + 16, ignore_eos=True)
    prompts = [[1] + [g.randrange(3, 512) for _ in range(200)] for _ in range(batch)]
    thread._commands.put(("add", [Job(0, p, params, None, i) for i, p in enumerate(prompts)]))  # text: HTTP side
    thread._apply(block=False)
    for _ in range(4):  # the prefill, and steps with every sequence decoding
        thread._step()
    inner, step = 0.0, engine.step

    def timed():
        nonlocal inner
        t = time.perf_counter()
        out = step()
        inner += time.perf_counter() - t
        return out

    engine.step = timed
    t = time.perf_counter()
    for _ in range(steps):
        thread._step()
    total = (time.perf_counter() - t) / steps * 1e3
    # The HTTP side's text of the timed steps' deltas (serve_load's requests: no stop strings, no logprobs).
    texts = {i: TextStream(tokenizer, p, ()) for i, p in enumerate(prompts)}
    t = time.perf_counter()
    for deltas in delivered[-steps:]:
        for key, d in deltas:
            step_text(texts[key], d.token_ids, False, d.finish_reason is not None)
    text_ms = (time.perf_counter() - t) / steps * 1e3
    return {"batch": batch, "step_ms": total, "engine_step_ms": inner / steps * 1e3,
            "loop_own_ms": total - inner / steps * 1e3, "message_bytes": sum(sent[-steps:]) / steps,
            "http_text_ms": text_ms}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = [measure(b, args.steps) for b in args.batches]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_host.json").write_text(json.dumps(rows, indent=1))
    print("| sequences | step ms | Engine.step ms | the loop's own ms | message bytes | the HTTP side's text ms |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['step_ms']:.2f} | {r['engine_step_ms']:.2f} | {r['loop_own_ms']:.2f} | "
              f"{r['message_bytes']:,.0f} | {r['http_text_ms']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
