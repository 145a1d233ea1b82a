"""Text in and out: the tokenizer, the ONE chat template function, streaming detokenisation.

- ``load_tokenizer(dir)`` reads a Hugging Face ``tokenizer.json`` with ``tokenizers``.
- The chat template is stored with the model and with each adapter: ``chat_template`` in
  ``tokenizer_config.json``, or ``chat_template.json`` (``{"chat_template": ...}``), or
  ``chat_template.jinja`` (what transformers writes). ``load_chat_template(dir)`` finds it.
- ``apply_chat_template(messages, *, add_generation_prompt=True, template=...)`` renders it.
  Training (``finetune``) and serving both call this function, so what the model is
  trained on is exactly what it is served. Without a stored template the project default,
  ``DEFAULT_CHAT_TEMPLATE``, applies::

      <|bos|><|system|>You are ...<|end|><|user|>Hi<|end|><|assistant|>Hello<|end|>

  plus a bare ``<|assistant|>`` as the generation prompt (the format
  ``finetune/tokenizer.py`` defines; a test checks both agree).
- ``IncrementalDetokenizer`` turns a growing list of token ids into text deltas that never
  split a multi-byte UTF-8 character.

Templates are Jinja, rendered in jinja2's immutable sandbox with the same globals
transformers provides (``raise_exception``, ``bos_token``, ``eos_token``), so a template
written for ``tokenizer.apply_chat_template`` works here unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer

BOS_TOKEN, EOS_TOKEN = "<|bos|>", "<|end|>"

DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """``directory/tokenizer.json`` as a ``tokenizers.Tokenizer``; ValueError if absent."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{directory}: no tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"{path}: cannot load tokenizer: {e}") from e


def load_chat_template(directory: str | Path) -> str | None:
    """The chat template stored in ``directory`` (see module doc), or None."""
    d = Path(directory)
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        f = d / name
        if f.is_file():
            template = json.loads(f.read_text()).get("chat_template")
            if isinstance(template, str):
                return template
    return None


def special_tokens(directory: str | Path) -> dict[str, str]:
    """bos/eos token strings from ``tokenizer_config.json`` (project defaults otherwise)."""
    f = Path(directory) / "tokenizer_config.json"
    cfg = json.loads(f.read_text()) if f.is_file() else {}

    def text(v, default):
        if isinstance(v, dict):  # the older AddedToken form
            v = v.get("content")
        return v if isinstance(v, str) else default

    return {
        "bos_token": text(cfg.get("bos_token"), BOS_TOKEN),
        "eos_token": text(cfg.get("eos_token"), EOS_TOKEN),
    }


def _raise(message: str):
    raise ValueError(message)


@lru_cache(maxsize=32)
def _compile(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(template)


def apply_chat_template(
    messages: Sequence[dict],
    *,
    add_generation_prompt: bool = True,
    template: str | None = None,
    bos_token: str = BOS_TOKEN,
    eos_token: str = EOS_TOKEN,
) -> str:
    """Render ``messages`` ([{"role": ..., "content": str}, ...]) with ``template``
    (DEFAULT_CHAT_TEMPLATE if None). Returns the prompt text, special tokens included.

    Raises ValueError for a message without a string role/content, or one the template
    rejects (the default rejects roles other than system, user and assistant).
    """
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] must be a dict with a string 'role'")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}].content must be a string")
    return _compile(template or DEFAULT_CHAT_TEMPLATE).render(
        messages=list(messages),
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token,
        eos_token=eos_token,
    )


class IncrementalDetokenizer:
    """Text deltas for a growing token list, holding back incomplete UTF-8.

    Decoding token by token breaks byte-level tokens that carry part of a character (they
    decode to U+FFFD) and drops spaces some decoders add between words. So each delta is
    the difference between decoding a short window ending at the newest token and the same
    window without the unread tokens; a delta that ends in U+FFFD is held back until the
    character completes (the approach of Hugging Face text-generation-inference).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def add(self, token_id: int) -> str:
        """Append one token; return the newly completed text (possibly '')."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (replacement characters included), at the end."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :]
