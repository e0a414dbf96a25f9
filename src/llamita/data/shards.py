"""The token shard format: one flat array of token ids behind a fixed, self-describing header.

Layout (all integers little-endian)::

    offset  size  field
         0     8  magic          b"LLAMITA\\x00"
         8     4  version        u32, currently 1
        12     4  dtype code     u32: 1 = uint16, 2 = uint32
        16     8  token count    u64
        24     8  vocab size     u64, of the tokenizer that produced the tokens
        32    32  zero padding   (the header is 64 bytes so the tokens start aligned)
        64     -  tokens         count * itemsize bytes, nothing after them

The dtype is uint16 when the vocabulary fits (``vocab_size <= 65536``), else uint32, so a reader can check
that the two agree. Shards are written to a temporary file in the same directory, fsynced and renamed into
place, so a shard that exists is complete. :func:`read_shard` checks every header field and the file size
before handing out a read-only memmap, and by default that every token id is below the vocabulary size.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"LLAMITA\x00"
FORMAT_VERSION = 1
HEADER_BYTES = 64

_HEADER = struct.Struct("<8sIIQQ")
_DTYPE_CODES = {1: np.dtype(np.uint16), 2: np.dtype(np.uint32)}
_CODE_OF_DTYPE = {dtype: code for code, dtype in _DTYPE_CODES.items()}
_CHECK_CHUNK_TOKENS = 1 << 22  # tokens per read when checking ids: 8-16 MiB of memory


class ShardError(ValueError):
    """A shard is missing, malformed or inconsistent; the message names the shard and what to do."""


@dataclass(frozen=True)
class ShardHeader:
    """The parsed header of a shard."""

    version: int
    dtype: np.dtype
    num_tokens: int
    vocab_size: int

    @property
    def expected_file_bytes(self) -> int:
        """Size the file must have: header plus tokens."""
        return HEADER_BYTES + self.num_tokens * self.dtype.itemsize


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The narrowest shard dtype that holds every id of a ``vocab_size`` vocabulary."""
    if not 1 <= vocab_size <= 2**32:
        raise ValueError(f"vocab_size must be in [1, 2**32], got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write_shard(path: Path, tokens: np.ndarray, vocab_size: int) -> str:
    """Write ``tokens`` as a shard at ``path`` atomically.

    Args:
        path: destination; its directory must exist.
        tokens: 1-D integer array of token ids.
        vocab_size: size of the tokenizer's vocabulary; every id must be below it.

    Returns:
        The sha256 hex digest of the whole file.

    Raises:
        ShardError: ``tokens`` is not a 1-D integer array or holds an id outside ``[0, vocab_size)``.
    """
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ShardError(f"{path}: tokens must be a 1-D integer array, got {tokens.dtype} of shape {tokens.shape}")
    dtype = dtype_for_vocab(vocab_size)
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        bad = np.flatnonzero((tokens < 0) | (tokens >= vocab_size))
        raise ShardError(
            f"{path}: token id {int(tokens[bad[0]])} at position {int(bad[0])} is outside the vocabulary "
            f"[0, {vocab_size}); the tokenizer and vocab_size do not match"
        )
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, _CODE_OF_DTYPE[dtype], tokens.size, vocab_size)
    header = header.ljust(HEADER_BYTES, b"\x00")
    body = np.ascontiguousarray(tokens, dtype=dtype.newbyteorder("<")).data
    digest = hashlib.sha256(header)
    digest.update(body)

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(header)
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform allows opening a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shard_header(path: Path) -> ShardHeader:
    """Read and check the header of the shard at ``path`` (magic, version, dtype code, dtype vs vocab).

    Raises:
        ShardError: the file is missing or its header is not a valid shard header.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(HEADER_BYTES)
    except FileNotFoundError:
        raise ShardError(f"{path}: shard not found; re-run `llamita prepare` for its source") from None
    if len(raw) < HEADER_BYTES:
        raise ShardError(
            f"{path}: file is {len(raw)} bytes, shorter than the {HEADER_BYTES}-byte shard header; "
            "re-run `llamita prepare` for its source"
        )
    magic, version, code, count, vocab_size = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise ShardError(
            f"{path}: not a llamita token shard (magic {magic!r}, expected {MAGIC!r}); re-run `llamita prepare` "
            "for its source"
        )
    if version != FORMAT_VERSION:
        raise ShardError(
            f"{path}: shard format version {version} is not supported (this llamita reads {FORMAT_VERSION}); "
            "re-run `llamita prepare`"
        )
    if code not in _DTYPE_CODES:
        raise ShardError(
            f"{path}: unknown dtype code {code} (known: {sorted(_DTYPE_CODES)}); the shard is corrupt, re-run "
            "`llamita prepare` for its source"
        )
    dtype = _DTYPE_CODES[code]
    if vocab_size < 1 or vocab_size > 2**32 or dtype != dtype_for_vocab(vocab_size):
        raise ShardError(
            f"{path}: dtype {dtype} does not match the header's vocab size {vocab_size}; the shard is corrupt, "
            "re-run `llamita prepare` for its source"
        )
    return ShardHeader(version=version, dtype=dtype, num_tokens=count, vocab_size=vocab_size)


def read_shard(path: Path, vocab_size: int | None = None, check_tokens: bool = True) -> np.ndarray:
    """Open the shard at ``path`` as a read-only memmap of its tokens, after checking it.

    Args:
        path: the shard file.
        vocab_size: if given, the shard must have been written for this vocabulary size.
        check_tokens: also check that every token id is below the vocabulary size (reads the whole shard).

    Returns:
        A read-only 1-D array (a memmap unless the shard is empty) of uint16 or uint32 token ids.

    Raises:
        ShardError: the shard is missing, malformed, truncated, has trailing bytes, was written for another
            vocabulary, or holds an out-of-range token id.
    """
    path = Path(path)
    header = shard_header(path)
    size = path.stat().st_size
    if size != header.expected_file_bytes:
        problem = "truncated" if size < header.expected_file_bytes else "has trailing bytes"
        raise ShardError(
            f"{path}: {problem}: {size} bytes, but the header's {header.num_tokens} {header.dtype} tokens "
            f"need {header.expected_file_bytes}; re-run `llamita prepare` for its source"
        )
    if vocab_size is not None and vocab_size != header.vocab_size:
        raise ShardError(
            f"{path}: written for a vocabulary of {header.vocab_size}, but the tokenizer has {vocab_size}; "
            "use the tokenizer the data was prepared with, or re-run `llamita prepare`"
        )
    if header.num_tokens == 0:
        # mmap cannot map zero bytes.
        empty = np.empty(0, dtype=header.dtype)
        empty.flags.writeable = False
        return empty
    if check_tokens:
        _check_token_ids(path, header)
    return np.memmap(path, dtype=header.dtype.newbyteorder("<"), mode="r", offset=HEADER_BYTES)


def _check_token_ids(path: Path, header: ShardHeader) -> None:
    """Raise ShardError if a token id of the shard is >= its vocabulary size.

    The tokens are read in fixed-size chunks into one buffer, so memory stays flat however large the shard.
    """
    dtype = header.dtype.newbyteorder("<")
    buffer = np.empty(min(header.num_tokens, _CHECK_CHUNK_TOKENS), dtype=dtype)
    with open(path, "rb") as fh:
        fh.seek(HEADER_BYTES)
        start = 0
        while start < header.num_tokens:
            chunk = buffer[: min(buffer.size, header.num_tokens - start)]
            if fh.readinto(memoryview(chunk).cast("B")) != chunk.nbytes:
                raise ShardError(f"{path}: shorter than its header says; re-run `llamita prepare` for its source")
            if int(chunk.max()) >= header.vocab_size:
                where = int(np.argmax(chunk >= header.vocab_size))
                raise ShardError(
                    f"{path}: token id {int(chunk[where])} (first bad one at position {start + where}) is outside "
                    f"the vocabulary [0, {header.vocab_size}) (vocab size {header.vocab_size}); the shard is corrupt "
                    "or was written with another tokenizer — re-run `llamita prepare` for its source with the "
                    "run's tokenizer"
                )
            start += chunk.size


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
