"""Ways to damage a token shard on disk, shared by the shard-format tests and the pretrain fault tests."""

from __future__ import annotations

import struct
from pathlib import Path

from llamita.data.shards import HEADER_BYTES, shard_header

BAD_TOKEN_POSITION = 5
"""Where "token >= vocab" writes its out-of-range id (the header's vocab size)."""


def patch(path: Path, offset: int, fmt: str, *values) -> None:
    """Overwrite bytes of `path` at `offset` with `values` packed as `fmt`."""
    raw = bytearray(path.read_bytes())
    struct.pack_into(fmt, raw, offset, *values)
    path.write_bytes(bytes(raw))


def damage(kind: str, path: Path) -> None:
    """Damage the uint16 shard at `path` in one of the ways `read_shard` must refuse (see the kinds below)."""
    if kind == "bad magic":
        patch(path, 0, "<8s", b"NOTSHARD")
    elif kind == "unsupported version":
        patch(path, 8, "<I", 99)
    elif kind == "unknown dtype code":
        patch(path, 12, "<I", 7)
    elif kind == "dtype inconsistent with vocab":
        patch(path, 12, "<I", 2)  # uint32 for a vocabulary that fits uint16
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[:-1])
    elif kind == "truncated header":
        path.write_bytes(path.read_bytes()[:10])
    elif kind == "trailing bytes":
        path.write_bytes(path.read_bytes() + b"\x00\x00")
    elif kind == "token >= vocab":
        patch(path, HEADER_BYTES + 2 * BAD_TOKEN_POSITION, "<H", shard_header(path).vocab_size)
    elif kind == "missing":
        path.unlink()
    else:
        raise ValueError(f"unknown kind of damage {kind!r}")
