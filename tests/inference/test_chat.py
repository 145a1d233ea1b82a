"""The one chat template function, stored templates, and the tokenizer loader."""

from __future__ import annotations

import json

import pytest

from finetune.tokenizer import CHAT_TEMPLATE, render_chat
from inference.chat import (
    DEFAULT_CHAT_TEMPLATE,
    apply_chat_template,
    load_chat_template,
    load_tokenizer,
)
from tests.inference.test_engine import make_tokenizer

MESSAGES = [
    {"role": "system", "content": "You are a bank assistant."},
    {"role": "user", "content": "Hi, what is APR?"},
    {"role": "assistant", "content": "The annual percentage rate."},
    {"role": "user", "content": "Thanks — and 世界?"},
]


def test_default_template_is_the_training_template():
    assert DEFAULT_CHAT_TEMPLATE == CHAT_TEMPLATE
    for gen in (True, False):
        assert apply_chat_template(MESSAGES, add_generation_prompt=gen) == render_chat(
            MESSAGES, add_generation_prompt=gen
        )
    assert apply_chat_template(MESSAGES[:2]).endswith("<|end|><|assistant|>")


def test_template_stored_with_model_or_adapter_is_found(tmp_path):
    assert load_chat_template(tmp_path) is None
    custom = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": custom}))
    assert load_chat_template(tmp_path) == custom
    (tmp_path / "chat_template.jinja").write_text("X{{ messages|length }}")
    template = load_chat_template(tmp_path)
    assert apply_chat_template(MESSAGES, template=template) == "X4"


def test_bad_messages_raise_value_error():
    with pytest.raises(ValueError, match="unknown role"):
        apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="content"):
        apply_chat_template([{"role": "user", "content": None}])


def test_load_tokenizer_round_trips_special_tokens(tmp_path):
    make_tokenizer(300).save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    ids = tok.encode(apply_chat_template(MESSAGES[:2]), add_special_tokens=False).ids
    assert ids[:2] == [0, 3]  # <|bos|> <|system|>: specials are single tokens
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "missing")
