"""`llamita generate --prompts FILE.jsonl`: a file of prompts through the engine as one batch, a JSONL of completions.

Each input line is a JSON object with a "prompt" string; its other fields are copied to the output line, which adds
"completion", "finish_reason" and "new_tokens". Lines that are not such objects, or whose prompt does not fit the
model's context, are skipped, counted and reported with their line numbers; the others are still generated.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from llamita.config import ConfigError
from llamita.inference.llm import LLM
from llamita.inference.sampling import SamplingParams

SHOWN = 10
"""Bad lines named in the report; the rest are counted."""


def read_prompts(path: Path, llm: LLM) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    """The file's good records (line number, object) and its bad lines (line number, what is wrong)."""
    good, bad = [], []
    context = llm.engine.seq_len
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                bad.append((number, f"invalid JSON ({e.msg})"))
                continue
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                bad.append((number, 'not an object with a "prompt" string'))
                continue
            n = len(llm.tokenizer.encode(record["prompt"], bos=True))
            if n >= context:
                bad.append((number, f"the prompt is {n} tokens; the model's context is {context}"))
                continue
            good.append((number, record))
    return good, bad


def generate_file(llm: LLM, params: SamplingParams, path: Path, out: Path | None) -> None:
    """Generate a completion for every good line of `path`, written to `out` (None: stdout) in the file's order.

    Raises:
        FileNotFoundError: `path` does not exist.
        ConfigError: The file holds no good line.
    """
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    good, bad = read_prompts(path, llm)
    named = "; ".join(f"line {n}: {why}" for n, why in bad[:SHOWN])
    report = f"skipped {len(bad)} bad line(s): {named}" + (f"; and {len(bad) - SHOWN} more" if len(bad) > SHOWN else "")
    if not good:
        raise ConfigError(
            f'--prompts {path}: no line holds a JSON object with a "prompt" string to continue'
            + (f" ({report})" if bad else "")
        )
    if bad:
        print(f"llamita generate: {path}: {report}", file=sys.stderr)
    completions = llm.generate([record["prompt"] for _, record in good], params)
    with out.open("w", encoding="utf-8") if out else contextlib.nullcontext(sys.stdout) as f:
        for (_, record), c in zip(good, completions):
            row = {**record, "completion": c.text, "finish_reason": c.finish_reason, "new_tokens": len(c.token_ids)}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    if out:
        print(f"llamita generate: {len(good)} completion(s) -> {out}", file=sys.stderr)
