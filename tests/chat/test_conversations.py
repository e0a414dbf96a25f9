"""Conversation readers: four formats from jsonl / jsonl.zst / parquet / datasets copies, every bad record counted."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from llamita.chat.conversations import (
    REJECT_REASONS,
    Conversation,
    ConversationRejects,
    RejectedRecord,
    conversation_files,
    read_conversations,
    to_messages,
    write_conversations_jsonl,
)
from llamita.data.sources import SourceError

TWO_TURNS = (
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
)


def _pair(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


# One record per format, each meaning TWO_TURNS (Alpaca and Open-Llama hold no system turn).
RECORDS = {
    "messages": {"prompt": "Hi", "prompt_id": "abc123", "messages": [dict(m) for m in TWO_TURNS]},
    "sharegpt": {
        "id": "x1",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"},
            {"from": "human", "value": "2+2?"},
            {"from": "gpt", "value": "4"},
        ],
    },
    "alpaca": {"instruction": "Add the numbers.", "input": "2, 2", "output": "4"},
    "openllama": {"text": "user:Hi\nsystem:Hello!</s>user:2+2?\nsystem:4</s>"},
}
EXPECTED = {
    "messages": TWO_TURNS,
    "sharegpt": TWO_TURNS,
    "alpaca": ({"role": "user", "content": "Add the numbers.\n\n2, 2"}, {"role": "assistant", "content": "4"}),
    "openllama": TWO_TURNS[1:],
}


def _write(path: Path, records: list) -> Path:
    """Write records as .jsonl, .jsonl.zst or .parquet by the suffix of ``path``."""
    if path.name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(records), path)
        return path
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(data) if path.name.endswith(".zst") else data)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst", ".parquet"])
@pytest.mark.parametrize("fmt", list(RECORDS))
def test_each_format_reads_from_each_file_type(fmt, suffix, tmp_path):
    path = _write(tmp_path / f"data{suffix}", [RECORDS[fmt], RECORDS[fmt]])
    for forced in ("auto", fmt):
        rejects = ConversationRejects()
        got = list(read_conversations([path], format=forced, rejects=rejects))
        assert rejects.total == 0, rejects.summary()
        assert [c.messages for c in got] == [EXPECTED[fmt]] * 2
    where = ["row 0", "row 1"] if suffix == ".parquet" else ["line 1", "line 2"]
    assert [c.where for c in got] == where
    assert got[0].source == f"{path.resolve()}:{where[0]}"


def test_sharegpt_roles_map_to_chat_roles():
    speakers = ["system", "human", "gpt", "user", "assistant", "Human", "chatgpt", "USER", "bing", "human", "bard"]
    record = {"conversations": [{"from": s, "value": f"turn {i}"} for i, s in enumerate(speakers)]}
    roles = [m["role"] for m in to_messages(record)]
    assert roles == ["system"] + ["user", "assistant"] * 5
    record["conversations"][2]["from"] = "tool"
    with pytest.raises(RejectedRecord) as err:
        to_messages(record)
    assert err.value.reason == "unknown_role"


def test_openllama_multi_turn_text_splits_into_turns():
    text = "<s>user: What is 1+1? \nsystem: 2 </s>\nuser:And 2+2?\nsystem:It is\n4.[multiturn_sep]user:3+3?\nsystem:6"
    assert to_messages({"text": text}, "openllama") == (
        {"role": "user", "content": "What is 1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "And 2+2?"},
        {"role": "assistant", "content": "It is\n4."},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6"},
    )
    for bad in ("just prose", "user:no reply</s>", "user:a\nsystem:b</s></s>", ""):
        with pytest.raises(RejectedRecord) as err:
            to_messages({"text": bad})
        assert err.value.reason == "malformed_text", bad


def test_alpaca_joins_instruction_and_input_with_a_blank_line_only_when_input_is_there():
    def user(record):
        return to_messages(record)[0]["content"]

    assert user({"instruction": "Sort.", "input": "b a", "output": "a b"}) == "Sort.\n\nb a"
    assert user({"instruction": "Sort.", "input": "", "output": "a b"}) == "Sort."
    assert user({"instruction": "Sort.", "input": "  \n", "output": "a b"}) == "Sort."
    assert user({"instruction": "Sort.", "input": None, "output": "a b"}) == "Sort."
    assert user({"instruction": "Sort.", "output": "a b"}) == "Sort."


# (record or raw line, reason): one of each way a record is rejected.
BAD = [
    (b"{not json", "invalid_json"),
    (b'{"messages": "\xff\xfe"}', "invalid_utf8"),
    ({"messages": [{"role": "user", "content": "\ud800"}, {"role": "assistant", "content": "x"}]}, "invalid_utf8"),
    ([1, 2], "wrong_type"),
    ({"messages": "user: hi"}, "wrong_type"),
    ({"messages": ["hi"]}, "wrong_type"),
    ({"messages": [{"role": "user", "content": ["part"]}, {"role": "assistant", "content": "x"}]}, "wrong_type"),
    ({"instruction": "Do it", "input": 3, "output": "ok"}, "wrong_type"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "missing_field"),
    ({"conversations": [{"from": "human"}]}, "missing_field"),
    ({"instruction": "Do it"}, "missing_field"),
    ({"messages": None}, "missing_field"),
    ({"id": 7, "body": "hello"}, "unknown_format"),
    ({"text": "a pretraining document"}, "malformed_text"),
    ({"messages": [{"role": "tool", "content": "{}"}, {"role": "assistant", "content": "x"}]}, "unknown_role"),
    ({"conversations": [{"from": "narrator", "value": "Once"}, {"from": "gpt", "value": "x"}]}, "unknown_role"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "system_not_first"),
    (
        {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]},
        "assistant_before_user",
    ),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "consecutive_roles"),
    ({"messages": [*_pair("a", "b"), {"role": "assistant", "content": "c"}]}, "consecutive_roles"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " \n"}]}, "empty_turn"),
    ({"instruction": "", "input": "x", "output": "y"}, "empty_turn"),
    ({"text": "user:hi\nsystem:</s>"}, "empty_turn"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]}, "no_assistant_turn"),
    ({"messages": []}, "no_assistant_turn"),
    ({"conversations": [{"from": "human", "value": "only me"}]}, "no_assistant_turn"),
]


def _line(item) -> bytes:
    return item if isinstance(item, bytes) else json.dumps(item).encode()


def test_a_mix_of_good_and_bad_lines_yields_the_good_in_order_and_counts_each_bad_one_where_it_is(tmp_path):
    lines, good_lines, first = [], [], {}
    for i, (item, reason) in enumerate(BAD):
        lines.append(json.dumps(RECORDS[list(RECORDS)[i % 4]]).encode())
        good_lines.append(len(lines))
        lines.append(_line(item))
        first.setdefault(reason, f"line {len(lines)}")
        if i % 5 == 0:
            lines.append(b"   ")  # blank lines carry no record and are not counted
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")

    rejects = ConversationRejects()
    got = list(read_conversations([path], rejects=rejects))

    assert [c.where for c in got] == [f"line {n}" for n in good_lines]
    assert [c.messages for c in got] == [EXPECTED[list(RECORDS)[i % 4]] for i in range(len(BAD))]
    expected_counts: dict[str, int] = {}
    for _, reason in BAD:
        expected_counts[reason] = expected_counts.get(reason, 0) + 1
    assert rejects.by_reason == {r: expected_counts[r] for r in REJECT_REASONS if r in expected_counts}
    assert rejects.to_dict()["first"][str(path.resolve())] == first
    # every reason the reader gives is tested (the others are the SFT entry's: tests/test_sft.py)
    assert set(expected_counts) == set(REJECT_REASONS) - {"over_length", "template_error", "no_trained_token"}
    summary = rejects.summary()
    assert f"{len(BAD)} record(s) rejected" in summary and "consecutive_roles=2 (first at line" in summary


def test_parquet_rejects_are_located_by_row(tmp_path):
    good = {"messages": [dict(m) for m in TWO_TURNS[1:3]]}
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    path = _write(tmp_path / "m.parquet", [good, bad, good, bad])
    rejects = ConversationRejects()
    assert [c.where for c in read_conversations([path], rejects=rejects)] == ["row 0", "row 2"]
    assert rejects.by_reason == {"consecutive_roles": 2}
    assert rejects.to_dict()["first"][str(path.resolve())] == {"consecutive_roles": "row 1"}


def test_hub_parquet_shards_are_read_by_split(tmp_path):
    """UltraChat-200k's hub layout: data/<split>-0000N-of-0000M-<hash>.parquet for train_sft, test_sft, ..."""
    data = tmp_path / "ultrachat_200k" / "data"
    data.mkdir(parents=True)
    rows = [{"prompt": f"q{i}", "prompt_id": str(i), "messages": _pair(f"q{i}", f"a{i}")} for i in range(5)]
    _write(data / "train_sft-00000-of-00002-a1b2c3.parquet", rows[:2])
    _write(data / "train_sft-00001-of-00002-d4e5f6.parquet", rows[2:4])
    _write(data / "test_sft-00000-of-00001-0789ab.parquet", rows[4:])
    (tmp_path / "ultrachat_200k" / "README.md").write_text("card")

    root = tmp_path / "ultrachat_200k"
    train = list(read_conversations([root], split="train_sft"))
    assert [c.messages[0]["content"] for c in train] == ["q0", "q1", "q2", "q3"]
    assert [c.messages[0]["content"] for c in read_conversations([root], split="test_sft")] == ["q4"]
    with pytest.raises(SourceError, match="several splits.*test_sft, train_sft"):
        read_conversations([root])
    with pytest.raises(SourceError, match="no readable files of split 'validation'.*splits found: test_sft, train_sft"):
        read_conversations([root], split="validation")
    one_shard = data / "test_sft-00000-of-00001-0789ab.parquet"
    assert len(list(read_conversations([one_shard]))) == 1  # a file named on its own needs no split


def test_save_to_disk_folders_and_arrow_files_are_read(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": f"q{i}", "prompt_id": str(i), "messages": _pair(f"q{i}", f"a{i}")} for i in range(4)]
    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {"train_sft": datasets.Dataset.from_list(rows[:3]), "test_sft": datasets.Dataset.from_list(rows[3:])}
    ).save_to_disk(str(saved))

    train = list(read_conversations([saved], split="train_sft"))
    assert [c.messages[1]["content"] for c in train] == ["a0", "a1", "a2"]
    assert train[0].where == "row 0" and train[0].file.endswith("data-00000-of-00001.arrow")
    with pytest.raises(SourceError, match="DatasetDict; choose a split: train_sft, test_sft"):
        read_conversations([saved])
    # One Dataset saved alone (its state.json lists the files), and one of its .arrow files named directly.
    assert len(list(read_conversations([saved / "train_sft"]))) == 3
    arrow = next((saved / "test_sft").glob("*.arrow"))
    assert [c.messages[0]["content"] for c in read_conversations([arrow])] == ["q3"]


def test_arrow_cache_file_of_a_split_is_found(tmp_path):
    """datasets' cache names a split's file <dataset>-<split>.arrow (an Arrow IPC stream)."""
    cache = tmp_path / "cache" / "default" / "0.0.0" / "abc"
    cache.mkdir(parents=True)
    table = pa.Table.from_pylist([{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}])
    for split in ("train_sft", "test_sft"):
        with pa.OSFile(str(cache / f"ultrachat_200k-{split}.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
    files = conversation_files([tmp_path / "cache"], split="test_sft").files
    assert [f.name for f in files] == ["ultrachat_200k-test_sft.arrow"]
    (got,) = read_conversations([tmp_path / "cache"], split="test_sft")
    assert got.messages == ({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"})


def test_the_packer_counts_its_rejects_in_the_same_object(tmp_path):
    path = _write(tmp_path / "a.jsonl", [RECORDS["messages"], {"messages": []}])
    rejects = ConversationRejects()
    (conversation,) = read_conversations([path], rejects=rejects)
    rejects.add(conversation.file, "over_length", conversation.where)
    assert rejects.by_reason == {"no_assistant_turn": 1, "over_length": 1}
    assert "over_length=1 (first at line 1)" in rejects.summary()
    with pytest.raises(ValueError, match="unknown reject reason"):
        rejects.add(conversation.file, "too long")


def test_rejects_without_a_counter_are_reported_in_a_warning(tmp_path):
    path = _write(tmp_path / "a.jsonl", [RECORDS["alpaca"], {"instruction": "x"}])
    with pytest.warns(UserWarning, match="missing_field=1 \\(first at line 2\\)"):
        assert len(list(read_conversations([path]))) == 1


def test_writer_round_trips_and_refuses_a_conversation_that_breaks_a_rule(tmp_path):
    path = tmp_path / "out" / "instructions.jsonl"
    conversations = [list(TWO_TURNS), Conversation(messages=EXPECTED["alpaca"], file="x.jsonl", where="line 1")]
    assert write_conversations_jsonl(conversations, path) == 2
    assert [c.messages for c in read_conversations([path], format="messages")] == [TWO_TURNS, EXPECTED["alpaca"]]
    assert json.loads(path.read_text().splitlines()[0]) == {"messages": list(TWO_TURNS)}

    with pytest.raises(ValueError, match="conversation 1 cannot be written: consecutive_roles"):
        write_conversations_jsonl([list(TWO_TURNS), [*_pair("a", "b"), _pair("c", "d")[1]]], path)
    assert [c.messages for c in read_conversations([path])] == [TWO_TURNS, EXPECTED["alpaca"]]  # left as it was
    assert not list(path.parent.glob("*.partial"))
    with pytest.raises(ValueError, match="written as .jsonl"):
        write_conversations_jsonl([], tmp_path / "x.json")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown conversation format 'chatml'"):
        read_conversations(["x.jsonl"], format="chatml")
    with pytest.raises(SourceError, match="no such file"):
        read_conversations(["/nonexistent/x.jsonl"])
