"""Read documents from raw text files and count the ones that cannot be used.

Supported formats, chosen by file suffix:

- ``.txt``, ``.txt.gz``, ``.txt.zst``: the whole (decompressed) file is one document.
- ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``: one JSON object per line, the text in ``text_field``
  (SlimPajama ships ``.jsonl.zst``). Blank lines carry no record and are skipped.
- ``.parquet``: the text in column ``text_field`` (Starcoderdata uses ``"content"``), read batch by batch.

A record that cannot become a document is never dropped silently: it is counted in :class:`Rejects` under its
file and one of the reasons in :data:`REJECT_REASONS`. Errors that make a whole file unreadable (a truncated
archive, a parquet file without the text column) raise :class:`SourceError` naming the file. Likewise a file that a
directory or glob leads to but that is not read (an unsupported type, a hidden one) is listed in
:attr:`InputFiles.skipped` under one of the reasons in :data:`SKIP_REASONS`.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

try:
    import zstandard
except ImportError:  # a core dependency, but images that run llamita from source may lack it
    zstandard = None

SUPPORTED_SUFFIXES = (".txt", ".txt.gz", ".txt.zst", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
REJECT_REASONS = ("invalid_json", "missing_field", "not_a_string", "invalid_utf8", "empty")
SKIP_REASONS = {
    "unsupported_type": "unsupported type",
    "hidden": "hidden (name starts with '.')",
    "not_a_file": "not a regular file",
    "symlinked_dir": "symlinked directory, not followed (name it as an input to read it)",
}
"""Why a path found under a directory or glob input is not read: reason -> what the report says."""

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


@dataclass(frozen=True)
class InputFiles:
    """What :func:`expand_inputs` found.

    Attributes:
        files: the files to read: absolute, sorted, without duplicates.
        skipped: reason (a key of :data:`SKIP_REASONS`) -> the paths under a directory or glob input that are
            not read for that reason, absolute and sorted. A hidden directory is listed once, not walked.
    """

    files: list[Path]
    skipped: dict[str, list[Path]]

    @property
    def skipped_total(self) -> int:
        """Number of paths skipped over all reasons."""
        return sum(map(len, self.skipped.values()))

    def skipped_summary(self, examples: int = 3) -> str:
        """One line naming how many paths were not read, why, and a few of them; empty if none were skipped."""
        if not self.skipped_total:
            return ""
        parts = []
        for reason, paths in self.skipped.items():
            detail = ""
            if reason == "unsupported_type":
                kinds = Counter("".join(p.suffixes[-2:]) or "no suffix" for p in paths).most_common(5)
                detail = ", ".join(f"{kind}: {n}" for kind, n in kinds) + "; "
            names = ", ".join(map(str, paths[:examples])) + (", ..." if len(paths) > examples else "")
            parts.append(f"{SKIP_REASONS[reason]}: {len(paths)} ({detail}e.g. {names})")
        return (
            f"skipped {self.skipped_total} path(s) found under the inputs, which are not read: "
            + "; ".join(parts)
            + f". Readable suffixes: {', '.join(SUPPORTED_SUFFIXES)}"
        )

    def skipped_dict(self, examples: int = 10) -> dict[str, dict]:
        """A JSON-serialisable form: ``{reason: {"count": n, "examples": [the first paths]}}``."""
        return {r: {"count": len(p), "examples": [str(x) for x in p[:examples]]} for r, p in self.skipped.items()}


def expand_inputs(patterns: list[str]) -> InputFiles:
    """Expand files, directories and glob patterns into the input files they name.

    Directories are searched recursively for files with a supported suffix; globs may use ``**``. Hidden files
    and directories under a directory, files of other types and symlinked directories are not read, and are
    listed in the result's ``skipped``. A file named explicitly must have a supported suffix.

    Args:
        patterns: paths, directories or glob patterns.

    Returns:
        The files to read and the paths passed over.

    Raises:
        SourceError: a pattern matches no supported file, or names a file with an unsupported suffix.
    """
    found: set[Path] = set()
    skipped: dict[str, set[Path]] = {}
    for pattern in patterns:
        found.update(_expand_one(pattern, skipped))
    return _input_files(found, skipped)


def _input_files(files: set[Path], skipped: dict[str, set[Path]]) -> InputFiles:
    return InputFiles(
        files=sorted(files, key=str),
        skipped={r: sorted(skipped[r], key=str) for r in SKIP_REASONS if skipped.get(r)},
    )


def _expand_one(pattern: str, skipped: dict[str, set[Path]]) -> list[Path]:
    supported = ", ".join(SUPPORTED_SUFFIXES)
    path = Path(pattern).expanduser()
    mine: dict[str, set[Path]] = {}
    if path.is_dir():
        files = _files_under(path, mine)
        if not files:
            what = _input_files(set(), mine).skipped_summary() or f"supported suffixes are {supported}"
            raise SourceError(f"{pattern}: directory holds no input files; {what}")
    elif path.is_file():
        if source_format(path) is None:
            raise SourceError(f"{pattern}: unsupported file type; supported suffixes are {supported}")
        files = [_absolute(path)]
    elif not any(ch in pattern for ch in "*?["):
        raise SourceError(f"{pattern}: no such file or directory")
    else:
        hits = [Path(hit) for hit in glob.glob(str(path), recursive=True)]
        files = []
        for hit in hits:
            if hit.is_dir():
                files += _files_under(hit, mine)
            elif not hit.is_file():
                mine.setdefault("not_a_file", set()).add(hit.absolute())
            elif source_format(hit) is None:
                mine.setdefault("unsupported_type", set()).add(_absolute(hit))
            else:
                files.append(_absolute(hit))
        if not files:
            why = _input_files(set(), mine).skipped_summary() or f"supported suffixes are {supported}"
            raise SourceError(f"{pattern}: " + (f"matches no supported file; {why}" if hits else "matches nothing"))
    for reason, paths in mine.items():
        skipped.setdefault(reason, set()).update(paths)
    return files


def _absolute(path: Path) -> Path:
    """`path` made absolute and normalised, but with its symlinks kept: the format comes from the name the input
    has, so a file linked to a suffix-less blob (a Hugging Face hub cache snapshot) is read by its link's name."""
    return Path(os.path.abspath(path))


def _files_under(directory: Path, skipped: dict[str, set[Path]]) -> list[Path]:
    """The supported files under ``directory``; what is passed over goes to ``skipped`` by reason."""
    files = []
    for root, dirs, names in os.walk(directory):
        here = Path(root)
        for name in list(dirs):
            reason = "hidden" if name.startswith(".") else "symlinked_dir" if (here / name).is_symlink() else None
            if reason is not None:
                # Hidden directories (.git, .cache) and symlinks (possible cycles) are not walked.
                dirs.remove(name)
                skipped.setdefault(reason, set()).add((here / name).absolute())
        for name in names:
            path = here / name
            if name.startswith("."):
                reason = "hidden"
            elif not path.is_file():
                reason = "not_a_file"
            elif source_format(path) is None:
                reason = "unsupported_type"
            else:
                files.append(_absolute(path))
                continue
            skipped.setdefault(reason, set()).add(path.absolute())
    return files


class Rejects:
    """Counts of rejected records, per file and per reason, with where each reason first occurred.

    A reader of another kind of record subclasses it with its own :attr:`reasons`.
    """

    reasons: tuple[str, ...] = REJECT_REASONS
    """The reasons a record may be rejected for, in report order."""

    def __init__(self) -> None:
        self._counts: dict[str, dict[str, int]] = {}
        self._first: dict[str, dict[str, str]] = {}

    def add(self, file: str | Path, reason: str, where: str | None = None) -> None:
        """Count one rejected record of ``file``; ``where`` (e.g. ``"line 7"``) is kept for its first one."""
        if reason not in self.reasons:
            raise ValueError(f"unknown reject reason {reason!r}; expected one of {self.reasons}")
        key = str(file)
        counts = self._counts.setdefault(key, {})
        counts[reason] = counts.get(reason, 0) + 1
        if where is not None:
            self._first.setdefault(key, {}).setdefault(reason, where)

    def merge(self, other: Rejects) -> None:
        """Add ``other``'s counts to these; the first locations already held are kept."""
        if not set(other.reasons) <= set(self.reasons):
            raise ValueError(f"cannot merge {type(other).__name__} into {type(self).__name__}: other reasons")
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
    def by_reason(self) -> dict[str, int]:
        """``{reason: count}`` over all files, in :attr:`reasons` order, for the reasons that occurred."""
        totals: Counter[str] = Counter()
        for counts in self._counts.values():
            totals.update(counts)
        return {reason: totals[reason] for reason in self.reasons if totals[reason]}

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
            for reason in self.reasons:
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

    @classmethod
    def from_dict(cls, data: dict) -> Rejects:
        """The counts a :meth:`to_dict` form holds.

        Raises:
            ValueError: a reason is not one of :attr:`reasons`, or a count is not a positive integer.
        """
        rejects = cls()
        for file, counts in data["by_file"].items():
            for reason, n in counts.items():
                if reason not in cls.reasons or not isinstance(n, int) or n < 1:
                    raise ValueError(f"{file}: bad reject count {reason}={n!r}")
            rejects._counts[file] = dict(counts)
        rejects._first = {file: dict(firsts) for file, firsts in data["first"].items()}
        return rejects


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
    if fmt.startswith(".txt"):
        yield from _txt_records(path, fmt, rejects)
    elif fmt == ".parquet":
        yield from _parquet_records(path, text_field, rejects, span)
    else:
        yield from _jsonl_records(path, fmt, text_field, rejects, span)


def iter_rows(path: Path, rejects: Rejects | None = None) -> Iterator[tuple[str, object]]:
    """Yield ``(where, record)`` for every whole record of a ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst`` or ``.parquet``.

    For readers whose records are more than one text field (conversations): a JSON line is parsed into any JSON
    value, which the caller checks; a parquet row is a dict of all its columns. ``where`` is ``"line N"`` (from 1)
    or ``"row N"`` (from 0, as :func:`iter_records` counts). A line that is not UTF-8 or not JSON is counted in
    ``rejects`` as ``invalid_utf8`` / ``invalid_json`` and not yielded; blank lines carry no record.

    Raises:
        SourceError: the file cannot be read as a whole, or is not ``.jsonl*`` / ``.parquet``.
    """
    rejects = rejects if rejects is not None else Rejects()
    fmt = source_format(path)
    if fmt is None or fmt.startswith(".txt"):
        raise SourceError(f"{path}: records are read from .jsonl, .jsonl.gz, .jsonl.zst or .parquet files")
    if not path.is_file():
        raise SourceError(f"{path}: no such file")
    if fmt == ".parquet":
        for row, batch in _parquet_batches(path, _open_parquet(path), None, None):
            for i, record in enumerate(batch.to_pylist()):
                yield f"row {row + i}", record
        return
    for _, where, raw in _jsonl_lines(path, fmt, None):
        parsed = _parse_json_line(raw, path, where, rejects)
        if parsed is not None:
            yield where, parsed[1]


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


def _txt_records(path: Path, fmt: str, rejects: Rejects) -> Iterator[tuple[int, str | None]]:
    try:
        with _open_stream(path, fmt) as fh:
            data = fh.read()
    except _ARCHIVE_ERRORS as err:
        raise _archive_error(path, fmt, err) from err
    try:
        text = data.decode("utf-8")
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
    for line_pos, where, raw in _jsonl_lines(path, fmt, span):
        yield line_pos, _json_text(raw, text_field, path, where, rejects)


def _jsonl_lines(path: Path, fmt: str, span: Span | None) -> Iterator[tuple[int, str, bytes]]:
    """``(byte offset, "line N" or "byte N", raw line)`` for each non-blank line of a ``.jsonl*`` file (or span)."""
    start, stop = span if span is not None else (0, None)
    if start and fmt != ".jsonl":
        raise ValueError(f"{path}: compressed files cannot be read from an offset")
    try:
        with _open_stream(path, fmt) as fh:
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
                yield line_pos, where, raw
    except _ARCHIVE_ERRORS as err:
        raise _archive_error(path, fmt, err) from err


def _parse_json_line(raw: bytes, path: Path, where: str, rejects: Rejects) -> tuple[str, object] | None:
    """``(decoded line, JSON value)``, or None for a line counted as ``invalid_utf8`` / ``invalid_json``."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        rejects.add(path, "invalid_utf8", where)
        return None
    try:
        return line, json.loads(line)
    except (ValueError, RecursionError):
        rejects.add(path, "invalid_json", where)
        return None


def _json_text(raw: bytes, text_field: str, path: Path, where: str, rejects: Rejects) -> str | None:
    parsed = _parse_json_line(raw, path, where, rejects)
    if parsed is None:
        return None
    line, record = parsed
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


def _archive_error(path: Path, fmt: str, err: Exception) -> SourceError:
    return SourceError(f"{path}: truncated or corrupt {fmt} archive ({err}); re-download or re-compress the file")


def _open_stream(path: Path, fmt: str) -> BinaryIO:
    """The decompressed bytes of a ``.txt``/``.jsonl`` file, plain or ``.gz``/``.zst``."""
    if fmt.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if fmt.endswith(".zst"):
        return io.BufferedReader(_ZstdReader(path), buffer_size=_READ_CHUNK)  # type: ignore[return-value]
    return open(path, "rb")


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
    pf = _open_parquet(path)
    columns = pf.schema_arrow.names
    if text_field not in columns:
        raise SourceError(
            f"{path}: no column {text_field!r}; available columns: {', '.join(columns)}. "
            f"Set the source's text_field to the column holding the text."
        )
    for row, batch in _parquet_batches(path, pf, [text_field], span):
        for i, value in enumerate(batch.column(0).to_pylist()):
            yield row + i, _parquet_text(value, path, f"row {row + i}", rejects)


def _parquet_batches(path: Path, pf, columns: list[str] | None, span: Span | None) -> Iterator[tuple[int, Any]]:
    """``(first row, RecordBatch)`` for the batches of ``columns`` in ``span``'s row groups; None means all."""
    import pyarrow as pa

    groups = range(pf.metadata.num_row_groups) if span is None else range(*span)
    row = sum(pf.metadata.row_group(g).num_rows for g in range(groups.start))
    try:
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, row_groups=list(groups), columns=columns):
            yield row, batch
            row += batch.num_rows
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
