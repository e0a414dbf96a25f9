"""Chat templates: ids and text equal transformers' apply_chat_template; masks cover every assistant turn."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from llamita.chat.templates import (
    BUILTIN,
    CHATML,
    ZEPHYR,
    add_template_tokens,
    generation_prompt_ids,
    get_template,
    render,
    stop_ids,
)
from llamita.tokenizer import Tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")

# Generation tags (transformers' own assistant mask), a namespace, tojson, an extra variable: the renderer's extras.
CUSTOM = (
    "{%- set ns = namespace(turns=0) -%}"
    "{%- if date_string is defined %}{{ 'Date: ' + date_string + '\n' }}{% endif -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'assistant' -%}"
    "{{ '### Assistant:' }}{% generation %}{{ ' ' + message.content + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{%- else -%}"
    "{%- set ns.turns = ns.turns + 1 -%}"
    "{{ '### ' + message.role | capitalize + ' ' + ns.turns | string + ': ' + message.content | tojson + '\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '### Assistant:' }}{% endif -%}"
)
TEMPLATES = {**BUILTIN, "custom": CUSTOM}

SYSTEM = {"role": "system", "content": "You are a helpful model."}
CONVERSATIONS = {
    "one turn": [
        {"role": "user", "content": "What is a token?"},
        {"role": "assistant", "content": "A piece of text, like a word."},
    ],
    "system": [
        SYSTEM,
        {"role": "user", "content": "Hello world"},
        {"role": "assistant", "content": "Hello! How can I help?"},
    ],
    "multi-turn": [
        SYSTEM,
        {"role": "user", "content": "Name a number."},
        {"role": "assistant", "content": "Seven, 7."},
        {"role": "user", "content": "  And another?\n"},
        {"role": "assistant", "content": "Forty-two:\n42 — déjà vu 🦙"},
    ],
    "ends with user": [
        {"role": "user", "content": "Train a model"},
        {"role": "assistant", "content": "Which data?"},
        {"role": "user", "content": "The list of words."},
    ],
}
# What each template trains in "multi-turn", decoded (the decoder drops one leading space, as Llama's does).
TRAINED = {
    "zephyr": ["Seven, 7.</s>", "Forty-two:\n42 — déjà vu 🦙</s>"],
    "chatml": ["Seven, 7.<|im_end|>", "Forty-two:\n42 — déjà vu 🦙<|im_end|>"],
    "llama2": ["Seven, 7. </s>", "Forty-two:\n42 — déjà vu 🦙 </s>"],
    "custom": ["Seven, 7.</s>", "Forty-two:\n42 — déjà vu 🦙</s>"],
}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    rng = random.Random(0)
    words = "the a model token data train what is how are you hello world help number name piece text".split()
    root = tmp_path_factory.mktemp("chat_tok")
    lines = [json.dumps({"text": " ".join(rng.choices(words, k=20)).capitalize() + "."}) for _ in range(300)]
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    train_tokenizer([root / "corpus.jsonl"], 380, root / "tokenizer")
    return root / "tokenizer"


@pytest.fixture(scope="module")
def chat_tokenizers(tok_dir, tmp_path_factory) -> dict[str, tuple[Tokenizer, object]]:
    """Per template: our tokenizer with its tokens and template, and AutoTokenizer on its saved directory."""
    out = {}
    for name, template in TEMPLATES.items():
        tok = Tokenizer.load(tok_dir)
        add_template_tokens(tok, template)
        tok.chat_template = template
        saved = tmp_path_factory.mktemp(f"chat_{name}")
        tok.save(saved)
        out[name] = (tok, transformers.AutoTokenizer.from_pretrained(saved))
    return out


def _trained_runs(rendered) -> list[list[int]]:
    runs: list[list[int]] = []
    for i, (token, trained) in enumerate(zip(rendered.ids, rendered.trainable)):
        if trained:
            if i == 0 or not rendered.trainable[i - 1]:
                runs.append([])
            runs[-1].append(token)
    return runs


def _hf_ids(out) -> list[int]:
    return list(out["input_ids"] if hasattr(out, "keys") else out)  # transformers 5 returns a BatchEncoding


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("name", TEMPLATES)
def test_ids_and_text_equal_apply_chat_template(chat_tokenizers, name, conversation, add_generation_prompt):
    tok, hf = chat_tokenizers[name]
    messages = CONVERSATIONS[conversation]
    rendered = render(messages, name if name in BUILTIN else CUSTOM, tok, add_generation_prompt=add_generation_prompt)
    expected = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    assert rendered.ids == _hf_ids(expected)
    assert rendered.text == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert len(rendered.trainable) == len(rendered.ids)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_mask_equals_transformers_generation_mask(chat_tokenizers, conversation):
    """Where a template marks the assistant's output itself ({% generation %}), transformers' mask is ours."""
    tok, hf = chat_tokenizers["custom"]
    messages = CONVERSATIONS[conversation]
    expected = hf.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    assert render(messages, CUSTOM, tok).trainable == [bool(m) for m in expected["assistant_masks"]]


@pytest.mark.parametrize("name", TEMPLATES)
def test_every_assistant_turn_and_its_end_token_is_trained_and_nothing_else(chat_tokenizers, name):
    tok, hf = chat_tokenizers[name]
    rendered = render(CONVERSATIONS["multi-turn"], TEMPLATES[name], tok)
    assert [hf.decode(run, skip_special_tokens=False) for run in _trained_runs(rendered)] == TRAINED[name]
    all_trained = render(CONVERSATIONS["multi-turn"], TEMPLATES[name], tok, train_on="all")
    assert all_trained.ids == rendered.ids and all(all_trained.trainable)


@pytest.mark.parametrize("name", TEMPLATES)
def test_end_of_turn_is_trained_even_where_it_is_also_eos_and_padding(chat_tokenizers, name):
    """trl#1623: masking by token identity (pad = EOS) drops the EOS the model must learn to stop on."""
    tok, _ = chat_tokenizers[name]
    rendered = render(CONVERSATIONS["multi-turn"], TEMPLATES[name], tok)
    (stop,) = stop_ids(TEMPLATES[name], tok)
    trained_stops = [t for t, trained in zip(rendered.ids, rendered.trainable) if trained and t == stop]
    assert len(trained_stops) == 2  # one per assistant turn
    for run in _trained_runs(rendered):
        assert run[-1] == stop
    if name == "zephyr":  # its user and system turns end with EOS too, untrained
        assert rendered.ids.count(tok.eos_id) == 5


def test_stop_ids(chat_tokenizers):
    for name in ("zephyr", "llama2", "custom"):
        tok, _ = chat_tokenizers[name]
        assert stop_ids(TEMPLATES[name], tok) == [tok.eos_id]
    tok, hf = chat_tokenizers["chatml"]
    assert stop_ids("chatml", tok) == [hf.convert_tokens_to_ids("<|im_end|>")]


@pytest.mark.parametrize("name", TEMPLATES)
def test_bos_is_where_the_template_writes_it(chat_tokenizers, name):
    tok, _ = chat_tokenizers[name]
    ids = render(CONVERSATIONS["multi-turn"], TEMPLATES[name], tok).ids
    if name == "llama2":  # Meta's format: <s>[INST] ... [/INST] answer </s> per exchange, never doubled
        assert ids[0] == tok.bos_id and ids[1] != tok.bos_id
        assert ids.count(tok.bos_id) == 2
    else:  # TinyLlama-Chat's ids from apply_chat_template start without BOS, and so do ours
        assert tok.bos_id not in ids


@pytest.mark.parametrize("name", TEMPLATES)
def test_generation_prompt_ids_are_the_prefix_before_each_answer(chat_tokenizers, name):
    """Inference sees the same ids as training up to where the answer starts, for every assistant turn."""
    tok, _ = chat_tokenizers[name]
    messages = CONVERSATIONS["multi-turn"]
    rendered = render(messages, TEMPLATES[name], tok)
    for i in (2, 4):
        prompt = generation_prompt_ids(messages[:i], TEMPLATES[name], tok)
        assert rendered.ids[: len(prompt)] == prompt
        assert not rendered.trainable[len(prompt) - 1] and rendered.trainable[len(prompt)]


def test_answer_tokenized_differently_in_context_is_still_masked_right(chat_tokenizers):
    """trl#598: the answer's tokens in context differ from the answer tokenized alone; spans come from text."""
    tok, hf = chat_tokenizers["chatml"]
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "model"}]
    rendered = render(messages, "chatml", tok)
    (run,) = _trained_runs(rendered)
    assert run[:-1] != tok.encode("model")  # "model" after a newline has no "▁" in front
    assert hf.decode(run, skip_special_tokens=False) == "model<|im_end|>"


def test_template_variables_reach_the_template(chat_tokenizers):
    tok, hf = chat_tokenizers["custom"]
    messages = CONVERSATIONS["system"]
    rendered = render(messages, CUSTOM, tok, date_string="1 Dec 2026")
    assert rendered.text.startswith("Date: 1 Dec 2026\n### System 1: ")
    assert rendered.ids == _hf_ids(hf.apply_chat_template(messages, date_string="1 Dec 2026"))
    prompt = hf.apply_chat_template(messages[:2], add_generation_prompt=True, date_string="x")
    assert generation_prompt_ids(messages[:2], CUSTOM, tok, date_string="x") == _hf_ids(prompt)


def test_messages_are_checked_by_index(chat_tokenizers):
    tok, _ = chat_tokenizers["zephyr"]
    ok = {"role": "user", "content": "hi"}
    with pytest.raises(ValueError, match="message 1: role 'tool' is not one of system, user, assistant"):
        render([ok, {"role": "tool", "content": "x"}], "zephyr", tok)
    with pytest.raises(ValueError, match="message 1: content must be a string, got list"):
        render([ok, {"role": "assistant", "content": [{"type": "text"}]}], "zephyr", tok)
    with pytest.raises(ValueError, match="message 0: expected a dict"):
        render(["hi"], "zephyr", tok)
    with pytest.raises(ValueError, match="non-empty list"):
        render([], "zephyr", tok)
    with pytest.raises(ValueError, match="train_on must be"):
        render([ok], "zephyr", tok, train_on="last")


def test_templates_that_hide_turns_are_refused(chat_tokenizers):
    tok, _ = chat_tokenizers["zephyr"]
    turns = CONVERSATIONS["multi-turn"][1:]
    with pytest.raises(ValueError, match="Conversation roles must alternate"):  # llama2's raise_exception
        render([turns[0], *turns], "llama2", tok)
    # The last answer alone keeps its text: earlier turns change when one is appended.
    last_only = "{% for m in messages %}{% if loop.last %}{{ m.content + eos_token }}{% else %}.{% endif %}{% endfor %}"
    with pytest.raises(ValueError, match="message 1: the template renders the conversation up to here differently"):
        render(turns, last_only, tok)
    no_end = "{% for m in messages %}{{ m.role + ': ' + m.content + '\n' }}{% endfor %}"
    with pytest.raises(ValueError, match="message 1: the template does not end this assistant turn with '</s>'"):
        render(turns, no_end, tok)
    with pytest.raises(ValueError, match="chat template: .*unexpected"):
        render(turns, "{% for m in messages %}{{ m.content }", tok)


def test_chatml_tokens_are_added_once_and_never_split(tok_dir):
    tok = Tokenizer.load(tok_dir)
    messages = CONVERSATIONS["one turn"]
    with pytest.raises(ValueError, match="writes '<\\|im_start\\|>', which this tokenizer lacks"):
        render(messages, "chatml", tok)
    vocab = tok.vocab_size
    assert add_template_tokens(tok, "chatml") == 2
    assert add_template_tokens(tok, CHATML) == 0
    assert tok.vocab_size == vocab + 2
    ids = render(messages, "chatml", tok).ids
    assert ids.count(vocab) == 2 and ids.count(vocab + 1) == 2  # <|im_start|>, <|im_end|> per message
    assert vocab not in tok.encode("<|im_start|>user")  # plain text stays text
    assert add_template_tokens(tok, "zephyr") == 0


def test_save_and_load_carry_the_template_and_added_tokens(chat_tokenizers, tmp_path):
    tok, _ = chat_tokenizers["chatml"]
    (tmp_path / "chat_template.jinja").write_text("stale")  # transformers would read it before the config
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHATML
    assert config["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"]
    assert config["split_special_tokens"] is False
    assert not (tmp_path / "chat_template.jinja").exists()
    loaded = Tokenizer.load(tmp_path)
    assert loaded.chat_template == CHATML and loaded.vocab_size == tok.vocab_size
    assert loaded.fingerprint() == tok.fingerprint()
    assert render(CONVERSATIONS["system"], "tokenizer", loaded).ids == render(CONVERSATIONS["system"], CHATML, tok).ids
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert {"<|im_start|>", "<|im_end|>"} <= set(hf.all_special_tokens)
    assert hf.chat_template == CHATML


def test_get_template_reads_names_jinja_and_files(chat_tokenizers, tok_dir, tmp_path):
    tok, _ = chat_tokenizers["zephyr"]
    assert get_template("zephyr") == ZEPHYR and get_template(CUSTOM) == CUSTOM
    assert get_template("tokenizer", tok) == ZEPHYR
    tok.save(tmp_path / "dir")
    assert get_template(tmp_path / "dir") == ZEPHYR
    assert get_template(str(tmp_path / "dir" / "tokenizer_config.json")) == ZEPHYR
    (tmp_path / "t.jinja").write_text(CUSTOM)
    assert get_template(tmp_path / "t.jinja") == CUSTOM
    named = {"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": CHATML}]}
    (tmp_path / "named.json").write_text(json.dumps(named))
    assert get_template(tmp_path / "named.json") == CHATML
    with pytest.raises(ValueError, match="'mistral' is not a chat template"):
        get_template("mistral")
    with pytest.raises(ValueError, match="the tokenizer has no chat_template"):
        get_template("tokenizer", Tokenizer.load(tok_dir))
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(ValueError, match="holds no chat_template"):
        get_template(tmp_path / "empty.json")
