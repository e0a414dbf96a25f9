"""The demo corpus, built from the running Python's own standard library: nothing to download.

Two sources, one JSON line ``{"text": ...}`` per document:

- ``prose.jsonl``: the reference manual's help topics (``pydoc_data``), then, per stdlib module, its module,
  class and function docstrings joined into one document (read with :mod:`ast`; nothing is imported).
- ``code.jsonl``: the source of each stdlib ``.py`` file, tests and site-packages left out.

Files are visited in sorted order, so the same interpreter always writes the same bytes. A cap stops a source
once its document text has reached that many UTF-8 bytes (the last document may cross it).
"""

from __future__ import annotations

import ast
import json
import os
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path
from pydoc_data.topics import topics

_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
_DOCSTRING_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_BLOCKS = (ast.stmt, ast.excepthandler, ast.match_case)


def write_demo_corpus(
    out_dir: Path, max_code_bytes: int | None = None, max_prose_bytes: int | None = None
) -> dict[str, Path]:
    """Write the demo corpus as JSONL files.

    Args:
        out_dir: directory to write into (created if missing).
        max_code_bytes: cap on the code source's text bytes; None for all of the standard library.
        max_prose_bytes: cap on the prose source's text bytes; None for everything.

    Returns:
        ``{"prose": out_dir / "prose.jsonl", "code": out_dir / "code.jsonl"}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"prose": out_dir / "prose.jsonl", "code": out_dir / "code.jsonl"}
    _write_jsonl(paths["prose"], _prose_documents(), max_prose_bytes)
    _write_jsonl(paths["code"], (source for _, source, _ in _stdlib_modules()), max_code_bytes)
    return paths


DEMO_SYSTEM = "You answer questions about the Python standard library."


def write_demo_chat(path: Path, max_conversations: int | None = None) -> Path:
    """An instruction set from the standard library's own documentation, one conversation per JSON line.

    For each public top-level function with a docstring (modules in sorted order): the user asks what
    ``module.function()`` does and the assistant answers with the docstring's first paragraph; then the user asks
    how to call it and the assistant gives its signature. Every third conversation starts with a system message.
    The format is OpenAI-style ``{"messages": [{"role": ..., "content": ...}, ...]}``.

    Args:
        path: the .jsonl file to write.
        max_conversations: stop after this many; None for every function.

    Returns:
        `path`.
    """

    def conversations() -> Iterator[dict]:
        for n, (module, name, answer, call) in enumerate(_documented_functions()):
            if max_conversations is not None and n >= max_conversations:
                return
            messages = [
                {"role": "user", "content": f"What does {module}.{name}() do?"},
                {"role": "assistant", "content": answer},
                {"role": "user", "content": "How do I call it?"},
                {"role": "assistant", "content": f"Like this: {call}"},
            ]
            if n % 3 == 0:
                messages.insert(0, {"role": "system", "content": DEMO_SYSTEM})
            yield {"messages": messages}

    return _write_records(Path(path), conversations())


def write_demo_preferences(path: Path, max_pairs: int | None = None) -> Path:
    """Preference pairs from the same documentation as `write_demo_chat`, one flat JSON line each.

    For each documented function (the same order) the prompt asks what ``module.function()`` does; the chosen
    answer is its docstring's first paragraph (the chat set's answer), the rejected one its call signature (the chat
    set's answer to "How do I call it?"): about the right function, plausible, and not an answer to the question.
    (Another function's docstring as the rejected answer is a finer distinction, which the demo's 5M-parameter model
    learns on its training pairs but hardly carries over to held-out ones.) The format is ``{"prompt": ...,
    "chosen": ..., "rejected": ...}`` (`llamita.chat.preferences`, ``flat``).

    Args:
        path: the .jsonl file to write.
        max_pairs: stop after this many; None for every function.

    Returns:
        `path`.
    """

    def pairs() -> Iterator[dict]:
        for n, (module, name, answer, call) in enumerate(_documented_functions()):
            if max_pairs is not None and n >= max_pairs:
                return
            yield {"prompt": f"What does {module}.{name}() do?", "chosen": answer, "rejected": f"Like this: {call}"}

    return _write_records(Path(path), pairs())


def _documented_functions() -> Iterator[tuple[str, str, str, str]]:
    """(module, function, its docstring's first paragraph, its call signature) for each public top-level function
    with a docstring of the public stdlib modules, in sorted module order."""
    for module, _, tree in _stdlib_modules():
        if any(part.startswith("_") for part in module.split(".")):
            continue
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node, clean=True)
            if not doc:
                continue
            answer = doc.split("\n\n")[0].replace("\n", " ").strip()[:400]
            yield module, node.name, answer, f"{module}.{node.name}({ast.unparse(node.args)})"


def _write_records(path: Path, records: Iterator[dict]) -> Path:
    """Write JSON lines through a temporary file, so no half-written file is ever seen; return `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def demo_corpus_stats(paths: dict[str, Path]) -> dict[str, dict[str, int]]:
    """Documents and text bytes per source, e.g. ``{"prose": {"docs": 812, "bytes": 6000000}, ...}``."""
    stats = {}
    for name, path in paths.items():
        docs = n_bytes = 0
        with open(path, encoding="utf-8") as f:
            for line in f:
                docs += 1
                n_bytes += len(json.loads(line)["text"].encode("utf-8"))
        stats[name] = {"docs": docs, "bytes": n_bytes}
    return stats


def _write_jsonl(path: Path, documents: Iterator[str], max_bytes: int | None) -> None:
    """Write documents until ``max_bytes`` is reached; through a temporary file, so no half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    total = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for text in documents:
            if max_bytes is not None and total >= max_bytes:
                break
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            total += len(text.encode("utf-8"))
    os.replace(tmp, path)


def _prose_documents() -> Iterator[str]:
    for key in sorted(topics):
        yield topics[key]
    for _, _, tree in _stdlib_modules():
        docstrings = list(_docstrings(tree))
        if docstrings:
            yield "\n\n".join(docstrings)


def _docstrings(node: ast.AST) -> Iterator[str]:
    """Docstrings of ``node`` and the definitions inside it, in source order."""
    if isinstance(node, _DOCSTRING_OWNERS) and (doc := ast.get_docstring(node, clean=True)):
        yield doc
    for child in ast.iter_child_nodes(node):
        if isinstance(child, _BLOCKS):  # definitions live in statement blocks, never in expressions
            yield from _docstrings(child)


def _stdlib_modules() -> Iterator[tuple[str, str, ast.Module]]:
    """Dotted module name, source and syntax tree of each standard-library file that is UTF-8 and parses, in sorted
    path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        (path for path in root.rglob("*.py") if not _SKIPPED_DIRS.intersection(path.relative_to(root).parts[:-1])),
        key=lambda path: path.relative_to(root).as_posix(),
    )
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
            with warnings.catch_warnings():  # e.g. invalid escapes: the file's business, not the reader's
                warnings.simplefilter("ignore", SyntaxWarning)
                tree = ast.parse(source, filename=str(path))
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue  # a data file posing as Python (some ship deliberately broken ones) teaches nothing
        if source.strip():
            parts = path.relative_to(root).with_suffix("").parts
            yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), source, tree
