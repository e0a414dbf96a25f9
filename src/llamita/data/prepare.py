"""Tokenize one source's raw files into token shards, a validation split and a manifest.

Output layout of ``out_dir``::

    train/shard_00000.bin ...   fixed-size shards of ``shard_tokens`` tokens (the last one may be shorter)
    val/shard_00000.bin ...     the held-out documents, same format
    manifest.json               written last: its presence marks a complete, consistent preparation

Every document becomes ``[bos] + ids + [eos]`` and documents are concatenated without padding. Each input file
(or each part of a large ``.jsonl``/``.parquet`` file) is tokenized by one worker process; the results are put
together in input order, so the shards are byte-identical for any number of workers. A document goes to the
validation split when a stable hash of (seed, file name relative to the inputs' common directory, record
position) falls below ``val_fraction``, so the split does not depend on workers or chunking either.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from llamita.config import ConfigError
from llamita.data.shards import FORMAT_VERSION, HEADER_BYTES, ShardError, dtype_for_vocab, write_shard
from llamita.data.sources import Rejects, SourceError, Span, expand_inputs, iter_records, plan_spans
from llamita.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")

# Input bytes per task: bounds a worker's result (~4 bytes of tokens per input byte at worst) and lets one big
# file use several workers.
_TASK_BYTES = 64 << 20
_ENCODE_BATCH = 256


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
    settings, nothing is done and that manifest is returned; otherwise the old shards are removed and all is
    rebuilt.

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
        _say(f"{name}: up to date ({out_dir / MANIFEST_NAME})", console)
        return existing
    _remove_outputs(out_dir)

    tasks = [
        _Task(i, f, meta["file"], span, text_field, val_fraction, seed)
        for i, (f, meta) in enumerate(zip(files, inputs_meta, strict=True))
        for span in plan_spans(f, _TASK_BYTES)
    ]
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    writers = {s: _SplitWriter(out_dir, s, shard_tokens, tokenizer.vocab_size) for s in SPLITS}
    per_file = [{"records": 0, "docs": 0, "tokens": 0} for _ in files]
    rejects = Rejects()
    spans_left = collections.Counter(task.index for task in tasks)

    with _progress_bar(console, name, len(files)) as update_bar:
        for result in _run_tasks(tasks, tokenizer, tokenizer_dir, workers, dtype):
            stats = per_file[result.index]
            stats["records"] += result.records
            for split in SPLITS:
                writers[split].add(result.tokens[split], result.doc_lens[split])
                stats["docs"] += len(result.doc_lens[split])
                stats["tokens"] += len(result.tokens[split])
            rejects.merge(result.rejects)
            spans_left[result.index] -= 1
            update_bar(
                advance=int(spans_left[result.index] == 0),
                docs=sum(w.docs for w in writers.values()),
                tokens=sum(w.tokens for w in writers.values()),
            )

    if val_fraction > 0:
        _ensure_both_splits(writers)
    if writers["train"].docs == 0:
        _remove_outputs(out_dir)
        raise SourceError(_no_train_documents(name, len(files), rejects, writers["val"].docs, text_field))
    shards = [shard for split in SPLITS for shard in writers[split].finish()]

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
    ids: dict[str, list[list[int]]] = {s: [] for s in SPLITS}

    def encode(split: str) -> None:
        ids[split].extend(tokenizer.encode_batch(texts[split], bos=True, eos=True))
        texts[split].clear()

    for position, text in iter_records(task.path, task.text_field, rejects, task.span):
        records += 1
        if text is None:
            continue
        split = (
            "val" if task.val_fraction > 0 and _is_val(task.rel, position, task.seed, task.val_fraction) else "train"
        )
        texts[split].append(text)
        if len(texts[split]) >= _ENCODE_BATCH:
            encode(split)
    tokens, doc_lens = {}, {}
    for split in SPLITS:
        encode(split)
        doc_lens[split] = np.fromiter(map(len, ids[split]), dtype=np.int64, count=len(ids[split]))
        total = int(doc_lens[split].sum())
        tokens[split] = np.fromiter(itertools.chain.from_iterable(ids[split]), dtype=dtype, count=total)
    return _Result(task.index, records, tokens, doc_lens, rejects)


_worker_tokenizer: Tokenizer | None = None
_worker_dtype: np.dtype | None = None


def _init_worker(tokenizer_dir: str, dtype: str) -> None:
    global _worker_tokenizer, _worker_dtype
    # The pool already uses one process per core; the tokenizer's own threads would oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = Tokenizer.load(tokenizer_dir)
    _worker_dtype = np.dtype(dtype)


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
    with ctx.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer_dir), dtype.name)) as pool:
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

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, vocab_size: int) -> None:
        self.out_dir, self.split = out_dir, split
        self.shard_tokens, self.vocab_size = shard_tokens, vocab_size
        (out_dir / split).mkdir(parents=True, exist_ok=True)
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
        """Write all that is pending (the last shard may be short); return the manifest's shard entries."""
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
        for piece in pieces:
            rel = f"{self.split}/shard_{len(self.shards):05d}.bin"
            sha256 = write_shard(self.out_dir / rel, piece, self.vocab_size)
            self.shards.append({"file": rel, "split": self.split, "tokens": len(piece), "sha256": sha256})
        self.pending = [rest] if len(rest) else []
        self.pending_tokens = len(rest)


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
    fingerprint = ("fingerprint", "vocab_size", "bos_id", "eos_id")
    same = (
        any(s.get("split") == "train" for s in manifest.get("shards", []))
        and manifest.get("name") == name
        and all(manifest.get("tokenizer", {}).get(k) == tokenizer_meta[k] for k in fingerprint)
        and manifest.get("settings") == settings
        and [(i.get("path"), i.get("size"), i.get("mtime_ns")) for i in manifest.get("inputs", [])]
        == [(i["path"], i["size"], i["mtime_ns"]) for i in inputs_meta]
    )
    itemsize = dtype_for_vocab(tokenizer_meta["vocab_size"]).itemsize
    # Cheap presence check (sizes only); read_shard validates the contents when training opens them.
    return same and all(
        (out_dir / s["file"]).is_file()
        and (out_dir / s["file"]).stat().st_size == HEADER_BYTES + s["tokens"] * itemsize
        for s in manifest.get("shards", [])
    )


def _remove_outputs(out_dir: Path) -> None:
    """Remove a previous preparation: the manifest first, so no half-rebuilt directory looks complete."""
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    for split in SPLITS:
        directory = out_dir / split
        if directory.is_dir():
            for path in [*directory.glob("shard_*.bin"), *directory.glob(".shard_*.tmp*")]:
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
def _progress_bar(console: Console | None, name: str, n_files: int) -> Iterator[Callable[..., None]]:
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
        task = bar.add_task(f"prepare {name}", total=n_files, docs=0, tokens=0)
        yield lambda **fields: bar.update(task, **fields)


def _say(message: str, console: Console | None, level: int = logging.INFO) -> None:
    """Print ``message`` on the console, or log it when there is none: one report either way."""
    if console is not None:
        console.print(message, markup=False, soft_wrap=True)
    else:
        log.log(level, message)
