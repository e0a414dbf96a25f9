"""Preference readers: UltraFeedback-binarized message lists, TRL's conversational and flat string records, local
files and Hugging Face datasets copies; every unusable record counted by its reason; the chat template renders
each side as transformers would."""

from __future__ import annotations

import json

import pytest

from llamita.chat.preferences import REJECT_REASONS, PreferenceRejects, read_preferences, to_preference
from llamita.data.sources import SourceError

Q, A, B = "What is 2 + 2?", "4.", "5."


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "Be brief."}
ULTRAFEEDBACK = {  # HuggingFaceH4/ultrafeedback_binarized's columns
    "prompt": Q,
    "prompt_id": "abc",
    "chosen": [_user(Q), _assistant(A)],
    "rejected": [_user(Q), _assistant(B)],
    "messages": [_user(Q), _assistant(A)],
    "score_chosen": 8.0,
    "score_rejected": 3.0,
}


def test_the_three_schemas_give_the_same_pair():
    want = ((_user(Q),), _assistant(A), _assistant(B))
    assert to_preference(ULTRAFEEDBACK) == want
    assert to_preference({"prompt": [_user(Q)], "chosen": [_assistant(A)], "rejected": [_assistant(B)]}) == want
    assert to_preference({"prompt": Q, "chosen": [_assistant(A)], "rejected": [_assistant(B)]}) == want
    assert to_preference({"prompt": Q, "chosen": A, "rejected": B}) == want
    multi = [SYSTEM, _user("hi"), _assistant("hello"), _user(Q)]
    record = {"chosen": [*multi, _assistant(A)], "rejected": [*multi, _assistant(B)]}
    assert to_preference(record) == (tuple(multi), _assistant(A), _assistant(B))
    with pytest.raises(ValueError, match="unknown preference format"):
        to_preference(ULTRAFEEDBACK, "ultrafeedback")


def _sides(chosen: list, rejected: list) -> dict:
    return {"chosen": chosen, "rejected": rejected}


BAD = {
    "wrong_type": [{"prompt": Q, "chosen": A, "rejected": [_assistant(B)]}, [1, 2]],
    "missing_field": [{"prompt": Q, "chosen": A}, _sides([_assistant(A)], [_assistant(B)])],
    "unknown_role": [_sides([{"role": "human", "content": Q}, _assistant(A)], [_user(Q), _assistant(B)])],
    "consecutive_roles": [_sides([_user(Q), _user(Q), _assistant(A)], [_user(Q), _assistant(B)])],
    "empty_turn": [{"prompt": Q, "chosen": " ", "rejected": B}],
    "assistant_before_user": [_sides([SYSTEM, _assistant(A)], [SYSTEM, _assistant(B)])],
    "last_turn_not_assistant": [_sides([_user(Q), _assistant(A), _user("?")], [_user(Q), _assistant(B)])],
    "prompt_mismatch": [_sides([_user(Q), _assistant(A)], [_user("Other?"), _assistant(B)])],
    "same_completion": [{"prompt": Q, "chosen": A, "rejected": A}],
}


def test_bad_records_are_counted_by_reason_with_their_first_line(tmp_path):
    path = tmp_path / "prefs.jsonl"
    lines = [json.dumps(ULTRAFEEDBACK)]
    for records in BAD.values():
        lines += [json.dumps(r) for r in records]
    lines += ["{not json", json.dumps({"prompt": Q, "chosen": A, "rejected": B})]
    path.write_text("\n".join(lines) + "\n")
    rejects = PreferenceRejects()
    pairs = list(read_preferences([path], rejects=rejects))
    assert [p.where for p in pairs] == ["line 1", f"line {len(lines)}"]
    assert pairs[0].source == f"{path}:line 1"
    want = {reason: len(records) for reason, records in BAD.items()} | {"invalid_json": 1}
    assert rejects.by_reason == {r: want[r] for r in REJECT_REASONS if r in want}
    assert "prompt_mismatch=1 (first at line 11)" in rejects.summary()
    with pytest.warns(UserWarning, match="preference records rejected"):
        list(read_preferences([path]))


def test_a_hugging_face_copy_is_read_by_split(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    data = tmp_path / "ultrafeedback_binarized" / "data"
    data.mkdir(parents=True)
    for split, n in (("train_prefs", 3), ("test_prefs", 2)):
        rows = [dict(ULTRAFEEDBACK, **_sides([_user(f"{Q} {i}"), _assistant(A)], [_user(f"{Q} {i}"), _assistant(B)]))
                for i in range(n)]  # fmt: skip
        pq.write_table(pa.Table.from_pylist(rows), data / f"{split}-00000-of-00001.parquet")
    root = tmp_path / "ultrafeedback_binarized"
    train = list(read_preferences([root], split="train_prefs"))
    assert [p.prompt[0]["content"] for p in train] == [f"{Q} {i}" for i in range(3)]
    assert [p.where for p in train] == ["row 0", "row 1", "row 2"]
    assert len(list(read_preferences([root], split="test_prefs"))) == 2
    with pytest.raises(SourceError, match="several splits"):
        list(read_preferences([data]))


def test_the_template_renders_each_side_as_the_whole_conversation(prepared):
    from llamita.chat.templates import get_template, render, render_answers
    from llamita.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(prepared["tokenizer"])
    template = get_template("zephyr")
    prompt, chosen, rejected = to_preference(ULTRAFEEDBACK)
    prompt_ids, answers = render_answers(prompt, [chosen, rejected], template, tokenizer)
    for answer, ids in zip((chosen, rejected), answers):
        whole = render([*prompt, answer], template, tokenizer)
        trained = [i for i, t in zip(whole.ids, whole.trainable) if t]
        assert prompt_ids + ids == whole.ids[: len(prompt_ids) + len(ids)]
        assert ids == trained  # the answer through its </s>, the trained tokens of the conversation
        assert ids[-1] == tokenizer.eos_id
