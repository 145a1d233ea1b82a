"""The SFT loop: it learns, resumes exactly, stops when asked, reports what it promises.

The base model is a tiny random DeepSeek-V3 (hidden 64, 2 layers, 4 routed experts) stored
in FP8 with the test tokenizer beside it, as a real model directory would be.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load as load_safetensors

import inference
from finetune.callbacks import JsonlMetricsLog
from finetune.sft import SFTConfig, SFTResult, evaluate_adapter, train_sft
from tests.inference.hf_factory import hf_model, save_hf

TINY = {
    "vocab_size": 512,
    "num_hidden_layers": 2,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
}


@pytest.fixture(autouse=True)
def one_thread():
    """The test machine's cores are shared: one thread runs these tiny matmuls ~10x faster
    than two fighting over a busy core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_model_dir(root, tokenizer_dir) -> str:
    """An FP8 model directory under ``root`` with config.json, safetensors and the tokenizer."""
    hf = hf_model(TINY, seed=4)
    with torch.no_grad():  # a calmer init, so a few LoRA steps visibly move the loss
        for name, p in hf.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(0.3)
    save_hf(hf, root / "hf")
    inference.save_checkpoint(inference.load_model(root / "hf", fp8=True), root / "fp8")
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, root / "fp8" / f.name)
    return str(root / "fp8")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer_dir):
    return build_model_dir(tmp_path_factory.mktemp("sft_model"), tiny_tokenizer_dir)


def _examples(n: int, seed: int = 0) -> list[dict]:
    """A learnable toy task: the answer is the prompt's digits, reversed."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        digits = " ".join(str(int(d)) for d in torch.randint(0, 10, (4,), generator=g))
        out.append(
            {
                "messages": [
                    {"role": "system", "content": "Reverse the digits."},
                    {"role": "user", "content": digits},
                    {"role": "assistant", "content": digits[::-1]},
                ]
            }
        )
    return out


class Recorder:
    """Callbacks that keep everything and stop on request at a given step."""

    def __init__(self, stop_at: int | None = None, request: str = "pause"):
        self.metrics: list[dict] = []
        self.checkpoints: dict[int, bytes] = {}
        self.stop_at, self.request = stop_at, request

    def on_metrics(self, metrics: dict) -> None:
        self.metrics.append(dict(metrics))

    def on_checkpoint(self, step: int, state: bytes) -> None:
        self.checkpoints[step] = state

    def should_stop(self) -> str | None:
        done = max((m["step"] for m in self.metrics), default=0)
        return self.request if self.stop_at is not None and done >= self.stop_at else None


def _adapter(result: SFTResult) -> dict[str, torch.Tensor]:
    return load_safetensors(result.adapter_files["adapter_model.safetensors"])


def _assert_same_adapter(a: SFTResult, b: SFTResult) -> None:
    ta, tb = _adapter(a), _adapter(b)
    assert set(ta) == set(tb) and ta
    for name in ta:
        assert torch.allclose(ta[name], tb[name], rtol=0, atol=1e-6), name


def _adapted(model_dir: str):
    """(model, peft_model): the FP8 model with a rank-4 adapter whose B is away from zero,
    so the adapter's own path carries gradient too."""
    from finetune import lora

    model = inference.load_model(model_dir)
    peft_model = lora.apply_lora(model, ("mla", "mlp"), 4, 8)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model, peft_model


def _config(model_dir: str, **overrides) -> SFTConfig:
    base = dict(
        model_path=model_dir,
        lora_r=4,
        lora_alpha=8,
        learning_rate=3e-3,
        batch_size=2,
        grad_accum=2,
        max_seq_len=40,
        max_steps=6,
        warmup_steps=2,
        lora_dropout=0.1,  # so the RNG state matters for exact resumption
    )
    return SFTConfig(**{**base, **overrides})


def test_a_short_run_on_a_learnable_task_lowers_the_loss(model_dir):
    rec = Recorder()
    config = _config(model_dir, max_steps=30, learning_rate=1e-2, lora_dropout=0.0)
    result = train_sft(config, train_examples=_examples(8), callbacks=rec)
    losses = [m["loss"] for m in rec.metrics]
    assert result.status == "succeeded" and result.steps == 30 and len(losses) == 30
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.5 * first, (first, last)
    assert rec.metrics[-1]["token_accuracy"] > rec.metrics[0]["token_accuracy"]


def test_metrics_carry_the_promised_fields_and_schedule(model_dir, tmp_path):
    log_path = tmp_path / "logs" / "metrics.jsonl"
    config = _config(model_dir, max_steps=5, warmup_steps=2, val_fraction=0.25, eval_every=2)
    result = train_sft(config, train_examples=_examples(8), callbacks=JsonlMetricsLog(log_path))
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5]
    for m in lines:
        for key in ("loss", "token_accuracy", "lr", "tokens_per_s", "elapsed_s", "eta_s"):
            assert isinstance(m[key], float) and m[key] >= 0, key
    assert [("val_loss" in m) for m in lines] == [False, True, False, True, True]
    lrs = [m["lr"] for m in lines]
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(config.learning_rate)  # warmup to peak
    assert lrs[2] > lrs[3] > lrs[4] > 0  # then cosine decay
    assert lines[-1]["eta_s"] == 0 and result.trained_tokens == lines[-1]["trained_tokens"] > 0
    assert result.metrics["best_val_loss"] == min(m["val_loss"] for m in lines if "val_loss" in m)
    # Appending: a second run adds lines, never truncates.
    train_sft(
        _config(model_dir, max_steps=1),
        train_examples=_examples(4),
        callbacks=JsonlMetricsLog(log_path),
    )
    assert len(log_path.read_text().splitlines()) == 6


def test_pause_then_resume_in_a_fresh_model_equals_an_uninterrupted_run(model_dir):
    examples = _examples(10)
    full_rec = Recorder()
    full = train_sft(
        _config(model_dir, checkpoint_every=3), train_examples=examples, callbacks=full_rec
    )
    assert full.status == "succeeded" and full.steps == 6 and set(full_rec.checkpoints) == {3, 6}

    paused = train_sft(_config(model_dir), train_examples=examples, callbacks=Recorder(stop_at=2))
    assert paused.status == "paused" and paused.steps == 2
    resumed = train_sft(_config(model_dir), train_examples=examples, resume_state=paused.state)
    assert resumed.status == "succeeded" and resumed.steps == 6
    _assert_same_adapter(resumed, full)

    # A checkpoint taken by on_checkpoint resumes just as well (a killed worker's restart).
    from_checkpoint = train_sft(
        _config(model_dir), train_examples=examples, resume_state=full_rec.checkpoints[3]
    )
    _assert_same_adapter(from_checkpoint, full)
    assert from_checkpoint.trained_tokens == full.trained_tokens


def test_cancel_stops_between_steps_and_still_returns_the_adapter(model_dir):
    rec = Recorder(stop_at=1, request="cancel")
    result = train_sft(_config(model_dir), train_examples=_examples(6), callbacks=rec)
    assert result.status == "cancelled" and result.steps == 1 and len(rec.metrics) == 1
    assert _adapter(result)  # what was trained so far

    class Typo(Recorder):
        def should_stop(self):
            return "stop"

    with pytest.raises(ValueError, match="should_stop returned 'stop'"):
        train_sft(_config(model_dir), train_examples=_examples(6), callbacks=Typo())


def test_initial_adapter_is_the_starting_point(model_dir):
    first = train_sft(_config(model_dir, max_steps=3), train_examples=_examples(6))
    # Zero steps of learning: a run with one step at a tiny rate stays next to its start.
    nudged = train_sft(
        _config(model_dir, max_steps=1, learning_rate=1e-9, warmup_steps=0, lora_dropout=0.0),
        train_examples=_examples(6),
        initial_adapter=first.adapter_files,
    )
    a, b = _adapter(first), _adapter(nudged)
    assert set(a) == set(b)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 1e-4  # not a fresh one
    with pytest.raises(ValueError, match="initial_adapter has r=4"):
        train_sft(
            _config(model_dir, lora_r=8),
            train_examples=_examples(6),
            initial_adapter=first.adapter_files,
        )


def test_only_assistant_tokens_are_trained_and_bad_input_is_refused(model_dir):
    # A run whose examples differ only in system and user text trains on the same tokens.
    config = _config(model_dir, max_steps=2, lora_dropout=0.0, max_seq_len=64)
    a = train_sft(config, train_examples=_examples(4))
    other = _examples(4)
    for e in other:
        e["messages"][0]["content"] = "Something else entirely, and longer."
    b = train_sft(config, train_examples=other)
    assert a.trained_tokens == b.trained_tokens > 0

    with pytest.raises(ValueError, match="line 2"):
        train_sft(config, train_examples=[_examples(1)[0], {"messages": [{"role": "user"}]}])
    with pytest.raises(ValueError, match="resume_state was written with lora_r=4"):
        train_sft(
            _config(model_dir, lora_r=8, max_seq_len=64),
            train_examples=_examples(4),
            resume_state=a.state,
        )


def test_early_stopping_returns_the_best_adapter(model_dir):
    rec = Recorder()
    # A rate this high diverges on the held-out examples after the first evaluations.
    config = _config(
        model_dir,
        max_steps=40,
        learning_rate=0.3,
        warmup_steps=0,
        eval_every=1,
        early_stopping_patience=2,
        lora_dropout=0.0,
    )
    result = train_sft(
        config, train_examples=_examples(6), val_examples=_examples(3, seed=9), callbacks=rec
    )
    vals = [m["val_loss"] for m in rec.metrics]
    assert result.metrics["early_stopped"] is True and result.steps < 40
    best = min(vals)
    assert vals[-1] > best and vals[-2] > best  # two evaluations without improvement
    assert result.metrics["best_val_loss"] == best
    # The returned adapter is the best one: evaluating it gives the best val_loss again.
    again = evaluate_adapter(
        model_dir, result.adapter_files, _examples(3, seed=9), max_seq_len=config.max_seq_len
    )
    assert again["loss"] == pytest.approx(best, rel=1e-5)


def test_training_refuses_a_model_whose_chat_template_serving_renders_differently(
    model_dir, tmp_path
):
    from finetune import run
    from finetune.data import encode_prompt
    from finetune.tokenizer import load_tokenizer

    # The stock template: serving's renderer and finetune.data agree, prompts included.
    tokenizer = load_tokenizer(model_dir)
    messages = _examples(1)[0]["messages"]
    run.check_chat_encoding(model_dir, tokenizer, messages)
    assert run.prompt_ids(model_dir, tokenizer, messages[:2]) == encode_prompt(
        tokenizer, messages[:2]
    )

    other = tmp_path / "model"
    shutil.copytree(model_dir, other)
    config_path = other / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["chat_template"] = tok_config["chat_template"].replace("'<|end|>'", "'<|end|>\\n'")
    config_path.write_text(json.dumps(tok_config))
    with pytest.raises(ValueError, match="renders conversations differently"):
        train_sft(_config(str(other), max_steps=1), train_examples=_examples(2))


def test_the_validation_split_is_fixed_by_the_seed(model_dir):
    def val_loss(seed: int) -> float:
        rec = Recorder()
        # A rate of ~0 keeps the model at its base: val_loss then depends only on the split.
        config = _config(model_dir, max_steps=1, val_fraction=0.25, seed=seed, learning_rate=1e-12)
        train_sft(config, train_examples=_examples(8), callbacks=rec)
        return rec.metrics[-1]["val_loss"]

    assert val_loss(0) == val_loss(0)
    assert abs(val_loss(0) - val_loss(1)) > 1e-3  # another seed holds out other examples


def test_gradient_accumulation_matches_one_large_batch(model_dir):
    """Loss and gradient are means over every assistant token of the step, so two
    micro-batches of 2 give the same step as one batch of 4 (the same 4 rows)."""
    firsts = []
    for batch_size, grad_accum in ((4, 1), (2, 2)):
        rec = Recorder()
        config = _config(
            model_dir, max_steps=1, batch_size=batch_size, grad_accum=grad_accum, lora_dropout=0.0
        )
        train_sft(config, train_examples=_examples(8), callbacks=rec)
        firsts.append(rec.metrics[0])
    one, accumulated = firsts
    assert accumulated["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert accumulated["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
    assert accumulated["trained_tokens"] == one["trained_tokens"]


def test_epochs_mode_runs_every_row_the_given_number_of_times(model_dir):
    rec = Recorder()
    config = _config(
        model_dir, max_steps=None, epochs=2, batch_size=2, grad_accum=1, warmup_steps=0
    )
    result = train_sft(config, train_examples=_examples(5), callbacks=rec)
    # 5 rows in batches of 2: 3 batches (the last short) per epoch, 2 epochs.
    assert result.steps == 6 and [m["epoch"] for m in rec.metrics] == [0, 0, 0, 1, 1, 1]
    assert result.trained_tokens == rec.metrics[-1]["trained_tokens"]
    assert rec.metrics[2]["trained_tokens"] * 2 == result.trained_tokens  # same rows twice
    assert result.trained_tokens > 0


def test_training_writes_nothing_to_disk(model_dir, monkeypatch):
    """Examples arrive decrypted in memory; neither they nor anything derived from them
    (adapter, state) may reach a file. Python-level writers are guarded: open and os.open
    for writing, temporary files, torch.save to a path (its C++ writer bypasses open) and
    safetensors' save_file."""
    import builtins
    import os
    import tempfile

    import safetensors.torch

    real_open, real_os_open = builtins.open, os.open
    writes = []

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            writes.append(str(file))
            raise AssertionError(f"wrote {file}")
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            writes.append(str(path))
            raise AssertionError(f"wrote {path}")
        return real_os_open(path, flags, *args, **kwargs)

    def no_temp(*args, **kwargs):
        raise AssertionError("temporary file")

    real_torch_save = torch.save

    def guarded_torch_save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            writes.append(str(f))
            raise AssertionError(f"torch.save to {f}")
        return real_torch_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", guarded_torch_save)
    monkeypatch.setattr(safetensors.torch, "save_file", no_temp)
    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    for name in ("mkstemp", "mkdtemp", "NamedTemporaryFile", "TemporaryFile"):
        monkeypatch.setattr(tempfile, name, no_temp)
    rec = Recorder()
    result = train_sft(
        _config(model_dir, max_steps=2, checkpoint_every=1, val_fraction=0.25),
        train_examples=_examples(6),
        callbacks=rec,
    )
    assert result.status == "succeeded" and set(rec.checkpoints) == {1, 2}
    resumed = train_sft(
        _config(model_dir, max_steps=2, checkpoint_every=1, val_fraction=0.25),
        train_examples=_examples(6),
        resume_state=rec.checkpoints[1],
    )
    assert resumed.steps == 2 and writes == []


# ---- hooks for federated clients: frozen LoRA parts, an extra loss term, a warm base ------


def test_freeze_keeps_lora_a_at_its_start_and_out_of_the_optimizer(model_dir):
    start = train_sft(_config(model_dir, max_steps=1), train_examples=_examples(6))
    frozen = train_sft(
        _config(model_dir, freeze=("lora_A",)),
        train_examples=_examples(6),
        initial_adapter=start.adapter_files,
    )
    before, after = _adapter(start), _adapter(frozen)
    a_keys = [k for k in before if "lora_A" in k]
    b_keys = [k for k in before if "lora_B" in k]
    assert a_keys and b_keys
    for k in a_keys:  # bit for bit: A had no gradient and no optimizer step (no weight decay)
        assert torch.equal(before[k], after[k]), k
    assert max(float((after[k] - before[k]).abs().max()) for k in b_keys) > 1e-4

    # The same run without freezing moves A: the test above could fail.
    free = train_sft(
        _config(model_dir), train_examples=_examples(6), initial_adapter=start.adapter_files
    )
    assert max(float((_adapter(free)[k] - before[k]).abs().max()) for k in a_keys) > 1e-4

    # Weight decay would move a parameter in the optimizer even without a gradient.
    decayed = train_sft(
        _config(model_dir, freeze=("lora_A",), weight_decay=0.5),
        train_examples=_examples(6),
        initial_adapter=start.adapter_files,
    )
    for k in a_keys:
        assert torch.equal(before[k], _adapter(decayed)[k]), k


def test_freeze_refuses_names_that_match_nothing_or_everything(model_dir):
    with pytest.raises(ValueError, match="matches no LoRA parameter"):
        train_sft(_config(model_dir, freeze=("lora_C",)), train_examples=_examples(4))
    with pytest.raises(ValueError, match="leaves no LoRA parameter"):
        train_sft(_config(model_dir, freeze=("lora_",)), train_examples=_examples(4))
    with pytest.raises(ValueError, match="freeze"):
        _config(model_dir, freeze="lora_A").validate()


def test_a_frozen_run_resumes_exactly_and_refuses_an_unfrozen_state(model_dir):
    examples = _examples(8)
    full = train_sft(_config(model_dir, freeze=("lora_A",)), train_examples=examples)
    paused = train_sft(
        _config(model_dir, freeze=("lora_A",)), train_examples=examples, callbacks=Recorder(2)
    )
    resumed = train_sft(
        _config(model_dir, freeze=("lora_A",)), train_examples=examples, resume_state=paused.state
    )
    _assert_same_adapter(resumed, full)
    with pytest.raises(ValueError, match="freeze"):
        train_sft(_config(model_dir), train_examples=examples, resume_state=paused.state)


def test_extra_loss_is_added_to_the_objective_and_zero_changes_nothing(model_dir):
    examples = _examples(6)
    start = train_sft(_config(model_dir, max_steps=1), train_examples=examples)
    config = _config(model_dir, lora_dropout=0.0)
    plain = train_sft(config, train_examples=examples, initial_adapter=start.adapter_files)
    initial = {k: v.clone() for k, v in _adapter(start).items()}

    def pull_to_start(weight: float):
        def term(model):
            total = torch.zeros(())
            for name, p in model.named_parameters():
                if p.requires_grad:
                    key = name.replace(".default", "")
                    total = total + (p - initial[key]).pow(2).sum()
            return 0.5 * weight * total

        return term

    rec = Recorder()
    zero = train_sft(
        config,
        train_examples=examples,
        initial_adapter=start.adapter_files,
        extra_loss=pull_to_start(0.0),
        callbacks=rec,
    )
    for k, v in _adapter(plain).items():  # a zero term: the same adapter, bit for bit
        assert torch.equal(v, _adapter(zero)[k]), k
    assert all(m["extra_loss"] == 0.0 for m in rec.metrics)

    strong = train_sft(
        config,
        train_examples=examples,
        initial_adapter=start.adapter_files,
        extra_loss=pull_to_start(50.0),
    )

    def distance(result):
        t = _adapter(result)
        return sum(float((t[k] - initial[k]).pow(2).sum()) for k in t) ** 0.5

    assert distance(strong) < 0.8 * distance(plain), (distance(strong), distance(plain))


def test_a_given_base_model_and_tokenizer_are_used_and_left_unmodified(model_dir):
    from finetune.tokenizer import load_tokenizer

    base = inference.load_model(model_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    examples = _examples(6)
    loaded = train_sft(_config(model_dir), train_examples=examples)
    warm = train_sft(
        _config(model_dir),
        train_examples=examples,
        base_model=base,
        tokenizer=load_tokenizer(model_dir),
    )
    _assert_same_adapter(warm, loaded)
    again = train_sft(_config(model_dir), train_examples=examples, base_model=base)
    _assert_same_adapter(again, loaded)  # a second call on the same base: no adapter left on it
    assert not any("lora" in name for name, _ in base.named_modules())
    after = base.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():  # float8 has no torch.equal: compare the bytes
        assert torch.equal(v.view(torch.uint8), after[k].view(torch.uint8)), k


def test_the_loss_on_labelled_positions_only_equals_the_full_logits_loss_and_its_gradients(
    model_dir,
):
    # labelled_loss runs the vocabulary projection on the labelled rows alone (logits_at);
    # it must give token_loss's loss, hits and count, and the same adapter gradients.
    from finetune.sft import labelled_loss, token_loss

    model, peft_model = _adapted(model_dir)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (3, 24), generator=g)
    labels = ids.clone()
    labels[0, :10] = labels[1, :] = -100  # a prompt, and a row with nothing to learn
    labels[2, 5:9] = -100

    def run(fn):
        peft_model.zero_grad(set_to_none=True)
        loss, hits, count = fn()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        return loss.item(), int(hits), count, grads

    full = run(lambda: token_loss(peft_model(ids), labels))
    only = run(lambda: labelled_loss(peft_model, ids, labels))
    assert only[2] == full[2] == 14 + 19  # next-token targets: row 0 at 10..23, row 2 not 5..8
    assert only[1] == full[1]
    assert only[0] == pytest.approx(full[0], rel=1e-6)
    assert full[3] and full[3].keys() == only[3].keys()
    for name, grad in full[3].items():
        torch.testing.assert_close(only[3][name], grad, rtol=1e-5, atol=1e-8, msg=name)

    with torch.no_grad():
        rows = model(ids, logits_at=labels != -100)
        assert rows.shape == (int((labels != -100).sum()), 512)
        torch.testing.assert_close(rows, model(ids)[labels != -100])
        with pytest.raises(ValueError, match="logits_at must be a bool mask"):
            model(ids, logits_at=(labels != -100).long())
        with pytest.raises(ValueError, match="logits_at must be a bool mask"):
            model(ids, logits_at=torch.ones(3, 5, dtype=torch.bool))


def test_precision_and_weight_cache_are_checked_and_reported(model_dir):
    with pytest.raises(ValueError, match="SFTConfig.precision"):
        _config(model_dir, precision="fp16").validate()
    with pytest.raises(ValueError, match="SFTConfig.fp8_cache_mb"):
        _config(model_dir, fp8_cache_mb=-1).validate()
    examples = _examples(6)
    fp32 = train_sft(_config(model_dir, precision="fp32", max_steps=2), train_examples=examples)
    assert fp32.metrics["precision"] == "fp32"
    # Decoding per use or from the kept copy: the same float32 products, bit for bit.
    uncached = train_sft(
        _config(model_dir, precision="fp32", max_steps=2, fp8_cache_mb=0), train_examples=examples
    )
    assert all(torch.equal(_adapter(fp32)[k], v) for k, v in _adapter(uncached).items())
    bf16 = train_sft(_config(model_dir, precision="bf16", max_steps=2), train_examples=examples)
    assert bf16.metrics["precision"] == "bf16"
    assert bf16.metrics["loss"] == pytest.approx(fp32.metrics["loss"], rel=2e-2)
    assert bf16.metrics["loss"] != fp32.metrics["loss"]


def test_right_padding_is_skipped_with_the_padded_batchs_loss_and_gradients(model_dir):
    # With an attention mask of right padding, labelled_loss runs the rows' real tokens end
    # to end (Transformer.forward(segments=...)): the same loss, hits and adapter gradients
    # as the padded batch, within float32 summation order.
    from finetune.sft import labelled_loss

    model, peft_model = _adapted(model_dir)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 512, (3, 20), generator=g)
    lengths = torch.tensor([20, 13, 7])
    mask = (torch.arange(20) < lengths[:, None]).long()
    ids[mask == 0] = 2  # the pad id
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    labels[:, :3] = -100  # a prompt

    def run(*args):
        peft_model.zero_grad(set_to_none=True)
        loss, hits, count = labelled_loss(peft_model, ids, labels, *args)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        return loss.item(), int(hits), count, grads

    padded, skipped = run(), run(mask)
    assert skipped[2] == padded[2] == 17 + 10 + 4  # targets at positions 3..L-1
    assert skipped[1] == padded[1]
    assert skipped[0] == pytest.approx(padded[0], rel=1e-5)
    for name, grad in padded[3].items():
        assert ((skipped[3][name] - grad).norm() / grad.norm()).item() < 1e-5, name

    at = labels != -100
    with torch.no_grad():
        rows = [[n] for n in lengths.tolist()]
        torch.testing.assert_close(model(ids, logits_at=at, segments=rows), model(ids)[at])
        with pytest.raises(ValueError, match="segments needs logits_at"):
            model(ids, segments=rows)
        with pytest.raises(ValueError, match="selects padding"):
            model(ids, logits_at=torch.ones_like(at), segments=rows)
        with pytest.raises(ValueError, match="segments must give each of the 3 rows"):
            model(ids, logits_at=at, segments=[[20], [0], [7]])
        with pytest.raises(ValueError, match="segments must give each of the 3 rows"):
            model(ids, logits_at=at, segments=[[20], [13, 8], [7]])


def test_packed_examples_train_as_if_each_were_alone(model_dir):
    # A packed row (positions restarting at each example) runs its examples as separate
    # sequences: its loss and gradients are those of the examples in rows of their own.
    from finetune import data
    from finetune.sft import labelled_loss, row_segments

    _, peft_model = _adapted(model_dir)
    g = torch.Generator().manual_seed(2)
    encoded = []
    for n in (9, 14, 6):
        ids = [0, *torch.randint(3, 512, (n - 1,), generator=g).tolist()]  # bos first
        encoded.append((ids, [-100, -100, *ids[2:]]))
    packed, _ = data.pack_examples(encoded, 32, pack=True)
    alone, _ = data.pack_examples(encoded, 32, pack=False)
    assert len(packed) == 1 and len(alone) == 3

    def batch(rows):
        return [torch.tensor([getattr(r, k) for r in rows]) for k in data.PackedDataset.KEYS]

    def run(rows, plain=False):
        ids, labels, mask, positions = batch(rows)
        peft_model.zero_grad(set_to_none=True)
        args = () if plain else (mask, positions)
        loss, hits, count = labelled_loss(peft_model, ids, labels, *args)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        return loss.item(), count, grads

    assert row_segments(*batch(packed)[2:]) == [[9, 14, 6]]
    together, separate, plain_rows = run(packed), run(alone), run(alone, plain=True)
    assert together[1] == separate[1] == plain_rows[1] == 7 + 12 + 4
    assert together[0] == pytest.approx(plain_rows[0], rel=1e-5)
    for name, grad in plain_rows[2].items():
        assert ((together[2][name] - grad).norm() / grad.norm()).item() < 1e-5, name
    # Without the positions the row is one sequence: the examples see each other.
    ids, labels, mask, _ = batch(packed)
    crossed = labelled_loss(peft_model, ids, labels, mask)[0].item()
    assert abs(crossed - together[0]) > 1e-3 * abs(together[0])


def test_a_constant_schedule_holds_the_rate_after_warmup(model_dir):
    rates = []

    class Rates:
        def on_metrics(self, metrics):
            rates.append(metrics["lr"])

        def on_checkpoint(self, step, state):
            pass

        def should_stop(self):
            return None

    config = _config(model_dir, lr_schedule="constant", max_steps=5, warmup_steps=2)
    train_sft(config, train_examples=_examples(6), callbacks=Rates())
    assert rates[:2] == pytest.approx([1e-3, 2e-3]) and rates[2:] == [3e-3] * 3
    with pytest.raises(ValueError, match="SFTConfig.lr_schedule"):
        _config(model_dir, lr_schedule="linear").validate()


def test_token_accuracy_hits_are_the_argmax_hits():
    from finetune.sft import _hits

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 40, generator=g, requires_grad=True)
    targets = torch.randint(0, 40, (64,), generator=g)
    targets[::3] = logits.detach().argmax(-1)[::3]  # a third are hits for sure
    hits = _hits(logits, targets)
    assert int(hits) == int((logits.argmax(-1) == targets).sum()) >= 22
    assert not hits.requires_grad
