"""The serving engine: latent decode against the full forward, continuous batching, streaming,
cancellation, validation, threads and asyncio.

Fixtures build a random two-layer DeepSeek-V3 checkpoint with transformers and a small
byte-level BPE tokenizer (the project's special tokens) trained in-test; other serving
tests import ``make_model_dir`` from here.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from inference.chat import IncrementalDetokenizer
from inference.checkpoint import load_model
from inference.decode import Chunk, LatentRunner
from inference.engine import Engine, Request
from inference.fp8 import FP8Linear
from inference.kv_cache import PagedLatentCache, latent_bytes_per_token
from inference.sampling import SamplingParams
from tests.inference.hf_factory import hf_model, save_hf

SPECIALS = ["<|bos|>", "<|end|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
TINY = {"vocab_size": 320, "num_hidden_layers": 2, "max_position_embeddings": 128}
TEXTS = [
    f"{w} {i} naïve café 世界 {w[::-1]} the quick brown fox jumps"
    for i, w in enumerate(["hello", "world", "alpha", "beta", "gamma", "delta", "loan"] * 40)
]


def make_tokenizer(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS, trainer=trainer)
    return tok


def make_model_dir(path: Path, overrides: dict | None = None, seed: int = 0) -> Path:
    """A random tiny DeepSeek-V3 checkpoint plus tokenizer.json in ``path``."""
    cfg = {**TINY, **(overrides or {})}
    save_hf(hf_model(cfg, seed=seed), path)
    make_tokenizer(cfg["vocab_size"]).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|bos|>", "eos_token": "<|end|>"})
    )
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("engine") / "tiny")


@pytest.fixture(scope="module")
def engine(model_dir):
    with Engine(model_dir, max_batch_tokens=64, kv_cache_bytes=1 << 20) as e:
        yield e


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ---- 1. latent decode ------------------------------------------------------------------


def test_latent_decode_matches_full_forward_over_steps_and_ragged_batch(model_dir):
    model = load_model(model_dir)
    c = model.config
    cache = PagedLatentCache(2, c.kv_lora_rank + c.qk_rope_head_dim, block_size=4, num_blocks=40)
    runner = LatentRunner(model, cache)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, c.vocab_size, (n,), generator=g).tolist() for n in (3, 11, 6)]
    tables = [cache.allocate(s)[0] for s in seqs]
    with torch.inference_mode():
        # Prefill: seq 1 in two chunks, the first without logits (chunked prefill).
        first = runner.step(
            [Chunk(seqs[0], 0, tables[0]), Chunk(seqs[1][:7], 0, tables[1], logits=False)]
        )
        second = runner.step([Chunk(seqs[1][7:], 7, tables[1]), Chunk(seqs[2], 0, tables[2])])
        prefill = [first[0], second[0], second[1]]
        for s, logits in zip(seqs, prefill, strict=True):
            ref = model(torch.tensor([s]))[0, -1]
            assert rel(logits, ref) < 1e-4
            s.append(int(logits.argmax()))
        for _ in range(4):  # decode steps, all three sequences batched, different lengths
            for s, t in zip(seqs, tables, strict=True):
                assert cache.ensure_capacity(t, len(s))
            out = runner.step(
                [Chunk([s[-1]], len(s) - 1, t) for s, t in zip(seqs, tables, strict=True)]
            )
            for s, logits in zip(seqs, out, strict=True):
                ref = model(torch.tensor([s]))[0, -1]
                assert rel(logits, ref) < 1e-4
                assert int(logits.argmax()) == int(ref.argmax())
                s.append(int(logits.argmax()))


def test_cache_keeps_only_latent_and_rope_key(engine):
    c = engine.config
    width = c.kv_lora_rank + c.qk_rope_head_dim
    assert engine.cache.pool.shape[-1] == width
    assert latent_bytes_per_token(c, torch.float32) == c.num_hidden_layers * width * 4
    per_token = engine.cache.pool.numel() * 4 // (engine.cache.num_blocks * engine.cache.block_size)
    assert per_token == latent_bytes_per_token(c, torch.float32)


# ---- 3. the engine ---------------------------------------------------------------------


def test_greedy_generation_equals_argmax_of_full_forward(engine):
    prompts = [[5, 17, 40, 2 + i, 99] * (i + 1) for i in range(3)]
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = engine.generate([Request(prompt_token_ids=p, sampling=sp) for p in prompts])
    for p, out in zip(prompts, outs, strict=True):
        assert out.token_ids == greedy_reference(engine.model, p, 6)
        assert out.finish_reason == "length"
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(p), 6)


def test_requests_join_running_batch_and_long_prompt_is_chunked(model_dir):
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    long_prompt = list(range(3, 90))  # 87 tokens, budget 16 per step: six prefill chunks
    with Engine(model_dir, max_batch_tokens=16, kv_cache_bytes=1 << 20) as eng:
        first = eng.stream(Request(prompt_token_ids=[7, 8, 9], sampling=sp))
        got = [next(first)]  # the first request is decoding ...
        steps_before = eng.steps
        late = eng.generate([Request(prompt_token_ids=long_prompt, sampling=sp)])[0]
        got += list(first)  # ... and kept decoding while the long prompt was prefilled
        ids = [t for d in got for t in d.token_ids]
        assert ids == greedy_reference(eng.model, [7, 8, 9], 12)
        assert late.token_ids == greedy_reference(eng.model, long_prompt, 12)
        assert eng.steps - steps_before >= 6 + 11


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine):
    sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=8)
    alone = engine.generate([Request(prompt_token_ids=[4, 5, 6], sampling=sp)])[0]
    others = [
        Request(prompt_token_ids=[9] * (3 + i), sampling=SamplingParams(seed=i, max_tokens=5))
        for i in range(3)
    ]
    crowd = engine.generate([*others, Request(prompt_token_ids=[4, 5, 6], sampling=sp)])[-1]
    assert crowd.token_ids == alone.token_ids
    other_seed = SamplingParams(temperature=1.0, seed=99, max_tokens=8, ignore_eos=True)
    outs = {
        tuple(
            engine.generate([Request(prompt_token_ids=[4, 5, 6], sampling=other_seed)])[0].token_ids
        )
        for _ in range(2)
    }
    assert len(outs) == 1


def test_stream_text_equals_final_text_and_stop_rules(engine):
    sp = SamplingParams(temperature=0.8, seed=3, max_tokens=10, ignore_eos=True)
    req = Request(prompt="hello world", sampling=sp)
    deltas = list(engine.stream(req))
    assert deltas[-1].finish_reason == "length" and deltas[-1].usage.completion_tokens == 10
    ids = [t for d in deltas for t in d.token_ids]
    assert "".join(d.text for d in deltas) == engine.tokenizer.decode(ids)
    assert all(d.finish_reason is None for d in deltas[:-1])
    # stop_token_ids: stop at the third generated token of the same seeded run
    stop_id = ids[2]
    sp2 = SamplingParams(
        temperature=0.8, seed=3, max_tokens=10, ignore_eos=True, stop_token_ids=[stop_id]
    )
    out = engine.generate([Request(prompt="hello world", sampling=sp2)])[0]
    assert out.finish_reason == "stop" and out.token_ids == ids[: ids.index(stop_id) + 1]
    # stop string: the text ends before it
    full = engine.tokenizer.decode(ids)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    if stop.strip():
        sp3 = SamplingParams(temperature=0.8, seed=3, max_tokens=10, ignore_eos=True, stop=[stop])
        out = engine.generate([Request(prompt="hello world", sampling=sp3)])[0]
        assert out.finish_reason == "stop" and out.text == full[: full.index(stop)]


def test_incremental_detokenizer_never_splits_utf8(engine):
    text = "naïve café 世界 🙂 done"
    ids = engine.tokenizer.encode(text).ids
    detok = IncrementalDetokenizer(engine.tokenizer)
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert len(ids) > len(text.encode()) // 4  # byte-level pieces really were involved


def test_logprobs_are_log_softmax_of_the_model(engine):
    sp = SamplingParams(temperature=0, max_tokens=3, logprobs=True, top_logprobs=2, ignore_eos=True)
    out = engine.generate([Request(prompt_token_ids=[3, 4, 5], sampling=sp)])[0]
    assert [lp.token_id for lp in out.logprobs] == out.token_ids
    with torch.no_grad():
        ref = engine.model(torch.tensor([[3, 4, 5]]))[0, -1].log_softmax(-1)
    assert abs(out.logprobs[0].logprob - ref.max().item()) < 1e-4
    assert out.logprobs[0].top[0][0] == out.token_ids[0] and len(out.logprobs[0].top) == 2


def test_cancel_by_id_and_by_closing_the_stream(engine):
    sp = SamplingParams(max_tokens=100, ignore_eos=True, seed=0)
    it = engine.stream(Request(prompt_token_ids=[3, 4], sampling=sp, request_id="c1"))
    next(it)
    engine.cancel("c1")
    rest = list(it)
    assert rest[-1].finish_reason == "cancelled"
    assert rest[-1].usage.completion_tokens < 100
    it2 = engine.stream(Request(prompt_token_ids=[3, 4], sampling=sp, request_id="c2"))
    next(it2)
    it2.close()
    out = engine.generate([Request(prompt_token_ids=[3], sampling=SamplingParams(max_tokens=2))])
    assert out[0].usage.completion_tokens <= 2
    assert "c2" not in engine._seqs and engine.scheduler.running == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt_token_ids": list(range(3, 131))}, "context"),
        ({"prompt_token_ids": [3], "sampling": SamplingParams(max_tokens=-1)}, "max_tokens"),
        ({"prompt_token_ids": [3], "sampling": SamplingParams(temperature=1e6)}, "temperature"),
        ({"prompt_token_ids": [3], "sampling": SamplingParams(top_p=1.5)}, "top_p"),
        ({"prompt_token_ids": [3], "adapter": "/nonexistent/adapter"}, "adapter"),
        ({"prompt": "a", "prompt_token_ids": [3]}, "exactly one"),
        ({"prompt_token_ids": [10_000]}, "vocabulary"),
    ],
)
def test_invalid_requests_raise_clear_value_errors(engine, kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine.generate([Request(**kwargs)])


def test_many_threads_and_an_asyncio_loop_share_the_engine(engine):
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    expected = greedy_reference(engine.model, [6, 7, 8], 5)
    results, errors = [], []

    def worker():
        try:
            results.append(engine.generate([Request(prompt_token_ids=[6, 7, 8], sampling=sp)])[0])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()

    async def main():
        async def one():
            return [
                d async for d in engine.astream(Request(prompt_token_ids=[6, 7, 8], sampling=sp))
            ]

        return await asyncio.gather(one(), one())

    streamed = asyncio.run(main())
    for t in threads:
        t.join()
    assert not errors and len(results) == 4
    assert all(r.token_ids == expected for r in results)
    assert all([t for d in s for t in d.token_ids] == expected for s in streamed)


def test_cli_streams_a_completion(model_dir, capsys):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "inference", "generate", "--model", str(model_dir)]
    cmd += ["--prompt", "hello", "--max-tokens", "5", "--seed", "1", "--temperature", "0.7"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "completion tokens]" in done.stderr and done.stdout.endswith("\n")
    from inference.__main__ import main

    assert main(["generate", "--model", str(model_dir), "--prompt", "x", "--max-tokens", "-1"]) == 2
    assert "max_tokens" in capsys.readouterr().err


def test_fp8_weights_decode_like_the_fp8_full_forward(model_dir):
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with Engine(model_dir, fp8=True, kv_cache_bytes=1 << 20) as eng:
        assert eng.model.config.quantization_config is not None
        out = eng.generate([Request(prompt_token_ids=[3, 9, 27, 81], sampling=sp)])[0]
        assert out.token_ids == greedy_reference(eng.model, [3, 9, 27, 81], 4)


def test_warm_up_chooses_every_decode_sized_kernel_before_serving(model_dir):
    # float32 (the measured float32 dispatch) and FP8 (the FP8 dispatch): after warm_up,
    # serving batches of 1-16 rows measures nothing new, and the output is unchanged.
    sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    prompts = [[3, 9, 27, 81], [5, 6], [7] * 9]
    for fp8 in (False, True):
        with Engine(model_dir, fp8=fp8, kv_cache_bytes=1 << 20) as eng:
            before = [
                o.token_ids
                for o in eng.generate([Request(prompt_token_ids=p, sampling=sp) for p in prompts])
            ]
        with Engine(model_dir, fp8=fp8, kv_cache_bytes=1 << 20) as eng:
            fp8_layers = [m for m in eng.model.modules() if isinstance(m, FP8Linear)]
            kernels = fp8_layers[0].kernels if fp8 else eng.model.linear_kernels
            assert eng.warm_up(max_rows=4) >= 0
            warmed = {k for k in kernels.choice if (k[0] if not fp8 else k[2]) <= 4}
            rows = {k[0] if not fp8 else k[2] for k in warmed}
            assert rows == {1, 2, 4} and len(warmed) >= 3 * 4  # every linear shape, each size
            outs = eng.generate([Request(prompt_token_ids=p, sampling=sp) for p in prompts])
            decode_keys = {k for k in kernels.choice if (k[0] if not fp8 else k[2]) <= 4}
            assert decode_keys == warmed  # decoding 3 sequences measured nothing new
            assert [o.token_ids for o in outs] == before
