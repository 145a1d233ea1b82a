"""Serving benchmark: Enclave's engine against transformers ``generate`` in the same run.

    .venv/bin/python bench/serving.py --config small      # models/configs/small.json
    .venv/bin/python bench/serving.py --config tiny
    .venv/bin/python bench/serving.py --smoke --out /tmp/s.json   # seconds; used by a test

Both sides load the same random weights (transformers builds them and ``save_pretrained``s
them; our ``load_model`` reads the directory), in float32 on the CPU. Measured:

- batch-1 decode tokens/s with a short and a long prompt (``--ctx``), ours vs transformers
  (``use_cache=True``, its default DynamicCache and SDPA attention);
- throughput with ``--concurrent`` requests: ours continuously batched (all submitted at
  once from threads), theirs one left-padded batch; TTFT p50/p99 under that load. Requests
  ask for different lengths (a quarter, half, three quarters or all of
  ``--concurrent-tokens``), as chat traffic does: a padded batch decodes until its longest
  member is done, a continuous batch lets each request leave when it is. Throughput counts
  the tokens the requests asked for, on both sides;
- FP8: the same checkpoint converted on load (``fp8=True``): batch-1 decode at the short
  context against transformers fp32, and resident weight bytes against our fp32 model;
- prefix sharing: requests whose prompts share a system prompt an earlier request used,
  against requests of the same lengths with nothing in common: prompt tokens computed,
  peak cache blocks and wall time (``--shared-prefix``);
- KV-cache bytes per token (ours must equal layers * (kv_lora_rank + rope dim) * 4);
- peak RSS of the process (both models live in it);
- the memory-bandwidth bound: active weight bytes per token (attention, dense MLP or
  shared + top-k experts, router, LM head) over measured copy bandwidth, and the fraction
  of it our batch-1 decode reaches.

Prints ratios and writes JSON to bench/results/serving-<config>.json (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inference.engine import Engine, Request  # noqa: E402
from inference.kv_cache import latent_bytes_per_token  # noqa: E402
from inference.sampling import SamplingParams  # noqa: E402


def build_checkpoint(config_path: Path, out: Path, seed: int = 0):
    """Random transformers DeepseekV3ForCausalLM for ``config_path``, saved into ``out``."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = json.loads(config_path.read_text())
    torch.manual_seed(seed)
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**cfg)).eval()
    with torch.no_grad():  # a nonzero correction bias, so routing is not uniform
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0, 0.01)
    hf.save_pretrained(str(out))
    hf.generation_config.eos_token_id = None  # decode exactly max_new_tokens
    hf.generation_config.pad_token_id = cfg.get("pad_token_id", 0)
    return hf


class _Clock:
    """A transformers streamer that timestamps every generated step."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:  # the first put is the prompt
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass


def hf_decode_rate(hf, prompt: list[int], n: int) -> float:
    clock = _Clock()
    with torch.inference_mode():
        hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            use_cache=True,
            streamer=clock,
        )
    return (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])


def our_decode_rate(engine: Engine, prompt: list[int], n: int) -> float:
    sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    times = []
    for delta in engine.stream(Request(prompt_token_ids=prompt, sampling=sp)):
        times += [time.perf_counter()] * len(delta.token_ids)
    return (len(times) - 1) / (times[-1] - times[0])


def hf_batch(hf, prompts: list[list[int]], lengths: list[int], pad: int) -> dict:
    n = max(lengths)  # one padded batch runs until its longest request is done
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as decoder-only generation wants
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    clock = _Clock()
    start = time.perf_counter()
    with torch.inference_mode():
        hf.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            use_cache=True,
            streamer=clock,
        )
    wall = time.perf_counter() - start
    ttft = clock.times[0] - start  # every request gets its first token at the same time
    return {"tokens_per_s": sum(lengths) / wall, "ttft_p50_s": ttft, "ttft_p99_s": ttft}


def our_concurrent(engine: Engine, prompts: list[list[int]], lengths: list[int]) -> dict:
    ttft: list[float] = []
    counts: list[int] = []
    lock = threading.Lock()

    def client(prompt, n):
        sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        t0 = time.perf_counter()
        first, total = None, 0
        for delta in engine.stream(Request(prompt_token_ids=prompt, sampling=sp)):
            if first is None and delta.token_ids:
                first = time.perf_counter() - t0
            total += len(delta.token_ids)
        with lock:
            ttft.append(first)
            counts.append(total)

    threads = [
        threading.Thread(target=client, args=(p, n)) for p, n in zip(prompts, lengths, strict=True)
    ]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttft.sort()
    return {
        "tokens_per_s": sum(counts) / wall,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p99_s": ttft[min(len(ttft) - 1, int(round(0.99 * (len(ttft) - 1))))],
    }


def prefix_sharing(engine: Engine, vocab: int, g: torch.Generator, prefix_len: int, n: int):
    """``n`` concurrent requests whose prompts start with one ``prefix_len``-token prefix (a
    shared system prompt, already used by an earlier request) against ``n`` requests of the
    same lengths with nothing in common: prompt tokens computed, peak cache blocks, wall."""
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    suffix = 16

    def run(prompts: list[list[int]]) -> dict:
        cache = engine.cache
        hits0 = cache.prefix_hit_tokens
        cache.reset_peak()
        t0 = time.perf_counter()
        engine.generate([Request(prompt_token_ids=p, sampling=sp) for p in prompts])
        wall = time.perf_counter() - t0
        hits = cache.prefix_hit_tokens - hits0
        prompt_tokens = sum(len(p) for p in prompts)
        return {
            "wall_s": wall,
            "prompt_tokens": prompt_tokens,
            "prompt_tokens_computed": prompt_tokens - hits,
            "peak_blocks": cache.peak_blocks_in_use,
        }

    def rand(k: int) -> list[int]:
        return torch.randint(3, vocab, (k,), generator=g).tolist()

    distinct = run([rand(prefix_len + suffix) for _ in range(n)])
    prefix = rand(prefix_len)
    engine.generate([Request(prompt_token_ids=prefix + rand(suffix), sampling=sp)])  # warm
    shared = run([prefix + rand(suffix) for _ in range(n)])
    return {
        "requests": n,
        "prefix_tokens": prefix_len,
        "suffix_tokens": suffix,
        "block_size": engine.cache.block_size,
        "distinct": distinct,
        "shared": shared,
        "blocks_saved": distinct["peak_blocks"] - shared["peak_blocks"],
        "speedup": distinct["wall_s"] / shared["wall_s"],
    }


def copy_bandwidth_bytes_per_s(mib: int = 256) -> float:
    """Best-of-5 bandwidth of a large tensor copy, counting bytes read plus bytes written."""
    src = torch.ones(mib << 18)  # float32: mib MiB
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer the model holds (float8 counts one byte)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def active_weight_bytes(c, elem: int = 4) -> int:
    """Weight bytes one decode token must read: attention, MLP (dense, or shared + top-k
    routed experts + router), norms, one embedding row and the LM head."""
    h = c.num_attention_heads
    if c.q_lora_rank is None:
        q = c.hidden_size * h * c.qk_head_dim
    else:
        q = c.hidden_size * c.q_lora_rank + c.q_lora_rank * h * c.qk_head_dim
    attn = (
        q
        + c.hidden_size * (c.kv_lora_rank + c.qk_rope_head_dim)
        + c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim)
        + h * c.v_head_dim * c.hidden_size
    )
    expert = 3 * c.hidden_size * c.moe_intermediate_size
    total = 0
    for i in range(c.num_hidden_layers):
        if i < c.first_k_dense_replace:
            mlp = 3 * c.hidden_size * c.intermediate_size
        else:
            mlp = expert * (c.num_experts_per_tok + c.n_shared_experts)
            mlp += c.n_routed_experts * c.hidden_size
        total += attn + mlp
    total += 2 * c.hidden_size + c.vocab_size * c.hidden_size
    return total * elem


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="small", help="name under models/configs/ or a path")
    ap.add_argument("--smoke", action="store_true", help="tiny config, few tokens")
    ap.add_argument("--ctx", type=int, nargs=2, default=[128, 2048], help="short, long prompt")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--concurrent", type=int, default=16)
    ap.add_argument("--concurrent-prompt", type=int, default=128)
    ap.add_argument(
        "--concurrent-tokens", type=int, default=128, help="the longest request's tokens"
    )
    ap.add_argument("--no-fp8", action="store_true", help="skip the FP8 engine")
    ap.add_argument(
        "--shared-prefix", type=int, default=512, help="tokens of the shared system prompt"
    )
    ap.add_argument("--max-batch-tokens", type=int, default=2048)
    ap.add_argument("--out", type=Path)
    ap.add_argument(
        "--threads", type=int, help="torch intra-op threads for both sides (default: torch's)"
    )
    args = ap.parse_args(argv)
    if args.threads:
        # Process-wide, and the same for both engines. On a CPU shared with other jobs, one
        # thread avoids OpenMP oversubscription that slows every op by an order of magnitude.
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.config = "tiny"
        args.ctx, args.decode_tokens = [16, 48], 4
        args.concurrent, args.concurrent_prompt, args.concurrent_tokens = 4, 40, 8
        args.shared_prefix = 48
    config_path = Path(args.config)
    if not config_path.is_file():
        config_path = ROOT / "models" / "configs" / f"{args.config}.json"
    name = config_path.stem
    out = args.out or ROOT / "bench" / "results" / f"serving-{name}.json"

    g = torch.Generator().manual_seed(0)
    tmp = tempfile.mkdtemp()  # kept until the FP8 side has loaded it too
    t0 = time.perf_counter()
    hf = build_checkpoint(config_path, Path(tmp))
    engine = Engine(
        tmp, max_batch_tokens=args.max_batch_tokens, kv_cache_bytes=256 << 20, max_num_seqs=64
    )
    setup_s = time.perf_counter() - t0
    c = engine.config
    vocab = c.vocab_size
    result: dict = {
        "config": name,
        "dtype": "float32",
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "setup_s": round(setup_s, 2),
        "command": " ".join(["bench/serving.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    try:
        decode = {}
        warm = torch.randint(3, vocab, (16,), generator=g).tolist()
        # Kernel choice for decode batches of 1-16 rows happens here, as a server does at
        # start-up, not inside the timed runs (transformers has no such step).
        result["kernel_warmup_s"] = round(engine.warm_up(), 2)
        our_decode_rate(engine, warm, 4)  # first-call costs (allocations, thread start-up)
        hf_decode_rate(hf, warm, 4)
        for ctx in args.ctx:
            prompt = torch.randint(3, vocab, (ctx,), generator=g).tolist()
            ours = our_decode_rate(engine, prompt, args.decode_tokens)
            theirs = hf_decode_rate(hf, prompt, args.decode_tokens)
            decode[str(ctx)] = {
                "ours_tokens_per_s": ours,
                "transformers_tokens_per_s": theirs,
                "ratio": ours / theirs,
            }
        result["batch1_decode"] = decode

        prompts = [
            torch.randint(
                3, vocab, (max(4, args.concurrent_prompt - (i % 4) * 8),), generator=g
            ).tolist()
            for i in range(args.concurrent)
        ]
        top = args.concurrent_tokens
        lengths = [max(1, top * (1 + i % 4) // 4) for i in range(args.concurrent)]
        ours = our_concurrent(engine, prompts, lengths)
        theirs = hf_batch(hf, prompts, lengths, c.pad_token_id or 0)
        result["concurrent"] = {
            "requests": args.concurrent,
            "prompt_tokens": [len(p) for p in prompts],
            "max_tokens": lengths,
            "ours": ours,
            "transformers": theirs,
            "throughput_ratio": ours["tokens_per_s"] / theirs["tokens_per_s"],
            "preemptions": engine.scheduler.total_preemptions,
        }

        result["prefix_sharing"] = prefix_sharing(
            engine, vocab, g, args.shared_prefix, args.concurrent // 2
        )

        ours_kv = engine.cache.pool.element_size() * engine.cache.width * c.num_hidden_layers
        result["kv_bytes_per_token"] = {
            "ours": ours_kv,
            "latent_formula": latent_bytes_per_token(c, torch.float32),
            "transformers": c.num_hidden_layers
            * c.num_attention_heads
            * (c.qk_head_dim + c.v_head_dim)
            * 4,
        }
        bw = copy_bandwidth_bytes_per_s()
        weights = active_weight_bytes(c)
        short = decode[str(args.ctx[0])]["ours_tokens_per_s"]
        result["bandwidth_bound"] = {
            "copy_bandwidth_gb_s": bw / 1e9,
            "active_weight_bytes_per_token": weights,
            "bound_tokens_per_s": bw / weights,
            "ours_fraction_of_bound": short / (bw / weights),
        }
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        fp32_weights = weight_bytes(engine.model)
    finally:
        engine.close()

    if not args.no_fp8:
        # Built only after the fp32 side is done: the two never hold memory at once.
        del engine
        short_prompt = torch.randint(3, vocab, (args.ctx[0],), generator=g).tolist()
        with Engine(tmp, fp8=True, kv_cache_bytes=64 << 20) as fp8_engine:
            # Warm-up: the FP8 dispatch times its kernels the first time it sees each shape.
            fp8_engine.warm_up()
            our_decode_rate(fp8_engine, short_prompt, 4)
            ours8 = our_decode_rate(fp8_engine, short_prompt, args.decode_tokens)
            fp8_weights = weight_bytes(fp8_engine.model)
        hf_decode_rate(hf, short_prompt, 4)  # the same warm-up, for symmetry
        theirs32 = hf_decode_rate(hf, short_prompt, args.decode_tokens)
        result["fp8"] = {
            "ctx": args.ctx[0],
            "ours_fp8_tokens_per_s": ours8,
            "transformers_fp32_tokens_per_s": theirs32,
            "ratio_vs_transformers_fp32": ours8 / theirs32,
            "weight_bytes": fp8_weights,
            "fp32_weight_bytes": fp32_weights,
            "weight_fraction_of_fp32": fp8_weights / fp32_weights,
        }

    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"serving benchmark, config {name} (fp32, cpu, {result['torch_threads']} threads)")
    for ctx, d in result["batch1_decode"].items():
        print(
            f"  batch-1 decode ctx {ctx:>5}: ours {d['ours_tokens_per_s']:8.1f} tok/s, "
            f"transformers {d['transformers_tokens_per_s']:8.1f} tok/s, ratio {d['ratio']:.2f}x"
        )
    cc = result["concurrent"]
    print(
        f"  {cc['requests']} concurrent: ours {cc['ours']['tokens_per_s']:.1f} tok/s, "
        f"transformers {cc['transformers']['tokens_per_s']:.1f} tok/s, "
        f"ratio {cc['throughput_ratio']:.2f}x; TTFT p50/p99 ours "
        f"{cc['ours']['ttft_p50_s']:.3f}/{cc['ours']['ttft_p99_s']:.3f} s, transformers "
        f"{cc['transformers']['ttft_p50_s']:.3f} s"
    )
    ps = result["prefix_sharing"]
    print(
        f"  shared {ps['prefix_tokens']}-token prefix, {ps['requests']} requests: prompt tokens "
        f"computed {ps['shared']['prompt_tokens_computed']} vs "
        f"{ps['distinct']['prompt_tokens_computed']} unshared, peak blocks "
        f"{ps['shared']['peak_blocks']} vs {ps['distinct']['peak_blocks']}, "
        f"{ps['speedup']:.2f}x faster"
    )
    kv = result["kv_bytes_per_token"]
    print(
        f"  KV bytes/token: ours {kv['ours']} (latent formula {kv['latent_formula']}), "
        f"transformers {kv['transformers']}"
    )
    bb = result["bandwidth_bound"]
    print(
        f"  bandwidth bound {bb['bound_tokens_per_s']:.1f} tok/s "
        f"({bb['copy_bandwidth_gb_s']:.1f} GB/s, {bb['active_weight_bytes_per_token'] / 2**20:.1f} "
        f"MiB/token); ours reaches {100 * bb['ours_fraction_of_bound']:.0f}%"
    )
    if "fp8" in result:
        f8 = result["fp8"]
        print(
            f"  FP8 batch-1 decode ctx {f8['ctx']}: {f8['ours_fp8_tokens_per_s']:.1f} tok/s, "
            f"{f8['ratio_vs_transformers_fp32']:.2f}x transformers fp32; FP8 weights "
            f"{f8['weight_fraction_of_fp32']:.3f} of fp32"
        )
    print(f"  peak RSS {result['peak_rss_mib']:.0f} MiB; JSON: {out}")
    return result


if __name__ == "__main__":
    main()
