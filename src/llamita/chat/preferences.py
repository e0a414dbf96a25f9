"""Read preference pairs (a prompt, a chosen and a rejected answer) from files, counting every unusable record.

A pair is a prompt -- the conversation so far, ending with a user turn -- and two alternative assistant turns that
continue it. Two record schemas are read, per record by the type of ``chosen`` (``format="auto"``) or forced:

- ``messages``: ``chosen`` and ``rejected`` are message lists (``{"role", "content"}``). Either whole conversations
  whose last turn is the assistant's answer, as in UltraFeedback-binarized (HuggingFaceH4/ultrafeedback_binarized,
  splits ``train_prefs`` / ``test_prefs``; its ``prompt`` string repeats the first user turn and is ignored), or
  the answer alone (a list starting with the assistant's turn, TRL's conversational format) after a ``prompt``
  that is a message list or a user message's string.
- ``flat``: ``prompt``, ``chosen`` and ``rejected`` are strings: one user turn and the two answers to it.

The prompt is everything before the last turn and must be the same for both answers. Each side, prompt + answer,
must keep the conversation rules of :mod:`llamita.chat.conversations` (roles, alternation, no blank turn). A record
that breaks a rule is counted in :class:`PreferenceRejects` by reason (:data:`REJECT_REASONS`) with its ``file`` and
``line N`` / ``row N``. Files, directories, globs and Hugging Face ``datasets`` copies are found as
:func:`llamita.chat.conversations.conversation_files` finds conversations.

Pairs too long for the training rows are the caller's to find (it knows token counts); it counts them in the same
object: ``rejects.add(pair.file, "over_length", pair.where)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from llamita.chat.conversations import REJECT_REASONS as CONVERSATION_REASONS
from llamita.chat.conversations import (
    Message,
    RejectedRecord,
    conversation_files,
    converted_records,
    to_messages,
)
from llamita.data.sources import Rejects

FORMATS = ("auto", "messages", "flat")

_SHARED = (
    "invalid_json",
    "invalid_utf8",
    "wrong_type",
    "missing_field",
    "unknown_role",
    "system_not_first",
    "assistant_before_user",
    "consecutive_roles",
    "empty_turn",
    "no_assistant_turn",
)
REJECT_REASONS = {
    **{reason: CONVERSATION_REASONS[reason] for reason in _SHARED},
    "wrong_type": "the record is not an object, chosen/rejected not both strings or both message lists, a message "
    "not an object, or a role, content or prompt of the wrong type",
    "missing_field": "chosen, rejected, or (when the answers come alone) prompt is absent or null; or a message "
    "lacks role or content",
    "last_turn_not_assistant": "a side's last turn is not the assistant's",
    "prompt_mismatch": "the chosen and the rejected answers continue different conversations",
    "same_completion": "the chosen and the rejected answers are the same text",
    "over_length": "longer than the sequence length allows (counted by the packer)",
    "template_error": "the chat template refused the conversation (its message says why)",
}
"""Why a preference record is rejected: reason -> what it means."""


class PreferenceRejects(Rejects):
    """Rejected preference records per file and reason (:data:`REJECT_REASONS`), with each reason's first place."""

    reasons = tuple(REJECT_REASONS)


@dataclass(frozen=True)
class Preference:
    """One valid preference pair and where it was read.

    Attributes:
        prompt: the conversation before the answers; its last turn is the user's.
        chosen: the preferred assistant turn.
        rejected: the other assistant turn.
        file: the file it was read from.
        where: ``"line N"`` (from 1) for JSON lines, ``"row N"`` (from 0) for parquet/arrow.
    """

    prompt: tuple[Message, ...]
    chosen: Message
    rejected: Message
    file: str
    where: str

    @property
    def source(self) -> str:
        """``file:line N`` / ``file:row N``, for messages and reports."""
        return f"{self.file}:{self.where}"


def to_preference(record: object, format: str = "auto") -> tuple[tuple[Message, ...], Message, Message]:
    """The (prompt, chosen, rejected) of one record, checked against the module's rules.

    Raises:
        ValueError: `format` is not one of :data:`FORMATS`.
        RejectedRecord: the record breaks a rule; its ``reason`` is a key of :data:`REJECT_REASONS`.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown preference format {format!r}; expected one of {', '.join(FORMATS)}")
    if not isinstance(record, dict):
        raise RejectedRecord("wrong_type", f"a record is a JSON object, not {type(record).__name__}")
    chosen, rejected = (_required(record, key) for key in ("chosen", "rejected"))
    if format == "auto":
        format = "flat" if isinstance(chosen, str) else "messages"
    if format == "flat":
        prompt = _required(record, "prompt")
        if not all(isinstance(v, str) for v in (prompt, chosen, rejected)):
            raise RejectedRecord("wrong_type", "format flat: prompt, chosen and rejected must be strings")
        sides = [[{"role": "user", "content": prompt}, {"role": "assistant", "content": c}] for c in (chosen, rejected)]
    else:
        if not isinstance(chosen, list) or not isinstance(rejected, list):
            raise RejectedRecord("wrong_type", "format messages: chosen and rejected must be message lists")
        sides = [_conversation(record, side) for side in (chosen, rejected)]
    chosen_conv, rejected_conv = (to_messages({"messages": side}, "messages") for side in sides)
    for name, conv in (("chosen", chosen_conv), ("rejected", rejected_conv)):
        if conv[-1]["role"] != "assistant":
            raise RejectedRecord("last_turn_not_assistant", f"{name}'s last turn is {conv[-1]['role']}'s")
    if chosen_conv[:-1] != rejected_conv[:-1]:
        raise RejectedRecord("prompt_mismatch", "chosen and rejected differ before their last turn")
    if chosen_conv[-1]["content"] == rejected_conv[-1]["content"]:
        raise RejectedRecord("same_completion", "chosen and rejected are the same answer")
    return chosen_conv[:-1], chosen_conv[-1], rejected_conv[-1]


def _required(record: dict, key: str) -> object:
    value = record.get(key)
    if value is None:
        raise RejectedRecord("missing_field", f"record has no {key!r}")
    return value


def _conversation(record: dict, side: list) -> list:
    """A side as a whole conversation: the answer alone follows the record's `prompt`."""
    starts_with_answer = bool(side) and isinstance(side[0], dict) and side[0].get("role") == "assistant"
    if not starts_with_answer:
        return side
    prompt = _required(record, "prompt")
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}, *side]
    if isinstance(prompt, list):
        return [*prompt, *side]
    raise RejectedRecord("wrong_type", f"'prompt' is {type(prompt).__name__}, not a string or a message list")


def read_preferences(
    inputs: Sequence[str | Path],
    *,
    format: str = "auto",
    split: str | None = None,
    rejects: PreferenceRejects | None = None,
) -> Iterator[Preference]:
    """Yield the valid preference pairs of ``inputs``, in file order and, within a file, in record order.

    Args:
        inputs: files, directories, globs or Hugging Face ``datasets`` copies (see
            :func:`llamita.chat.conversations.conversation_files`).
        format: one of :data:`FORMATS`; ``"auto"`` decides per record.
        split: the Hugging Face split to read (UltraFeedback-binarized: ``train_prefs`` / ``test_prefs``); None for
            plain files.
        rejects: where rejected records are counted. If None, a warning with their summary is issued when the
            iteration ends.

    Raises:
        ValueError: ``format`` is not one of :data:`FORMATS`.
        SourceError: an input cannot be found or a file cannot be read as a whole.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown preference format {format!r}; expected one of {', '.join(FORMATS)}")
    files = conversation_files(inputs, split).files
    return _preferences(files, format, rejects)


def _preferences(files: list[Path], format: str, rejects: PreferenceRejects | None) -> Iterator[Preference]:
    counts = rejects if rejects is not None else PreferenceRejects()
    for path, where, (prompt, chosen, rejected) in converted_records(
        files, counts, lambda record: to_preference(record, format)
    ):
        yield Preference(prompt, chosen, rejected, str(path), where)
    if rejects is None and counts.total:
        warnings.warn(f"preference records rejected: {counts.summary()}", stacklevel=2)
