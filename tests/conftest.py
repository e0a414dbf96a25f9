"""Shared fixtures: global state reset around every test, a small prepared two-source corpus and run configs on it.

Tests marked `gpu` are skipped where CUDA is unavailable.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pretrain_runs import mixture_sources


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _reset_global_state():
    """Each test starts from the same seeds and default dtype, and leaves no process group behind."""
    random.seed(0)
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    threads = torch.get_num_threads()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _write_corpus(root: Path) -> dict[str, Path]:
    """Two small sources, prose and code, with enough distinct text for a few hundred windows."""
    import json

    rng = random.Random(1234)
    words = "the a model token data train loss value list tuple function return string number".split()
    prose = root / "prose.jsonl"
    with prose.open("w") as f:
        for i in range(400):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 80)))
            f.write(json.dumps({"text": f"Document {i}. {text.capitalize()}."}) + "\n")
    code = root / "code.jsonl"
    with code.open("w") as f:
        for i in range(300):
            body = "\n".join(f"    x{j} = {rng.randint(0, 99)} + y{j}" for j in range(rng.randint(2, 10)))
            f.write(json.dumps({"text": f"def f{i}(y):\n{body}\n    return x0\n"}) + "\n")
    return {"prose": prose, "code": code}


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> dict[str, Path]:
    """A trained 400-token tokenizer and two prepared sources: {"tokenizer": dir, "prose": dir, "code": dir}."""
    from llamita.data.prepare import prepare_source
    from llamita.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("prepared")
    corpus = _write_corpus(root)
    tok_dir = root / "tokenizer"
    train_tokenizer(sorted(corpus.values()), 400, tok_dir)
    out = {"tokenizer": tok_dir}
    for name, path in corpus.items():
        out[name] = root / "data" / name
        prepare_source(
            name,
            [str(path)],
            tok_dir,
            out[name],
            shard_tokens=4096,
            val_fraction=0.05,
            workers=1,
            progress=False,
        )
    return out


@pytest.fixture
def private_prose(prepared, tmp_path) -> tuple[str, Path]:
    """A private copy of the prepared prose source, for a test to damage or replace its shards; returns the
    `data.sources` override that mixes it with the shared code source, and the copy's directory."""
    import shutil

    prose = tmp_path / "prose"
    shutil.copytree(prepared["prose"], prose)
    return mixture_sources(prose, prepared["code"]), prose


@pytest.fixture(scope="session")
def debug_config(prepared):
    """A factory of `debug`-recipe run configs on the prepared corpus: ``debug_config(out_dir, **{"key": "value"})``."""
    from llamita.config import RunConfig, load_config

    sources = mixture_sources(prepared["prose"], prepared["code"])

    def make(out: Path, **overrides: str) -> RunConfig:
        values = {
            "out_dir": str(out),
            "data.tokenizer": str(prepared["tokenizer"]),
            "data.sources": sources,
            "log.interval": "1",
            **overrides,
        }
        return load_config("debug", values)

    return make
