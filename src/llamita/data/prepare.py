"""Tokenize one source's raw files into token shards, a validation split and a manifest.

Output layout of ``out_dir``::

    train/shard_00000.bin ...   fixed-size shards of ``shard_tokens`` tokens (the last one may be shorter)
    val/shard_00000.bin ...     the held-out documents, same format
    manifest.json               written last: its presence marks a complete, consistent preparation
    .progress/                  while unfinished: how far it got (state.json) and each split's unwritten tail

Every document becomes ``[bos] + ids + [eos]`` and documents are concatenated without padding. Each input file
(or each part of a large ``.jsonl``/``.parquet`` file) is a task that one worker process reads as a stream and
tokenizes; the results are put together in input order, so the shards are byte-identical for any number of
workers. A document goes to the validation split when a stable hash of (seed, file name relative to the inputs'
common directory, record position) falls below ``val_fraction``, so the split does not depend on workers or
chunking either. Memory is bounded by the tasks in flight and one shard, whatever the size of the inputs.

An interrupted preparation resumes. Every 30 seconds it records how many tasks it has put together, the shards
they filled, their statistics and the tokens not yet in a shard; run again with the same inputs, tokenizer and
settings (any number of workers), it continues after the last recorded task: no finished file is read again, no
document is written twice, and the output equals an uninterrupted preparation's.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from llamita.config import ConfigError
from llamita.data.shards import FORMAT_VERSION, HEADER_BYTES, ShardError, dtype_for_vocab, read_shard, write_shard
from llamita.data.sources import Rejects, SourceError, Span, expand_inputs, iter_records, plan_spans
from llamita.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
PROGRESS_DIR = ".progress"
SPLITS = ("train", "val")

# Input bytes per task: bounds a worker's result (~4 bytes of tokens per input byte at worst) and lets one big
# file use several workers.
_TASK_BYTES = 64 << 20
# Characters of text encoded at a time: bounds the memory of a batch whatever the documents' sizes.
_ENCODE_CHARS = 1 << 20
# Seconds between progress records: each rewrites the statistics of every file and the unwritten tails.
_CHECKPOINT_SECONDS = 30.0
# The pool already uses one process per core: the tokenizer's threads, and the BLAS thread pool numpy starts for every
# core as it is imported (a tenth of a CPU second per process; the workers never use it), would oversubscribe them.
_WORKER_ENVIRONMENT = {"TOKENIZERS_PARALLELISM": "false", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
# What identifies a tokenizer's ids in a manifest or a progress record.
_TOKENIZER_IDENTITY = ("fingerprint", "vocab_size", "bos_id", "eos_id")


class ManifestError(ShardError):
    """A prepared source's manifest is unreadable or from an unsupported format version."""


def prepare_source(
    name: str,
    inputs: list[str],
    tokenizer_dir: Path,
    out_dir: Path,
    *,
    text_field: str = "text",
    shard_tokens: int = 2**24,
    val_fraction: float = 0.001,
    workers: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Tokenize the files of one source into ``out_dir`` (see the module docstring for the layout).

    If ``out_dir`` already holds a manifest for the same inputs (paths, sizes, mtimes), tokenizer and
    settings, nothing is done and that manifest is returned. If it holds the progress of an interrupted
    preparation of the same, that one is resumed (see the module docstring). Otherwise the old shards are removed
    and all is rebuilt.

    Args:
        name: the source's name, recorded in the manifest.
        inputs: files, directories or globs (see :func:`llamita.data.sources.expand_inputs`).
        tokenizer_dir: directory loadable by :meth:`llamita.tokenizer.Tokenizer.load`.
        out_dir: output directory; created if missing.
        text_field: JSON key or parquet column holding the text.
        shard_tokens: tokens per shard (the last shard of each split may be shorter).
        val_fraction: expected fraction of documents held out for validation, in ``[0, 1)``. When it is
            positive and there are at least two documents, at least one is held out.
        workers: tokenizer processes; 1 tokenizes in this process.
        seed: changes which documents are held out.
        progress: show a progress bar and print the report.

    Returns:
        The manifest (also written to ``out_dir/manifest.json``).

    Raises:
        SourceError: an input cannot be read, or the inputs yield no document for the train split (no records,
            or all rejected: the message counts the reasons); ``out_dir`` is then left without shards or manifest.
        ConfigError: a setting is out of range, or an empty source name.
    """
    if not name:
        raise ConfigError("--name is empty; name the source (the mixture and logs refer to it)")
    if shard_tokens < 1:
        raise ConfigError(f"--shard-tokens must be >= 1, got {shard_tokens}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    out_dir, tokenizer_dir = Path(out_dir), Path(tokenizer_dir)
    console = Console(stderr=True) if progress else None

    found = expand_inputs(inputs)
    if found.skipped_total:
        _say(f"{name}: {found.skipped_summary()}", console, logging.WARNING)
    files = found.files
    base = Path(os.path.commonpath([str(f.parent) for f in files]))
    inputs_meta = []
    for f in files:
        stat = f.stat()
        inputs_meta.append(
            {
                "path": str(f),
                "file": f.relative_to(base).as_posix(),
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
            }
        )
    tokenizer = Tokenizer.load(tokenizer_dir)
    tokenizer_meta = {
        "path": str(tokenizer_dir.resolve()),
        "fingerprint": tokenizer.fingerprint(),
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
    }
    settings = {
        "text_field": text_field,
        "shard_tokens": shard_tokens,
        "val_fraction": val_fraction,
        "seed": seed,
    }

    existing = _read_manifest_if_any(out_dir)
    if existing is not None and _up_to_date(existing, name, tokenizer_meta, settings, inputs_meta, out_dir):
        shutil.rmtree(out_dir / PROGRESS_DIR, ignore_errors=True)  # left if the last run stopped right after
        _say(f"{name}: up to date ({out_dir / MANIFEST_NAME})", console)
        return existing

    tasks = [
        _Task(i, f, meta["file"], span, text_field, val_fraction, seed)
        for i, (f, meta) in enumerate(zip(files, inputs_meta, strict=True))
        for span in plan_spans(f, _TASK_BYTES)
    ]
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    with _ShardWrites(tokenizer.vocab_size) as writes:
        writers = {s: _SplitWriter(out_dir, s, shard_tokens, writes) for s in SPLITS}
        per_file = [{"records": 0, "docs": 0, "tokens": 0} for _ in files]
        rejects = Rejects()
        progress = _Progress(out_dir, name, tokenizer_meta, settings, inputs_meta, tasks)
        resumed = progress.load(writers, console) if existing is None else None
        if resumed is None:
            _remove_outputs(out_dir)
            done = 0
        else:
            done, per_file, rejects = resumed
            _remove_outputs(out_dir, keep={s["file"] for w in writers.values() for s in w.shards})
        spans_left = collections.Counter(task.index for task in tasks[done:])
        if done:
            _say(
                f"{name}: resuming an interrupted preparation: {len(files) - len(spans_left)} of {len(files)} file(s) "
                f"done ({sum(w.docs for w in writers.values()):,} docs); reading the rest",
                console,
            )

        checkpoint = time.monotonic()
        with _progress_bar(console, name, len(files), len(files) - len(spans_left)) as update_bar:
            for result in _run_tasks(tasks[done:], tokenizer, tokenizer_dir, workers, dtype):
                stats = per_file[result.index]
                stats["records"] += result.records
                for split in SPLITS:
                    writers[split].add(result.tokens[split], result.doc_lens[split])
                    stats["docs"] += len(result.doc_lens[split])
                    stats["tokens"] += len(result.tokens[split])
                rejects.merge(result.rejects)
                spans_left[result.index] -= 1
                done += 1
                if time.monotonic() - checkpoint >= _CHECKPOINT_SECONDS and done < len(tasks):
                    progress.save(done, writers, per_file, rejects)
                    checkpoint = time.monotonic()
                update_bar(
                    advance=int(spans_left[result.index] == 0),
                    docs=sum(w.docs for w in writers.values()),
                    tokens=sum(w.tokens for w in writers.values()),
                )

        if val_fraction > 0:
            _ensure_both_splits(writers)
        if writers["train"].docs == 0:
            writes.flush()
            _remove_outputs(out_dir)
            raise SourceError(_no_train_documents(name, len(files), rejects, writers["val"].docs, text_field))
        shards = [shard for split in SPLITS for shard in writers[split].finish()]
        writes.flush()

    by_file = rejects.by_file
    for meta, stats in zip(inputs_meta, per_file, strict=True):
        file_rejects = by_file.get(meta["path"], {})
        if stats["records"] != stats["docs"] + sum(file_rejects.values()):
            raise RuntimeError(f"{meta['path']}: record count does not add up (bug in llamita): {stats}")
        meta.update(docs=stats["docs"], tokens=stats["tokens"], rejects=file_rejects)
    totals = {
        "docs_in": sum(s["records"] for s in per_file),
        "docs": sum(w.docs for w in writers.values()),
        "docs_rejected": rejects.total,
        "docs_train": writers["train"].docs,
        "docs_val": writers["val"].docs,
        "tokens_train": writers["train"].tokens,
        "tokens_val": writers["val"].tokens,
    }
    if totals["docs_in"] != totals["docs"] + totals["docs_rejected"]:
        raise RuntimeError(f"documents in != written + rejected (bug in llamita): {totals}")

    manifest = {
        "name": name,
        "format_version": FORMAT_VERSION,
        "dtype": dtype.name,
        "tokenizer": tokenizer_meta,
        "settings": settings,
        "inputs": inputs_meta,
        "skipped": found.skipped_dict(),
        "totals": totals,
        "rejects": rejects.to_dict(),
        "shards": shards,
    }
    _write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    shutil.rmtree(out_dir / PROGRESS_DIR, ignore_errors=True)
    n_shards = collections.Counter(s["split"] for s in shards)
    _say(
        f"{name}: {totals['docs']:,} docs ({totals['docs_rejected']:,} rejected) -> "
        f"{totals['tokens_train']:,} train tokens in {n_shards['train']} shard(s), "
        f"{totals['tokens_val']:,} val tokens in {n_shards['val']} shard(s) in {out_dir}",
        console,
    )
    if rejects.total:
        _say(f"{name}: {rejects.summary()}", console, logging.WARNING)
    return manifest


def load_manifest(source_dir: Path) -> dict:
    """Read the manifest of a prepared source.

    Raises:
        FileNotFoundError: ``source_dir`` has no manifest (never prepared, or preparation did not finish).
        ManifestError: the manifest is unreadable or from an unsupported format version.
    """
    path = Path(source_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {source_dir} is not a prepared source (or its preparation did not finish); "
            "run `llamita prepare` to create it"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ManifestError(f"{path}: unreadable manifest ({err}); run `llamita prepare` again") from err
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ManifestError(
            f"{path}: format version {version} is not supported (this llamita writes {FORMAT_VERSION}); "
            "run `llamita prepare` again"
        )
    return manifest


def shard_paths(source_dir: Path, split: str) -> list[Path]:
    """The shard files of one split of a prepared source, in order.

    Args:
        source_dir: a directory written by :func:`prepare_source`.
        split: ``"train"`` or ``"val"``.

    Raises:
        ValueError: unknown split.
        FileNotFoundError, ManifestError: as for :func:`load_manifest`.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    manifest = load_manifest(source_dir)
    return [Path(source_dir) / s["file"] for s in manifest["shards"] if s["split"] == split]


# ------------------------------------------------------------------------------------------- tokenizing
@dataclass(frozen=True)
class _Task:
    index: int  # input file index: results are assembled in this order
    path: Path
    rel: str  # the file's name relative to the inputs' common directory, hashed for the split
    span: Span | None
    text_field: str
    val_fraction: float
    seed: int


@dataclass
class _Result:
    index: int
    records: int
    tokens: dict[str, np.ndarray]  # split -> the split's documents, concatenated
    doc_lens: dict[str, np.ndarray]  # split -> token count of each document
    rejects: Rejects


def _is_val(rel: str, position: int, seed: int, val_fraction: float) -> bool:
    # blake2b rather than hash(): Python's str hash is salted per process.
    digest = hashlib.blake2b(f"{seed}\0{rel}\0{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


def _tokenize_task(task: _Task, tokenizer: Tokenizer, dtype: np.dtype) -> _Result:
    rejects = Rejects()
    records = 0
    texts: dict[str, list[str]] = {s: [] for s in SPLITS}
    chars = dict.fromkeys(SPLITS, 0)
    ids: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    lens: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}

    def encode(split: str) -> None:
        batch_ids, batch_lens = tokenizer.encode_concat(texts[split], dtype, bos=True, eos=True)
        ids[split].append(batch_ids)
        lens[split].append(batch_lens)
        texts[split].clear()
        chars[split] = 0

    for position, text in iter_records(task.path, task.text_field, rejects, task.span):
        records += 1
        if text is None:
            continue
        split = (
            "val" if task.val_fraction > 0 and _is_val(task.rel, position, task.seed, task.val_fraction) else "train"
        )
        texts[split].append(text)
        chars[split] += len(text)
        if chars[split] >= _ENCODE_CHARS:
            encode(split)
    for split in SPLITS:
        encode(split)
    tokens = {split: np.concatenate(ids[split]) for split in SPLITS}
    doc_lens = {split: np.concatenate(lens[split]) for split in SPLITS}
    return _Result(task.index, records, tokens, doc_lens, rejects)


_worker_tokenizer: Tokenizer | None = None
_worker_dtype: np.dtype | None = None


def _init_worker(tokenizer_dir: str, dtype: str) -> None:
    global _worker_tokenizer, _worker_dtype
    _worker_tokenizer = Tokenizer.load(tokenizer_dir)
    _worker_dtype = np.dtype(dtype)


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the processes started in the block (not thread-safe)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


def _worker_task(task: _Task) -> _Result:
    assert _worker_tokenizer is not None and _worker_dtype is not None, "worker not initialised"
    return _tokenize_task(task, _worker_tokenizer, _worker_dtype)


def _run_tasks(
    tasks: list[_Task], tokenizer: Tokenizer, tokenizer_dir: Path, workers: int, dtype: np.dtype
) -> Iterator[_Result]:
    """Yield the tasks' results in task order."""
    if workers == 1 or len(tasks) <= 1:
        for task in tasks:
            yield _tokenize_task(task, tokenizer, dtype)
        return
    # spawn, not fork: the parent's tokenizer may already run Rust threads, which fork does not copy safely.
    ctx = multiprocessing.get_context("spawn")
    with _environment(_WORKER_ENVIRONMENT):
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer_dir), dtype.name))
    with pool:
        todo = iter(tasks)
        # A bounded window of tasks in flight, so finished results cannot pile up behind a slow one.
        pending = collections.deque(pool.apply_async(_worker_task, (t,)) for t in itertools.islice(todo, 2 * workers))
        while pending:
            result = pending.popleft().get()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.apply_async(_worker_task, (nxt,)))
            yield result


# ------------------------------------------------------------------------------------------- writing
class _SplitWriter:
    """Cuts one split's token stream into fixed-size shards.

    The last document added is held back from the shards until :meth:`finish`, so that
    :func:`_ensure_both_splits` can still move it to the other split.
    """

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, writes: _ShardWrites) -> None:
        self.out_dir, self.split = out_dir, split
        self.shard_tokens, self.vocab_size, self.writes = shard_tokens, writes.vocab_size, writes
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.last_doc_tokens = 0
        self.docs = 0
        self.tokens = 0
        self.shards: list[dict] = []

    def add(self, tokens: np.ndarray, doc_lens: np.ndarray) -> None:
        if not len(doc_lens):
            return
        self.pending.append(tokens)
        self.pending_tokens += len(tokens)
        self.docs += len(doc_lens)
        self.tokens += len(tokens)
        self.last_doc_tokens = int(doc_lens[-1])
        self._write(self.pending_tokens - self.last_doc_tokens, final=False)

    def state(self) -> tuple[dict, np.ndarray]:
        """What :meth:`restore` needs to continue from here: counts and shards, and the unwritten tokens."""
        self.writes.flush()
        counts = {"docs": self.docs, "tokens": self.tokens, "last_doc_tokens": self.last_doc_tokens}
        pending = np.concatenate(self.pending) if self.pending else np.empty(0, dtype_for_vocab(self.vocab_size))
        return {**counts, "shards": self.shards}, pending

    def restore(self, state: dict, pending: np.ndarray) -> None:
        """Continue from a :meth:`state`."""
        self.docs, self.tokens, self.last_doc_tokens = state["docs"], state["tokens"], state["last_doc_tokens"]
        self.shards = state["shards"]
        self.pending, self.pending_tokens = ([pending] if len(pending) else []), len(pending)

    def pop_last(self) -> np.ndarray:
        """Remove and return the last document added."""
        buf = np.concatenate(self.pending)
        doc, rest = buf[len(buf) - self.last_doc_tokens :], buf[: len(buf) - self.last_doc_tokens]
        self.pending, self.pending_tokens = [rest], len(rest)
        self.docs -= 1
        self.tokens -= len(doc)
        self.last_doc_tokens = 0
        return doc

    def finish(self) -> list[dict]:
        """Write all that is pending (the last shard may be short); return the manifest's shard entries.

        Their sha256 is filled in when the writes are flushed.
        """
        self._write(self.pending_tokens, final=True)
        return self.shards

    def _write(self, available: int, final: bool) -> None:
        """Write the full shards among the first ``available`` pending tokens, and the rest if ``final``."""
        n_full = available // self.shard_tokens
        if n_full == 0 and not (final and self.pending_tokens):
            return
        buf = np.concatenate(self.pending)
        cut = n_full * self.shard_tokens
        pieces = [buf[i : i + self.shard_tokens] for i in range(0, cut, self.shard_tokens)]
        rest = buf[cut:]
        if final and len(rest):
            pieces.append(rest)
            rest = rest[:0]
        (self.out_dir / self.split).mkdir(parents=True, exist_ok=True)  # not before: removing outputs drops it
        for piece in pieces:
            rel = f"{self.split}/shard_{len(self.shards):05d}.bin"
            self.shards.append({"file": rel, "split": self.split, "tokens": len(piece)})
            self.writes.submit(self.out_dir / rel, piece, self.shards[-1])
        self.pending = [rest] if len(rest) else []
        self.pending_tokens = len(rest)


class _ShardWrites:
    """Writes shards in one background thread, so that putting results together does not wait for the disk.

    At most ``depth`` shards wait at a time (their tokens are held until written). :meth:`flush` waits for them all
    and fills in their manifest entries' sha256; a failed write raises there.
    """

    def __init__(self, vocab_size: int, depth: int = 2) -> None:
        self.vocab_size, self.depth = vocab_size, depth
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llamita-shards")
        self._pending: collections.deque[tuple[concurrent.futures.Future, dict]] = collections.deque()

    def submit(self, path: Path, tokens: np.ndarray, entry: dict) -> None:
        """Write ``tokens`` to ``path``; ``entry`` gets the file's sha256."""
        while len(self._pending) >= self.depth:
            self._finish_oldest()
        self._pending.append((self._thread.submit(write_shard, path, tokens, self.vocab_size), entry))

    def flush(self) -> None:
        """Wait for every write submitted."""
        while self._pending:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        future, entry = self._pending.popleft()
        entry["sha256"] = future.result()

    def __enter__(self) -> _ShardWrites:
        return self

    def __exit__(self, *exc: object) -> None:
        # After an error the writes in flight still finish: each shard is written to a temporary file and renamed.
        self._thread.shutdown(wait=True)


def _no_train_documents(name: str, n_files: int, rejects: Rejects, val_docs: int, text_field: str) -> str:
    """Why a preparation has nothing for the train split, and what to do about it."""
    where = f"{name}: no documents to train on in {n_files} input file(s)"
    if val_docs:
        return f"{where}: the only document went to the validation split; add documents or use --val-fraction 0"
    if not rejects.total:
        return f"{where}: they hold no records (empty files?); check the --input paths"
    words = {
        "invalid_json": "invalid JSON",
        "missing_field": f"missing field {text_field!r}",
        "not_a_string": f"field {text_field!r} is not a string",
        "invalid_utf8": "invalid UTF-8",
        "empty": "empty text",
    }
    by_reason = rejects.by_reason
    counts = "; ".join(f"{words[reason]}: {n:,}" for reason, n in by_reason.items())
    message = f"{where}: all {rejects.total:,} record(s) were rejected ({counts})"
    file, firsts = min(rejects.to_dict()["first"].items(), default=(None, {}))
    if file is not None:
        reason, at = next(iter(firsts.items()))
        message += f"; the first {words[reason]} is at {file} {at}"
    if 2 * by_reason.get("missing_field", 0) >= rejects.total:
        message += f"; is {text_field!r} the field holding the text? Set --text-field to the JSON key or parquet column"
    return message


def _ensure_both_splits(writers: dict[str, _SplitWriter]) -> None:
    """Move one document to an empty split from the other one, when the other has at least two."""
    for empty, full in (("val", "train"), ("train", "val")):
        if writers[empty].docs == 0 and writers[full].docs >= 2:
            doc = writers[full].pop_last()
            writers[empty].add(doc, np.array([len(doc)]))


# ------------------------------------------------------------------------------------------- bookkeeping
class _Progress:
    """The progress of an unfinished preparation, in ``out_dir/.progress``: ``state.json`` and the splits' tails.

    ``state.json`` names what it was made for (source name, tokenizer, settings, inputs and their split into
    tasks), how many tasks are put together, the shards written so far, the statistics, and the file holding
    each split's tokens that are not in a shard yet (in the shard format, named by the task count so that the
    state being replaced keeps its own until the new one is in place).
    """

    def __init__(
        self,
        out_dir: Path,
        name: str,
        tokenizer_meta: dict,
        settings: dict,
        inputs_meta: list[dict],
        tasks: list[_Task],
    ) -> None:
        self.dir = out_dir / PROGRESS_DIR
        plan = json.dumps([[t.index, t.span] for t in tasks]).encode()
        self.identity = {
            "name": name,
            "format_version": FORMAT_VERSION,
            "tokenizer": {k: tokenizer_meta[k] for k in _TOKENIZER_IDENTITY},
            "settings": settings,
            "inputs": [[i["path"], i["size"], i["mtime_ns"]] for i in inputs_meta],
            "tasks_sha256": hashlib.sha256(plan).hexdigest(),
        }

    def save(self, done: int, writers: dict[str, _SplitWriter], per_file: list[dict], rejects: Rejects) -> None:
        """Record that the first ``done`` tasks are put together into ``writers``, ``per_file`` and ``rejects``."""
        self.dir.mkdir(parents=True, exist_ok=True)
        splits = {}
        for split, writer in writers.items():
            state, pending = writer.state()
            tail = f"{split}_{done:08d}.bin"
            write_shard(self.dir / tail, pending, writer.vocab_size)
            splits[split] = {**state, "tail": tail}
        state = {
            "identity": self.identity,
            "tasks_done": done,
            "per_file": per_file,
            "rejects": rejects.to_dict(),
            "splits": splits,
        }
        _write_json_atomic(self.dir / "state.json", state)
        for path in self.dir.glob("*.bin"):
            if path.name not in {s["tail"] for s in splits.values()}:
                path.unlink()

    def load(self, writers: dict[str, _SplitWriter], console: Console | None) -> tuple[int, list[dict], Rejects] | None:
        """Restore ``writers`` to the recorded state and return ``(tasks done, per-file statistics, rejects)``.

        None, and ``writers`` untouched, when there is no record, or it cannot be resumed (it says why).
        """
        path = self.dir / "state.json"
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            return self._start_over(f"its record {path} is unreadable ({err})", console)
        if not isinstance(state, dict) or state.get("identity") != self.identity:
            return self._start_over("the inputs, tokenizer or settings changed since it stopped", console)
        itemsize = dtype_for_vocab(self.identity["tokenizer"]["vocab_size"]).itemsize
        restored = {}
        try:
            for split, writer in writers.items():
                recorded = state["splits"][split]
                missing = _first_missing_shard(self.dir.parent, recorded["shards"], itemsize)
                if missing is not None:
                    return self._start_over(f"its shard {missing} is missing or has another size", console)
                restored[split] = recorded, np.array(read_shard(self.dir / recorded["tail"], writer.vocab_size))
            done, per_file, rejects = state["tasks_done"], state["per_file"], Rejects.from_dict(state["rejects"])
        except (KeyError, TypeError, ValueError) as err:  # ShardError is a ValueError
            return self._start_over(f"its record {path} is damaged ({err!r})", console)
        for split, (recorded, tail) in restored.items():
            writers[split].restore(recorded, tail)
        return done, per_file, rejects

    def _start_over(self, why: str, console: Console | None) -> None:
        _say(f"not resuming the interrupted preparation in {self.dir.parent}: {why}; starting over", console)


def _read_manifest_if_any(out_dir: Path) -> dict | None:
    try:
        return load_manifest(out_dir)
    except (FileNotFoundError, ManifestError):
        return None


def _up_to_date(
    manifest: dict, name: str, tokenizer_meta: dict, settings: dict, inputs_meta: list[dict], out_dir: Path
) -> bool:
    """Whether ``manifest`` describes exactly what this call would produce, and its shards are all present.

    A manifest without train shards (written by a llamita that allowed it) is never up to date: rebuilding it
    reports why the inputs yield no documents.
    """
    same = (
        any(s.get("split") == "train" for s in manifest.get("shards", []))
        and manifest.get("name") == name
        and all(manifest.get("tokenizer", {}).get(k) == tokenizer_meta[k] for k in _TOKENIZER_IDENTITY)
        and manifest.get("settings") == settings
        and [(i.get("path"), i.get("size"), i.get("mtime_ns")) for i in manifest.get("inputs", [])]
        == [(i["path"], i["size"], i["mtime_ns"]) for i in inputs_meta]
    )
    itemsize = dtype_for_vocab(tokenizer_meta["vocab_size"]).itemsize
    return same and _first_missing_shard(out_dir, manifest.get("shards", []), itemsize) is None


def _first_missing_shard(out_dir: Path, shards: list[dict], itemsize: int) -> str | None:
    """The first of the manifest entries ``shards`` whose file is missing or has another size, or None.

    Cheap (sizes only); read_shard validates the contents when training opens them.
    """
    for shard in shards:
        path = out_dir / shard["file"]
        if not path.is_file() or path.stat().st_size != HEADER_BYTES + shard["tokens"] * itemsize:
            return shard["file"]
    return None


def _remove_outputs(out_dir: Path, keep: set[str] | None = None) -> None:
    """Remove a previous preparation: the manifest first, so no half-rebuilt directory looks complete.

    Args:
        out_dir: the output directory.
        keep: for a resumed preparation, the shards it recorded (paths relative to ``out_dir``), which stay with
            its progress; the shards written after its last record are removed. None removes all.
    """
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    if keep is None:
        shutil.rmtree(out_dir / PROGRESS_DIR, ignore_errors=True)
    for split in SPLITS:
        directory = out_dir / split
        if directory.is_dir():
            for path in [*directory.glob("shard_*.bin"), *directory.glob(".shard_*.tmp*")]:
                if keep is None or path.relative_to(out_dir).as_posix() not in keep:
                    path.unlink()
            if not any(directory.iterdir()):
                directory.rmdir()


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=1)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _progress_bar(console: Console | None, name: str, n_files: int, files_done: int) -> Iterator[Callable[..., None]]:
    """Yield ``update(advance=..., docs=..., tokens=...)`` for a files-done bar, a no-op without a console."""
    if console is None:
        yield lambda **_: None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("files  {task.fields[docs]:,} docs  {task.fields[tokens]:,} tokens"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(f"prepare {name}", total=n_files, completed=files_done, docs=0, tokens=0)
        yield lambda **fields: bar.update(task, **fields)


def _say(message: str, console: Console | None, level: int = logging.INFO) -> None:
    """Print ``message`` on the console, or log it when there is none: one report either way."""
    if console is not None:
        console.print(message, markup=False, soft_wrap=True)
    else:
        log.log(level, message)
