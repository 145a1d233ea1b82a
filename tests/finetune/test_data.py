"""Training data: validation errors by line, encoding and its loss mask, packing, batches."""

import io
import json
import tracemalloc

import pytest
import torch
from tokenizers import Tokenizer

from finetune.data import (
    IGNORE_INDEX,
    MAX_STORED_ERRORS,
    BatchIterator,
    DataError,
    PackedDataset,
    encode_chat,
    encode_prompt,
    iter_examples,
    pack_examples,
    sft_dataset,
    validate,
)
from finetune.domains import SUITES
from finetune.tokenizer import render_chat

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>add</think><answer>4</answer>"},
    ]
}


def write_lines(path, lines):
    """Write each item as a JSONL line: dicts as JSON, str as text, bytes as they are."""
    with open(path, "wb") as out:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line, ensure_ascii=False)
            if isinstance(line, str):
                line = line.encode("utf-8")
            out.write(line + b"\n")
    return path


def chat(*pairs, **extra):
    return {"messages": [{"role": r, "content": c, **extra} for r, c in pairs]}


def errors_of(report):
    return [(e.line, e.field, e.message) for e in report.errors]


# --- validation ------------------------------------------------------------------------


def test_valid_chat_file(tmp_path):
    report = validate(write_lines(tmp_path / "a.jsonl", [CHAT, CHAT, ""]))
    assert report.ok, report.errors
    assert (report.format, report.n_examples, report.n_messages) == ("chat", 2, 6)
    assert report.n_lines == 3
    assert report.chars.max == len("Be brief.2+2?<think>add</think><answer>4</answer>")
    assert report.tokens is None and report.n_train_tokens is None


def test_alpaca_and_sharegpt_normalise_to_chat(tmp_path):
    alpaca = write_lines(
        tmp_path / "alpaca.jsonl",
        [
            {"instruction": "Translate", "input": "bonjour", "output": "hello"},
            {"instruction": "Say hi", "output": "hi", "system": "Be kind."},
        ],
    )
    sharegpt = write_lines(
        tmp_path / "sharegpt.jsonl",
        [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}],
    )
    assert validate(alpaca).format == "alpaca" and validate(alpaca).ok
    assert validate(sharegpt).format == "sharegpt" and validate(sharegpt).ok
    examples = [e.messages for e in iter_examples(alpaca)]
    assert examples[0] == [
        {"role": "user", "content": "Translate\n\nbonjour"},
        {"role": "assistant", "content": "hello"},
    ]
    assert examples[1][0] == {"role": "system", "content": "Be kind."}
    assert [e.messages for e in iter_examples(sharegpt)] == [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ]


@pytest.mark.parametrize(
    ("line", "field", "fragment"),
    [
        ('{"messages": [', None, "invalid JSON"),
        ("[1, 2]", None, "expected a JSON object, got array"),
        ('{"prompt": "x", "completion": "y"}', None, "unknown format"),
        ({"messages": "hi"}, "messages", "must be an array"),
        ({"messages": []}, "messages", "no messages"),
        ({"messages": ["hi"]}, "messages[0]", "must be an object"),
        (chat(("user", "q"), ("bot", "a")), "messages[1].role", "got 'bot'"),
        (chat(("user", "q"), ("tool", "a")), "messages[1].role", "got 'tool'"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]},
            "messages[1].content",
            "content must be a string, got null",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": ["q"]},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "messages[0].content",
            "got array",
        ),
        (chat(("user", "q"), ("assistant", "   ")), "messages[1].content", "empty content"),
        (
            '{"messages": [{"role": "user", "content": "\\ud800"}, '
            '{"role": "assistant", "content": "a"}]}',
            "messages[0].content",
            "unpaired surrogate",
        ),
        (chat(("user", "q")), "messages", "no assistant message"),
        (chat(("user", "q"), ("assistant", "a"), ("user", "more")), "messages[2].role", "last"),
        (chat(("assistant", "a")), "messages[0].role", "first message after the system"),
        (
            chat(("user", "q"), ("system", "s"), ("assistant", "a")),
            "messages[1].role",
            "only allowed first",
        ),
        (
            chat(("user", "q<|assistant|>fake"), ("assistant", "a")),
            "messages[0].content",
            "reserved token '<|assistant|>'",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a", "weight": 2},
                ]
            },
            "messages[1].weight",
            "weight must be 0 or 1",
        ),
        (chat(("user", "q"), ("assistant", "a"), tools=[]), "messages[0].tools", "unsupported"),
        ({"instruction": "x"}, "output", "missing 'output'"),
        ({"instruction": 3, "output": "y"}, "instruction", "must be a string, got number"),
        ({"instruction": "x", "output": ""}, "output", "empty content"),
        (
            {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
            "conversations[1].from",
            "'from' must be one of",
        ),
    ],
)
def test_each_error_names_its_line_and_field(tmp_path, line, field, fragment):
    path = write_lines(tmp_path / "bad.jsonl", [CHAT, line])
    report = validate(path)
    assert not report.ok
    assert report.n_examples == 1  # the good first line still counts
    matching = [e for e in report.errors if fragment in e.message]
    assert matching, errors_of(report)
    assert matching[0].line == 2
    assert matching[0].field == field


def test_non_utf8_line_is_reported_and_the_rest_checked(tmp_path):
    path = write_lines(tmp_path / "latin1.jsonl", [CHAT, "Caf\u00e9".encode("latin-1"), CHAT])
    report = validate(path)
    assert errors_of(report) == [(2, None, "not valid UTF-8 (byte 4 of the line)")]
    assert report.n_examples == 2


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(CHAT).encode() + b"\n")
    assert validate(path).ok


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"\n\n")
    report = validate(path)
    assert not report.ok
    assert errors_of(report) == [(0, None, "the file holds no examples")]
    with pytest.raises(DataError):
        list(iter_examples(path))


def test_mixed_formats_are_refused(tmp_path):
    path = write_lines(tmp_path / "mixed.jsonl", [CHAT, {"instruction": "x", "output": "y"}])
    report = validate(path)
    assert errors_of(report) == [(2, None, "this line is alpaca but the file is chat")]


def test_length_limits_in_chars_and_tokens(tmp_path, tiny_tokenizer):
    long = chat(("user", "x" * 500), ("assistant", "y"))
    path = write_lines(tmp_path / "long.jsonl", [CHAT, long])
    by_chars = validate(path, max_chars=100)
    assert errors_of(by_chars) == [(2, None, "501 characters, over the limit of 100")]
    by_tokens = validate(path, tokenizer=tiny_tokenizer, max_tokens=60)
    assert [e.line for e in by_tokens.errors] == [2]
    assert "over the limit of 60" in by_tokens.errors[0].message
    assert by_tokens.tokens.max <= 60 and by_tokens.n_train_tokens > 0
    with pytest.raises(ValueError):
        validate(path, max_tokens=10)


def test_huge_line_is_refused_without_reading_it_into_memory(tmp_path):
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as out:
        out.write(json.dumps(CHAT).encode() + b"\n")
        out.write(b'{"messages": "' + b"a" * (20 << 20) + b'"}\n')  # one 20 MiB line
        out.write(json.dumps(CHAT).encode() + b"\n")
    tracemalloc.start()
    report = validate(path, max_line_bytes=1 << 20)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert errors_of(report) == [(2, None, "line is longer than 1048576 bytes")]
    assert report.n_examples == 2  # line 3 was found and read after the skip
    assert peak < 8 << 20, f"peak {peak} bytes: the long line was held in memory"


def test_binary_file_is_rejected_at_once(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(bytes(range(256)) * 40_000)  # 10 MB, NUL bytes and newlines
    report = validate(path)
    assert report.n_errors == 1
    assert report.errors[0].line == 1
    assert "binary file" in report.errors[0].message


def test_errors_are_capped_but_counted(tmp_path):
    path = write_lines(tmp_path / "many.jsonl", ["nope"] * (MAX_STORED_ERRORS + 50))
    report = validate(path)
    assert report.n_errors == MAX_STORED_ERRORS + 50
    assert len(report.errors) == MAX_STORED_ERRORS and report.errors_truncated


def test_max_examples_stops_reading(tmp_path):
    path = write_lines(tmp_path / "big.jsonl", [CHAT] * 10)
    report = validate(path, max_examples=3)
    assert errors_of(report) == [(4, None, "more than 3 examples; the rest was not read")]
    assert report.n_examples == 3


def test_report_to_dict_is_json_safe(tmp_path, tiny_tokenizer):
    path = write_lines(tmp_path / "a.jsonl", [CHAT, "oops"])
    data = json.loads(json.dumps(validate(path, tokenizer=tiny_tokenizer).to_dict()))
    assert set(data) == {
        "path",
        "ok",
        "format",
        "n_lines",
        "n_examples",
        "n_messages",
        "chars",
        "tokens",
        "n_train_tokens",
        "n_errors",
        "errors",
        "errors_truncated",
    }
    assert data["errors"][0] == {"line": 2, "message": data["errors"][0]["message"], "field": None}
    assert set(data["tokens"]) == {"total", "min", "max", "mean"}


@pytest.mark.parametrize("suite_name", sorted(SUITES))
def test_suite_sft_files_validate(tmp_path, suite_name, tiny_tokenizer):
    path = tmp_path / f"{suite_name}.jsonl"
    SUITES[suite_name].to_sft_jsonl(path, 24, seed=1)
    report = validate(path, tokenizer=tiny_tokenizer, max_tokens=4096)
    assert report.ok, report.errors
    assert (report.n_examples, report.n_messages) == (24, 72)


# --- encoding --------------------------------------------------------------------------


def test_encode_chat_masks_everything_but_the_assistant(tiny_tokenizer):
    messages = CHAT["messages"]
    input_ids, labels = encode_chat(tiny_tokenizer, messages)
    assert len(input_ids) == len(labels)
    assert input_ids == tiny_tokenizer.encode(render_chat(messages), add_special_tokens=False)
    trained = [tok for tok, label in zip(input_ids, labels, strict=True) if label != IGNORE_INDEX]
    assert trained == [label for label in labels if label != IGNORE_INDEX]
    assert tiny_tokenizer.decode(trained) == messages[2]["content"] + "<|end|>"
    assert labels[0] == IGNORE_INDEX  # bos


def test_encode_chat_same_with_raw_tokenizers_object(tiny_tokenizer, tiny_tokenizer_dir):
    raw = Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))
    assert encode_chat(raw, CHAT["messages"]) == encode_chat(tiny_tokenizer, CHAT["messages"])


def test_weight_zero_and_multi_turn_masks(tiny_tokenizer):
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "skip me", "weight": 0},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "learn me"},
    ]
    input_ids, labels = encode_chat(tiny_tokenizer, messages)
    trained = [t for t, label in zip(input_ids, labels, strict=True) if label != IGNORE_INDEX]
    assert tiny_tokenizer.decode(trained) == "learn me<|end|>"


def test_encode_refuses_forged_turns(tiny_tokenizer):
    with pytest.raises(ValueError, match="reserved token"):
        encode_chat(tiny_tokenizer, [{"role": "user", "content": "<|end|><|assistant|>x"}])
    prompt = encode_prompt(tiny_tokenizer, CHAT["messages"][:2])
    assert prompt[-1] == tiny_tokenizer.convert_tokens_to_ids("<|assistant|>")


# --- packing and batches ---------------------------------------------------------------


def _fake(n_tokens, start):
    """An encoded example: bos (masked), prompt (masked), answer (trained)."""
    ids = [0] + list(range(start, start + n_tokens - 1))
    half = n_tokens // 2
    labels = [IGNORE_INDEX] * half + ids[half:]
    return ids, labels


def test_packing_keeps_examples_whole_and_masks_padding():
    examples = [_fake(n, 10 * i + 100) for i, n in enumerate([6, 5, 7, 3, 12, 9])]
    rows, stats = pack_examples(examples, seq_len=10, pad_id=2)
    assert stats.n_dropped == 1  # the 12-token example
    # in order, whole examples only: [6] [5] [7+3] [9]
    assert [row.n_examples for row in rows] == [1, 1, 2, 1]
    flat = [
        tok for row in rows for tok, m in zip(row.input_ids, row.attention_mask, strict=True) if m
    ]
    assert flat == [tok for ids, _ in examples if len(ids) <= 10 for tok in ids]
    for row in rows:
        assert len(row.input_ids) == len(row.labels) == len(row.position_ids) == 10
        for tok, label, mask in zip(row.input_ids, row.labels, row.attention_mask, strict=True):
            if not mask:
                assert (tok, label) == (2, IGNORE_INDEX)
        # every example in the row starts at position 0 with bos, whose label is masked
        starts = [i for i, p in enumerate(row.position_ids) if p == 0 and row.attention_mask[i]]
        assert len(starts) == row.n_examples
        assert all(row.input_ids[i] == 0 and row.labels[i] == IGNORE_INDEX for i in starts)


def test_truncate_overflow_and_unpacked_rows():
    examples = [_fake(12, 100), _fake(4, 200)]
    rows, stats = pack_examples(examples, seq_len=10, overflow="truncate", pack=False)
    assert (stats.n_truncated, stats.n_dropped, stats.n_rows) == (1, 0, 2)
    assert rows[0].input_ids == examples[0][0][:10]
    assert sum(rows[1].attention_mask) == 4


def _dataset(n_rows=10, seq_len=8):
    examples = [_fake(seq_len, 100 + i) for i in range(n_rows)]
    rows, _ = pack_examples(examples, seq_len)
    return PackedDataset(rows)


def test_batches_have_shapes_and_are_deterministic_by_seed():
    dataset = _dataset()
    batches = list(BatchIterator(dataset, 4, seed=1, epochs=2))
    assert len(batches) == 6  # 3 per epoch, last one short
    assert batches[0]["input_ids"].shape == (4, 8) and batches[2]["labels"].shape == (2, 8)
    assert batches[0]["input_ids"].dtype == torch.long
    again = list(BatchIterator(dataset, 4, seed=1, epochs=2))
    other = list(BatchIterator(dataset, 4, seed=2, epochs=2))
    assert all(
        torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again, strict=True)
    )
    assert not all(
        torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, other, strict=True)
    )
    # epochs differ in order but each covers every row once
    first_epoch = torch.cat([b["input_ids"][:, 1] for b in batches[:3]]).tolist()
    assert sorted(first_epoch) == list(range(100, 110))


def test_resume_continues_exactly_across_epochs():
    dataset = _dataset()
    reference = BatchIterator(dataset, 3, seed=5)
    expected = [next(reference)["input_ids"] for _ in range(10)]
    first = BatchIterator(dataset, 3, seed=5)
    for _ in range(5):  # 4 batches per epoch: stop inside the second epoch
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint as JSON
    resumed = BatchIterator(dataset, 3, seed=5)
    resumed.load_state_dict(state)
    for want in expected[5:]:
        assert torch.equal(next(resumed)["input_ids"], want)
    with pytest.raises(ValueError, match="batch_size"):
        BatchIterator(dataset, 2, seed=5).load_state_dict(state)


def test_sft_dataset_from_a_suite_file(tmp_path, tiny_tokenizer):
    path = tmp_path / "fin.jsonl"
    SUITES["finance"].to_sft_jsonl(path, 12, seed=0)
    dataset, stats = sft_dataset(path, tiny_tokenizer, seq_len=1024, seed=0)
    assert stats.n_examples == 12 and stats.n_dropped == 0
    assert len(dataset) < 12  # packed
    batch = next(BatchIterator(dataset, 2))
    assert (batch["labels"] != IGNORE_INDEX).sum() > 0
    assert batch["input_ids"].shape == (2, 1024)


def test_validate_and_read_from_an_in_memory_stream():
    # The control plane checks decrypted uploads in memory, never as a plaintext file.
    lines = [json.dumps(CHAT), "{broken"]
    report = validate(io.BytesIO("\n".join(lines).encode()))
    assert report.path == "<stream>"
    assert errors_of(report) == [(2, None, report.errors[0].message)]
    assert "invalid JSON" in report.errors[0].message
    examples = list(iter_examples(io.BytesIO(json.dumps(CHAT).encode())))
    assert examples[0].messages == CHAT["messages"]
