"""The paged latent cache: block accounting, prefix sharing, preemption under memory pressure."""

from __future__ import annotations

import pytest

from inference.engine import Engine, Request
from inference.kv_cache import PagedLatentCache
from inference.sampling import SamplingParams
from tests.inference.test_engine import greedy_reference, make_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("kv") / "tiny")


def test_pool_is_sized_from_bytes_and_blocks_are_refcounted():
    cache = PagedLatentCache(2, 10, block_size=4, kv_cache_bytes=2 * 4 * 10 * 4 * 5 + 7)
    assert cache.num_blocks == 5 and cache.pool.shape == (2, 20, 10)
    table, cached = cache.allocate(list(range(9)))  # 3 blocks
    assert cached == 0 and len(table) == 3 and cache.num_free_blocks == 2
    assert cache.allocate(list(range(50, 70))) is None  # 5 blocks do not fit: nothing taken
    assert cache.num_free_blocks == 2
    cache.commit_full_blocks(table, list(range(9)), 9, None, 0)
    # Same prefix: the two full blocks are shared, the partial third one is not.
    table2, cached2 = cache.allocate(list(range(8)) + [99, 98])
    assert table2[:2] == table[:2] and cached2 == 8 and table2[2] != table[2]
    assert cache.refcount[table[0]] == 2
    # The counters: 8 prompt tokens came from the cache; 4 distinct blocks are held.
    assert cache.prefix_hit_tokens == 8
    assert cache.blocks_in_use == cache.peak_blocks_in_use == 4
    # Another adapter never shares (its latents differ).
    assert cache.allocate(list(range(9)), adapter_key="other") is None
    cache.free(table)
    assert cache.refcount[table[0]] == 1 and cache.num_free_blocks == 2
    cache.free(table2)
    assert cache.num_free_blocks == 5
    assert cache.peak_blocks_in_use == 4 and cache.blocks_in_use == 0
    cache.reset_peak()
    assert cache.peak_blocks_in_use == 0
    # Freed hashed blocks stay findable until reused.
    table3, cached3 = cache.allocate(list(range(8)) + [5])
    assert cached3 == 8 and table3[:2] == table[:2]
    with pytest.raises(ValueError, match="no block"):
        PagedLatentCache(2, 10, block_size=4, kv_cache_bytes=100)


def test_identical_prompt_prefixes_share_blocks_and_skip_compute(model_dir):
    prefix = list(range(3, 3 + 40))  # 2 full blocks of 16 and a partial one
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with Engine(model_dir, max_batch_tokens=256, kv_cache_bytes=1 << 20) as eng:
        a = eng.stream(Request(prompt_token_ids=prefix + [50], sampling=sp))
        first = next(a)  # a's prompt is in the cache; a is still running
        seq_a = next(iter(eng._seqs.values()))
        b_req = Request(prompt_token_ids=prefix + [60, 61], sampling=sp, request_id="b")
        b_stream = eng.stream(b_req)
        b_first = next(b_stream)
        seq_b = eng._seqs["b"]
        assert seq_b.block_table[:2] == seq_a.block_table[:2]
        assert eng.cache.refcount[seq_a.block_table[0]] == 2
        rest_a = [t for d in [first, *a] for t in d.token_ids]
        rest_b = [t for d in [b_first, *b_stream] for t in d.token_ids]
        # Sharing changes nothing in the results.
        assert rest_a == greedy_reference(eng.model, prefix + [50], 4)
        assert rest_b == greedy_reference(eng.model, prefix + [60, 61], 4)
        assert all(r == 0 for r in eng.cache.refcount)


def test_one_prompt_sampled_n_times_in_one_batch_is_computed_once(model_dir):
    """Requests arriving together with the same prompt (GRPO's groups, n samples): the first
    one's prefill publishes the full blocks, the others wait one step and take them, so the
    prompt's full blocks are computed once, not n times, and the results are unchanged."""
    prompt = list(range(3, 3 + 40))  # 2 full blocks of 16, then 8 tokens
    other = list(range(100, 140))  # a different prompt in the same batch is not held back
    sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    with Engine(model_dir, max_batch_tokens=512, kv_cache_bytes=1 << 20) as eng:
        out = eng.generate(
            [Request(prompt_token_ids=p, sampling=sp) for p in [prompt] * 4 + [other]]
        )
        # Three of the four copies took both full blocks from the cache; `other` shares none.
        assert eng.cache.prefix_hit_tokens == 3 * 32
        assert [c.token_ids for c in out[:4]] == [greedy_reference(eng.model, prompt, 3)] * 4
        assert out[4].token_ids == greedy_reference(eng.model, other, 3)
        # A prompt shorter than one full block has nothing to share: no one waits.
        steps = eng.steps
        eng.generate([Request(prompt_token_ids=[5, 6, 7], sampling=sp) for _ in range(3)])
        assert eng.steps - steps == 3  # prefill + 2 decode steps, all three together


def test_out_of_blocks_preempts_and_recomputes_never_fails(model_dir):
    # 6 blocks of 16 tokens: three 20-token prompts fit, but not their growth to 60 tokens.
    probe = Engine(model_dir, kv_cache_bytes=1 << 20)
    per_block = probe.cache.bytes_per_block
    probe.close()
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = [[3 + i] * 20 for i in range(3)]
    with Engine(model_dir, max_batch_tokens=64, kv_cache_bytes=6 * per_block) as eng:
        assert eng.cache.num_blocks == 6
        outs = eng.generate([Request(prompt_token_ids=p, sampling=sp) for p in prompts])
        assert eng.scheduler.total_preemptions > 0
        for p, out in zip(prompts, outs, strict=True):
            assert out.finish_reason == "length"
            assert out.token_ids == greedy_reference(eng.model, p, 40)
        # A request that alone outgrows the whole cache ends "length", not an error.
        long = eng.generate(
            [
                Request(
                    prompt_token_ids=[5] * 90,
                    sampling=SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),
                )
            ]
        )[0]
        assert long.finish_reason == "length" and 0 < long.usage.completion_tokens < 30
