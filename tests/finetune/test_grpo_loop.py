"""The GRPO training loop on a tiny FP8 model, sampling through the serving engine: the
update direction, metrics (with the share of each step spent generating), exact resume,
dynamic sampling and the domain suites' reward. (The CLI, ``python -m finetune grpo``, is
tested in test_cli_train.py.)"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as load_safetensors

import inference
from finetune import grpo, lora
from finetune.domains import SUITES
from finetune.domains import reward as domain_reward
from finetune.grpo import GRPOConfig, train_grpo
from tests.finetune.test_sft import Recorder, build_model_dir, one_thread  # noqa: F401 (fixture)

ITEMS = SUITES["finance"].generate(4, seed=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer_dir):
    return build_model_dir(tmp_path_factory.mktemp("grpo_model"), tiny_tokenizer_dir)


def _config(model_dir: str, **overrides) -> GRPOConfig:
    base = dict(
        model_path=model_dir,
        lora_r=4,
        learning_rate=1e-2,
        max_steps=3,
        prompts_per_step=2,
        group_size=4,
        max_prompt_len=16,
        max_completion_length=4,
    )
    return GRPOConfig(**{**base, **overrides})


def _shorter_is_better(text: str, item) -> float:
    return -len(text) / 10


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_one_update_moves_logprobs_towards_the_advantage(model_dir, loss_type):
    config = _config(model_dir, group_size=8, loss_type=loss_type)
    torch.manual_seed(0)
    policy = lora.apply_lora(inference.load_model(model_dir), r=4)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with grpo.sampling_engine(policy, config) as engine:
        adapter = engine.register_adapter("policy", *lora.serving_state(policy))
        [group] = grpo.sample_groups(
            engine, adapter, [[0, 4, 20, 30, 40, 1, 5]], [0], config, 1, 2, "cpu"
        )
    advantages = grpo.group_advantages(torch.arange(8.0), 8)
    with torch.no_grad():
        before = grpo._completion_logps(policy, group, 1.0)[0]
    grpo._update(
        policy, [group], [advantages], float(group.mask.sum()), config, optimizer, scheduler, params
    )
    with torch.no_grad():
        after = grpo._completion_logps(policy, group, 1.0)[0]
    moved = ((after - before) * group.mask).sum(1)
    # The best completion gains, the worst loses, and the whole move follows the advantage.
    assert moved[-1] > 0 > moved[0]
    assert (advantages * moved).sum() > 0


def test_metrics_and_pause_resume_in_a_fresh_model_match_an_uninterrupted_run(model_dir):
    # Dropout, a KL term and two iterations per batch: every piece of state matters.
    config = _config(model_dir, lora_dropout=0.1, beta=0.04, num_iterations=2)
    full_rec = Recorder()
    full = train_grpo(config, tasks=ITEMS, reward_fn=_shorter_is_better, callbacks=full_rec)
    assert full.status == "succeeded" and full.steps == 3 and len(full_rec.metrics) == 3
    m = full_rec.metrics[-1]
    for key in (
        "reward_mean",
        "reward_std",
        "frac_reward_zero_std",
        "kl",
        "entropy",
        "clip_ratio_low",
        "clip_ratio_high",
        "clip_ratio_region",
        "completion_length",
        "lr",
        "grad_norm",
        "generation_s",
        "step_s",
        "generation_share",
        "elapsed_s",
        "eta_s",
    ):
        assert isinstance(m[key], float), key
    for step in full_rec.metrics:  # the share of each step spent sampling in the engine
        assert 0 < step["generation_s"] < step["step_s"]
        assert step["generation_share"] == pytest.approx(step["generation_s"] / step["step_s"])
    assert m["groups_sampled"] == m["groups_kept"] == 2 and m["eta_s"] == 0
    assert 1 <= m["completion_length"] <= 4 and m["kl"] >= 0 and m["entropy"] > 0
    assert m["kl"] > 0  # the policy has moved away from the base model

    paused = train_grpo(
        config, tasks=ITEMS, reward_fn=_shorter_is_better, callbacks=Recorder(stop_at=1)
    )
    assert paused.status == "paused" and paused.steps == 1
    resumed = train_grpo(
        config, tasks=ITEMS, reward_fn=_shorter_is_better, resume_state=paused.state
    )
    a = load_safetensors(full.adapter_files["adapter_model.safetensors"])
    b = load_safetensors(resumed.adapter_files["adapter_model.safetensors"])
    assert set(a) == set(b)
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-6), name
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 0  # it did train


def test_dynamic_sampling_drops_groups_without_signal(model_dir):
    flat = {ITEMS[0].id, ITEMS[1].id}

    def reward(text, item):  # half the prompts give every completion the same reward
        if item.id in flat:
            return 0.5
        return None if len(text) > 12 else -len(text) / 10  # None: cannot score

    rec = Recorder()
    config = _config(model_dir, max_steps=2, dynamic_sampling=True, max_sampling_rounds=3)
    tasks = [item.to_dict() for item in ITEMS]  # the JSON form is accepted too
    train_grpo(config, tasks=tasks, reward_fn=reward, callbacks=rec)
    for m in rec.metrics:
        assert m["groups_kept"] <= 2 < m["groups_sampled"] or m["groups_sampled"] == 2
        assert m["frac_reward_zero_std"] == pytest.approx(
            (m["groups_sampled"] - m["groups_kept"]) / m["groups_sampled"]
        )
    assert sum(m["groups_sampled"] - m["groups_kept"] for m in rec.metrics) > 0
    assert all(m["reward_mean"] == m["reward_mean"] for m in rec.metrics)  # NaN-free means
    assert any(m["unscorable_fraction"] > 0 for m in rec.metrics)


def test_the_default_reward_is_the_domain_suites_and_no_signal_means_no_update(model_dir):
    # A random model never writes <think>...</think><answer>...</answer>: every reward is 0,
    # so every group is flat, dynamic sampling keeps none and the adapter stays at its start.
    rec = Recorder()
    config = _config(model_dir, max_steps=1, dynamic_sampling=True, max_sampling_rounds=2)
    result = train_grpo(config, tasks=ITEMS, callbacks=rec)
    m = rec.metrics[0]
    assert m["reward_mean"] == 0 and m["frac_reward_zero_std"] == 1
    assert m["groups_kept"] == 0 and m["groups_sampled"] == 4
    tensors = load_safetensors(result.adapter_files["adapter_model.safetensors"])
    assert all(torch.all(t == 0) for k, t in tensors.items() if "lora_B" in k)
    # The same default reward gives an item's reference completion the full 1.0.
    assert domain_reward(ITEMS[0].reference, ITEMS[0]) == 1.0
