"""`llamita prepare` against TinyLlama's own preparation loop, on the same synthetic SlimPajama-like files.

1. Data: ``--size-gb`` of ``.jsonl.zst`` files of ``--file-mb`` each (uncompressed), as SlimPajama ships them
   (``{"text": ..., "meta": {"redpajama_set_name": ...}}`` per line), written by one process per core. The text is
   synthetic but not one repeated paragraph: prose documents are paragraphs of sentences drawn at random from the
   Python standard library's docstrings and comments, with made-up words and numbers put in at random (2% of the
   words) so that the vocabulary keeps growing as real text's does; 15% of the documents are slices of the
   standard library's source files.
2. A 32000-token tokenizer trained by ``llamita train-tokenizer`` on the first ``--tokenizer-sample-mb`` of text.
3. Runs, each a separate process tree pinned to the first N cores (``sched_setaffinity``), the files on the
   command line, ``--val-fraction 0`` so that both write one stream:
   * ``llamita prepare --workers N`` for each N of ``--workers``, on ``N * --files-per-worker`` files (so every
     run has the same work per core, and the largest reads all the files), and once with 1 worker on 1 file (the
     memory of a 1-file and a many-file run);
   * the reference, TinyLlama's ``scripts/prepare_slimpajama.py`` as written below (:func:`reference_prepare`):
     the files split into N chunks, one process per chunk, each reading its files line by line, json-decoding
     each line (twice, as it does, to skip RedPajamaGithub, which the data never names), encoding one document at
     a time with the ``tokenizers`` Tokenizer (``[bos] + encode(text).ids``, what its ``Tokenizer.encode(text,
     bos=True, eos=False)`` gives) and appending it to a PackedDatasetBuilder (fixed 2049*1024-token chunks); on
     ``N * --reference-files-per-worker`` files, fewer than llamita's when the reference would not fit the time,
     which the results say.
   The 1-worker runs' streams are compared token for token (llamita's documents end with EOS, the reference's
   do not). Wall time covers the whole command (start-up and worker spawn included); peak memory is the largest
   sum of RSS over the process tree, sampled every 50 ms.
4. A markdown table, printed last and written to ``--results`` with the date, CPU, cores, commit and command, and
   the projection for SlimPajama-627B + Starcoderdata on 64 cores.

    PYTHONPATH=src python bench/prepare_throughput.py --size-gb 1 --workers 1 2 4 8 16 --out /tmp/prep
    PYTHONPATH=src python bench/prepare_throughput.py --size-gb 0.1 --workers 1 2 --tag cpu2   # a 2-core check
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# Tokens in the corpora TinyLlama trained on, with Llama's tokenizer: SlimPajama-627B's name, and Starcoderdata's
# ~250B (the StarCoder paper's count for the 783 GB of code).
CORPUS_TOKENS = {"SlimPajama-627B": 627e9, "Starcoderdata": 250e9}
PROJECTION_CORES = 64
SET_NAMES = ("RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaWikipedia", "RedPajamaBook", "RedPajamaArXiv")
CODE_SET = "RedPajamaStackExchange"  # never RedPajamaGithub, which the reference skips
RARE_WORDS = 0.02  # share of prose words replaced by a made-up word or a number
CODE_SHARE = 0.15


# ------------------------------------------------------------------------------------------------- data
def text_pool() -> dict[str, list[str]]:
    """Sentences (the standard library's docstrings and comments) and source files: the same on every machine
    with the same Python."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = []
    for path in sorted(stdlib.rglob("*.py")):
        if {"site-packages", "dist-packages"} & set(path.parts):
            continue
        try:
            sources.append(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
    prose = [m for s in sources for m in re.findall(r'"""(.*?)"""', s, re.S)]
    prose += ["\n\n".join(re.findall(r"^\s*#\s?(.{30,})$", s, re.M)) for s in sources]
    sentences = []
    for block in prose:
        for paragraph in re.split(r"\n\s*\n", block):
            paragraph = " ".join(paragraph.split())
            if len(paragraph) > 40 and not paragraph.startswith((">>>", "..")):
                sentences += [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", paragraph) if len(s) > 20]
    return {"sentences": sentences, "sources": [s for s in sources if len(s) > 2000]}


_POOL: dict[str, list[str]] = {}  # set before the generating processes fork


def _made_up(rng: random.Random) -> str:
    if rng.random() < 0.35:
        return rng.choice([str(rng.randrange(10 ** rng.randint(1, 6))), f"{rng.uniform(0, 100):.2f}", "1998", "2023"])
    word = "".join(rng.choice("bcdfghjklmnprstvwz") + rng.choice("aeiouy") for _ in range(rng.randint(2, 4)))
    word = word.capitalize() if rng.random() < 0.5 else word
    return word + rng.choice(("", "", "", "s", "'s", ",", ".", "ing", "ed"))


def _document(rng: random.Random) -> tuple[str, str]:
    if rng.random() < CODE_SHARE:
        source = rng.choice(_POOL["sources"])
        start = source.rfind("\n", 0, rng.randrange(len(source))) + 1
        return source[start : start + int(rng.lognormvariate(8.0, 0.8))], CODE_SET
    paragraphs = []
    for _ in range(1 + min(30, int(rng.expovariate(1 / 4)))):
        words = " ".join(rng.choices(_POOL["sentences"], k=rng.randint(2, 7))).split(" ")
        for _ in range(int(len(words) * RARE_WORDS + rng.random())):
            words[rng.randrange(len(words))] = _made_up(rng)
        paragraphs.append(" ".join(words))
    return "\n\n".join(paragraphs), rng.choice(SET_NAMES)


def _write_file(job: tuple[Path, int, int, int]) -> tuple[int, int]:
    """One .jsonl.zst of at least ``size`` uncompressed bytes; returns (documents, bytes)."""
    import zstandard

    path, index, size, seed = job
    rng = random.Random(f"{seed}-{index}")
    lines, n = [], 0
    while n < size:
        text, set_name = _document(rng)
        line = json.dumps({"text": text, "meta": {"redpajama_set_name": set_name}}, ensure_ascii=False) + "\n"
        lines.append(line.encode())
        n += len(lines[-1])
    path.write_bytes(zstandard.ZstdCompressor(level=3).compress(b"".join(lines)))
    return len(lines), n


def generate(data_dir: Path, size_gb: float, file_mb: float, seed: int, cores: int) -> dict:
    """Write the files (SlimPajama's layout: chunk1/example_train_<i>.jsonl.zst); reuse them if already there."""
    n_files = max(1, round(size_gb * 1000 / file_mb))
    record = data_dir / "data.json"
    if record.is_file():
        info = json.loads(record.read_text())
        if info["params"] == [size_gb, file_mb, seed]:
            return info
    shutil.rmtree(data_dir, ignore_errors=True)
    (data_dir / "chunk1").mkdir(parents=True)
    start = time.perf_counter()
    _POOL.update(text_pool())
    jobs = [(data_dir / "chunk1" / f"example_train_{i}.jsonl.zst", i, int(file_mb * 1e6), seed) for i in range(n_files)]
    with multiprocessing.get_context("fork").Pool(cores) as pool:
        counts = pool.map(_write_file, jobs, chunksize=1)
    info = {
        "params": [size_gb, file_mb, seed],
        "files": [str(job[0]) for job in jobs],
        "docs": sum(c[0] for c in counts),
        "bytes": sum(c[1] for c in counts),
        "compressed_bytes": sum(job[0].stat().st_size for job in jobs),
        "pool_sentences": len(_POOL["sentences"]),
        "pool_sources": len(_POOL["sources"]),
        "seconds": time.perf_counter() - start,
    }
    record.write_text(json.dumps(info, indent=1))
    return info


def tokenizer_sample(files: list[str], out: Path, mb: float) -> Path:
    """The first ``mb`` MB of documents, as one .jsonl for the tokenizer trainer."""
    import zstandard

    with open(out, "w", encoding="utf-8") as sink:
        written = 0
        for file in files:
            with zstandard.open(file, "rt", encoding="utf-8") as source:
                for line in source:
                    sink.write(line)
                    written += len(line)
                    if written >= mb * 1e6:
                        return out
    return out


# ----------------------------------------------------------------------------------------- the reference
class PackedDatasetBuilder:
    """lit_gpt's ``packed_dataset.PackedDatasetBuilder`` as TinyLlama uses it: fixed-size chunks padded with
    ``sep_token``, each file a 24-byte header then the tokens."""

    def __init__(self, outdir: Path, prefix: str, chunk_size: int, sep_token: int, vocab_size: int) -> None:
        self._dtype = np.uint16 if vocab_size < 65500 else np.int32
        self._outdir, self._prefix, self._chunk_size, self._sep_token = outdir, prefix, chunk_size, sep_token
        self._arr = np.full(chunk_size, sep_token, dtype=self._dtype)
        self._idx = 0
        self._counter = 0

    @property
    def dtype(self) -> type:
        return self._dtype

    def _write_chunk(self) -> None:
        with open(self._outdir / f"{self._prefix}_{self._counter:010d}.bin", "wb") as f:
            f.write(b"LITPKDS" + (1).to_bytes(8, "little") + bytes([8]) + self._chunk_size.to_bytes(8, "little"))
            f.write(self._arr.tobytes(order="C"))
        self._counter += 1
        self._arr.fill(self._sep_token)
        self._idx = 0

    def add_array(self, arr: np.ndarray) -> None:
        while self._idx + arr.shape[0] > self._chunk_size:
            part_len = self._chunk_size - self._idx
            self._arr[self._idx : self._idx + part_len] = arr[:part_len]
            self._write_chunk()
            arr = arr[part_len:]
        self._arr[self._idx : self._idx + arr.shape[0]] = arr
        self._idx += arr.shape[0]

    def write_reminder(self) -> None:
        self._write_chunk()


def _reference_process(files: list[str], tokenizer_dir: Path, out_dir: Path, process_id: int) -> None:
    """TinyLlama's ``prepare_full``: one process's chunk of files, one document at a time."""
    import zstandard as zstd
    from tokenizers import Tokenizer as HFTokenizer

    processor = HFTokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    processor.encode_special_tokens = True  # as llamita reads "</s>" in text: as text, so the streams compare
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    bos_id = processor.token_to_id(config["bos_token"])
    vocab_size = processor.get_vocab_size(with_added_tokens=False)
    builder = PackedDatasetBuilder(out_dir, f"train_slimpajama_{process_id}", 2049 * 1024, bos_id, vocab_size)
    docs = tokens = 0
    for filepath in files:
        with zstd.open(open(filepath, "rb"), "rt", encoding="utf-8") as f:
            for row in f:
                text = json.loads(row)["text"]
                if json.loads(row)["meta"]["redpajama_set_name"] == "RedPajamaGithub":
                    continue
                text_ids = [bos_id] + processor.encode(text, add_special_tokens=False).ids
                builder.add_array(np.array(text_ids, dtype=builder.dtype))
                docs += 1
                tokens += len(text_ids)
    builder.write_reminder()
    (out_dir / f"summary_{process_id}.json").write_text(json.dumps({"docs": docs, "tokens": tokens}))


def reference_prepare(files: list[str], tokenizer_dir: Path, out_dir: Path, processes: int) -> dict:
    """TinyLlama's ``prepare``: ``np.array_split`` of the files over ``processes`` processes, started and joined."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("fork")
    chunks = np.array_split(np.array(files), processes)
    procs = [
        ctx.Process(target=_reference_process, args=(list(chunk), tokenizer_dir, out_dir, i))
        for i, chunk in enumerate(chunks)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"reference process {p.pid} failed with exit code {p.exitcode}")
    summaries = [json.loads(p.read_text()) for p in sorted(out_dir.glob("summary_*.json"))]
    return {k: sum(s[k] for s in summaries) for k in ("docs", "tokens")}


# --------------------------------------------------------------------------------------------- measuring
def _children(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return children


def _rss_and_cpu(pid: int) -> tuple[int, float]:
    """RSS bytes and CPU seconds of one process; zeros when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        rss_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError):
        return 0, 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return rss_pages * os.sysconf("SC_PAGE_SIZE"), (int(fields[11]) + int(fields[12])) / ticks


def measure(cmd: list[str], cores: list[int], log: Path) -> dict:
    """Run ``cmd`` pinned to ``cores``: wall seconds, peak RSS of its process tree, CPU seconds of the whole tree
    (every process waits for its children, so their times add up to ours) and of its main process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=lambda: os.sched_setaffinity(0, cores)
        )
        peak, main_cpu = 0, 0.0
        while proc.poll() is None:
            tree, todo = [], [proc.pid]
            while todo:
                pid = todo.pop()
                tree.append(pid)
                todo += _children(pid)
            samples = [_rss_and_cpu(pid) for pid in tree]
            peak = max(peak, sum(s[0] for s in samples))
            main_cpu = max(main_cpu, samples[0][1])
            time.sleep(0.05)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak / 2**20, "main_cpu_s": main_cpu}


def run_llamita(files: list[str], workers: int, tokenizer: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "llamita.cli", "prepare", "--name", "bench", "--tokenizer", str(tokenizer)]
    cmd += ["--out", str(out), "--workers", str(workers), "--val-fraction", "0", "--input", *files]
    result = measure(cmd, list(range(workers)), out.with_suffix(".log"))
    totals = json.loads((out / "manifest.json").read_text())["totals"]
    return result | {"docs": totals["docs"], "tokens": totals["tokens_train"]}


def run_reference(files: list[str], processes: int, tokenizer: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "reference", "--tokenizer", str(tokenizer)]
    cmd += ["--out", str(out), "--processes", str(processes), *files]
    result = measure(cmd, list(range(processes)), out.with_suffix(".log"))
    return result | json.loads((out / "summary.json").read_text())


def same_streams(llamita_dir: Path, reference_dir: Path, eos_id: int, n_tokens: int) -> bool:
    """Whether the reference's 1-process stream equals llamita's with EOS dropped, over the reference's tokens."""
    from llamita.data.prepare import shard_paths
    from llamita.data.shards import read_shard

    chunks = sorted(reference_dir.glob("train_slimpajama_0_*.bin"))
    reference = np.concatenate([np.fromfile(c, dtype=np.uint16, offset=24) for c in chunks])[:n_tokens]
    ours, got = [], 0
    for path in shard_paths(llamita_dir, "train"):
        shard = np.asarray(read_shard(path))
        ours.append(shard[shard != eos_id])
        got += len(ours[-1])
        if got > n_tokens:
            break
    ours = np.concatenate(ours)
    return len(ours) >= n_tokens and np.array_equal(ours[:n_tokens], reference)


# ----------------------------------------------------------------------------------------------- report
def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def table(runs: list[dict], data: dict) -> str:
    """One row per run; the last two columns divide by the reference's rate at the same number of cores."""
    mb_per_file = data["bytes"] / len(data["files"]) / 1e6
    reference = {r["workers"]: r for r in runs if r["system"] == "reference"}
    rows = [
        "| system | cores | files (MB) | docs | tokens | wall s | tokens/s | tokens/s/core | docs/s | MB/s/core "
        "| tokens per CPU s | peak RSS MB | per core vs reference | per CPU s vs reference |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        per_core, per_cpu = r["tokens"] / r["wall_s"] / r["workers"], r["tokens"] / r["cpu_s"]
        ref = reference.get(r["workers"])
        ratios = "| - | -"
        if ref:
            ref_core, ref_cpu = ref["tokens"] / ref["wall_s"] / ref["workers"], ref["tokens"] / ref["cpu_s"]
            ratios = f"| {per_core / ref_core:.2f}x | {per_cpu / ref_cpu:.2f}x"
        name = "TinyLlama's loop" if r["system"] == "reference" else "llamita prepare"
        mb = r["files"] * mb_per_file
        rows.append(
            f"| {name} | {r['workers']} | {r['files']} ({mb:,.0f}) | {r['docs']:,} | {r['tokens']:,} "
            f"| {r['wall_s']:.1f} | {r['tokens'] / r['wall_s']:,.0f} | {per_core:,.0f} "
            f"| {r['docs'] / r['wall_s']:,.0f} | {mb / r['wall_s'] / r['workers']:.2f} | {per_cpu:,.0f} "
            f"| {r['peak_rss_mb']:,.0f} {ratios} |"
        )
    return "\n".join(rows)


def projection(runs: list[dict]) -> tuple[list[str], dict[str, float]]:
    """Hours for SlimPajama-627B + Starcoderdata on 64 cores at the per-core rate of each system's largest run."""
    lines, hours = [], {}
    total = sum(CORPUS_TOKENS.values())
    for system, name in (("llamita", "llamita prepare"), ("reference", "TinyLlama's loop")):
        scaling = [r for r in runs if r["system"] == system and not r.get("single")]
        one, top = min(scaling, key=lambda r: r["workers"]), max(scaling, key=lambda r: r["workers"])
        rate = top["tokens"] / top["wall_s"] / top["workers"]
        hours[system] = total / (rate * PROJECTION_CORES) / 3600
        lines.append(
            f"* {name}: {rate:,.0f} tokens/s per core with {top['workers']} cores "
            f"({rate / (one['tokens'] / one['wall_s'] / one['workers']):.0%} of its rate with {one['workers']}) -> "
            f"**{hours[system]:.1f} h** on {PROJECTION_CORES} cores"
        )
    top = max((r for r in runs if r["system"] == "llamita"), key=lambda r: r["workers"])
    per_token = top["main_cpu_s"] / top["tokens"]
    rate = total / hours["llamita"] / 3600
    lines.append(
        f"* llamita's main process (its threads put the results together, hash and write the shards) used "
        f"{top['main_cpu_s']:.1f} CPU s in the {top['workers']}-worker run, start-up included: at the projected "
        f"{rate / 1e6:,.0f}M tokens/s it would need {per_token * rate:.1f} cores' worth (an upper bound), and the "
        f"disk would take {2 * rate / 1e6:,.0f} MB/s of shards; the projection assumes both keep up."
    )
    return lines, hours


def report(args: argparse.Namespace, data: dict, runs: list[dict], tokenizer_s: float, equal: bool, load: float) -> str:
    """The results file: what ran where, the table, and what follows from it."""
    cores = len(os.sched_getaffinity(0))
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "src", "bench"], capture_output=True, text=True).stdout
    single = next(r for r in runs if r.get("single"))
    many = max((r for r in runs if r["system"] == "llamita" and r["workers"] == 1), key=lambda r: r["files"])
    cold_ref = next(r for r in runs if r["system"] == "reference" and r["workers"] == 1 and r["files"] == 1)
    cold = (single["tokens"] / single["wall_s"]) / (cold_ref["tokens"] / cold_ref["wall_s"])
    lines, _ = projection(runs)
    per_worker = max(r["files"] // r["workers"] for r in runs if r["system"] == "llamita")
    ref_per_worker = max(r["files"] // r["workers"] for r in runs if r["system"] == "reference")
    return "\n".join(
        [
            "# `llamita prepare` against TinyLlama's preparation loop (issue 16)",
            "",
            f"{time.strftime('%Y-%m-%d')}, {cpu_model()}, {cores} cores (load average {load:.1f} at the start); "
            f"commit {commit}{' with working-tree changes' if dirty.strip() else ''}; Python "
            f"{sys.version.split()[0]}. Command:",
            "",
            "    PYTHONPATH=src python " + " ".join(["bench/prepare_throughput.py"] + sys.argv[1:]),
            "",
            f"Data: {len(data['files'])} synthetic SlimPajama-like `.jsonl.zst` files, {data['bytes'] / 1e9:.2f} GB "
            f"of JSON lines ({data['compressed_bytes'] / 1e9:.2f} GB compressed), {data['docs']:,} documents, "
            f"generated in {data['seconds']:.1f} s from {data['pool_sentences']:,} sentences and "
            f"{data['pool_sources']:,} source files (the script's docstring says how); a 32000-token tokenizer from "
            f"`llamita train-tokenizer` on the first {args.tokenizer_sample_mb:g} MB ({tokenizer_s:.1f} s). Each run "
            f"is its own process tree pinned to its first N cores, on the first files: llamita {per_worker} file(s) "
            f"per core, the reference {ref_per_worker}"
            + (
                " (fewer, to fit the time; its rate does not depend on how many files it reads)"
                if ref_per_worker < per_worker
                else ""
            )
            + ". Wall time includes start-up; tokens per CPU s divide by the CPU time of the whole process tree, "
            "which a busy machine does not inflate as it does wall time; peak RSS is summed over the process tree.",
            "",
            table(runs, data),
            "",
            f"* Same tokens: the 1-core streams are {'identical' if equal else '**DIFFERENT**'} over the reference's "
            f"{cold_ref['tokens']:,} tokens (llamita's EOS dropped).",
            f"* On one file alone, where llamita's piece cache starts empty, llamita is {cold:.2f}x the reference on "
            "one core; the cache fills over the first files a worker reads, and a worker of a corpus-scale run reads "
            "hundreds.",
            f"* Memory: llamita with 1 worker peaks at {single['peak_rss_mb']:,.0f} MB on 1 file and "
            f"{many['peak_rss_mb']:,.0f} MB on {many['files']}: the tasks in flight, one shard and the piece cache "
            "(at most 2^20 pieces, some 200 MB), whatever the size of the input.",
            f"* Projection for SlimPajama-627B + Starcoderdata ({CORPUS_TOKENS['SlimPajama-627B'] / 1e9:.0f}B + "
            f"{CORPUS_TOKENS['Starcoderdata'] / 1e9:.0f}B Llama tokens; rates here are this tokenizer's tokens on this "
            f"text), if the per-core rate of the largest run holds on {PROJECTION_CORES} cores:",
            *lines,
        ]
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "reference":
        parser = argparse.ArgumentParser(prog="prepare_throughput.py reference")
        parser.add_argument("--tokenizer", type=Path, required=True)
        parser.add_argument("--out", type=Path, required=True)
        parser.add_argument("--processes", type=int, required=True)
        parser.add_argument("files", nargs="+")
        args = parser.parse_args(sys.argv[2:])
        summary = reference_prepare(args.files, args.tokenizer, args.out, args.processes)
        (args.out / "summary.json").write_text(json.dumps(summary))
        return

    cores = len(os.sched_getaffinity(0))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="uncompressed text to generate")
    parser.add_argument("--file-mb", type=float, default=16.0, help="uncompressed MB per file (SlimPajama: ~15)")
    parser.add_argument("--workers", type=int, nargs="+", default=[n for n in (1, 2, 4, 8, 16) if n <= cores])
    parser.add_argument("--reference-workers", type=int, nargs="+", help="core counts of the reference (--workers)")
    parser.add_argument("--files-per-worker", type=int, help="llamita reads N times this (all files at the most N)")
    parser.add_argument("--reference-files-per-worker", type=int, default=1, help="the reference reads N times this")
    parser.add_argument("--tokenizer-sample-mb", type=float, default=16.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "prepare", help="data and outputs")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results", help="where the table goes")
    parser.add_argument("--tag", default="", help="suffix of the results file name (e.g. cpu2)")
    args = parser.parse_args()
    if max(args.workers + (args.reference_workers or [])) > cores:
        parser.error(f"more workers than the {cores} cores this process may use")
    args.out.mkdir(parents=True, exist_ok=True)
    started, load = time.perf_counter(), os.getloadavg()[0]

    data = generate(args.out / "data", args.size_gb, args.file_mb, args.seed, cores)
    files = data["files"]
    print(f"data: {len(files)} files, {data['bytes'] / 1e9:.2f} GB, {data['seconds']:.1f} s", flush=True)
    tokenizer, tokenizer_s = args.out / "tokenizer", time.perf_counter()
    if not (tokenizer / "tokenizer.json").is_file():
        sample = tokenizer_sample(files, args.out / "sample.jsonl", args.tokenizer_sample_mb)
        cmd = [sys.executable, "-m", "llamita.cli", "train-tokenizer", "--input", str(sample), "--vocab-size"]
        measure([*cmd, "32000", "--out", str(tokenizer), "--force"], list(range(cores)), args.out / "tok.log")
    tokenizer_s = time.perf_counter() - tokenizer_s
    print(f"tokenizer: {tokenizer_s:.1f} s", flush=True)

    per_worker = args.files_per_worker or -(-len(files) // max(args.workers))  # the largest run reads all
    # (system, cores, files, whether it is the 1-file run beside the scaling runs)
    plan = [("llamita", n, n * per_worker, False) for n in sorted(args.workers)] + [("llamita", 1, 1, True)]
    plan += [
        ("reference", n, n * args.reference_files_per_worker, False) for n in args.reference_workers or args.workers
    ]
    runs = []
    for system, n, n_files, single in plan:
        out = args.out / f"{system}-{n}w-{n_files}f"
        run = (run_llamita if system == "llamita" else run_reference)(files[:n_files], n, tokenizer, out)
        runs.append({"system": system, "workers": n, "files": min(n_files, len(files)), "single": single, **run})
        runs[-1]["out"] = str(out)
        print(
            f"{system}, {n} cores, {n_files} files: {run['wall_s']:.1f} s, "
            f"{run['tokens'] / run['wall_s'] / n:,.0f} tokens/s per core",
            flush=True,
        )

    from llamita.tokenizer import Tokenizer

    one_ref = next(r for r in runs if r["system"] == "reference" and r["workers"] == 1)
    one_ours = max((r for r in runs if r["system"] == "llamita" and r["workers"] == 1), key=lambda r: r["files"])
    eos = Tokenizer.load(tokenizer).eos_id
    equal = same_streams(Path(one_ours["out"]), Path(one_ref["out"]), eos, one_ref["tokens"])
    text = (
        report(args, data, runs, tokenizer_s, equal, load)
        + f"\n\nThe whole benchmark took {time.perf_counter() - started:.0f} s.\n"
    )
    args.results.mkdir(parents=True, exist_ok=True)
    name = f"{time.strftime('%Y-%m-%d')}-prepare-throughput{'-' + args.tag if args.tag else ''}"
    (args.results / f"{name}.md").write_text(text)
    record = {
        "data": {k: v for k, v in data.items() if k != "files"},
        "runs": [{k: v for k, v in r.items() if k != "out"} for r in runs],
        "hours": projection(runs)[1],
    }
    (args.results / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
