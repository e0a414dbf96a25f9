import struct

import numpy as np
import pytest

from llamita.data import shards
from llamita.data.shards import (
    HEADER_BYTES,
    MAGIC,
    ShardError,
    dtype_for_vocab,
    file_sha256,
    read_shard,
    shard_header,
    write_shard,
)
from shard_damage import damage, patch


def test_dtype_for_vocab_boundaries():
    assert dtype_for_vocab(32000) == np.uint16
    assert dtype_for_vocab(65536) == np.uint16
    assert dtype_for_vocab(65537) == np.uint32
    with pytest.raises(ValueError):
        dtype_for_vocab(0)


@pytest.mark.parametrize(("vocab_size", "dtype"), [(32000, np.uint16), (65536, np.uint16), (128256, np.uint32)])
def test_round_trip(tmp_path, vocab_size, dtype):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab_size, size=1000)
    tokens[:2] = [0, vocab_size - 1]
    path = tmp_path / "shard.bin"
    sha = write_shard(path, tokens, vocab_size)

    assert sha == file_sha256(path)
    assert path.stat().st_size == HEADER_BYTES + tokens.size * np.dtype(dtype).itemsize
    header = shard_header(path)
    assert (header.version, header.dtype, header.num_tokens, header.vocab_size) == (
        1,
        dtype,
        1000,
        vocab_size,
    )
    out = read_shard(path, vocab_size=vocab_size)
    assert out.dtype == dtype and not out.flags.writeable
    np.testing.assert_array_equal(out, tokens)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_header_layout_is_little_endian_and_documented(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, np.array([1, 2, 3]), 100)
    raw = path.read_bytes()
    assert raw[:8] == MAGIC
    assert struct.unpack_from("<IIQQ", raw, 8) == (1, 1, 3, 100)
    assert raw[32:HEADER_BYTES] == bytes(32)
    assert raw[HEADER_BYTES:] == np.array([1, 2, 3], dtype="<u2").tobytes()


def test_empty_shard(tmp_path):
    path = tmp_path / "empty.bin"
    write_shard(path, np.array([], dtype=np.int64), 10)
    assert read_shard(path).size == 0


def test_write_rejects_ids_outside_vocab(tmp_path):
    path = tmp_path / "bad.bin"
    with pytest.raises(ShardError, match="token id 10 at position 2") as err:
        write_shard(path, np.array([1, 2, 10, 3]), 10)
    assert str(path) in str(err.value)
    with pytest.raises(ShardError, match="token id -1"):
        write_shard(path, np.array([-1]), 10)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("bad magic", "not a llamita token shard"),
        ("unsupported version", "version 99"),
        ("unknown dtype code", "unknown dtype code 7"),
        ("dtype inconsistent with vocab", "does not match"),
        ("truncated", "truncated"),
        ("truncated header", "shorter than"),
        ("trailing bytes", "trailing bytes"),
        ("token >= vocab", "token id 100 .first bad one at position 5"),
        ("missing", "not found"),
    ],
)
def test_read_rejects_broken_shards_naming_the_path(tmp_path, kind, message):
    path = tmp_path / "shard_00000.bin"
    write_shard(path, np.arange(50) % 100, 100)
    read_shard(path)
    damage(kind, path)
    with pytest.raises(ShardError, match=message) as err:
        read_shard(path)
    assert str(path) in str(err.value)


def test_read_checks_vocab_size_and_can_skip_token_check(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, np.arange(50), 100)
    with pytest.raises(ShardError, match="vocabulary of 100, but the tokenizer has 200") as err:
        read_shard(path, vocab_size=200)
    assert str(path) in str(err.value)
    patch(path, HEADER_BYTES, "<H", 999)
    assert read_shard(path, check_tokens=False)[0] == 999


@pytest.mark.parametrize("position", [0, 23, 48, 49])
def test_token_check_reads_in_chunks_and_finds_the_first_bad_id(tmp_path, monkeypatch, position):
    monkeypatch.setattr(shards, "_CHECK_CHUNK_TOKENS", 7)  # 50 tokens: 7 chunks of 7 and one of 1
    path = tmp_path / "s.bin"
    write_shard(path, np.arange(50) % 100, 100)
    read_shard(path)
    patch(path, HEADER_BYTES + 2 * position, "<H", 100 + position)
    patch(path, HEADER_BYTES + 2 * 49, "<H", 999)  # a later bad id does not hide the first one
    bad = 999 if position == 49 else 100 + position
    with pytest.raises(ShardError, match=rf"token id {bad} \(first bad one at position {position}\)"):
        read_shard(path)
