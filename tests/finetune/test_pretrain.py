"""finetune.pretrain on a toy size: the loss falls, and the written directory is a DeepSeek-V3
FP8 checkpoint with tokenizer and chat template that the serving engine can run."""

import json

import pytest
import torch
from safetensors import safe_open

from finetune.pretrain import PretrainConfig, documents, model_config, train_pretrain
from finetune.tokenizer import BOS, EOS

# A toy DeepSeek-V3 shape: MLA, one dense layer then MoE (4 experts in 2 groups, top-2).
TOY = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "n_routed_experts": 4,
    "n_group": 2,
    "topk_group": 1,
}


class Recorder:
    def __init__(self, stop_after=None):
        self.metrics, self.stop_after = [], stop_after

    def on_metrics(self, metrics):
        self.metrics.append(metrics)

    def on_checkpoint(self, step, state):
        pass

    def should_stop(self):
        if self.stop_after is not None and len(self.metrics) >= self.stop_after:
            return "cancel"
        return None


def build_toy_model(out, tokenizer_dir):
    """A 2-step toy model: enough for code paths that need a real checkpoint."""
    config = PretrainConfig(
        out_dir=str(out),
        overrides=TOY,
        steps=2,
        batch_size=2,
        seq_len=32,
        tokenizer_dir=str(tokenizer_dir),
    )
    train_pretrain(config, Recorder())
    return out


def toy_config(out, tokenizer_dir, **changes):
    fields = dict(
        out_dir=str(out),
        overrides=TOY,
        steps=12,
        batch_size=4,
        seq_len=48,
        learning_rate=1e-2,
        warmup_steps=2,
        tokenizer_dir=str(tokenizer_dir),
        log_every=1,
        threads=1,
    )
    fields.update(changes)
    return PretrainConfig(**fields)


def test_pretrain_lowers_loss_and_writes_fp8_checkpoint(tmp_path, tiny_tokenizer_dir):
    out = tmp_path / "toy"
    recorder = Recorder()
    result = train_pretrain(toy_config(out, tiny_tokenizer_dir), recorder)

    assert result.status == "completed" and result.steps == 12
    assert [m["step"] for m in recorder.metrics] == list(range(1, 13))
    first, last = recorder.metrics[0]["loss"], recorder.metrics[-1]["loss"]
    assert last < first - 0.5, (first, last)  # 12 steps at lr 1e-2 learn the unigram stats
    assert result.trained_tokens == 12 * 4 * 48

    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    assert config["hidden_size"] == 64 and config["n_routed_experts"] == 4
    assert not out.with_name("toy.fp32").exists()  # the float32 work copy is removed
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("lm_head.weight").dtype == torch.float8_e4m3fn
        expert = "model.layers.1.mlp.experts.3.up_proj.weight"
        assert f.get_tensor(expert).dtype == torch.float8_e4m3fn
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        # The balancing bias moved away from zero: aux-loss-free routing ran.
        bias = f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias")
        assert bias.abs().sum() > 0
    assert "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv" in names
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert "<|assistant|>" in tok_config["chat_template"]
    assert (out / "tokenizer.json").is_file()
    assert json.loads((out / "pretrain_config.json").read_text())["steps"] == 12
    assert result.size_bytes == (out / "model.safetensors").stat().st_size

    # The serving engine loads and runs it, chat template included.
    from inference.engine import Engine, Request
    from inference.sampling import SamplingParams

    with Engine(out) as engine:
        done = engine.generate(
            [
                Request(
                    messages=[{"role": "user", "content": "BMI?"}],
                    sampling=SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
                )
            ]
        )
    assert len(done[0].token_ids) == 5


def test_pretrain_is_deterministic_and_cancellable(tmp_path, tiny_tokenizer_dir):
    a = train_pretrain(toy_config(tmp_path / "a", tiny_tokenizer_dir, steps=3), Recorder())
    b = train_pretrain(toy_config(tmp_path / "b", tiny_tokenizer_dir, steps=3), Recorder())
    assert a.metrics["loss"] == b.metrics["loss"]
    blob_a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert blob_a == (tmp_path / "b" / "model.safetensors").read_bytes()

    stopped = train_pretrain(
        toy_config(tmp_path / "c", tiny_tokenizer_dir, steps=10), Recorder(stop_after=2)
    )
    assert stopped.status == "cancelled" and stopped.steps == 2
    assert (tmp_path / "c" / "model.safetensors").is_file()  # weights so far are kept


def test_documents_mix_and_framing():
    docs = documents(corpus_seed=0, chat_share=0.5)
    sample = [next(docs) for _ in range(400)]
    assert all(d.startswith(BOS) and d.endswith(EOS) for d in sample)
    chats = [d for d in sample if "<|assistant|>" in d]
    # generate_corpus makes 2 of 5 documents chats; half of those are kept.
    share = len(chats) / len(sample)
    assert 0.15 < share < 0.35, share
    assert any("<answer>" in d for d in chats)
    # Every family of both suites is in the stream (generate_corpus alone holds only two
    # per suite), judged by each family's own question wording.
    openings = [
        "A loan of",
        "is deposited at",
        "Balance sheet of",
        "Headline:",
        "A patient weighing",
        "An adult weighs",
        "serum creatinine",
        "presents with",
    ]
    for opening in openings:
        assert any(opening in d for d in chats), opening


def test_bad_override_is_a_value_error(tmp_path):
    config = PretrainConfig(out_dir=str(tmp_path), overrides={"n_group": 3})
    with pytest.raises(ValueError, match="n_group"):
        model_config(config)
    with pytest.raises(ValueError, match="chat_share"):
        PretrainConfig(out_dir=str(tmp_path), chat_share=0.0).validate()
