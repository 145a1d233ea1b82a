"""`python -m finetune validate|gen`: exit status, JSON on stdout, error lines named."""

import json
import subprocess
import sys

from finetune.__main__ import main


def test_gen_then_validate(tmp_path, capsys):
    out = tmp_path / "medical.jsonl"
    assert main(["gen", "--suite", "medical", "--n", "12", "--seed", "4", "--out", str(out)]) == 0
    assert len(out.read_text(encoding="utf-8").splitlines()) == 12
    capsys.readouterr()
    assert main(["validate", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["n_examples"] == 12 and report["format"] == "chat"


def test_validate_invalid_file_exits_1_and_names_lines(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
        '{"messages": [{"role": "user", "content": "q"}]}\n'
        "not json\n",
        encoding="utf-8",
    )
    assert main(["validate", str(bad)]) == 1
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert not report["ok"]
    assert sorted({e["line"] for e in report["errors"]}) == [2, 3]
    assert f"{bad}:3: invalid JSON" in captured.err


def test_validate_with_tokenizer_reports_tokens(tmp_path, capsys, tiny_tokenizer_dir):
    out = tmp_path / "fin.jsonl"
    main(["gen", "--suite", "finance", "--n", "4", "--out", str(out)])
    capsys.readouterr()
    args = ["validate", str(out), "--tokenizer", str(tiny_tokenizer_dir), "--max-tokens", "50"]
    assert main(args) == 1  # suite prompts are longer than 50 tokens
    report = json.loads(capsys.readouterr().out)
    assert report["n_errors"] == 4 and report["tokens"]["total"] == 0


def test_missing_file_exits_2(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_module_entry_point_help():
    result = subprocess.run(
        [sys.executable, "-m", "finetune", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert "validate" in result.stdout and "gen" in result.stdout
