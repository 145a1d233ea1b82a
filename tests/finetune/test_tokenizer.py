"""The byte-level BPE tokenizer: fixed ids, UTF-8 round trips, determinism, HF loading."""

import json

from tokenizers import Tokenizer
from transformers import AutoTokenizer

from finetune.corpus import generate_corpus
from finetune.tokenizer import (
    CHAT_TEMPLATE,
    REASONING_TAGS,
    SPECIAL_TOKENS,
    render_chat,
    train_tokenizer,
)

CHAT = [
    {"role": "system", "content": "You are careful."},
    {"role": "user", "content": "Café au lait, 中文, 🎉?"},
    {"role": "assistant", "content": "<think>\nok\n</think>\n<answer>42</answer>"},
]


def test_fixed_token_ids(tiny_tokenizer_dir):
    raw = Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))
    fixed = [*SPECIAL_TOKENS, *REASONING_TAGS]
    assert [raw.token_to_id(token) for token in fixed] == list(range(len(fixed)))
    assert raw.get_vocab_size() == 512


def test_utf8_round_trip(tiny_tokenizer):
    text = "Zoë paid 1,234.56 € — naïve café, 中文字符, emoji 😀🩺 and \t tabs\n"
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert tiny_tokenizer.decode(ids) == text
    assert tiny_tokenizer.unk_token_id is None or tiny_tokenizer.unk_token_id not in ids


def test_digits_are_single_tokens(tiny_tokenizer):
    tokens = tiny_tokenizer.tokenize("86.07")
    assert tokens == ["8", "6", ".", "0", "7"]


def test_reasoning_tags_are_single_and_survive_skip_special(tiny_tokenizer):
    ids = tiny_tokenizer.encode(render_chat(CHAT), add_special_tokens=False)
    assert ids[0] == 0 and ids[-1] == 1
    for tag in REASONING_TAGS:
        assert tiny_tokenizer.convert_tokens_to_ids(tag) in ids
    decoded = tiny_tokenizer.decode(ids, skip_special_tokens=True)
    assert "<|user|>" not in decoded and "<|end|>" not in decoded
    assert "<think>\nok\n</think>\n<answer>42</answer>" in decoded


def test_loads_with_auto_tokenizer_and_chat_template(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir), local_files_only=True)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    config = json.loads((tiny_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    assert tok.apply_chat_template(CHAT, tokenize=False) == render_chat(CHAT)
    prompt = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == render_chat(CHAT[:2], add_generation_prompt=True)
    assert prompt.endswith("<|end|><|assistant|>")


def test_training_is_deterministic(tmp_path, tiny_tokenizer_dir):
    again = train_tokenizer(tmp_path / "again", vocab_size=512, n_docs=400)
    other = train_tokenizer(tmp_path / "other", vocab_size=512, n_docs=400, seed=1)
    first = (tiny_tokenizer_dir / "tokenizer.json").read_bytes()
    assert (again / "tokenizer.json").read_bytes() == first
    assert (other / "tokenizer.json").read_bytes() != first


def test_corpus_is_seeded_and_covers_the_task_format():
    docs = list(generate_corpus(0, 50))
    assert docs == list(generate_corpus(0, 50))
    assert docs != list(generate_corpus(1, 50))
    assert sum("<answer>" in doc for doc in docs) == 20  # two in five are task chats
    assert any("中" in doc or "😀" in doc or "👍" in doc for doc in docs)
