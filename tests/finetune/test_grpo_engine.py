"""The serving engine serves the GRPO policy while it trains: the engine shares the training
model's FP8 base weights (``lora.base_view``) and takes the peft LoRA tensors as an
in-memory adapter (``Engine.register_adapter``), with the same greedy tokens and logits as
the peft-wrapped training model's full forward, and no stale weights or cached latents after
an update."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

import inference
from finetune import lora
from inference.engine import Engine, Request
from inference.fp8 import FP8Linear
from inference.lora import AdapterCache
from inference.sampling import SamplingParams
from tests.finetune.test_sft import build_model_dir, one_thread  # noqa: F401 (fixture)
from tests.inference.test_engine import rel
from tests.inference.test_lora_serving import run

PROMPT = [5, 40, 77, 12, 9, 200, 31, 8, 300, 41]
TARGETS = ("mla", "mlp", "experts", "router")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer_dir):
    return build_model_dir(tmp_path_factory.mktemp("grpo_engine_model"), tiny_tokenizer_dir)


def _policy(model_dir, seed: int):
    """A peft-wrapped FP8 training model with random nonzero LoRA weights on every target."""
    policy = lora.apply_lora(inference.load_model(model_dir), TARGETS, r=4, alpha=8)
    _randomize(policy, seed)
    return policy.eval()


def _randomize(policy, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _greedy_no_cache(policy, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """n greedy tokens by the training model's full forward (no KV cache), with each step's
    logits."""
    ids, logits = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            x = policy(torch.tensor([ids]))[0, -1].float()
            logits.append(x)
            ids.append(int(x.argmax()))
    return ids[len(prompt) :], logits


def test_base_view_shares_the_fp8_weights_and_leaves_the_training_model_alone(model_dir):
    policy = _policy(model_dir, 0)
    view = lora.base_view(policy)
    base = policy.get_base_model()
    assert not any("lora_" in n for n, _ in view.named_parameters())
    fp8 = [m for m in view.modules() if isinstance(m, FP8Linear)]
    assert fp8 and all(m.weight.dtype == torch.float8_e4m3fn for m in fp8)
    shared = {p.data_ptr() for p in base.parameters()}
    assert all(p.data_ptr() in shared for p in view.parameters())  # nothing copied
    adapted = lora.adapted_module_names(policy)
    assert any(n.endswith("mlp.gate") for n in adapted)  # the router too
    for n in adapted:  # peft's layer in the training model, the bare base layer in the view
        assert isinstance(base.get_submodule(n), BaseTunerLayer)
        assert view.get_submodule(n) is base.get_submodule(n).get_base_layer()
    with torch.no_grad():  # the view is the base model: the adapter disabled
        ids = torch.tensor([PROMPT])
        with policy.disable_adapter():
            want = policy(ids)
        assert torch.equal(view(ids), want)
        assert rel(policy(ids), want) > 1e-2  # while the training model keeps its adapter


def test_in_memory_adapter_logits_match_the_training_model_without_cache(model_dir):
    policy = _policy(model_dir, 1)
    view = lora.base_view(policy)
    cache = AdapterCache(view, 1, torch.float32, "cpu")
    key = cache.resolve(cache.register("policy", *lora.serving_state(policy)))
    adapter = cache.acquire(key)
    outs, seqs = run(view, [adapter], [PROMPT], steps=4)
    tokens, want = _greedy_no_cache(policy, PROMPT, 5)
    assert seqs[0][len(PROMPT) :] == tokens
    for got, ref in zip(outs[0], want, strict=True):
        assert rel(got, ref) < 1e-4


@pytest.mark.parametrize("wide", [False, True])
def test_engine_greedy_tokens_and_logprobs_match_the_training_model(model_dir, wide):
    policy = _policy(model_dir, 2)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, top_logprobs=5)
    view = lora.base_view(policy, wide=wide)
    if wide:  # dequantised copies in the view; the training model keeps its FP8 layers
        assert not any(isinstance(m, FP8Linear) for m in view.modules())
        assert any(isinstance(m, FP8Linear) for m in policy.modules())
    with Engine(model_dir, model=view, block_size=4) as engine:
        name = engine.register_adapter("policy", *lora.serving_state(policy))
        assert name == "memory:policy"
        served, base = engine.generate(
            [
                Request(prompt_token_ids=PROMPT, sampling=sp, adapter=name),
                Request(prompt_token_ids=PROMPT, sampling=sp),
            ]
        )
    tokens, logits = _greedy_no_cache(policy, PROMPT, 6)
    assert served.token_ids == tokens
    with policy.disable_adapter():
        base_tokens, _ = _greedy_no_cache(policy, PROMPT, 6)
    assert base.token_ids == base_tokens != tokens  # the base row in the same batch: no adapter
    for info, x in zip(served.logprobs, logits, strict=True):
        ref = x.log_softmax(-1)
        ids = torch.tensor([i for i, _ in info.top])
        got = torch.tensor([v for _, v in info.top])
        assert rel(got, ref[ids]) < 1e-4
        assert set(ids.tolist()) == set(ref.topk(5).indices.tolist())


def test_an_adapter_update_changes_what_the_engine_serves_with_no_stale_cache(model_dir):
    policy = _policy(model_dir, 3)
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=True)
    request = lambda name: Request(prompt_token_ids=PROMPT, sampling=sp, adapter=name)  # noqa: E731
    # block_size 4: the 10-token prompt fills two blocks that the prefix cache keeps
    with Engine(model_dir, model=lora.base_view(policy), block_size=4) as engine:
        name = engine.register_adapter("policy", *lora.serving_state(policy))
        [first] = engine.generate([request(name)])
        [again] = engine.generate([request(name)])  # served from the prefix cache
        assert again.token_ids == first.token_ids
        _randomize(policy, 4)  # the training step: new LoRA tensors in place
        [stale] = engine.generate([request(name)])  # not registered yet: the old weights
        assert stale.token_ids == first.token_ids
        engine.register_adapter("policy", *lora.serving_state(policy))
        [updated] = engine.generate([request(name)])
        tokens, logits = _greedy_no_cache(policy, PROMPT, 5)
        assert updated.token_ids == tokens != first.token_ids
        for info, x in zip(updated.logprobs, logits, strict=True):
            want = x.log_softmax(-1)[info.token_id]
            assert abs(info.logprob - want.item()) <= 1e-4 * want.abs().clamp(min=1).item()
        # only the current version is held; an unknown name is a clear error
        assert len(engine.adapters._versions) == 1
        engine.unregister_adapter("policy")
        with pytest.raises(ValueError, match="not registered"):
            engine.generate([request(name)])


def test_a_request_keeps_the_version_it_started_with(model_dir):
    policy = _policy(model_dir, 5)
    view = lora.base_view(policy)
    cache = AdapterCache(view, 1, torch.float32, "cpu")
    name = cache.register("policy", *lora.serving_state(policy))
    old_key = cache.resolve(name)  # a running request holds version 1
    _randomize(policy, 6)
    cache.register("policy", *lora.serving_state(policy))
    new_key = cache.resolve(name)
    assert old_key != new_key
    old, new = cache.acquire(old_key), cache.acquire(new_key)
    assert old.version == 1 and new.version == 2
    module = next(iter(old.weights))
    assert not torch.equal(old.weights[module][0], new.weights[module][0])
    cache.unref(old_key)  # the old request ended: version 1 is dropped
    assert set(cache._versions) == {new_key}
