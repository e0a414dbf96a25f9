"""Does llama.cpp run llamita's GGUF export like llamita does? Token ids, greedy continuations, top-1 agreement.

Trains (or reuses) a `demo`-preset run on the embedded demo corpus, exports it as f16, q8_0 and q4_0 GGUF files
and runs them with llama.cpp through llama-cpp-python (not a llamita dependency: it compiles llama.cpp when
installed, e.g. `CMAKE_ARGS="-DGGML_NATIVE=off" pip install llama-cpp-python==0.3.36`).

    python bench/llamacpp_agreement.py        # train 150 demo steps into runs/llamacpp-agreement, then compare
    python bench/llamacpp_agreement.py --run runs/demo    # compare an existing run

Measured:
* tokenizer: documents of both demo sources whose llama.cpp token ids equal llamita's exactly;
* greedy: continuations of the prompts (32 new tokens) that llama.cpp reproduces token for token, and their
  common prefix;
* teacher-forced top-1: positions of llamita's greedy continuations where llama.cpp's argmax is llamita's token,
  and the largest logit difference.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

PROMPTS = [
    "The list type",
    "def read_file(path):",
    "Return the number of",
    "import os\nimport sys\n\n",
    "class Parser:\n    def __init__(self",
    "This module provides",
    "    for i in range(",
    "The default value is",
]


def documents(run: Path, per_source: int) -> list[str]:
    from llamita.data.sources import Rejects, iter_documents

    out = []
    for path in sorted((run / "corpus").iterdir()):
        docs = iter_documents(path, "text", Rejects())
        out += [d for _, d in zip(range(per_source), docs)]
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/llamacpp-agreement", help="demo run directory (trained if missing)")
    parser.add_argument("--steps", type=int, default=150, help="training steps when the run is missing")
    parser.add_argument("--corpus-mb", type=float, default=1.0, help="demo corpus cap per source when training")
    parser.add_argument("--docs", type=int, default=300, help="documents per source for the tokenizer check")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt")
    parser.add_argument("--build-seconds", type=float, default=None, help="llama-cpp-python's build time, to record")
    parser.add_argument("--out", default="bench/results/2026-11-24-llamacpp-agreement.md", help="results file")
    parser.add_argument("--machine", default="CPU 2 cores 24 GB", help="machine description for the results")
    args = parser.parse_args()

    import llama_cpp

    from llamita.demo import run_demo
    from llamita.inference import LLM, SamplingParams
    from llamita.interop import export_gguf
    from llamita.pretrained import load_pretrained
    from llamita.train.checkpoint import list_checkpoints

    run = Path(args.run)
    if not list_checkpoints(run):
        run_demo(run, max_steps=args.steps, corpus_mb=args.corpus_mb, overrides={"checkpoint.interval": "50"})
    pre = load_pretrained(run)
    tok, eos = pre.tokenizer, pre.tokenizer.eos_id
    n_ctx = pre.model_config.max_seq_len

    ours: dict[str, list[int]] = {}
    logits: dict[str, np.ndarray] = {}
    llm = LLM(pre.model, tok, max_batch=len(PROMPTS))
    greedy = SamplingParams(temperature=0.0, max_tokens=args.new_tokens)
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, greedy)):
        ids = out.prompt_token_ids
        ours[prompt] = out.token_ids
        with torch.no_grad():
            logits[prompt] = pre.model(torch.tensor([ids + ours[prompt]]))[0].numpy()  # [T, V]

    docs = documents(run, args.docs)
    results = {}
    for quant in ("f16", "q8_0", "q4_0"):
        path = export_gguf(run, run / f"model-{quant}.gguf", quant)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, logits_all=True, verbose=False)
        try:
            r = {"size_mb": path.stat().st_size / 1e6, "greedy_equal": 0, "prefix": [], "agree": 0, "positions": 0}
            if quant == "f16":
                encode = llm.tokenize
                mismatched = [
                    d for d in docs if encode(d.encode(), add_bos=True, special=False) != tok.encode(d, bos=True)
                ]
                r["docs_equal"] = len(docs) - len(mismatched)
                r["example"] = mismatched[0][:200] if mismatched else None
            r["max_logit_diff"] = 0.0
            for prompt in PROMPTS:
                ids = tok.encode(prompt, bos=True)
                theirs = []
                for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
                    theirs.append(token)
                    if token == eos or len(theirs) == args.new_tokens:
                        break
                r["greedy_equal"] += theirs == ours[prompt]
                r["prefix"].append(common_prefix(theirs, ours[prompt]))
                sequence = ids + ours[prompt]
                llm.reset()
                llm.eval(sequence)
                scores = llm.scores[: len(sequence)]
                predicted = scores[len(ids) - 1 : -1].argmax(-1)
                r["agree"] += int((predicted == np.array(ours[prompt])).sum())
                r["positions"] += len(ours[prompt])
                r["max_logit_diff"] = max(r["max_logit_diff"], float(np.abs(scores - logits[prompt]).max()))
            results[quant] = r
            print(quant, r, flush=True)
        finally:
            llm.close()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    f16 = results["f16"]
    lines = [
        "# llama.cpp agreement with llamita on the GGUF export",
        "",
        f"- date: {time.strftime('%Y-%m-%d')}",
        f"- machine: {args.machine} ({platform.machine()}, Python {platform.python_version()})",
        f"- commit: {commit} (with the working tree's interop changes)",
        f"- command: `python bench/llamacpp_agreement.py --run {args.run}`",
        f"- llama.cpp: llama-cpp-python {llama_cpp.__version__}"
        + (f", built from source in {args.build_seconds:.0f} s on this machine" if args.build_seconds else ""),
        f"- model: {run} (`demo` preset, {pre.model_config.num_params / 1e6:.1f} M parameters, step {pre.step}, "
        f"{tok.vocab_size}-token tokenizer)",
        "",
        f"Tokenizer: {f16['docs_equal']}/{len(docs)} demo-corpus documents (the first {args.docs} of each source) "
        "get exactly llamita's token ids from llama.cpp's `llama` (SentencePiece) tokenizer"
        + (f"; first mismatch: {f16['example']!r}" if f16["example"] else "."),
        "",
        f"Greedy decoding of {len(PROMPTS)} prompts, {args.new_tokens} new tokens each (llamita: fp32 on CPU). "
        "Teacher-forced top-1: llama.cpp's argmax at each position of llamita's greedy continuation.",
        "",
        "| GGUF | size (MB) | identical continuations | mean common prefix | teacher-forced top-1 | max logit diff |",
        "|---|---|---|---|---|---|",
    ]
    for quant, r in results.items():
        prefix = sum(r["prefix"]) / len(r["prefix"])
        cells = [
            quant,
            f"{r['size_mb']:.1f}",
            f"{r['greedy_equal']}/{len(PROMPTS)}",
            f"{prefix:.1f}/{args.new_tokens}",
            f"{r['agree']}/{r['positions']} ({100 * r['agree'] / r['positions']:.1f}%)",
            f"{r['max_logit_diff']:.3g}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
