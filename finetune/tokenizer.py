"""The project's tokenizer: byte-level BPE (Hugging Face `tokenizers`), its special tokens
and its chat template.

Token ids fixed by the model configs (bos 0, eos 1, pad 2) and by this module:

    0 <|bos|>        start of every sequence
    1 <|end|>        end of every chat message, and the eos: a model stops generating
                     when it closes its assistant turn
    2 <|pad|>        padding; never attended to, never trained on
    3 <|system|>     4 <|user|>     5 <|assistant|>     role headers
    6 <think>  7 </think>  8 <answer>  9 </answer>      reasoning tags

Ids 0-5 are special: `decode(..., skip_special_tokens=True)` drops them. The reasoning tags
are single tokens but not special, so decoded completions keep them for the reward.

The chat template (CHAT_TEMPLATE, the same as `render_chat`)::

    <|bos|><|system|>You are ...<|end|><|user|>Hi<|end|><|assistant|>Hello<|end|>

with a bare `<|assistant|>` appended as the generation prompt. Byte-level BPE covers every
byte, so any UTF-8 text round-trips; there is no unknown token. Digits are single tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS, EOS, PAD = "<|bos|>", "<|end|>", "<|pad|>"
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = (BOS, EOS, PAD, *ROLE_TOKENS.values())
REASONING_TAGS = ("<think>", "</think>", "<answer>", "</answer>")

# Same output as render_chat(); tests compare the two.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

DEFAULT_VOCAB_SIZE = 4096
DEFAULT_N_DOCS = 30_000
MODEL_MAX_LENGTH = 4096  # max_position_embeddings of the shipped configs


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The chat template as a string; ValueError on an unknown role."""
    parts = [BOS]
    for message in messages:
        role = message["role"]
        if role not in ROLE_TOKENS:
            raise ValueError(f"unknown role: {role!r}")
        parts.append(f"{ROLE_TOKENS[role]}{message['content']}{EOS}")
    if add_generation_prompt:
        parts.append(ROLE_TOKENS["assistant"])
    return "".join(parts)


def build_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on `texts`; the fixed tokens take ids 0-9 (see module doc).

    ValueError when vocab_size cannot hold the 256 bytes and the fixed tokens.
    """
    fixed = [*SPECIAL_TOKENS, *REASONING_TAGS]
    if vocab_size < 256 + len(fixed):
        raise ValueError(f"vocab_size must be at least {256 + len(fixed)}")
    tokenizer = Tokenizer(models.BPE())
    # Digits are split one by one before the byte-level split (as Llama and PaLM do):
    # a small model learns arithmetic on digits far more easily than on arbitrary
    # multi-digit chunks such as "866" + "07".
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=fixed,
        # All 256 byte symbols from the start: any UTF-8 text encodes, even characters
        # the corpus never showed.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # The trainer marks every token it is given as special, and `tokenizers` has no call
    # to clear the flag; the reasoning tags must survive skip_special_tokens, so we edit
    # the serialised form.
    data = json.loads(tokenizer.to_str())
    for token in data["added_tokens"]:
        if token["content"] in REASONING_TAGS:
            token["special"] = False
    tokenizer = Tokenizer.from_str(json.dumps(data))
    for token_id, token in enumerate(fixed):
        if tokenizer.token_to_id(token) != token_id:  # the model configs depend on these
            raise RuntimeError(f"{token} got id {tokenizer.token_to_id(token)}, not {token_id}")
    return tokenizer


def train_tokenizer(
    out_dir: str | Path,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seed: int = 0,
    n_docs: int = DEFAULT_N_DOCS,
    texts: Iterable[str] | None = None,
) -> Path:
    """Train on the generated corpus (or `texts`) and save a Hugging Face tokenizer.

    Writes tokenizer.json and tokenizer_config.json (with bos/eos/pad and the chat
    template) into `out_dir`, loadable by transformers' PreTrainedTokenizerFast and
    AutoTokenizer. The same seed, n_docs and vocab_size give byte-identical files.
    Returns `out_dir`.
    """
    if texts is None:
        # Imported here: the corpus renders chats with this module's template.
        from finetune.corpus import generate_corpus

        texts = generate_corpus(seed, n_docs)
    tokenizer = build_tokenizer(texts, vocab_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    to_transformers(tokenizer).save_pretrained(out, save_jinja_files=False)
    # transformers 5 names its own class; the portable name loads in 4.x as well.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return out


def to_transformers(tokenizer: Tokenizer):
    """Wrap a `tokenizers.Tokenizer` as a transformers PreTrainedTokenizerFast."""
    from transformers import PreTrainedTokenizerFast  # heavy; only needed here

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=list(ROLE_TOKENS.values()),
        model_max_length=MODEL_MAX_LENGTH,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def load_tokenizer(path: str | Path):
    """Load a saved tokenizer directory as a PreTrainedTokenizerFast (no network)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
