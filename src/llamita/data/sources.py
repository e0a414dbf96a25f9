"""Read documents from raw text files and count the ones that cannot be used.

Supported formats, chosen by file suffix:

- ``.txt``: the whole file is one document.
- ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``: one JSON object per line, the text in ``text_field``
  (SlimPajama ships ``.jsonl.zst``). Blank lines carry no record and are skipped.
- ``.parquet``: the text in column ``text_field`` (Starcoderdata uses ``"content"``), read batch by batch.

A record that cannot become a document is never dropped silently: it is counted in :class:`Rejects` under its
file and one of the reasons in :data:`REJECT_REASONS`. Errors that make a whole file unreadable (a truncated
archive, a parquet file without the text column) raise :class:`SourceError` naming the file.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

try:
    import zstandard
except ImportError:  # a core dependency, but images that run llamita from source may lack it
    zstandard = None

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
REJECT_REASONS = ("invalid_json", "missing_field", "not_a_string", "invalid_utf8", "empty")

_READ_CHUNK = 1 << 20
_PARQUET_BATCH_ROWS = 1024

Span = tuple[int, int]
"""A part of a file: ``[start, stop)`` in bytes for ``.jsonl``, in row groups for ``.parquet``."""


class SourceError(Exception):
    """A raw input cannot be read; the message names the file (and line when known) and what to do."""


def source_format(path: Path) -> str | None:
    """Return the supported suffix ``path`` ends with (e.g. ``".jsonl.zst"``), or None if unsupported."""
    name = path.name.lower()
    # Longest first so ".jsonl.zst" is not mistaken for a bare ".zst".
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return None


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Expand files, directories and glob patterns into the input files they name.

    Directories are searched recursively for files with a supported suffix (hidden files and directories are
    skipped); globs may use ``**``. A file named explicitly must have a supported suffix.

    Args:
        patterns: paths, directories or glob patterns.

    Returns:
        Absolute paths, sorted and without duplicates.

    Raises:
        SourceError: a pattern matches no supported file, or names a file with an unsupported suffix.
    """
    found: set[Path] = set()
    for pattern in patterns:
        found.update(_expand_one(pattern))
    return sorted(found, key=str)


def _expand_one(pattern: str) -> list[Path]:
    supported = ", ".join(SUPPORTED_SUFFIXES)
    path = Path(pattern).expanduser()
    if path.is_dir():
        files = _files_under(path)
        if not files:
            raise SourceError(f"{pattern}: directory holds no input files (supported: {supported})")
        return files
    if path.is_file():
        if source_format(path) is None:
            raise SourceError(f"{pattern}: unsupported file type; supported suffixes are {supported}")
        return [path.resolve()]
    if not any(ch in pattern for ch in "*?["):
        raise SourceError(f"{pattern}: no such file or directory")
    hits = [Path(hit) for hit in glob.glob(str(path), recursive=True)]
    files = [f for hit in hits for f in (_files_under(hit) if hit.is_dir() else [hit.resolve()])]
    files = [f for f in files if f.is_file() and source_format(f) is not None]
    if not files:
        what = "matches nothing" if not hits else f"matches no supported file (supported: {supported})"
        raise SourceError(f"{pattern}: {what}")
    return files


def _files_under(directory: Path) -> list[Path]:
    files = []
    for path in directory.rglob("*"):
        rel = path.relative_to(directory)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.is_file() and source_format(path) is not None:
            files.append(path.resolve())
    return files


class Rejects:
    """Counts of rejected records, per file and per reason, with where each reason first occurred."""

    def __init__(self) -> None:
        self._counts: dict[str, dict[str, int]] = {}
        self._first: dict[str, dict[str, str]] = {}

    def add(self, file: str | Path, reason: str, where: str | None = None) -> None:
        """Count one rejected record of ``file``; ``where`` (e.g. ``"line 7"``) is kept for its first one."""
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}; expected one of {REJECT_REASONS}")
        key = str(file)
        counts = self._counts.setdefault(key, {})
        counts[reason] = counts.get(reason, 0) + 1
        if where is not None:
            self._first.setdefault(key, {}).setdefault(reason, where)

    def merge(self, other: Rejects) -> None:
        """Add ``other``'s counts to these; the first locations already held are kept."""
        for file, counts in other._counts.items():
            mine = self._counts.setdefault(file, {})
            for reason, n in counts.items():
                mine[reason] = mine.get(reason, 0) + n
        for file, firsts in other._first.items():
            mine_first = self._first.setdefault(file, {})
            for reason, where in firsts.items():
                mine_first.setdefault(reason, where)

    @property
    def total(self) -> int:
        """Number of rejected records over all files."""
        return sum(n for counts in self._counts.values() for n in counts.values())

    @property
    def by_file(self) -> dict[str, dict[str, int]]:
        """``{file: {reason: count}}`` (a copy)."""
        return {file: dict(counts) for file, counts in self._counts.items()}

    def summary(self) -> str:
        """A human-readable report: one line per file with its counts and first occurrences."""
        if not self.total:
            return "no records rejected"
        lines = [f"{self.total} record(s) rejected:"]
        for file in sorted(self._counts):
            firsts = self._first.get(file, {})
            parts = []
            for reason in REJECT_REASONS:
                n = self._counts[file].get(reason, 0)
                if n:
                    at = f" (first at {firsts[reason]})" if reason in firsts else ""
                    parts.append(f"{reason}={n}{at}")
            lines.append(f"  {file}: " + ", ".join(parts))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """A JSON-serialisable form: total, counts by file and reason, and first occurrences."""
        return {
            "total": self.total,
            "by_file": self.by_file,
            "first": {f: dict(w) for f, w in self._first.items()},
        }


def iter_documents(path: Path, text_field: str = "text", rejects: Rejects | None = None) -> Iterator[str]:
    """Yield the documents of one input file, counting rejected records in ``rejects``.

    Args:
        path: a file with a supported suffix.
        text_field: JSON key or parquet column holding the text (ignored for ``.txt``).
        rejects: where to count rejected records; a throwaway counter if None.

    Yields:
        Each non-empty, valid document's text, unchanged.

    Raises:
        SourceError: the file cannot be read as a whole (unsupported, truncated, corrupt, missing column).
    """
    for _, text in iter_records(path, text_field, rejects):
        if text is not None:
            yield text


def iter_records(
    path: Path, text_field: str = "text", rejects: Rejects | None = None, span: Span | None = None
) -> Iterator[tuple[int, str | None]]:
    """Yield ``(position, text)`` for every record of ``path``; ``text`` is None for a rejected record.

    The position identifies the record within its file independently of how the file is split into spans:
    the byte offset of its line (in the decompressed stream for ``.gz``/``.zst``), its row number for parquet,
    0 for ``.txt``.

    Args:
        path: a file with a supported suffix.
        text_field: JSON key or parquet column holding the text.
        rejects: where to count rejected records.
        span: read only this part of the file (see :func:`plan_spans`); the whole file if None.

    Raises:
        SourceError: as for :func:`iter_documents`.
    """
    rejects = rejects if rejects is not None else Rejects()
    fmt = source_format(path)
    if fmt is None:
        raise SourceError(f"{path}: unsupported file type; supported suffixes are {', '.join(SUPPORTED_SUFFIXES)}")
    if not path.is_file():
        raise SourceError(f"{path}: no such file")
    if fmt == ".txt":
        yield from _txt_records(path, rejects)
    elif fmt == ".parquet":
        yield from _parquet_records(path, text_field, rejects, span)
    else:
        yield from _jsonl_records(path, fmt, text_field, rejects, span)


def plan_spans(path: Path, target_bytes: int) -> list[Span | None]:
    """Split ``path`` into parts of roughly ``target_bytes`` that can be read independently.

    Plain ``.jsonl`` splits at byte offsets (each part reads the lines that start inside it) and ``.parquet``
    at row-group boundaries; other formats, and files smaller than ``target_bytes``, are one part, ``None``.
    """
    fmt = source_format(path)
    if fmt == ".jsonl":
        size = path.stat().st_size
        if size <= target_bytes:
            return [None]
        return [(start, min(start + target_bytes, size)) for start in range(0, size, target_bytes)]
    if fmt == ".parquet":
        meta = _open_parquet(path).metadata
        spans: list[Span | None] = []
        start, acc = 0, 0
        for group in range(meta.num_row_groups):
            acc += meta.row_group(group).total_byte_size
            if acc >= target_bytes:
                spans.append((start, group + 1))
                start, acc = group + 1, 0
        if start < meta.num_row_groups:
            spans.append((start, meta.num_row_groups))
        return [None] if len(spans) <= 1 else spans
    return [None]


def _txt_records(path: Path, rejects: Rejects) -> Iterator[tuple[int, str | None]]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        rejects.add(path, "invalid_utf8", f"byte {err.start}")
        yield 0, None
        return
    if not text.strip():
        rejects.add(path, "empty")
        yield 0, None
        return
    yield 0, text


def _jsonl_records(
    path: Path, fmt: str, text_field: str, rejects: Rejects, span: Span | None
) -> Iterator[tuple[int, str | None]]:
    start, stop = span if span is not None else (0, None)
    if start and fmt != ".jsonl":
        raise ValueError(f"{path}: compressed files cannot be read from an offset")
    try:
        with _open_lines(path, fmt) as fh:
            pos = start
            if start:
                # Finish the line that straddles `start`: it belongs to the previous span.
                fh.seek(start - 1)
                pos = start - 1 + len(fh.readline())
            for lineno, raw in enumerate(fh, start=1):
                if stop is not None and pos >= stop:
                    break
                line_pos, pos = pos, pos + len(raw)
                if not raw.strip():
                    continue
                # Line numbers are only known when reading from the start of the file.
                where = f"line {lineno}" if not start else f"byte {line_pos}"
                yield line_pos, _json_text(raw, text_field, path, where, rejects)
    except _ARCHIVE_ERRORS as err:
        raise SourceError(
            f"{path}: truncated or corrupt {fmt} archive ({err}); re-download or re-compress the file"
        ) from err


def _json_text(raw: bytes, text_field: str, path: Path, where: str, rejects: Rejects) -> str | None:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        rejects.add(path, "invalid_utf8", where)
        return None
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        rejects.add(path, "invalid_json", where)
        return None
    # A null value counts as missing: there is no text to check the type of.
    if not isinstance(record, dict) or record.get(text_field) is None:
        rejects.add(path, "missing_field", where)
        return None
    text = record[text_field]
    if not isinstance(text, str):
        rejects.add(path, "not_a_string", where)
        return None
    # Valid UTF-8 bytes can still hold a lone surrogate as a JSON "\ud800" escape, which no tokenizer accepts.
    if "\\u" in line and not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            rejects.add(path, "invalid_utf8", where)
            return None
    if not text.strip():
        rejects.add(path, "empty", where)
        return None
    return text


# What a truncated or corrupt compressed file raises while it is being read.
_ARCHIVE_ERRORS: tuple[type[Exception], ...] = (EOFError, zlib.error, gzip.BadGzipFile) + (
    (zstandard.ZstdError,) if zstandard is not None else ()
)


def _open_lines(path: Path, fmt: str) -> BinaryIO:
    if fmt == ".jsonl":
        return open(path, "rb")
    if fmt == ".jsonl.gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return io.BufferedReader(_ZstdReader(path), buffer_size=_READ_CHUNK)  # type: ignore[return-value]


class _ZstdReader(io.RawIOBase):
    """Streams a (possibly multi-frame) zstd file and, unlike ``stream_reader``, fails on a truncated one."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._path = path
        self._fh = open(path, "rb")
        self._chunks = self._decompressed_chunks()
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = chunk
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()

    def _decompressed_chunks(self) -> Iterator[bytes]:
        if zstandard is None:
            raise SourceError(f"{self._path}: reading .zst needs the zstandard package: pip install zstandard")
        dctx = zstandard.ZstdDecompressor()
        dobj, in_frame = dctx.decompressobj(), False
        while data := self._fh.read(_READ_CHUNK):
            while data:
                out = dobj.decompress(data)
                in_frame = True
                if out:
                    yield out
                data = b""
                if dobj.eof:
                    # Concatenated frames (e.g. from `cat a.zst b.zst`) each need a fresh decompressor.
                    data, dobj, in_frame = dobj.unused_data, dctx.decompressobj(), False
        if in_frame:
            raise zstandard.ZstdError("stream ends inside a frame")


def _open_parquet(path: Path):  # -> pyarrow.parquet.ParquetFile
    # pyarrow is slow to import; only parquet inputs need it.
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise SourceError(f"{path}: not a readable parquet file ({err})") from err


def _parquet_records(
    path: Path, text_field: str, rejects: Rejects, span: Span | None
) -> Iterator[tuple[int, str | None]]:
    import pyarrow as pa

    pf = _open_parquet(path)
    columns = pf.schema_arrow.names
    if text_field not in columns:
        raise SourceError(
            f"{path}: no column {text_field!r}; available columns: {', '.join(columns)}. "
            f"Set the source's text_field to the column holding the text."
        )
    groups = range(pf.metadata.num_row_groups) if span is None else range(*span)
    row = sum(pf.metadata.row_group(g).num_rows for g in range(groups.start))
    try:
        batches = pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, row_groups=list(groups), columns=[text_field])
        for batch in batches:
            for value in batch.column(0).to_pylist():
                yield row, _parquet_text(value, path, f"row {row}", rejects)
                row += 1
    except (pa.ArrowException, OSError) as err:
        raise SourceError(f"{path}: corrupt parquet data near row {row} ({err})") from err


def _parquet_text(value: object, path: Path, where: str, rejects: Rejects) -> str | None:
    if value is None:
        rejects.add(path, "missing_field", where)
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            rejects.add(path, "invalid_utf8", where)
            return None
    if not isinstance(value, str):
        rejects.add(path, "not_a_string", where)
        return None
    if not value.strip():
        rejects.add(path, "empty", where)
        return None
    return value
