"""Read supervised fine-tuning conversations from files, counting every record that cannot be used.

A conversation is a tuple of messages ``{"role": "system" | "user" | "assistant", "content": str}``, the form
transformers' ``apply_chat_template`` takes. Four record formats are read, detected per record by the first of these
fields it holds (``format="auto"``) or forced with ``format=``:

- ``messages`` (field ``messages``): OpenAI style, a list of ``{"role", "content"}``; UltraChat-200k's schema, whose
  ``prompt`` and ``prompt_id`` columns repeat the first user turn and are ignored. Roles must be spelled exactly.
- ``sharegpt`` (field ``conversations``): a list of ``{"from", "value"}``; ``from`` maps by :data:`SHAREGPT_ROLES`,
  ignoring case.
- ``alpaca`` (field ``instruction``): ``instruction``, optional ``input``, ``output``. The user turn is the
  instruction, then a blank line and the input when the input is not blank; the assistant turn is the output.
  Stanford Alpaca joins the same two parts with the same blank line inside its own prompt template
  (``### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:``, the input part only when
  ``input != ""``); here the chat template does the framing, so the ``###`` headers are left out.
- ``openllama`` (field ``text``): Open-Llama's instruction text, ``user:{prompt}\\nsystem:{completion}</s>`` once per
  turn. Open-Llama's ``system:`` is the assistant's turn. The last turn may lack ``</s>`` (Open-Llama stores the
  text without it and its tokenizer adds the EOS); ``[multiturn_sep]``, its preprocessing's separator, also ends a
  turn. Prompt and completion are stripped, as Open-Llama strips them when it builds the text.

Files are ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst`` and ``.parquet`` (read by :mod:`llamita.data.sources`),
directories and globs of them, and copies of Hugging Face ``datasets`` (see :func:`conversation_files`).

Every conversation yielded keeps these rules; a record that breaks one is counted in :class:`ConversationRejects`
under the reason (:data:`REJECT_REASONS`) and its ``file`` and ``line N`` / ``row N``, never dropped silently:

1. roles are system, user, assistant; every content is a string of valid UTF-8;
2. a system message, if any, is the first;
3. the first turn after it is the user's;
4. user and assistant alternate;
5. no user or assistant turn is blank, and there is at least one assistant turn.

A trailing user turn after the last assistant turn is kept (it is prompt only; the packer trains on none of it), and
so is a blank system message (templates render it as given).

Consecutive same-role turns (rule 4) are rejected, not merged. TRL's SFTTrainer and axolotl's ``chat_template``
strategy hand them to the chat template unchanged, where strict templates (Llama-2's, Mistral's) raise "Conversation
roles must alternate" and others render two turns in a row; torchtune's ``validate_messages`` rejects them. Merging
would need a separator no record holds and would train on text that was never written; rejecting counts them.

Conversations too long for the sequence length are the packer's to find (it knows token counts); it counts them in
the same object: ``rejects.add(conversation.file, "over_length", conversation.where)``.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypedDict, TypeVar

from llamita.data.sources import InputFiles, Rejects, SourceError, expand_inputs, iter_rows
from llamita.evaluate.task_data import files_under, hf_split_file, iter_arrow_records

FORMATS = ("auto", "messages", "sharegpt", "alpaca", "openllama")
ROLES = ("system", "user", "assistant")

SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}
"""ShareGPT's ``from`` (lower-cased) -> role; any other ``from`` is rejected as ``unknown_role``."""

REJECT_REASONS = {
    "invalid_json": "the line is not JSON",
    "invalid_utf8": "the line, or a content string, is not valid UTF-8",
    "wrong_type": "the record is not an object, messages/conversations not a list, a message not an object, "
    "or a role, content or Alpaca/Open-Llama field not a string",
    "missing_field": "a field the format needs is absent or null (messages, conversations, instruction, output, "
    "text; a message's role and content, or from and value)",
    "unknown_format": "format=auto and the record has none of the fields messages, conversations, instruction, text",
    "malformed_text": "an Open-Llama turn is not 'user:{prompt}\\nsystem:{completion}'",
    "unknown_role": "a role other than system, user, assistant (ShareGPT: a 'from' not in SHAREGPT_ROLES)",
    "system_not_first": "a system message after the first message",
    "assistant_before_user": "an assistant turn before any user turn",
    "consecutive_roles": "two user or two assistant turns in a row",
    "empty_turn": "a user or assistant turn whose content is blank",
    "no_assistant_turn": "no assistant turn at all",
    "over_length": "longer than the sequence length (counted by the packer)",
    "template_error": "the chat template refused the conversation (its message says why)",
    "no_trained_token": "nothing in the rendered conversation carries loss (sft.train_on assistant, no assistant text)",
}
"""Why a conversation record is rejected: reason -> what it means."""

_DETECT = (("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "alpaca"), ("text", "openllama"))
"""Field -> format, in the order ``format="auto"`` tries them."""

_OPENLLAMA_END = re.compile(r"</s>|\[multiturn_sep\]")
_HF_SHARD = re.compile(r"(.+?)-\d+-of-\d+(?:-[0-9a-f]+)?\.(?:parquet|arrow)")
_SPLIT_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".jsonl.gz", ".jsonl.zst")


class Message(TypedDict):
    """One turn, as transformers' chat templates take it."""

    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True)
class Conversation:
    """One valid conversation and where it was read.

    Attributes:
        messages: the turns, in order.
        file: the file it was read from.
        where: its place in the file: ``"line N"`` (from 1) for JSON lines, ``"row N"`` (from 0) for parquet/arrow.
    """

    messages: tuple[Message, ...]
    file: str
    where: str

    @property
    def source(self) -> str:
        """``file:line N`` / ``file:row N``, for messages and reports."""
        return f"{self.file}:{self.where}"


class ConversationRejects(Rejects):
    """Rejected conversation records per file and reason (:data:`REJECT_REASONS`), with each reason's first place."""

    reasons = tuple(REJECT_REASONS)


class RejectedRecord(ValueError):
    """A record is not a usable conversation; ``reason`` is a key of :data:`REJECT_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


# ------------------------------------------------------------------------------------------- records -> messages
def to_messages(record: object, format: str = "auto") -> tuple[Message, ...]:
    """The messages of one record, checked against the module's rules.

    Args:
        record: a parsed JSON line or a parquet/arrow row.
        format: one of :data:`FORMATS`; ``"auto"`` picks it from the record's fields.

    Raises:
        RejectedRecord: the record breaks a rule; its ``reason`` says which.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown conversation format {format!r}; expected one of {', '.join(FORMATS)}")
    if not isinstance(record, dict):
        raise RejectedRecord("wrong_type", f"a record is a JSON object, not {type(record).__name__}")
    fmt = _detect(record) if format == "auto" else format
    return _checked(_PARSERS[fmt](record))


def _detect(record: dict) -> str:
    for key, fmt in _DETECT:
        if record.get(key) is not None:
            return fmt
    for key, fmt in _DETECT:  # the field is there but null: its parser reports it missing
        if key in record:
            return fmt
    raise RejectedRecord("unknown_format", f"none of the fields {', '.join(k for k, _ in _DETECT)}")


def _field(record: dict, key: str, what: str = "record") -> object:
    value = record.get(key)
    if value is None:
        raise RejectedRecord("missing_field", f"{what} has no {key!r}")
    return value


def _string(record: dict, key: str) -> str:
    value = _field(record, key)
    if not isinstance(value, str):
        raise RejectedRecord("wrong_type", f"{key!r} is {type(value).__name__}, not a string")
    return value


def _turn_list(record: dict, key: str) -> list[dict]:
    turns = _field(record, key)
    if not isinstance(turns, list):
        raise RejectedRecord("wrong_type", f"{key!r} is {type(turns).__name__}, not a list")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RejectedRecord("wrong_type", f"{key}[{i}] is {type(turn).__name__}, not an object")
    return turns


def _from_messages(record: dict) -> list[tuple[object, object]]:
    turns = _turn_list(record, "messages")
    return [(_field(m, "role", f"messages[{i}]"), _field(m, "content", f"messages[{i}]")) for i, m in enumerate(turns)]


def _from_sharegpt(record: dict) -> list[tuple[object, object]]:
    pairs = []
    for i, turn in enumerate(_turn_list(record, "conversations")):
        speaker = _field(turn, "from", f"conversations[{i}]")
        if not isinstance(speaker, str):
            raise RejectedRecord("wrong_type", f"conversations[{i}]'s 'from' is not a string")
        role = SHAREGPT_ROLES.get(speaker.lower())
        if role is None:
            raise RejectedRecord("unknown_role", f"conversations[{i}] is from {speaker!r}")
        pairs.append((role, _field(turn, "value", f"conversations[{i}]")))
    return pairs


def _from_alpaca(record: dict) -> list[tuple[object, object]]:
    instruction, output = _string(record, "instruction"), _string(record, "output")
    extra = record.get("input")
    if extra is not None and not isinstance(extra, str):
        raise RejectedRecord("wrong_type", f"'input' is {type(extra).__name__}, not a string")
    if not instruction.strip():
        raise RejectedRecord("empty_turn", "'instruction' is blank")
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return [("user", prompt), ("assistant", output)]


def _from_openllama(record: dict) -> list[tuple[object, object]]:
    chunks = _OPENLLAMA_END.split(_string(record, "text"))
    if len(chunks) > 1 and not chunks[-1].strip():
        chunks.pop()  # the text ends with its last turn's terminator
    pairs: list[tuple[object, object]] = []
    for i, chunk in enumerate(chunks):
        body = chunk.lstrip().removeprefix("<s>").lstrip()
        if not body.startswith("user:") or "\nsystem:" not in body:
            raise RejectedRecord("malformed_text", f"turn {i + 1} is not 'user:{{prompt}}\\nsystem:{{completion}}'")
        prompt, completion = body[len("user:") :].split("\nsystem:", 1)
        pairs += [("user", prompt.strip()), ("assistant", completion.strip())]
    return pairs


_PARSERS = {
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
    "alpaca": _from_alpaca,
    "openllama": _from_openllama,
}


def _checked(pairs: list[tuple[object, object]]) -> tuple[Message, ...]:
    """Apply the module's rules to ``(role, content)`` pairs, in order; the first one broken is the reason."""
    messages: list[Message] = []
    for i, (role, content) in enumerate(pairs):
        if not isinstance(role, str) or not isinstance(content, str):
            bad = "role" if not isinstance(role, str) else "content"
            raise RejectedRecord("wrong_type", f"message {i}'s {bad} is not a string")
        if role not in ROLES:
            raise RejectedRecord("unknown_role", f"message {i} has role {role!r}")
        if not content.isascii():
            try:  # a JSON "\ud800" escape decodes to a lone surrogate, which no tokenizer accepts
                content.encode("utf-8")
            except UnicodeEncodeError:
                raise RejectedRecord("invalid_utf8", f"message {i}'s content holds a lone surrogate") from None
        previous = messages[-1]["role"] if messages else "system"
        if role == "system":
            if i:
                raise RejectedRecord("system_not_first", f"message {i} is a system message")
        elif not content.strip():
            raise RejectedRecord("empty_turn", f"message {i} ({role}) is blank")
        elif role == previous:
            raise RejectedRecord("consecutive_roles", f"messages {i - 1} and {i} are both {role}")
        elif role == "assistant" and previous == "system":
            raise RejectedRecord("assistant_before_user", f"message {i} (assistant) comes before any user turn")
        messages.append({"role": role, "content": content})  # type: ignore[typeddict-item]
    if not any(m["role"] == "assistant" for m in messages):
        raise RejectedRecord("no_assistant_turn", f"{len(messages)} message(s), none from the assistant")
    return tuple(messages)


# ----------------------------------------------------------------------------------------------- finding files
def conversation_files(inputs: Sequence[str | Path], split: str | None = None) -> InputFiles:
    """The files to read for ``inputs``, in reading order.

    Without ``split``, inputs are files, directories and globs as :func:`llamita.data.sources.expand_inputs` takes
    them, plus ``.arrow`` files named one by one and ``save_to_disk`` folders of one ``Dataset`` (their
    ``state.json`` lists the files). A directory whose files are the shards of several Hugging Face splits
    (``train_sft-*.parquet`` and ``test_sft-*.parquet``) is refused: reading a test split by accident is worse than
    an error.

    With ``split``, each input is a Hugging Face ``datasets`` copy: a directory searched a few levels deep for the
    split's files by the names :func:`llamita.evaluate.task_data.hf_split_file` knows (hub parquet shards
    ``data/train_sft-00000-of-00003-<hash>.parquet``, ``save_to_disk`` folders ``train_sft/data-00000-of-00001.arrow``,
    cache files ``ultrachat_200k-train_sft.arrow``, ``train_sft.jsonl``), or one file of that split.

    Returns:
        The files, and the paths under directory or glob inputs that are not read (for the caller to report).

    Raises:
        SourceError: an input names nothing readable, holds several splits, or has no file of ``split``.
    """
    if split is not None:
        files: list[Path] = []
        for pattern in inputs:
            files += _split_files(Path(pattern).expanduser(), split)
        return InputFiles(files=files, skipped={})
    plain, files = [], []
    for pattern in inputs:
        path = Path(pattern).expanduser()
        if path.is_file() and path.name.endswith(".arrow"):
            files.append(path.absolute())
        elif path.is_dir() and (path / "state.json").is_file():
            files += _saved_dataset_files(path)
        elif path.is_dir() and (path / "dataset_dict.json").is_file():
            raise SourceError(f"{pattern}: a save_to_disk DatasetDict; choose a split: {_saved_splits(path)}")
        else:
            plain.append(str(pattern))
    for pattern in plain:
        if not Path(pattern).is_file():  # a file named on its own is a choice; a directory or glob may hide one
            splits = sorted({s for f in expand_inputs([pattern]).files if (s := _split_of(f)) is not None})
            if len(splits) > 1:
                raise SourceError(
                    f"{pattern}: holds the shards of several splits ({', '.join(splits)}); choose one with split="
                )
    found = expand_inputs(plain) if plain else InputFiles(files=[], skipped={})
    return InputFiles(files=files + found.files, skipped=found.skipped)


def _split_files(path: Path, split: str) -> list[Path]:
    if path.is_file():
        if not hf_split_file(path, split):
            raise SourceError(f"{path}: not a file of split {split!r} by its name; name the dataset's directory")
        return [path.absolute()]
    if not path.is_dir():
        raise SourceError(f"{path}: with a split, name a dataset directory (or one of its split files)")
    candidates = files_under(path)
    matches = [p.absolute() for p in candidates if hf_split_file(p, split)]
    readable = [p for p in matches if p.name.endswith(_SPLIT_SUFFIXES)]
    if not readable:
        found = sorted({s for p in candidates if (s := _split_of(p)) is not None})
        raise SourceError(
            f"{path}: no readable files of split {split!r}; expected {split}-*.parquet, {split}/data-*.arrow, "
            f"*-{split}.arrow or {split}.jsonl (a JSON array file must be converted to .jsonl)"
            + (f"; splits found: {', '.join(found)}" if found else "")
        )
    folders = sorted({p.parent for p in readable})
    if len(folders) > 1:
        raise SourceError(
            f"{path}: files of split {split!r} in several folders ({', '.join(map(str, folders))}); name the one to use"
        )
    return readable


def _saved_dataset_files(folder: Path) -> list[Path]:
    """The ``.arrow`` files of a ``Dataset.save_to_disk`` folder, in the order its ``state.json`` lists them."""
    try:
        names = [entry["filename"] for entry in json.loads((folder / "state.json").read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError) as err:
        raise SourceError(f"{folder}/state.json: not a datasets save_to_disk state ({err!r})") from err
    return [(folder / name).absolute() for name in names]


def _saved_splits(folder: Path) -> str:
    try:
        return ", ".join(json.loads((folder / "dataset_dict.json").read_text())["splits"])
    except (ValueError, KeyError, TypeError):
        return ", ".join(sorted(p.name for p in folder.iterdir() if (p / "state.json").is_file()))


def _split_of(path: Path) -> str | None:
    """The split a Hugging Face shard belongs to by its name (``train_sft-00000-of-00003.parquet``), else None."""
    match = _HF_SHARD.fullmatch(path.name)
    if match is None:
        return None
    return path.parent.name if match[1] == "data" else match[1]  # save_to_disk: <split>/data-00000-of-00001.arrow


# ---------------------------------------------------------------------------------------------------- reading
def read_conversations(
    inputs: Sequence[str | Path],
    *,
    format: str = "auto",
    split: str | None = None,
    rejects: ConversationRejects | None = None,
) -> Iterator[Conversation]:
    """Yield the valid conversations of ``inputs``, in file order and, within a file, in record order.

    Args:
        inputs: files, directories, globs or Hugging Face ``datasets`` copies (see :func:`conversation_files`).
        format: one of :data:`FORMATS`; ``"auto"`` decides per record.
        split: the Hugging Face split to read (UltraChat-200k: ``train_sft`` / ``test_sft``); None for plain files.
        rejects: where rejected records are counted. If None, a warning with their summary is issued when the
            iteration ends.

    Raises:
        ValueError: ``format`` is not one of :data:`FORMATS`.
        SourceError: an input cannot be found or a file cannot be read as a whole (raised here, before iterating,
            for the inputs; while iterating for a file's contents).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown conversation format {format!r}; expected one of {', '.join(FORMATS)}")
    files = conversation_files(inputs, split).files
    return _conversations(files, format, rejects)


def _conversations(files: list[Path], format: str, rejects: ConversationRejects | None) -> Iterator[Conversation]:
    counts = rejects if rejects is not None else ConversationRejects()
    for path, where, messages in converted_records(files, counts, lambda record: to_messages(record, format)):
        yield Conversation(messages=messages, file=str(path), where=where)
    if rejects is None and counts.total:
        warnings.warn(f"conversation records rejected: {counts.summary()}", stacklevel=2)


_Converted = TypeVar("_Converted")


def converted_records(
    files: list[Path], rejects: Rejects, convert: Callable[[object], _Converted]
) -> Iterator[tuple[Path, str, _Converted]]:
    """(file, place, `convert(record)`) for every record of `files`; a record `convert` rejects (`RejectedRecord`)
    is counted in `rejects` by its reason and place instead."""
    for path in files:
        for where, record in file_records(path, rejects):
            try:
                converted = convert(record)
            except RejectedRecord as err:
                rejects.add(path, err.reason, where)
                continue
            yield path, where, converted


def file_records(path: Path, rejects: Rejects) -> Iterator[tuple[str, object]]:
    """``(where, record)`` for every record of one file that :func:`conversation_files` names (JSON lines,
    parquet or arrow rows); lines that are not UTF-8 or JSON are counted in ``rejects``."""
    if not path.name.endswith(".arrow"):
        yield from iter_rows(path, rejects)
        return
    import pyarrow as pa

    row = 0
    try:
        for record in iter_arrow_records(path):
            yield f"row {row}", record
            row += 1
    except (pa.ArrowException, OSError) as err:
        raise SourceError(f"{path}: not a readable Arrow file near row {row} ({err})") from err


# ---------------------------------------------------------------------------------------------------- writing
def write_conversations_jsonl(conversations: Iterable[Conversation | Sequence[Message]], path: str | Path) -> int:
    """Write conversations as ``{"messages": [...]}`` lines (the ``messages`` format); return how many.

    Each is checked by the rules the readers apply, so the file reads back as written. The file appears only once
    complete.

    Args:
        conversations: :class:`Conversation` objects or lists of message dicts (keys other than role and content
            are left out).
        path: the ``.jsonl`` file to write; parent directories are created.

    Raises:
        ValueError: ``path`` does not end in ``.jsonl``, or a conversation breaks a rule (its index and reason).
    """
    path = Path(path)
    if not path.name.endswith(".jsonl"):
        raise ValueError(f"{path}: conversations are written as .jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    count = 0
    try:
        with partial.open("w", encoding="utf-8") as f:
            for i, conversation in enumerate(conversations):
                messages = conversation.messages if isinstance(conversation, Conversation) else conversation
                try:
                    checked = to_messages({"messages": list(messages)}, "messages")
                except RejectedRecord as err:
                    raise ValueError(f"conversation {i} cannot be written: {err}") from None
                f.write(json.dumps({"messages": list(checked)}, ensure_ascii=False) + "\n")
                count += 1
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return count
