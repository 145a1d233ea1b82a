"""`python -m finetune sft|grpo|eval|pretrain`: help, JSON summaries, JSONL metrics, adapters
on disk, no progress bar when stderr is not a terminal, Ctrl-C as a stop request."""

import json
import signal
import subprocess
import sys

import pytest
from peft import PeftModel

import inference
from finetune import lora
from finetune.__main__ import main
from finetune.cli_train import CliCallbacks
from tests.finetune.test_pretrain import TOY, build_toy_model


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory, tiny_tokenizer_dir):
    return build_toy_model(tmp_path_factory.mktemp("climodel") / "toy", tiny_tokenizer_dir)


@pytest.mark.parametrize(
    "command,flag",
    [
        ("sft", "--lora-r"),
        ("grpo", "--group-size"),
        ("eval", "--adapter"),
        ("pretrain", "--seq-len"),
    ],
)
def test_help(command, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert flag in capsys.readouterr().out


def test_help_needs_no_torch():
    # --help must stay quick: the heavy imports happen inside run_*.
    code = "import sys; from finetune.__main__ import build_parser; build_parser(); "
    code += "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_sft_then_grpo_then_eval(tmp_path, toy_model, capsys):
    data = tmp_path / "train.jsonl"
    assert main(["gen", "--suite", "medical", "--n", "8", "--seed", "1", "--out", str(data)]) == 0
    capsys.readouterr()
    sft_out = tmp_path / "sft"
    args = ["sft", "--model", str(toy_model), "--data", str(data), "--out", str(sft_out)]
    args += ["--steps", "2", "--batch-size", "2", "--max-seq-len", "320", "--lora-r", "4"]
    args += ["--set", "log_every=1", "--threads", "1"]
    assert main(args) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["status"] == "succeeded" and summary["steps"] == 2
    assert "sft:" not in captured.err and "step/s" not in captured.err  # no bar off a TTY
    assert (sft_out / "adapter_config.json").is_file()
    assert json.loads((sft_out / "adapter_config.json").read_text())["r"] == 4
    # peft itself reads the directory onto the engine's model
    peft_model = PeftModel.from_pretrained(inference.load_model(toy_model), str(sft_out))
    assert lora.adapted_module_names(peft_model)
    lines = (sft_out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)] == [1, 2]

    grpo_out = tmp_path / "grpo"
    args = ["grpo", "--model", str(toy_model), "--suite", "medical", "--out", str(grpo_out)]
    args += ["--initial-adapter", str(sft_out), "--steps", "1", "--prompts-per-step", "1"]
    args += ["--group-size", "2", "--max-completion-length", "4", "--n", "4", "--lr", "1e-4"]
    args += ["--set", "lora_r=4", "--metrics", str(tmp_path / "grpo.jsonl")]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 1 and (grpo_out / "adapter_model.safetensors").is_file()
    assert len((tmp_path / "grpo.jsonl").read_text().splitlines()) >= 1

    report_file = tmp_path / "eval.json"
    args = ["eval", "--model", str(toy_model), "--adapter", str(grpo_out), "--suite", "medical"]
    args += ["--n", "4", "--max-tokens", "3", "--out", str(report_file)]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["adapter"] == str(grpo_out) and report["n"] == 4
    assert set(report["per_family"]) == {"weight_dosing", "bmi", "egfr", "triage"}
    assert json.loads(report_file.read_text()) == report


def test_bad_arguments_exit_2(tmp_path, toy_model, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("")
    args = ["sft", "--model", str(toy_model), "--data", str(data), "--out", str(tmp_path)]
    assert main([*args, "--set", "no_such_field=1"]) == 2
    assert "no_such_field" in capsys.readouterr().err
    assert main(["eval", "--model", str(toy_model), "--suite", "finance", "--n", "0"]) == 2
    assert main(["pretrain", "--out", str(tmp_path / "m"), "--override", "oops"]) == 2


def test_sft_invalid_data_exits_1(tmp_path, toy_model, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": [{"role": "robot", "content": "x"}]}\n')
    args = ["sft", "--model", str(toy_model), "--data", str(data), "--out", str(tmp_path / "a")]
    assert main(args) == 1
    assert "line 1" in capsys.readouterr().err


def test_pretrain_command(tmp_path, tiny_tokenizer_dir, capsys):
    out = tmp_path / "model"
    args = ["pretrain", "--out", str(out), "--tokenizer", str(tiny_tokenizer_dir)]
    args += ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--log-every", "1"]
    for key, value in TOY.items():
        args += ["--override", f"{key}={value}"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert (out / "model.safetensors").is_file()
    metrics = [json.loads(x) for x in (tmp_path / "model.metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]


def test_ctrl_c_becomes_a_cancel_request(tmp_path):
    # Whatever handler was there before comes back (a shell's background job starts with
    # SIGINT ignored, an interactive one with Python's default handler).
    before = signal.getsignal(signal.SIGINT)
    callbacks = CliCallbacks(tmp_path / "m.jsonl", total=3, desc="t")
    try:
        assert callbacks.should_stop() is None
        handler = signal.getsignal(signal.SIGINT)
        handler(signal.SIGINT, None)
        assert callbacks.should_stop() == "cancel"
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, None)
    finally:
        callbacks.close()
    assert signal.getsignal(signal.SIGINT) is before
