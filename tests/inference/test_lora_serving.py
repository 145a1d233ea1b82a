"""Multi-LoRA serving: adapters made with peft (through ``finetune.lora``) on the engine model
give peft's own logits through the absorbed-MLA path, and a batch mixing adapters gives
each row what its adapter gives alone."""

from __future__ import annotations

import pytest
import torch

from finetune.lora import adapter_files, apply_lora
from inference.checkpoint import load_model
from inference.decode import Chunk, LatentRunner
from inference.engine import Engine, Request
from inference.kv_cache import PagedLatentCache
from inference.lora import load_adapter
from inference.sampling import SamplingParams
from tests.inference.test_engine import make_model_dir, rel

PROMPT = [5, 40, 77, 12, 9, 200, 31]


def make_adapter(model_dir, out_dir, targets, seed):
    """A peft adapter with random (nonzero) A and B on ``targets``; returns (dir, PeftModel)."""
    peft_model = apply_lora(load_model(model_dir), targets=targets, r=4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    out_dir.mkdir(parents=True)
    for name, data in adapter_files(peft_model).items():
        (out_dir / name).write_bytes(data)
    return out_dir, peft_model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    model_dir = make_model_dir(root / "m")
    full = make_adapter(model_dir, root / "a_full", ("mla", "mlp", "experts", "router"), 1)
    mla = make_adapter(model_dir, root / "a_mla", ("mla",), 2)
    return model_dir, full, mla


def run(model, adapters, prompts, steps=3):
    """Prefill then ``steps`` greedy decode steps; returns per-sequence lists of logits."""
    c = model.config
    cache = PagedLatentCache(2, c.kv_lora_rank + c.qk_rope_head_dim, block_size=4, num_blocks=64)
    runner = LatentRunner(model, cache)
    seqs = [list(p) for p in prompts]
    tables = [
        cache.allocate(s, a.key if a else None)[0] for s, a in zip(seqs, adapters, strict=True)
    ]
    outs = [[] for _ in seqs]
    with torch.inference_mode():
        chunks = [Chunk(s, 0, t, a) for s, t, a in zip(seqs, tables, adapters, strict=True)]
        for _ in range(steps + 1):
            logits = runner.step(chunks)
            chunks = []
            for i, (s, t, a) in enumerate(zip(seqs, tables, adapters, strict=True)):
                outs[i].append(logits[i])
                s.append(int(logits[i].argmax()))
                cache.ensure_capacity(t, len(s))
                chunks.append(Chunk([s[-1]], len(s) - 1, t, a))
    return outs, seqs


def test_absorbed_path_with_adapter_matches_peft_forward(setup):
    model_dir, (full_dir, full_peft), (mla_dir, mla_peft) = setup
    model = load_model(model_dir)
    for adapter_dir, peft_model in ((full_dir, full_peft), (mla_dir, mla_peft)):
        adapter = load_adapter(adapter_dir, model, torch.float32, "cpu")
        outs, seqs = run(model, [adapter], [PROMPT])
        with torch.no_grad():
            ref = peft_model(torch.tensor([seqs[0]]))[0]
            base = model(torch.tensor([seqs[0]]))[0]
        for k, logits in enumerate(outs[0]):
            pos = len(PROMPT) - 1 + k
            assert rel(logits, ref[pos]) < 1e-4
            assert rel(ref[pos], base[pos]) > 1e-2  # the adapter really changes the output


def test_mixed_adapter_batch_equals_each_adapter_alone(setup):
    model_dir, (full_dir, _), (mla_dir, _) = setup
    model = load_model(model_dir)
    full = load_adapter(full_dir, model, torch.float32, "cpu")
    mla = load_adapter(mla_dir, model, torch.float32, "cpu")
    adapters = [full, None, mla, full]
    prompts = [PROMPT, PROMPT[:5], PROMPT[2:], [7, 8, 9, 10, 11, 12, 13, 14, 15]]
    mixed, _ = run(model, adapters, prompts)
    for a, p, got in zip(adapters, prompts, mixed, strict=True):
        alone, _ = run(model, [a], [p])
        for x, y in zip(got, alone[0], strict=True):
            assert rel(x, y) < 1e-5


def test_engine_serves_mixed_adapters_with_lru_budget(setup):
    model_dir, (full_dir, _), (mla_dir, _) = setup
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with Engine(model_dir, max_active_adapters=1, kv_cache_bytes=1 << 20) as eng:
        reqs = [
            Request(prompt_token_ids=PROMPT, sampling=sp, adapter=str(d) if d else None)
            for d in (full_dir, mla_dir, None, full_dir)
        ]
        outs = eng.generate(reqs)
        alone = [
            eng.generate([r])[0]
            for r in (
                Request(prompt_token_ids=PROMPT, sampling=sp, adapter=str(d) if d else None)
                for d in (full_dir, mla_dir, None, full_dir)
            )
        ]
        assert [o.token_ids for o in outs] == [o.token_ids for o in alone]
        assert outs[0].token_ids != outs[2].token_ids or outs[1].token_ids != outs[2].token_ids
        assert len(eng.adapters.loaded()) == 1
    bad = full_dir.parent / "not_an_adapter"
    bad.mkdir()
    with (
        Engine(model_dir, kv_cache_bytes=1 << 20) as eng,
        pytest.raises(ValueError, match="adapter"),
    ):
        eng.generate([Request(prompt_token_ids=PROMPT, adapter=str(bad))])
