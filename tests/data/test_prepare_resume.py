"""prepare at corpus scale: an interrupted preparation resumes exactly, and memory does not grow with the input."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from llamita.data import prepare
from llamita.data.prepare import prepare_source, shard_paths
from llamita.data.shards import read_shard
from llamita.tokenizer import Tokenizer, train_tokenizer

WORDS = "the quick brown fox jumps over a lazy dog while small llamas eat green grass near the river".split()
TASK_BYTES = 600  # each .jsonl file is then several tasks


def _doc(i: int) -> str:
    words = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(3 + i % 13))
    return f"doc {i}:  {words}\n{i * 31} é✓" if i % 5 == 0 else f"doc {i}: {words}."


def _docs_of(root: Path) -> list[str]:
    """The documents of a corpus written by :func:`_write_corpus`, in prepare's input order."""
    return [json.loads(line)["text"] for line in (root.parent / f"{root.name}-order.jsonl").read_text().splitlines()]


def _write_corpus(root: Path, n_jsonl: int, docs_per_file: int = 40) -> Path:
    """``n_jsonl`` .jsonl files, a .jsonl.zst, a parquet file of several row groups and a .txt, in sorted order.

    The documents in input order are written beside ``root``, for :func:`_docs_of`.
    """
    root.mkdir(parents=True)
    i, order = 0, []

    def take(n: int) -> list[str]:
        nonlocal i
        docs = [_doc(k) for k in range(i, i + n)]
        i += n
        order.extend(docs)
        return docs

    for f in range(n_jsonl):
        lines = [json.dumps({"text": d}) + "\n" for d in take(docs_per_file)]
        lines[3:3] = ['{"text": "unterminated\n', '{"text": ""}\n']  # rejects, which a resume must carry over
        (root / f"a{f:02d}.jsonl").write_text("".join(lines))
    blob = "".join(json.dumps({"text": d}) + "\n" for d in take(30)).encode()
    (root / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(blob))
    pq.write_table(pa.table({"text": take(30)}), root / "c.parquet", row_group_size=4)
    (root / "d.txt").write_text(take(1)[0])
    (root.parent / f"{root.name}-order.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in order))
    return root


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A tokenizer from llamita's trainer, so prepare encodes through its piece cache."""
    corpus = _write_corpus(tmp_path_factory.mktemp("tok") / "corpus", 3)
    out = corpus.parent / "tokenizer"
    with pytest.warns(UserWarning, match="skipped records"):
        train_tokenizer(sorted(corpus.iterdir()), 400, out)
    return out


@pytest.fixture()
def corpus(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(prepare, "_TASK_BYTES", TASK_BYTES)
    monkeypatch.setattr(prepare, "_CHECKPOINT_SECONDS", 0.0)  # a progress record after every task
    return _write_corpus(tmp_path / "corpus", 6)


def _run(corpus: Path, tokenizer_dir: Path, out: Path, **kwargs) -> dict:
    settings = {"shard_tokens": 211, "val_fraction": 0.1, "progress": False} | kwargs
    return prepare_source("toy", [str(corpus)], tokenizer_dir, out, **settings)


def _tasks(corpus: Path) -> list[tuple]:
    files = sorted(corpus.iterdir())
    return [(i, span) for i, f in enumerate(files) for span in prepare.plan_spans(f, TASK_BYTES)]


_TOKENIZE = prepare._tokenize_task


def _record_tasks(monkeypatch, fail_after: int | None = None) -> list[tuple]:
    """Make the in-process tokenizer note the (file index, span) of each task it reads; fail after ``fail_after``."""
    seen = []

    def noting(task, tokenizer, dtype):
        if len(seen) == fail_after:
            raise RuntimeError("injected failure")
        seen.append((task.index, task.span))
        return _TOKENIZE(task, tokenizer, dtype)

    monkeypatch.setattr(prepare, "_tokenize_task", noting)
    return seen


def _same_output(out: Path, reference: Path, manifest: dict, reference_manifest: dict) -> None:
    assert manifest == reference_manifest
    for split in ("train", "val"):
        paths, reference_paths = shard_paths(out, split), shard_paths(reference, split)
        assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in reference_paths]
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == sorted(
        p.relative_to(reference) for p in reference.rglob("*")
    ), "no progress record or stray shard is left"


def test_prepared_stream_is_every_document_encoded_in_order(corpus, tokenizer_dir, tmp_path):
    manifest = _run(corpus, tokenizer_dir, tmp_path / "out", val_fraction=0.0)
    stream = np.concatenate([np.asarray(read_shard(p)) for p in shard_paths(tmp_path / "out", "train")])
    tok = Tokenizer.load(tokenizer_dir)
    docs = _docs_of(corpus)
    assert stream.tolist() == [i for d in docs for i in tok.encode(d, bos=True, eos=True)]
    assert manifest["totals"]["docs"] == len(docs)


def test_resume_after_a_failure_reads_only_the_rest(corpus, tokenizer_dir, tmp_path, monkeypatch, caplog):
    reference = _run(corpus, tokenizer_dir, tmp_path / "reference")
    tasks = _tasks(corpus)
    assert len(tasks) > 20 and len(reference["shards"]) > 10

    out = tmp_path / "out"
    _record_tasks(monkeypatch, fail_after=12)
    with pytest.raises(RuntimeError, match="injected failure"):
        _run(corpus, tokenizer_dir, out)
    assert not (out / "manifest.json").exists()
    state = json.loads((out / ".progress" / "state.json").read_text())
    assert state["tasks_done"] == 12 and state["splits"]["train"]["shards"], "shards were written before the stop"

    seen = _record_tasks(monkeypatch)
    with caplog.at_level(logging.INFO, logger="llamita.data.prepare"):
        manifest = _run(corpus, tokenizer_dir, out)
    assert seen == tasks[12:], "the tasks recorded as done are not read again"
    done_files = len({index for index, _ in tasks[:12]} - {index for index, _ in tasks[12:]})
    n_files = len(list(corpus.iterdir()))
    assert f"resuming an interrupted preparation: {done_files} of {n_files} file(s) done" in caplog.text
    _same_output(out, tmp_path / "reference", manifest, reference)


def test_resume_after_sigkill_with_workers(corpus, tokenizer_dir, tmp_path, monkeypatch, caplog):
    """The whole process group is killed (as by the OOM killer) after the third progress record, mid-shard."""
    reference = _run(corpus, tokenizer_dir, tmp_path / "reference", workers=2)
    out = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import os, signal
        from llamita.data import prepare

        prepare._TASK_BYTES, prepare._CHECKPOINT_SECONDS = {TASK_BYTES}, 0.0
        save = prepare._Progress.save

        def save_then_die(self, done, *args):
            save(self, done, *args)
            if done == 3:
                os.killpg(os.getpgid(0), signal.SIGKILL)

        prepare._Progress.save = save_then_die
        prepare.prepare_source(
            "toy", [{str(corpus)!r}], {str(tokenizer_dir)!r}, {str(out)!r},
            shard_tokens=211, val_fraction=0.1, workers=2, progress=False,
        )
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # any worker the kill left behind
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGKILL, err.decode()
    assert not (out / "manifest.json").exists()
    assert json.loads((out / ".progress" / "state.json").read_text())["tasks_done"] == 3

    seen = _record_tasks(monkeypatch)
    with caplog.at_level(logging.INFO, logger="llamita.data.prepare"):
        manifest = _run(corpus, tokenizer_dir, out)
    assert seen == _tasks(corpus)[3:]
    assert "resuming an interrupted preparation" in caplog.text
    _same_output(out, tmp_path / "reference", manifest, reference)


@pytest.mark.parametrize("change", ["input", "setting", "damaged record"])
def test_progress_that_does_not_match_starts_over(corpus, tokenizer_dir, tmp_path, monkeypatch, caplog, change):
    out = tmp_path / "out"
    _record_tasks(monkeypatch, fail_after=8)
    with pytest.raises(RuntimeError, match="injected failure"):
        _run(corpus, tokenizer_dir, out)
    monkeypatch.setattr(prepare, "_tokenize_task", _TOKENIZE)
    kwargs = {}
    if change == "input":
        with (corpus / "a00.jsonl").open("a") as fh:
            fh.write(json.dumps({"text": "one more document"}) + "\n")
        why = "the inputs, tokenizer or settings changed"
    elif change == "setting":
        kwargs = {"shard_tokens": 97}
        why = "the inputs, tokenizer or settings changed"
    else:
        next((out / ".progress").glob("train_*.bin")).unlink()
        why = "is damaged"
    with caplog.at_level(logging.INFO, logger="llamita.data.prepare"):
        manifest = _run(corpus, tokenizer_dir, out, **kwargs)
    assert f"not resuming the interrupted preparation in {out}: " in caplog.text and why in caplog.text
    _same_output(out, tmp_path / "fresh", manifest, _run(corpus, tokenizer_dir, tmp_path / "fresh", **kwargs))


def test_memory_does_not_grow_with_the_input(tokenizer_dir, tmp_path):
    """Peak traced memory (Python objects and numpy arrays) for 8 and 40 files, each of a few shards."""

    def peak(n_jsonl: int) -> tuple[int, int]:
        corpus = _write_corpus(tmp_path / f"corpus{n_jsonl}", n_jsonl, docs_per_file=800)
        for f in corpus.glob("a*.jsonl"):
            # The same words in every file: the tokenizer's word cache is full after the first one.
            f.write_text((corpus / "a00.jsonl").read_text())
        tracemalloc.start()
        try:
            manifest = _run(corpus, tokenizer_dir, tmp_path / f"out{n_jsonl}", shard_tokens=1 << 14)
            return tracemalloc.get_traced_memory()[1], manifest["totals"]["tokens_train"]
        finally:
            tracemalloc.stop()

    peak(1)  # warm: what a first run allocates once
    small, small_tokens = peak(8)
    large, large_tokens = peak(40)
    assert small_tokens > 6 * (1 << 14) and large_tokens > 4 * small_tokens
    # Holding the tokens would add 2 bytes per token of the larger run; the bookkeeping of 32 more files and
    # their shards is some 50 kB.
    assert large - small < 0.2 * 2 * (large_tokens - small_tokens), (small, large)
