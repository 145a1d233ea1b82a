"""Training data: validation, chat encoding with an assistant-only loss mask, packing,
and deterministic, resumable batches.

Accepted formats, one JSON object per line (JSONL, UTF-8); every line of a file must use
the same format:

    chat      {"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}
              (OpenAI fine-tuning format; "name" and, on assistant turns, "weight": 0|1
              are accepted, weight 0 keeping that turn out of the loss)
    alpaca    {"instruction": "...", "input": "...", "output": "...", "system": "..."}
              ("input" and "system" optional)
    sharegpt  {"conversations": [{"from": "system|human|gpt", "value": "..."}, ...]}

All three normalise to chat messages. Rules every example must meet: content is a
non-empty string; a system message comes only first; the first message after it is from
the user; there is an assistant message and the last message is from the assistant; no
content contains a control token of the chat template (see finetune.tokenizer), which
would let data forge turn boundaries. Keys other than the format's own are ignored at the
top level and refused inside a message.

Blank lines are skipped. Errors name the 1-based line; line 0 means the whole file.

Sources are a path or an open binary stream (anything with `readline(size)`, such as
io.BytesIO or a decrypting reader), so the control plane can check an upload without
writing its plaintext to disk.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import math
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO

from finetune.tokenizer import BOS, EOS, PAD_ID, ROLE_TOKENS, SPECIAL_TOKENS

FORMATS = ("chat", "alpaca", "sharegpt")
ROLES = tuple(ROLE_TOKENS)
IGNORE_INDEX = -100  # what torch's cross_entropy and Hugging Face models skip

DEFAULT_MAX_LINE_BYTES = 1 << 20  # 1 MiB: a single example larger than this is a mistake
DEFAULT_MAX_EXAMPLES = 200_000
DEFAULT_MAX_CHARS = 200_000  # content characters in one example
MAX_STORED_ERRORS = 100

if TYPE_CHECKING:
    import torch

_CHUNK = 1 << 16
_SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
_MESSAGE_KEYS = {"role", "content", "name", "weight"}


class DataError(ValueError):
    """An invalid training file, raised by the loaders; `errors` say where."""

    def __init__(self, path: str, errors: Sequence[ValidationError]):
        self.errors = list(errors)
        first = self.errors[0] if self.errors else None
        where = f" line {first.line}: {first.message}" if first else ""
        super().__init__(f"{path}: invalid training data;{where}")


@dataclass(frozen=True)
class ValidationError:
    """One problem: the 1-based line (0 for the whole file), what is wrong, and where in
    the JSON object ("messages[2].content"), when that is known."""

    line: int
    message: str
    field: str | None = None


@dataclass(frozen=True)
class LengthStats:
    """Per-example lengths over the valid examples (all zero when there are none)."""

    total: int = 0
    min: int = 0
    max: int = 0
    mean: float = 0.0

    @classmethod
    def of(cls, lengths: Sequence[int]) -> LengthStats:
        if not lengths:
            return cls()
        return cls(sum(lengths), min(lengths), max(lengths), sum(lengths) / len(lengths))


@dataclass
class ValidationReport:
    """What `validate` found.

    ok: no errors and at least one example. n_lines counts every line read, blank ones
    too. n_examples and n_messages, chars and tokens cover valid examples only.
    tokens and n_train_tokens (the assistant tokens the loss sees) are None without a
    tokenizer. errors keeps the first MAX_STORED_ERRORS; n_errors counts them all.
    """

    path: str
    ok: bool = False
    format: str | None = None
    n_lines: int = 0
    n_examples: int = 0
    n_messages: int = 0
    chars: LengthStats = field(default_factory=LengthStats)
    tokens: LengthStats | None = None
    n_train_tokens: int | None = None
    n_errors: int = 0
    errors: list[ValidationError] = field(default_factory=list)
    errors_truncated: bool = False

    def add_error(self, error: ValidationError) -> None:
        self.n_errors += 1
        if len(self.errors) < MAX_STORED_ERRORS:
            self.errors.append(error)
        else:
            self.errors_truncated = True

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: only str, int, float, bool, None, lists and dicts."""
        return asdict(self)


@dataclass(frozen=True)
class Example:
    """One valid example, normalised to chat messages, with the line it came from."""

    line: int
    messages: list[dict[str, Any]]


@dataclass(frozen=True)
class _Scanned:
    line: int
    format: str | None
    messages: list[dict[str, Any]] | None
    errors: list[ValidationError]
    fatal: bool = False  # stop reading: the rest of the file cannot be trusted or is too much


# ---------------------------------------------------------------------------------------
# Reading and checking


def _read_lines(stream: BinaryIO, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """Yield (line number, bytes) without ever holding more than max_line_bytes + 1 bytes
    of one line; a longer line is skipped in chunks and yielded as None."""
    number = 0
    while True:
        raw = stream.readline(max_line_bytes + 1)
        if not raw:
            return
        number += 1
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            if b"\x00" in raw:
                yield number, raw  # let the caller name it binary
                return
            while raw and not raw.endswith(b"\n"):
                raw = stream.readline(_CHUNK)
            yield number, None
            continue
        yield number, raw


Source = str | os.PathLike | BinaryIO


def source_name(source: Source) -> str:
    """The path of a source, or the name of a stream ("<stream>" when it has none)."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return str(getattr(source, "name", "<stream>"))


@contextlib.contextmanager
def _open_binary(source: Source) -> Iterator[BinaryIO]:
    """Open a path for binary reading; a stream is used as it is and left open."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as stream:
            yield stream
    else:
        yield source


def _scan(source: Source, max_line_bytes: int, max_examples: int) -> Iterator[_Scanned]:
    """Check every line of `source`; see the module docstring for the rules.

    OSError propagates when the file cannot be opened.
    """
    file_format: str | None = None
    n_examples = 0
    with _open_binary(source) as stream:
        for number, raw in _read_lines(stream, max_line_bytes):
            if raw is None:
                yield _Scanned(
                    number,
                    None,
                    None,
                    [ValidationError(number, f"line is longer than {max_line_bytes} bytes")],
                )
                continue
            if b"\x00" in raw:
                message = "NUL byte: this is a binary file, not UTF-8 JSONL text"
                yield _Scanned(number, None, None, [ValidationError(number, message)], True)
                return
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                message = f"not valid UTF-8 (byte {exc.start + 1} of the line)"
                yield _Scanned(number, None, None, [ValidationError(number, message)])
                continue
            if not text.strip():
                yield _Scanned(number, None, None, [])  # counted as read, nothing more
                continue
            n_examples += 1
            if n_examples > max_examples:
                message = f"more than {max_examples} examples; the rest was not read"
                yield _Scanned(number, None, None, [ValidationError(number, message)], True)
                return
            line_format, messages, errors = _check_line(number, text)
            if line_format is not None:
                if file_format is None:
                    file_format = line_format
                elif line_format != file_format:
                    message = f"this line is {line_format} but the file is {file_format}"
                    errors.insert(0, ValidationError(number, message))
            yield _Scanned(number, line_format, None if errors else messages, errors)


def _check_line(number: int, text: str) -> tuple[str | None, list[dict], list[ValidationError]]:
    """Parse and check one line: (format or None, normalised messages, errors)."""
    errors: list[ValidationError] = []

    def error(message: str, where: str | None = None) -> None:
        errors.append(ValidationError(number, message, where))

    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        error(f"invalid JSON: {exc.msg} (column {exc.colno})")
        return None, [], errors
    except RecursionError:
        error("invalid JSON: nested too deeply")
        return None, [], errors
    if not isinstance(obj, dict):
        error(f"expected a JSON object, got {_json_type(obj)}")
        return None, [], errors

    if "messages" in obj:
        line_format, messages, sources = "chat", *_from_chat(obj, error)
    elif "conversations" in obj:
        line_format, messages, sources = "sharegpt", *_from_sharegpt(obj, error)
    elif "instruction" in obj or "output" in obj:
        line_format, messages, sources = "alpaca", *_from_alpaca(obj, error)
    else:
        error(
            "unknown format: expected a 'messages' list (chat), a 'conversations' list "
            "(sharegpt) or 'instruction' and 'output' (alpaca)"
        )
        return None, [], errors
    if not errors:
        container = {"chat": "messages", "sharegpt": "conversations"}.get(line_format)
        _check_conversation(messages, sources, container, error)
    return line_format, messages, errors


def _from_chat(obj: dict, error) -> tuple[list[dict], list[tuple[str, str, str]]]:
    """Chat messages and, per message, (its field, role key, content key) for errors."""
    raw = obj["messages"]
    if not isinstance(raw, list):
        error(f"'messages' must be an array, got {_json_type(raw)}", "messages")
        return [], []
    messages, sources = [], []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            error(f"a message must be an object, got {_json_type(message)}", where)
            continue
        for key in sorted(set(message) - _MESSAGE_KEYS):
            error(f"unsupported key {key!r}", f"{where}.{key}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or role not in ROLES:
            shown = role if isinstance(role, str) else _json_type(role)
            error(f"role must be one of {', '.join(ROLES)}, got {shown!r}", f"{where}.role")
            continue
        if not isinstance(content, str):
            error(f"content must be a string, got {_json_type(content)}", f"{where}.content")
            continue
        if "name" in message and not isinstance(message["name"], str):
            error("name must be a string", f"{where}.name")
        out = {"role": role, "content": content}
        if "weight" in message:
            weight = message["weight"]
            if role != "assistant":
                error("weight is only allowed on assistant messages", f"{where}.weight")
            elif weight not in (0, 1) or isinstance(weight, bool):
                error(f"weight must be 0 or 1, got {weight!r}", f"{where}.weight")
            else:
                out["weight"] = weight
        messages.append(out)
        sources.append((where, f"{where}.role", f"{where}.content"))
    return messages, sources


def _from_sharegpt(obj: dict, error) -> tuple[list[dict], list[tuple[str, str, str]]]:
    raw = obj["conversations"]
    if not isinstance(raw, list):
        error(f"'conversations' must be an array, got {_json_type(raw)}", "conversations")
        return [], []
    messages, sources = [], []
    for i, turn in enumerate(raw):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            error(f"a turn must be an object, got {_json_type(turn)}", where)
            continue
        speaker, value = turn.get("from"), turn.get("value")
        if not isinstance(speaker, str) or speaker not in _SHAREGPT_ROLES:
            shown = speaker if isinstance(speaker, str) else _json_type(speaker)
            allowed = ", ".join(_SHAREGPT_ROLES)
            error(f"'from' must be one of {allowed}, got {shown!r}", f"{where}.from")
            continue
        if not isinstance(value, str):
            error(f"value must be a string, got {_json_type(value)}", f"{where}.value")
            continue
        messages.append({"role": _SHAREGPT_ROLES[speaker], "content": value})
        sources.append((where, f"{where}.from", f"{where}.value"))
    return messages, sources


def _from_alpaca(obj: dict, error) -> tuple[list[dict], list[tuple[str, str, str]]]:
    bad = False
    for key, required in (("instruction", True), ("input", False), ("output", True)):
        if key not in obj:
            if required:
                error(f"missing {key!r}", key)
                bad = True
        elif not isinstance(obj[key], str):
            error(f"{key!r} must be a string, got {_json_type(obj[key])}", key)
            bad = True
    if "system" in obj and not isinstance(obj["system"], str):
        error(f"'system' must be a string, got {_json_type(obj['system'])}", "system")
        bad = True
    if bad:
        return [], []
    messages, sources = [], []
    if obj.get("system"):
        messages.append({"role": "system", "content": obj["system"]})
        sources.append(("system", "system", "system"))
    prompt = obj["instruction"]
    if obj.get("input", "").strip():
        prompt = f"{prompt}\n\n{obj['input']}"
    messages.append({"role": "user", "content": prompt})
    sources.append(("instruction", "instruction", "instruction"))
    messages.append({"role": "assistant", "content": obj["output"]})
    sources.append(("output", "output", "output"))
    return messages, sources


def _check_conversation(
    messages: list[dict], sources: list[tuple[str, str, str]], container: str | None, error
):
    if not messages:
        error("no messages", container)
        return
    for i, (message, (_, role_field, content_field)) in enumerate(
        zip(messages, sources, strict=True)
    ):
        if not message["content"].strip():
            error("empty content", content_field)
        elif not _is_encodable(message["content"]):
            # JSON can spell a lone surrogate ("\ud800"); no tokenizer can encode it.
            error("content holds an unpaired surrogate escape, not text", content_field)
        for token in SPECIAL_TOKENS:
            if token in message["content"]:
                error(f"content contains the reserved token {token!r}", content_field)
        if message["role"] == "system" and i > 0:
            error("a system message is only allowed first", role_field)
    first_turn = 1 if messages[0]["role"] == "system" else 0
    if first_turn < len(messages) and messages[first_turn]["role"] != "user":
        error(
            "the first message after the system prompt must be from the user",
            sources[first_turn][1],
        )
    trained = [m for m in messages if m["role"] == "assistant" and m.get("weight", 1)]
    if not any(m["role"] == "assistant" for m in messages):
        error("no assistant message: nothing to train on", container)
    elif not trained:
        error("every assistant message has weight 0: nothing to train on", container)
    if messages[-1]["role"] != "assistant":
        error("the last message must be from the assistant", sources[-1][1])


def _is_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def validate(
    path: Source,
    *,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    max_examples: int = DEFAULT_MAX_EXAMPLES,
    max_chars: int | None = DEFAULT_MAX_CHARS,
    tokenizer: Any = None,
    max_tokens: int | None = None,
) -> ValidationReport:
    """Check a training file and describe it; never raises for bad content.

    path: a JSONL file in one of the accepted formats (module docstring), or an open
        binary stream positioned at its start (read, not closed).
    max_line_bytes: longer lines are refused unread, so a huge or binary file costs
        little; a NUL byte stops the scan at once (binary file).
    max_examples: reading stops with an error after this many examples.
    max_chars: per-example limit on content characters (None: no limit).
    tokenizer: a `tokenizers.Tokenizer` or transformers tokenizer with the project's
        special tokens; when given, token statistics are computed with `encode_chat`.
    max_tokens: per-example limit on encoded tokens (needs `tokenizer`).

    Returns a ValidationReport. OSError when the file cannot be read; ValueError when
    max_tokens is given without a tokenizer.
    """
    if max_tokens is not None and tokenizer is None:
        raise ValueError("max_tokens needs a tokenizer")
    report = ValidationReport(path=source_name(path))
    chars, tokens, n_train = [], [], 0
    for scanned in _scan(path, max_line_bytes, max_examples):
        report.n_lines = scanned.line
        if report.format is None and scanned.format is not None:
            report.format = scanned.format
        for error in scanned.errors:
            report.add_error(error)
        if scanned.messages is None:
            continue
        n_chars = sum(len(m["content"]) for m in scanned.messages)
        if max_chars is not None and n_chars > max_chars:
            report.add_error(
                ValidationError(
                    scanned.line, f"{n_chars} characters, over the limit of {max_chars}"
                )
            )
            continue
        if tokenizer is not None:
            input_ids, labels = encode_chat(tokenizer, scanned.messages)
            if max_tokens is not None and len(input_ids) > max_tokens:
                message = f"{len(input_ids)} tokens, over the limit of {max_tokens}"
                report.add_error(ValidationError(scanned.line, message))
                continue
            tokens.append(len(input_ids))
            n_train += sum(label != IGNORE_INDEX for label in labels)
        chars.append(n_chars)
        report.n_examples += 1
        report.n_messages += len(scanned.messages)
    if report.n_examples == 0 and report.n_errors == 0:
        report.add_error(ValidationError(0, "the file holds no examples"))
    report.chars = LengthStats.of(chars)
    if tokenizer is not None:
        report.tokens = LengthStats.of(tokens)
        report.n_train_tokens = n_train
    report.ok = report.n_errors == 0
    return report


def iter_examples(
    path: Source,
    *,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    max_examples: int = DEFAULT_MAX_EXAMPLES,
) -> Iterator[Example]:
    """Yield the examples of `path` as chat messages; DataError at the first bad line.

    For training on a file `validate` accepted. Empty files raise DataError too.
    """
    seen = False
    for scanned in _scan(path, max_line_bytes, max_examples):
        if scanned.errors:
            raise DataError(source_name(path), scanned.errors)
        if scanned.messages is not None:
            seen = True
            yield Example(scanned.line, scanned.messages)
    if not seen:
        raise DataError(source_name(path), [ValidationError(0, "the file holds no examples")])


# ---------------------------------------------------------------------------------------
# Encoding


def _encoder(tokenizer: Any):
    """(text -> ids, token -> id) for a `tokenizers.Tokenizer` or a transformers one."""
    if hasattr(tokenizer, "token_to_id"):  # tokenizers.Tokenizer

        def encode(text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False).ids

        lookup = tokenizer.token_to_id
    else:

        def encode(text: str) -> list[int]:
            return list(tokenizer.encode(text, add_special_tokens=False))

        lookup = tokenizer.convert_tokens_to_ids

    def token_id(token: str) -> int:
        found = lookup(token)
        if found is None or (found == getattr(tokenizer, "unk_token_id", -1)):
            raise ValueError(f"tokenizer has no {token!r}; train it with finetune.tokenizer")
        return found

    return encode, token_id


def encode_chat(tokenizer: Any, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """Encode messages with the chat template; labels mask everything but the assistant.

    Returns (input_ids, labels), equal lengths. labels[t] is input_ids[t] where the
    token is assistant content or the <|end|> closing an assistant turn (so the model
    learns to stop), and IGNORE_INDEX elsewhere: bos, role headers, system and user
    turns, and assistant turns with weight 0. Labels are aligned with input_ids; the
    loss shifts them (Hugging Face convention). input_ids equal the tokenisation of
    `render_chat(messages)`.

    ValueError for an unknown role or content containing a reserved control token.
    """
    encode, token_id = _encoder(tokenizer)
    bos, end = token_id(BOS), token_id(EOS)
    input_ids, labels = [bos], [IGNORE_INDEX]
    for message in messages:
        role, content = message["role"], message["content"]
        if role not in ROLE_TOKENS:
            raise ValueError(f"unknown role: {role!r}")
        for token in SPECIAL_TOKENS:
            if token in content:
                raise ValueError(f"content contains the reserved token {token!r}")
        body = encode(content) + [end]
        input_ids += [token_id(ROLE_TOKENS[role]), *body]
        trained = role == "assistant" and message.get("weight", 1) != 0
        labels += [IGNORE_INDEX, *(body if trained else [IGNORE_INDEX] * len(body))]
    return input_ids, labels


def encode_prompt(tokenizer: Any, messages: Sequence[dict]) -> list[int]:
    """Input ids of `messages` followed by the generation prompt (<|assistant|>)."""
    input_ids, _ = encode_chat(tokenizer, messages)
    _, token_id = _encoder(tokenizer)
    return input_ids + [token_id(ROLE_TOKENS["assistant"])]


# ---------------------------------------------------------------------------------------
# Packing and batches


@dataclass(frozen=True)
class PackedRow:
    """One training row of exactly seq_len tokens.

    position_ids restart at 0 for every example, so a model that supports packed
    (block-diagonal) attention can keep examples apart; attention_mask is 0 on padding.
    n_examples says how many examples the row holds.
    """

    input_ids: list[int]
    labels: list[int]
    attention_mask: list[int]
    position_ids: list[int]
    n_examples: int


@dataclass(frozen=True)
class PackStats:
    n_examples: int
    n_rows: int
    n_dropped: int  # longer than seq_len (overflow="drop")
    n_truncated: int  # cut to seq_len (overflow="truncate")
    fill: float  # share of row tokens that are real, not padding


def pack_examples(
    encoded: Iterable[tuple[list[int], list[int]]],
    seq_len: int,
    *,
    pad_id: int = PAD_ID,
    pack: bool = True,
    overflow: str = "drop",
) -> tuple[list[PackedRow], PackStats]:
    """Lay encoded (input_ids, labels) examples into rows of seq_len tokens, in order.

    pack=True concatenates whole examples into a row until the next one does not fit
    (no example is split across rows); pack=False gives each example its own row.
    The mask needs no extra work at a boundary: every example starts with bos, whose
    label is IGNORE_INDEX, so nothing learns to predict one example from the previous.
    overflow: "drop" skips an example longer than seq_len, "truncate" cuts it (and
    still drops it when nothing trainable is left). ValueError on bad arguments.
    """
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2")
    if overflow not in ("drop", "truncate"):
        raise ValueError("overflow must be 'drop' or 'truncate'")
    rows: list[PackedRow] = []
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    count = n_examples = dropped = truncated = real = 0

    def close() -> None:
        nonlocal ids, labels, positions, count, real
        if not ids:
            return
        pad = seq_len - len(ids)
        real += len(ids)
        rows.append(
            PackedRow(
                ids + [pad_id] * pad,
                labels + [IGNORE_INDEX] * pad,
                [1] * len(ids) + [0] * pad,
                positions + [0] * pad,
                count,
            )
        )
        ids, labels, positions, count = [], [], [], 0

    for example_ids, example_labels in encoded:
        if len(example_ids) != len(example_labels):
            raise ValueError("input_ids and labels differ in length")
        n_examples += 1
        if len(example_ids) > seq_len:
            if overflow == "drop":
                dropped += 1
                continue
            example_ids, example_labels = example_ids[:seq_len], example_labels[:seq_len]
            if all(label == IGNORE_INDEX for label in example_labels):
                dropped += 1
                continue
            truncated += 1
        if not pack or len(ids) + len(example_ids) > seq_len:
            close()
        ids += example_ids
        labels += example_labels
        positions += range(len(example_ids))
        count += 1
    close()
    fill = real / (len(rows) * seq_len) if rows else 0.0
    return rows, PackStats(n_examples, len(rows), dropped, truncated, fill)


class PackedDataset:
    """Map-style dataset over packed rows; item i is a dict of 1-D int64 tensors.

    A plain class with __len__ and __getitem__ (all torch's DataLoader asks for), and
    torch is imported only when a row is built: the control plane imports this module
    for `validate` and should not pay torch's one-second import for it.
    """

    KEYS = ("input_ids", "labels", "attention_mask", "position_ids")

    def __init__(self, rows: Sequence[PackedRow]):
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        import torch

        row = self.rows[index]
        return {key: torch.tensor(getattr(row, key), dtype=torch.long) for key in self.KEYS}


def sft_dataset(
    path: Source,
    tokenizer: Any,
    *,
    seq_len: int,
    seed: int = 0,
    pack: bool = True,
    overflow: str = "drop",
) -> tuple[PackedDataset, PackStats]:
    """Read, encode, shuffle (by seed) and pack a chat/alpaca/sharegpt file.

    DataError when the file is invalid (validate it first for the full list).
    """
    encoded = [encode_chat(tokenizer, example.messages) for example in iter_examples(path)]
    random.Random(f"examples:{seed}").shuffle(encoded)
    rows, stats = pack_examples(encoded, seq_len, pack=pack, overflow=overflow)
    return PackedDataset(rows), stats


class BatchIterator:
    """Deterministic, resumable batches over a PackedDataset.

    Each epoch visits the rows in an order fixed by (seed, epoch); a batch is a dict of
    [batch_size, seq_len] int64 tensors (input_ids, labels, attention_mask,
    position_ids). state_dict() after k batches and load_state_dict() on a fresh
    iterator over the same data continue with batch k+1, exactly: this is what a
    checkpoint stores to resume a job. No DataLoader workers on purpose: rows are
    already tokenised in memory, and worker prefetch would make the position fuzzy.

    epochs=None iterates forever; otherwise StopIteration after that many epochs.
    drop_last skips the final short batch of each epoch.
    """

    def __init__(
        self,
        dataset: PackedDataset,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        epochs: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        if len(dataset) == 0 or (drop_last and len(dataset) < batch_size):
            raise ValueError("the dataset yields no batches")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epochs = epochs
        self.epoch = 0
        self.batch_in_epoch = 0
        self._order = self._order_for(0)

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _order_for(self, epoch: int) -> list[int]:
        order = list(range(len(self.dataset)))
        if self.shuffle:
            random.Random(f"batches:{self.seed}:{epoch}").shuffle(order)
        return order

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.batch_in_epoch >= len(self):
            self.epoch += 1
            self.batch_in_epoch = 0
            self._order = self._order_for(self.epoch)
        if self.epochs is not None and self.epoch >= self.epochs:
            raise StopIteration
        start = self.batch_in_epoch * self.batch_size
        indices = self._order[start : start + self.batch_size]
        self.batch_in_epoch += 1
        items = [self.dataset[i] for i in indices]
        import torch

        return {key: torch.stack([item[key] for item in items]) for key in PackedDataset.KEYS}

    def state_dict(self) -> dict[str, int | bool]:
        """Where the iterator stands, JSON-safe (plus what must match on restore)."""
        return {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "n_rows": len(self.dataset),
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; ValueError when it was taken over different data or
        settings (the order would not be the same)."""
        mine = self.state_dict()
        for key in ("seed", "batch_size", "n_rows", "shuffle", "drop_last"):
            if state[key] != mine[key]:
                raise ValueError(f"state is for {key}={state[key]!r}, not {mine[key]!r}")
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self._order = self._order_for(self.epoch)
