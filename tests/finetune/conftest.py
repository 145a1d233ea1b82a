"""A tiny tokenizer trained once for the finetune tests (a second or two)."""

import pytest

from finetune.tokenizer import load_tokenizer, train_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"), vocab_size=512, n_docs=400)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    """The transformers (PreTrainedTokenizerFast) form."""
    return load_tokenizer(tiny_tokenizer_dir)
