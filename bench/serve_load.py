"""Serving under load: `llamita serve` with concurrent streaming clients, against the engine offline and
`transformers serve`, in one call (issue 15).

Model: the TinyLlama-1.1B shape with TinyLlama's random init (seed 0) in bf16, built on the device and written as a
Hugging Face directory with a word-level tokenizer over the same 32,000 ids (`<unk>`, `<s>`, `</s>`, then `t3` ..
`t31999`, split on whitespace): a prompt's text encodes to exactly its ids and each new token streams as one word,
so every system sees the same tokens whichever form (ids or text) its API takes. `--checkpoint PATH` serves a
trained llamita run or Hugging Face directory instead (a run is exported to Hugging Face's format for the peer).

Requests (`sharegpt_like`, seed 0), a stated ShareGPT-like shape, not fitted to the data set: prompt lengths
lognormal with median 200 tokens (sigma 0.8) clipped to [16, 1024]; output lengths lognormal with median 200 (sigma
0.6) clipped to [16, 512], drawn independently (254 and 231 tokens on average over the 1,024 drawn); prompt ids
uniform over the vocabulary past the special ids, after BOS. Every request is greedy (temperature 0) with its output
length as `max_tokens`; llamita is asked to `ignore_eos` (vLLM's extra field; the offline engine's SamplingParams
has it), so its answers run to `max_tokens`; output tokens are always counted from each answer's `usage`.
Concurrency c runs the first `requests_at(c)` = min(max(4c, 32), 1024) requests, the same ones for every system.

Systems, each in its own process (`sft_throughput.run_systems`), one after the other on the same device:

- ``llamita-offline``: the requests through `LLM`'s engine in one process, no HTTP: at most c in flight, the next
  added as one finishes (`Engine.add` / `Engine.step`), the closed loop the clients make; same `max_batch`.
  The cost of HTTP is the gap between this row and the next.
- ``llamita-serve``: ``llamita serve --checkpoint DIR --max-batch 256`` (a subprocess, stopped with SIGTERM at the
  end; ``--stream-interval N`` passes on, and ``--engine-process``, which puts its engine in a process of its
  own; ``--api-server-count N [M ...]`` runs it with N HTTP processes on one engine process, then M, ..., the runs
  past the first named ``llamita-serve-xM``). Clients: the official ``openai`` AsyncOpenAI, streaming `/v1/completions`
  with token-id prompts and ``stream_options.include_usage``, no retries, a connection pool as large as the
  concurrency; c workers each send one request at a time until the level's requests are done or `--level-seconds` have
  passed (the requests in flight then finish; any still running `--grace-seconds` later are cancelled, and count with
  the chunks they had streamed, a lower bound of their tokens). Past 16 streams the workers are spread over client
  processes (16 each, started together), so that parsing chunks in Python does not limit what is measured.
- ``transformers-serve``: ``transformers serve DIR --continuous-batching`` (its paged-attention continuous batching;
  without it, requests run one `generate` after another on one thread), its defaults otherwise, the same clients.
  Its `/v1/completions` takes text prompts only, so it gets each prompt's text (the same ids with the word-level
  tokenizer), and it refuses fields it does not know (422), so it is not asked to ignore EOS: its answers end at EOS
  or max_tokens (a random model rarely draws EOS; the detail table counts short answers). If it does not start, its
  row says why (the tail of its log).

Per request: TTFT = first chunk with text - request sent; ITL = (last text chunk - first text chunk) / (output
tokens - 1), whatever number of tokens a chunk holds (vLLM's TPOT); chunk gaps = the times between consecutive text
chunks (all gaps of the level together). Per level: output tokens/s = output tokens / (last answer done - first
request sent); requests = those completed (the detail table has sent, planned and cancelled); TTFT and ITL p50/p99
over the level's requests; errors = requests that raised or whose stream ended without usage. For llamita serve,
also where its time went in the level: its engine loop's steps, prefill steps, ms a step and ms a step by part
(`Engine.step`, the deltas, sending them, commands; read from its /metrics before and after), its processes' CPU and
its busiest thread's CPU (Linux's /proc; a thread near 100% of a core is what limits a Python loop; for the engine
offline, its loop's thread). A warm-up of `warmup` short requests runs, untimed, before a system's first level. A
level that would end past `--deadline` (seconds for the whole call) is skipped and says so, so that the record is
written.

Targets (issue 15): at concurrency 64 the server delivers >= 90% of the engine's offline throughput; at 256
>= 30,000 output tokens/s with p99 TTFT under 1 s and no errors; >= 10x `transformers serve`.

    PYTHONPATH=src python3 bench/serve_load.py --out out/serve                    # one GPU: all three systems
    PYTHONPATH=src python3 bench/serve_load.py --smoke --out /tmp/serve           # tiny model on a CPU, no peer
    PYTHONPATH=src python3 bench/serve_load.py --smoke --peers --out /tmp/serve   # ... with transformers serve

On the GPU machine (no package index) the serving stack is carried as wheels in `.whl/`: fastapi, starlette, uvicorn,
pydantic, pydantic-core, annotated-types, annotated-doc, typing-inspection, opentelemetry-api (fastapi's), openai,
jiter, sniffio, httpx2, httpcore2, truststore (openai's), anyio, h11, idna, click and typing-extensions (newer than
the image may hold); `transformers serve` needs nothing more there (rich and accelerate are on the image).
Outputs under `--out`: `serve_load.json` (date, device, commit, command, shape, every level's numbers),
`serve_load.md` (the same header and tables) and one log per server (`<system>.log`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from queue import Empty
from typing import Any

from sft_throughput import run_systems  # this folder: one runner for the benchmarks with systems in processes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
SEED = 0
SPECIAL = ("<unk>", "<s>", "</s>")
SYSTEMS = ["llamita-offline", "llamita-serve", "transformers-serve"]

SHAPE = {"preset": "tinyllama-1.1b", "device": "cuda", "dtype": "bfloat16", "concurrency": [1, 16, 64, 256],
         "requests": [4, 32, 1024], "prompt": [200, 0.8, 16, 1024], "output": [200, 0.6, 16, 512],
         "warmup": 16, "streams_per_client": 16}  # fmt: skip
SMOKE = {"preset": "debug", "device": "cpu", "dtype": "float32", "concurrency": [1, 4], "requests": [2, 6, 8],
         "prompt": [24, 0.5, 8, 48], "output": [12, 0.5, 4, 24], "warmup": 2, "streams_per_client": 2}  # fmt: skip
"""`requests`: [per stream, at least, at most]; `prompt` and `output`: [median, sigma, min, max] in tokens. The smoke
shape's 2 streams per client process puts its concurrency 4 on two client processes, as 64 and 256 are on the GPU.
`streams_per_client`: one openai client process parses about 12,000 chunks/s at most on a 2-core CPU (80 us of CPU
a chunk), so 16 streams a process keeps each well below that (the detail table shows the busiest one's CPU use)."""


# --------------------------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class Request:
    prompt: list[int]
    """Token ids, BOS first."""
    max_tokens: int


def requests_at(concurrency: int, shape: dict) -> int:
    """How many requests a level of `concurrency` streams runs: `requests` = [per stream, at least, at most]."""
    per_stream, least, most = shape["requests"]
    return min(max(per_stream * concurrency, least), most)


def sharegpt_like(n: int, vocab: int, shape: dict, bos: int = 1, seed: int = SEED) -> list[Request]:
    """`n` requests with the lognormal prompt and output lengths of `shape` (see the module docstring)."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def lengths(median: float, sigma: float, low: int, high: int) -> np.ndarray:
        return np.clip(np.rint(rng.lognormal(math.log(median), sigma, n)), low, high).astype(int)

    prompts, outputs = lengths(*shape["prompt"]), lengths(*shape["output"])
    return [
        Request([bos, *rng.integers(len(SPECIAL), vocab, p - 1).tolist()], int(o)) for p, o in zip(prompts, outputs)
    ]


# ------------------------------------------------------------------------------------------------ model
@dataclass
class _Weights:
    """A state dict as a `WeightSource` for `write_hf`."""

    model_config: Any
    state: dict[str, Any]

    @property
    def names(self) -> list[str]:
        from llamita.interop.checkpoint_io import weight_names

        return weight_names(self.model_config)

    def load(self, name: str) -> Any:
        return self.state[name].cpu()


def word_tokenizer(vocab: int) -> Any:
    """A llamita Tokenizer whose ids are whitespace-separated words: `<unk>`, `<s>`, `</s>`, `t3`, ..."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, processors

    from llamita.tokenizer import Tokenizer

    words = {w: i for i, w in enumerate(SPECIAL)} | {f"t{i}": i for i in range(len(SPECIAL), vocab)}
    backend = Backend(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(list(SPECIAL))  # dropped when decoding, never split out of text
    # transformers' tok(text) starts with BOS, as llamita's encode(text, bos=True) does.
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", source="word-level tokenizer")


def write_model(shape: dict, out: Path) -> Path:
    """The preset with TinyLlama's random init (seed 0), built on the device in the shape's dtype, as a Hugging Face
    directory with the word-level tokenizer."""
    import torch

    from llamita.interop.hf import write_hf
    from llamita.model import Llama, get_preset

    torch.manual_seed(SEED)
    with torch.device("meta"):
        model = Llama(get_preset(shape["preset"]))
    model.to_empty(device=shape["device"])
    model.init_weights()
    model.to(getattr(torch, shape["dtype"]))
    dtype = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}[shape["dtype"]]
    write_hf(out, _Weights(model.config, model.state_dict()), word_tokenizer(model.config.vocab_size), dtype)
    del model
    if shape["device"] == "cuda":
        torch.cuda.empty_cache()
    return out


def load_tokenizer(model: Path) -> Any:
    """The tokenizer of a Hugging Face directory or of a llamita run or checkpoint."""
    from llamita.evaluate.load_model import is_hf_directory
    from llamita.interop.checkpoint_io import open_checkpoint
    from llamita.tokenizer import Tokenizer

    return Tokenizer.load(model) if is_hf_directory(model) else open_checkpoint(model).tokenizer()


def hf_directory(checkpoint: Path, out: Path, dtype: str) -> Path:
    """`checkpoint` itself when it is a Hugging Face directory, else its export (`llamita.interop.export_hf`)."""
    from llamita.evaluate.load_model import is_hf_directory
    from llamita.interop import export_hf

    if is_hf_directory(checkpoint):
        return checkpoint
    return export_hf(checkpoint, out, {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}[dtype])


# -------------------------------------------------------------------------------------------- measuring
def _record(req: Request) -> dict:
    return {"max_tokens": req.max_tokens, "status": "ok", "tokens": 0, "start": time.time(), "end": None,
            "times": [], "t0": time.perf_counter()}  # fmt: skip


def _finish(rec: dict, tokens: int | None) -> dict:
    """Close a request's record: its tokens (usage, else the chunks it streamed), TTFT, ITL and chunk gaps."""
    times = rec.pop("times")
    t0 = rec.pop("t0")
    rec["end"] = time.time()
    rec["tokens"] = tokens if tokens is not None else len(times)
    rec["ttft"] = times[0] - t0 if times else None
    rec["itl"] = (times[-1] - times[0]) / (rec["tokens"] - 1) if len(times) > 1 and rec["tokens"] > 1 else None
    rec["gaps"] = [b - a for a, b in zip(times, times[1:])]
    return rec


async def _stream(client: Any, model: str, prompt: Any, req: Request, extra: dict, rec: dict) -> None:
    """One streaming completion; its chunk times, status and tokens (its usage) go into `rec`."""
    usage = None
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=req.max_tokens, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, extra_body=extra or None,
        )  # fmt: skip
        async with stream:
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    rec["times"].append(time.perf_counter())
                if chunk.usage is not None:
                    usage = chunk.usage.completion_tokens
        if usage is None:
            rec["status"], rec["error"] = "error", "the stream ended without usage"
    except asyncio.CancelledError:
        rec["status"] = "cancelled"
        raise
    except Exception as e:  # an error answer or a broken stream: counted, the level goes on
        rec["status"], rec["error"] = "error", f"{type(e).__name__}: {e}"[:300]
    _finish(rec, usage)


async def _clients(client_spec: dict, requests: list[Request], prompts: list[Any], workers: int) -> dict:
    """`workers` closed-loop streams over `requests`, until they are done or the level's seconds have passed: the
    requests' records, and the share of the wall time this process spent on its CPU."""
    import openai

    s = client_spec
    n = workers + 8
    limits = type(openai.DEFAULT_CONNECTION_LIMITS)(max_connections=n, max_keepalive_connections=n)
    timeout = s["level_s"] + s["grace_s"] + 120
    http = openai.DefaultAsyncHttpxClient(limits=limits, timeout=timeout)
    client = openai.AsyncOpenAI(base_url=s["base_url"], api_key="bench", max_retries=0, http_client=http)
    loop = asyncio.get_running_loop()
    t0, cpu = loop.time(), time.process_time()
    jobs = iter(zip(requests, prompts))
    records: list[dict] = []

    async def worker() -> None:
        for req, prompt in jobs:  # one shared iterator: each worker takes the next request
            if loop.time() - t0 >= s["level_s"]:
                break
            rec = _record(req)
            records.append(rec)
            left = s["level_s"] + s["grace_s"] - (loop.time() - t0)
            try:
                await asyncio.wait_for(_stream(client, s["model"], prompt, req, s["extra"], rec), max(left, 0.01))
            except TimeoutError:
                if "ttft" not in rec:
                    _finish(rec, None)

    await asyncio.gather(*(worker() for _ in range(workers)))
    share = (time.process_time() - cpu) / max(loop.time() - t0, 1e-9)
    await client.close()
    return {"records": records, "cpu": share}


def _client_process(client_spec: dict, requests: list, prompts: list, workers: int, barrier: Any, queue: Any) -> None:
    """One client process of a level: waits for the others, then runs its streams; its records go to `queue`."""
    try:
        barrier.wait()
        queue.put(asyncio.run(_clients(client_spec, requests, prompts, workers)))
    except Exception as e:  # reported as the level's error rather than a hang
        error = {"status": "error", "error": f"client process: {type(e).__name__}: {e}"[:300], "tokens": 0}
        queue.put({"records": [error], "cpu": None})


def run_level(client_spec: dict, requests: list[Request], prompts: list[Any], concurrency: int) -> dict:
    """A level: `concurrency` streams, in one process or spread over client processes of `streams_per_client`;
    its summary."""
    procs = math.ceil(concurrency / client_spec["streams_per_client"])
    if procs == 1:
        done = [asyncio.run(_clients(client_spec, requests, prompts, concurrency))]
        return summarize(done[0]["records"], len(requests), done[0]["cpu"])
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(procs, timeout=120), ctx.Queue()
    children = []
    for i in range(procs):
        workers = concurrency // procs + (i < concurrency % procs)
        args = (client_spec, requests[i::procs], prompts[i::procs], workers, barrier, queue)
        children.append(ctx.Process(target=_client_process, args=args))
        children[-1].start()
    deadline = time.perf_counter() + client_spec["level_s"] + client_spec["grace_s"] + 300
    done = []
    for _ in children:  # before join: a child exits once its records are read
        try:
            done.append(queue.get(timeout=max(deadline - time.perf_counter(), 1)))
        except Empty:
            lost = {"status": "error", "error": "a client process gave no records", "tokens": 0}
            done.append({"records": [lost], "cpu": None})
    for child in children:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    cpu = [d["cpu"] for d in done if d["cpu"] is not None]
    return summarize([rec for d in done for rec in d["records"]], len(requests), max(cpu, default=None))


def _percentile(values: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(values, q)) if values else None


def summarize(records: list[dict], planned: int, client_cpu: float | None = None) -> dict:
    """A level's numbers from its requests' records (times in ms); `client_cpu`: the busiest client process's
    CPU time over the level's wall time."""
    done = [r for r in records if r["status"] != "error" and r.get("end") is not None]
    tokens = sum(r["tokens"] for r in done)
    wall = max(r["end"] for r in done) - min(r["start"] for r in done) if done else None
    ttft = [r["ttft"] for r in done if r["ttft"] is not None]
    itl = [r["itl"] for r in done if r["itl"] is not None]
    gaps = [g for r in done for g in r["gaps"]]
    chunks = sum(len(r["gaps"]) + 1 for r in done if r["ttft"] is not None)

    def ms(values: list[float], q: float) -> float | None:
        p = _percentile(values, q)
        return None if p is None else 1000 * p

    errors = [r for r in records if r["status"] == "error"]
    return {
        "planned": planned,
        "sent": len(records),
        "completed": sum(r["status"] == "ok" for r in records),
        "cancelled": sum(r["status"] == "cancelled" for r in records),
        "errors": len(errors),
        "error_samples": sorted({r["error"] for r in errors})[:3],
        "output_tokens": tokens,
        "short_answers": sum(r["status"] == "ok" and r["tokens"] < r["max_tokens"] for r in done),
        "wall_s": wall,
        "output_tokens_per_s": tokens / wall if wall else None,
        "ttft_p50_ms": ms(ttft, 50),
        "ttft_p99_ms": ms(ttft, 99),
        "itl_p50_ms": ms(itl, 50),
        "itl_p99_ms": ms(itl, 99),
        "chunk_gap_p50_ms": ms(gaps, 50),
        "chunk_gap_p99_ms": ms(gaps, 99),
        "tokens_per_chunk": tokens / chunks if chunks else None,
        "client_cpu": client_cpu,
    }


# ----------------------------------------------------------------------------------------------- systems
def run_offline(spec: dict) -> dict:
    """`LLM`'s engine on the same requests, no HTTP: the closed loop of the clients, in one process."""
    import torch

    from llamita.inference import LLM, SamplingParams

    shape = spec["shape"]
    t = time.perf_counter()
    llm = LLM(spec["model"], device=shape["device"], dtype=shape["dtype"], max_batch=max(shape["concurrency"]),
              compile=shape["device"] == "cuda", prefill_interval=spec["prefill_interval"],
              prefill_graphs=spec["prefill_graphs"], decode_attention=spec["decode_attention"],
              overlap=spec.get("overlap"), packed_prefill=spec.get("packed_prefill"))  # fmt: skip
    out: dict[str, Any] = {"start_s": time.perf_counter() - t}
    # Where a level's time goes: the prefill forwards, timed between syncs (the step syncs once anyway).
    prefill, untimed = {"s": 0.0}, llm.engine._prefill

    def timed_prefill(chunks: Any) -> Any:
        if shape["device"] == "cuda":
            torch.cuda.synchronize()  # the decode step launched before it
        t = time.perf_counter()
        result = untimed(chunks)
        if shape["device"] == "cuda":
            torch.cuda.synchronize()
        prefill["s"] += time.perf_counter() - t
        return result

    llm.engine._prefill = timed_prefill
    requests = sharegpt_like(spec["n"], llm.model.config.vocab_size, shape, llm.tokenizer.bos_id)

    def level(reqs: list[Request], concurrency: int, level_s: float) -> list[dict]:
        engine = llm.engine
        pending = list(reversed(reqs))
        live: dict[int, tuple[Any, dict]] = {}
        records = []
        t0 = time.perf_counter()
        while pending or live:
            elapsed = time.perf_counter() - t0
            while pending and len(live) < concurrency and elapsed < level_s:
                req = pending.pop()
                rec = _record(req)
                seq = engine.add(req.prompt, SamplingParams(temperature=0.0, max_tokens=req.max_tokens,
                                                            ignore_eos=True))  # fmt: skip
                live[seq.id] = (seq, rec)
                records.append(rec)
            if elapsed >= level_s:
                pending.clear()
            if elapsed >= level_s + spec["grace_s"]:
                for seq, rec in live.values():
                    engine.abort(seq)
                    rec["status"] = "cancelled"
                    _finish(rec, len(seq.output))
                break
            emitted = engine.step()
            now = time.perf_counter()
            for seq, tokens in emitted:
                _, rec = live[seq.id]
                if tokens:
                    rec["times"].append(now)  # one chunk: the step's tokens of this sequence
                if seq.finished:
                    _finish(rec, len(seq.output))
                    del live[seq.id]
        if shape["device"] == "cuda":
            torch.cuda.synchronize()
        return records

    level([Request(r.prompt, 8) for r in requests[: shape["warmup"]]], shape["warmup"], math.inf)
    stats = llm.engine.stats
    for c in shape["concurrency"]:
        n = requests_at(c, shape)
        before = (stats.steps, stats.prefill_steps, prefill["s"], time.perf_counter(), time.thread_time())
        skipped = _past_deadline(spec)
        out[str(c)] = skipped or summarize(level(requests[:n], c, spec["level_s"]), n)
        if skipped is None:
            steps, wall = stats.steps - before[0], time.perf_counter() - before[3]
            out[str(c)] |= {"steps": steps, "prefill_steps": stats.prefill_steps - before[1],
                            "prefill_share": (prefill["s"] - before[2]) / wall,
                            "step_ms": 1e3 * wall / max(steps, 1),
                            "busiest_server_thread": (time.thread_time() - before[4]) / wall}  # fmt: skip
    return out


def _past_deadline(spec: dict) -> dict | None:
    """A level that would end after the call's --deadline is skipped (and says so) rather than cut off."""
    if time.time() + spec["level_s"] + spec["grace_s"] + 15 > spec["deadline_at"]:
        return {"skipped": "it would end past --deadline"}
    return None


class ServerFailed(RuntimeError):
    """A server that exited or never answered /health; the message holds its log's tail."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def _tail(log: Path, lines: int = 25) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])[-3000:]


@contextmanager
def server(
    cmd: list[str], port: int, log: Path, start_timeout: float, env: dict | None = None
) -> Iterator[tuple[str, int]]:
    """A server subprocess, up once its /health answers; yields its base URL and pid; stopped with SIGTERM (then
    killed)."""
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.perf_counter() + start_timeout
        while True:
            if proc.poll() is not None:
                raise ServerFailed(f"exited with code {proc.returncode} before answering /health:\n{_tail(log)}")
            if time.perf_counter() > deadline:
                raise ServerFailed(f"no answer on /health after {start_timeout:.0f} s:\n{_tail(log)}")
            try:
                _get(base + "/health", timeout=2.0)
                break
            except OSError:
                time.sleep(0.5)
        yield base, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _server_command(spec: dict, port: int) -> tuple[list[str], str | None, dict | None]:
    """The server's command line, the model name its requests carry (None: ask /v1/models) and its environment."""
    shape = spec["shape"]
    if spec["system"].startswith("llamita-serve"):
        cmd = [sys.executable, "-m", "llamita.cli", "serve", "--checkpoint", spec["model"], "--host", "127.0.0.1",
               "--port", str(port), "--max-batch", str(max(shape["concurrency"])), "--max-queue", str(spec["n"]),
               "--device", shape["device"], "--dtype", shape["dtype"], "--log-level", "warning",
               "--prefill-interval", str(spec["prefill_interval"]),
               "--stream-interval", str(spec["stream_interval"])]  # fmt: skip
        if spec.get("decode_attention"):
            cmd += ["--decode-attention", spec["decode_attention"]]
        if spec.get("overlap") is not None:
            cmd.append("--overlap" if spec["overlap"] else "--no-overlap")
        if spec.get("engine_process"):
            cmd.append("--engine-process")
        if spec.get("api_server_count", 1) > 1:
            cmd += ["--api-server-count", str(spec["api_server_count"])]
        if spec["prefill_graphs"] is not None:
            cmd.append("--prefill-graphs" if spec["prefill_graphs"] else "--no-prefill-graphs")
        if spec.get("packed_prefill") is not None:
            cmd.append("--packed-prefill" if spec["packed_prefill"] else "--no-packed-prefill")
        return cmd, None, None
    # transformers' CLI; offline, so huggingface_hub looks for no update and no remote files.
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    cmd = [sys.executable, "-c", "from transformers.cli.transformers import app; app()", "serve", spec["hf_model"],
           "--continuous-batching", "--host", "127.0.0.1", "--port", str(port), "--device", shape["device"],
           "--log-level", "warning"]  # fmt: skip
    return cmd, spec["hf_model"], env


def run_server(spec: dict) -> dict:
    """A server in its own process, driven by the clients at every concurrency level."""
    shape = spec["shape"]
    port = _free_port()
    cmd, model, env = _server_command(spec, port)
    tokenizer = load_tokenizer(Path(spec["model"]))
    requests = sharegpt_like(spec["n"], tokenizer.vocab_size, shape, tokenizer.bos_id)
    text = spec["system"] == "transformers-serve"  # its /v1/completions takes text only
    prompts = [tokenizer.decode(r.prompt) if text else r.prompt for r in requests]
    extra = {} if text else {"ignore_eos": True}
    out: dict[str, Any] = {"command": " ".join(cmd)}
    t = time.perf_counter()
    try:
        wait = min(spec["start_timeout"], spec["deadline_at"] - time.time() - 30)
        if wait <= 0:
            raise ServerFailed("not started: no time left before --deadline")
        with server(cmd, port, Path(spec["log"]), wait, env) as (base, pid):
            out["start_s"] = time.perf_counter() - t
            model = model or _get(base + "/v1/models")["data"][0]["id"]
            client = {"base_url": base + "/v1", "model": model, "extra": extra, "level_s": spec["level_s"],
                      "grace_s": spec["grace_s"], "streams_per_client": shape["streams_per_client"]}  # fmt: skip
            k = shape["warmup"]
            warm = [Request(r.prompt, 8) for r in requests[:k]]
            # Untimed, and as long as the deadline allows: transformers serve loads its model on the first request.
            budget = max(spec["deadline_at"] - time.time() - spec["grace_s"] - 30, 1)
            out["warmup"] = run_level(client | {"level_s": budget}, warm, prompts[:k], k)
            for c in shape["concurrency"]:
                n = requests_at(c, shape)
                before, cpu, t0 = _engine_loop(base), _process_cpu(pid), time.perf_counter()
                out[str(c)] = _past_deadline(spec) or run_level(client, requests[:n], prompts[:n], c)
                after, wall = _engine_loop(base), time.perf_counter() - t0
                used = [s - cpu.get(p, 0.0) for p, s in _process_cpu(pid).items()]
                if used and "planned" in out[str(c)]:  # the server's threads: is one of them a whole core?
                    out[str(c)] |= {"server_cpu": sum(used) / wall, "busiest_server_thread": max(used) / wall}
                if before and after and "planned" in out[str(c)]:  # llamita's engine loop in the level
                    steps = int(after["steps"] - before["steps"])
                    prefills = int(after["prefill_steps"] - before["prefill_steps"])
                    out[str(c)] |= {"steps": steps, "prefill_steps": prefills,
                                    "step_ms": 1e3 * wall / max(steps, 1),
                                    "loop_ms": {part: 1e3 * (t - before["seconds"][part]) / max(steps, 1)
                                                for part, t in after["seconds"].items()}}  # fmt: skip
                print(f"[{spec['system']}] concurrency {c}: {json.dumps(out[str(c)])}", flush=True)
    except ServerFailed as e:
        out["error"] = f"server failed: {e}".strip()
    return out


def _process_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of the process `pid` and of its descendants, by thread id, through
    Linux's /proc ({} elsewhere, or once it is gone): a thread near 100% of a core is what limits a Python loop."""
    tick, seconds, todo = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100, {}, [pid]
    while todo:
        p = todo.pop()
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                fields = (task / "stat").read_text().rpartition(")")[2].split()
                seconds[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime (14 and 15)
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError, IndexError):
            continue
    return seconds


def _engine_loop(base: str) -> dict | None:
    """llamita serve's engine loop counters from /metrics (steps, prefill steps, and "seconds" by part); None
    from a server without them."""
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return None
    from prometheus_client.parser import text_string_to_metric_families

    names = {"llamita_engine_steps_total": "steps", "llamita_engine_prefill_steps_total": "prefill_steps"}
    found: dict = {"seconds": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in names:
                found[names[sample.name]] = sample.value
            elif sample.name == "llamita_engine_loop_seconds_total":
                found["seconds"][sample.labels["part"]] = sample.value
    return found if len(found) == 3 else None


def _runner(name: str) -> Callable[[dict], dict]:
    return run_offline if name == "llamita-offline" else run_server


def device_name(shape: dict) -> str:
    import torch

    if shape["device"] == "cuda":
        return f"one {torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}"


# ------------------------------------------------------------------------------------------------ tables
MAIN = [("requests", "completed", ","), ("output tok/s", "output_tokens_per_s", ",.0f"),
        ("TTFT p50 ms", "ttft_p50_ms", ",.1f"), ("TTFT p99 ms", "ttft_p99_ms", ",.1f"),
        ("ITL p50 ms", "itl_p50_ms", ".2f"), ("ITL p99 ms", "itl_p99_ms", ".2f"),
        ("errors", "errors", ",")]  # fmt: skip
DETAIL = [("sent", "sent", ","), ("planned", "planned", ","), ("cancelled", "cancelled", ","),
          ("output tokens", "output_tokens", ","), ("short answers", "short_answers", ","),
          ("chunk gap p50 ms", "chunk_gap_p50_ms", ".2f"), ("chunk gap p99 ms", "chunk_gap_p99_ms", ".2f"),
          ("tokens per chunk", "tokens_per_chunk", ".2f"), ("wall s", "wall_s", ".1f"),
          ("busiest client CPU", "client_cpu", ".0%"), ("engine steps", "steps", ","),
          ("prefill steps", "prefill_steps", ","), ("step ms", "step_ms", ".2f"),
          ("prefill share of wall", "prefill_share", ".0%"),
          ("server loop ms a step: step / deltas / send / commands", "loop_ms", "loop"),
          ("server processes' CPU", "server_cpu", ".0%"),
          ("busiest server thread's CPU", "busiest_server_thread", ".0%")]  # fmt: skip
"""Table columns: (header, key in a level's summary, format)."""


def _fmt(x: Any, spec: str) -> str:
    if spec == "loop":  # llamita serve's engine loop, ms a step by part
        from llamita.inference.server_metrics import LOOP_PARTS

        return "-" if x is None else " / ".join(f"{x[part]:.2f}" for part in LOOP_PARTS)
    return "-" if x is None else format(x, spec)


def _table(results: dict, levels: list[int], columns: list[tuple[str, str, str]]) -> list[str]:
    lines = ["| system | concurrency | " + " | ".join(c[0] for c in columns) + " |"]
    lines.append("|---|" + "---:|" * (1 + len(columns)))
    for name, r in results.items():
        if "error" in r:
            why = r["error"][:300].replace("\n", " / ")
            lines.append(f"| {name} | failed: {why} |" + " |" * len(columns))
            continue
        for c in levels:
            if "skipped" in r.get(str(c), {}):
                lines.append(f"| {name} | {c} | skipped: {r[str(c)]['skipped']} |" + " |" * (len(columns) - 1))
            elif str(c) in r:
                cells = [_fmt(r[str(c)].get(key), spec) for _, key, spec in columns]
                lines.append(f"| {name} | {c} | " + " | ".join(cells) + " |")
    return lines


def tables(record: dict) -> str:
    """The detail table, the main table and the issue's ratios, as Markdown."""
    results, levels = record["results"], record["shape"]["concurrency"]

    def at(name: str, c: int) -> dict:
        r = results.get(name, {})
        return {} if "error" in r else r.get(str(c), {})

    def ratio(a: str, b: str, c: int) -> float | None:
        x, y = at(a, c).get("output_tokens_per_s"), at(b, c).get("output_tokens_per_s")
        return x / y if x and y else None

    serves = [name for name in results if name.startswith("llamita-serve")]  # --api-server-count's runs
    ratios = ["| server | concurrency | serve / offline | serve / transformers serve |", "|---|---:|---:|---:|"]
    for name in serves:
        for c in levels:
            ratios.append(f"| {name} | {c} | {_fmt(ratio(name, 'llamita-offline', c), '.3f')} | "
                          f"{_fmt(ratio(name, 'transformers-serve', c), '.1f')} |")  # fmt: skip
    targets = []
    for name in serves:
        if 64 in levels:
            targets.append(f"- {name} / offline at 64: {_fmt(ratio(name, 'llamita-offline', 64), '.3f')} "
                           "(target >= 0.90)")  # fmt: skip
        if 256 in levels:
            x = at(name, 256)
            targets.append(f"- {name} at 256: {_fmt(x.get('output_tokens_per_s'), ',.0f')} output tok/s (target >= "
                           f"30,000), TTFT p99 {_fmt(x.get('ttft_p99_ms'), ',.0f')} ms (target < 1,000), "
                           f"errors {x.get('errors', '-')} (target 0)")  # fmt: skip
    peer = [ratio("llamita-serve", "transformers-serve", c) for c in levels]
    if any(p is not None for p in peer):
        low = min(p for p in peer if p is not None)
        targets.append(f"- serve / transformers serve: at least {low:.1f}x over the levels (target >= 10x)")
    elif "error" in results.get("transformers-serve", {}):
        why = results["transformers-serve"]["error"][:300].replace("\n", " / ")
        targets.append(f"- transformers serve did not run: {why}")
    starts = []
    for name, r in results.items():
        if "start_s" in r:
            warm = r.get("warmup", {}).get("wall_s")
            starts.append(f"{name} {r['start_s']:.0f} s" + (f" + warm-up {warm:.0f} s" if warm else ""))
    targets.append("- start (load, compile, CUDA graphs; a server: until /health answers): " + ", ".join(starts))
    head = f"{record['date']}, {record['device']}, commit {record['commit']}; command: `{record['command']}`"
    main, detail = _table(results, levels, MAIN), _table(results, levels, DETAIL)
    return "\n".join([head, "", *detail, "", *main, "", *ratios, "", *targets])


def main() -> None:
    from llamita.inference.engine import DECODE_ATTENTION

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="the debug preset on a CPU, concurrency 1 and 4")
    parser.add_argument("--peers", action="store_true", help="with --smoke: run transformers serve too")
    parser.add_argument("--systems", default="", help="comma list of " + ", ".join(SYSTEMS) + " (default: all)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="a llamita run or Hugging Face directory")
    parser.add_argument("--level-seconds", type=float, default=20.0, help="a level sends no request after this")
    parser.add_argument("--grace-seconds", type=float, default=15.0, help="then cancels what still runs after this")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds for a server to answer /health")
    parser.add_argument("--deadline", type=float, default=470.0, help="seconds for the call: later levels are skipped")
    parser.add_argument("--prefill-interval", type=int, default=1, help="llamita's EngineConfig.prefill_interval")
    parser.add_argument("--concurrency", type=int, nargs="+", default=None, help="the levels (default: the shape's)")
    parser.add_argument("--stream-interval", type=int, default=1, help="llamita serve's tokens per streamed chunk")
    parser.add_argument(
        "--prefill-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="llamita's EngineConfig.prefill_graphs (default: the engine's, on with CUDA graphs)",
    )
    parser.add_argument(
        "--decode-attention",
        choices=DECODE_ATTENTION,
        default=None,
        help="llamita's EngineConfig.decode_attention (default: the engine's)",
    )
    parser.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                        help="llamita's EngineConfig.overlap (default: the engine's)")  # fmt: skip
    parser.add_argument("--packed-prefill", action=argparse.BooleanOptionalAction, default=None,
                        help="llamita's EngineConfig.packed_prefill (default: the engine's)")  # fmt: skip
    parser.add_argument("--engine-process", action="store_true",
                        help="llamita serve --engine-process: its engine in a process of its own")  # fmt: skip
    parser.add_argument("--api-server-count", type=int, nargs="+", default=[1],
                        help="llamita serve --api-server-count; several: llamita-serve runs with each, named "
                             "llamita-serve-xN past the first")  # fmt: skip
    args = parser.parse_args()
    shape = dict(SMOKE if args.smoke else SHAPE)
    if args.concurrency:
        shape["concurrency"] = sorted(args.concurrency)
    names = args.systems.split(",") if args.systems else SYSTEMS[: 3 if args.peers or not args.smoke else 2]
    unknown = sorted(set(names) - set(SYSTEMS))
    if unknown:
        parser.error(f"--systems: unknown {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    deadline_at = time.time() + args.deadline
    tmp = Path(tempfile.mkdtemp(prefix="serve_load-"))
    try:
        t = time.perf_counter()
        model = args.checkpoint or write_model(shape, tmp / "model")
        hf_model = hf_directory(model, tmp / "hf", shape["dtype"]) if "transformers-serve" in names else model
        print(f"model at {model} ({time.perf_counter() - t:.0f} s)", flush=True)
        n = max(requests_at(c, shape) for c in shape["concurrency"])
        base = {"shape": shape, "model": str(model), "hf_model": str(hf_model), "n": n, "deadline_at": deadline_at,
                "level_s": args.level_seconds, "grace_s": args.grace_seconds,
                "start_timeout": args.start_timeout, "prefill_interval": args.prefill_interval,
                "stream_interval": args.stream_interval, "prefill_graphs": args.prefill_graphs,
                "decode_attention": args.decode_attention, "overlap": args.overlap,
                "engine_process": args.engine_process, "packed_prefill": args.packed_prefill}  # fmt: skip
        specs = {}
        for name in names:
            counts = args.api_server_count if name == "llamita-serve" else [1]
            for i, count in enumerate(counts):
                label = name if i == 0 else f"{name}-x{count}"
                log = str(args.out / f"{label}.log")
                specs[label] = base | {"system": label, "api_server_count": count, "log": log}
        record = run_systems(list(specs), specs, _runner, shape, args.out / "serve_load.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    record["device"] = device_name(shape)
    record["command"] = " ".join(sys.argv)
    (args.out / "serve_load.json").write_text(json.dumps(record, indent=1) + "\n")
    text = tables(record)
    (args.out / "serve_load.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
