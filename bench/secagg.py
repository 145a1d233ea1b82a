"""Secure aggregation per round: ours (federated.secagg) against Flower's SecAgg+, in one run.

    python bench/secagg.py                         # 3 members, the bench adapter's size
    python bench/secagg.py --members 3 5 10 --dropouts 1 --out DIR

What is compared, and why not end to end: Flower's SecAgg+ exists only on its legacy stack
(``flwr.server.workflow.SecAggPlusWorkflow`` driving ``flwr.client.mod.secaggplus_mod``
through a LegacyContext and ``fit`` instructions), which our Message-API apps do not run.
So this measures the protocol's computation, not its messages:

  ours     ``federated.secagg``: X25519 + HKDF, ChaCha20 mask streams, AES-GCM share
           encryption, Shamir over a 256-bit prime field, 32-bit fixed point. The whole
           round through ``secagg.secagg_overhead`` (every client stage and the server).
  flower   SecAgg+'s client stages run verbatim (``secaggplus_mod._setup``,
           ``_share_keys``, ``_collect_masked_vectors``, ``_unmask``: SECP384R1 ECDH,
           Fernet, its Shamir, stochastic quantisation, masks from numpy's Mersenne Twister
           seeded with 32 bits); its server side (``SecAggPlusWorkflow``'s unmask stage)
           rebuilt from the same primitives it calls: ``combine_shares``, ``pseudo_rand_gen``,
           ``generate_shared_key``, the modular sum, dequantisation.

Both are timed on the same update size (``--vector-len``, default the LoRA adapter of
``bench/federated.py``: models/enclave-tiny, rank 4, MLA + MLP) and member count, with
``--dropouts`` members vanishing after sharing keys (the server then rebuilds their masks).
Reported: mean client seconds per member, server seconds, and ours / flower (below 1 means
ours is faster). The plain weighted sum is the anchor for both. JSON to ``<out>/secagg.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def adapter_size(model_path: str, r: int = 4) -> int:
    """Parameters of a rank-r LoRA on MLA + MLP of ``model_path`` (the bench's adapter)."""
    import inference
    from finetune import lora

    model = lora.apply_lora(inference.load_model(model_path), ("mla", "mlp"), r=r, alpha=2 * r)
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def flower_round(n: int, vector_len: int, dropouts: int, seed: int = 0) -> dict:
    """One SecAgg+ round: Flower's client code verbatim, its server step from its primitives."""
    import flwr.client.mod.secure_aggregation.secaggplus_mod  # noqa: F401 (the module, not the function)

    mod = sys.modules["flwr.client.mod.secure_aggregation.secaggplus_mod"]
    from flwr.common import ndarrays_to_parameters
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_extract,
        parameters_addition,
        parameters_mod,
        parameters_subtraction,
    )
    from flwr.common.secure_aggregation.quantization import dequantize
    from flwr.common.secure_aggregation.secaggplus_constants import Key
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
    from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

    rng = np.random.default_rng(seed)
    ids = list(range(1, n + 1))
    vectors = {c: rng.uniform(-1, 1, vector_len) for c in ids}
    threshold = max(2, n // 2 + 1)
    # SecAggPlusWorkflow's defaults: clipping 8, quantisation range 2^22, modulus 2^32.
    clip, target, mod_range, max_weight = 8.0, 1 << 22, 1 << 32, 1.0
    setup_cfg = {
        Key.SAMPLE_NUMBER: n,
        Key.SHARE_NUMBER: n,
        Key.THRESHOLD: threshold,
        Key.CLIPPING_RANGE: clip,
        Key.TARGET_RANGE: target,
        Key.MOD_RANGE: mod_range,
        Key.MAX_WEIGHT: max_weight,
    }
    states = {c: mod.SecAggPlusState(nid=c) for c in ids}
    client_s = server_s = 0.0

    def timed(fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        return out, time.perf_counter() - start

    keys = {}
    for c in ids:
        out, dt = timed(mod._setup, states[c], dict(setup_cfg))
        client_s += dt
        keys[str(c)] = (out[Key.PUBLIC_KEY_1], out[Key.PUBLIC_KEY_2])
    inbox: dict[int, tuple[list, list]] = {c: ([], []) for c in ids}
    for c in ids:
        out, dt = timed(mod._share_keys, states[c], dict(keys))
        client_s += dt
        start = time.perf_counter()
        for dst, ctxt in zip(out[Key.DESTINATION_LIST], out[Key.CIPHERTEXT_LIST], strict=True):
            inbox[dst][0].append(c)
            inbox[dst][1].append(ctxt)
        server_s += time.perf_counter() - start
    dropped = set(ids[:dropouts])
    survivors = [c for c in ids if c not in dropped]
    masked = {}
    for c in survivors:
        cfg = {Key.SOURCE_LIST: inbox[c][0], Key.CIPHERTEXT_LIST: inbox[c][1]}
        params = ndarrays_to_parameters([vectors[c]])
        out, dt = timed(mod._collect_masked_vectors, states[c], cfg, 1, params)
        client_s += dt
        masked[c] = out[Key.MASKED_PARAMETERS]
    shares: dict[int, list[bytes]] = {c: [] for c in ids}
    for c in survivors:
        cfg = {Key.ACTIVE_NODE_ID_LIST: survivors, Key.DEAD_NODE_ID_LIST: sorted(dropped)}
        out, dt = timed(mod._unmask, states[c], cfg)
        client_s += dt
        for nid, share in zip(out[Key.NODE_ID_LIST], out[Key.SHARE_LIST], strict=True):
            shares[nid].append(share)

    # The server: SecAggPlusWorkflow.unmask_stage's arithmetic.
    from flwr.common import bytes_to_ndarray

    start = time.perf_counter()
    # Each masked input is [weight factor, vector] (factor_combine), masks cover both.
    inputs = [[bytes_to_ndarray(b) for b in masked[c]] for c in survivors]
    dims = [a.shape for a in inputs[0]]
    total = [sum(arrays) for arrays in zip(*inputs, strict=True)]
    for c in survivors:
        seed_bytes = combine_shares(shares[c][:threshold])
        total = parameters_subtraction(total, pseudo_rand_gen(seed_bytes, mod_range, dims))
    for d in dropped:
        sk1 = bytes_to_private_key(combine_shares(shares[d][:threshold]))
        for c in survivors:
            pk1 = bytes_to_public_key(keys[str(c)][0])
            pair = pseudo_rand_gen(generate_shared_key(sk1, pk1), mod_range, dims)
            if d > c:  # the workflow's rule for a dropped member's pairwise masks
                total = parameters_addition(total, pair)
            else:
                total = parameters_subtraction(total, pair)
    total = parameters_mod(total, mod_range)
    q_total_ratio, total = factor_extract(total)
    mean = dequantize(total, clip, target)[0]
    mean = (mean - (len(survivors) - 1) * clip) * (target / q_total_ratio)
    server_s += time.perf_counter() - start
    plain = np.mean([vectors[c] for c in survivors], axis=0)
    error = float(np.max(np.abs(mean - plain)))
    if error > 1e-3:  # the reconstruction must be SecAgg+'s, or the timing means nothing
        raise AssertionError(f"SecAgg+ round did not recover the mean (max error {error})")
    return {"client_s": client_s / n, "server_s": server_s, "max_abs_error": error}


def ours_round(n: int, vector_len: int, dropouts: int) -> dict:
    from federated import secagg

    return secagg.secagg_overhead(n, vector_len, dropouts=dropouts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, nargs="+", default=[3])
    parser.add_argument("--vector-len", type=int, help="default: the bench adapter's size")
    parser.add_argument("--model", default=str(REPO / "models" / "enclave-tiny"))
    parser.add_argument("--dropouts", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many rounds")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args()
    vector_len = args.vector_len or adapter_size(args.model)
    rows = []
    for n in args.members:
        if args.dropouts >= n - 1:
            parser.error(f"--dropouts must leave at least two of {n} members")
        ours = min((ours_round(n, vector_len, args.dropouts) for _ in range(args.repeats)),
                   key=lambda r: r["client_s"] + r["server_s"])  # fmt: skip
        flower = min((flower_round(n, vector_len, args.dropouts) for _ in range(args.repeats)),
                     key=lambda r: r["client_s"] + r["server_s"])  # fmt: skip
        row = {
            "members": n,
            "dropouts": args.dropouts,
            "vector_len": vector_len,
            "ours": ours,
            "flower_secaggplus": flower,
            "client_ratio": ours["client_s"] / flower["client_s"],
            "server_ratio": ours["server_s"] / flower["server_s"],
        }
        rows.append(row)
        print(
            f"members={n} dropouts={args.dropouts} vector={vector_len}: client/member "
            f"ours {ours['client_s'] * 1e3:.1f} ms, SecAgg+ {flower['client_s'] * 1e3:.1f} ms "
            f"(ratio {row['client_ratio']:.2f}); server ours {ours['server_s'] * 1e3:.1f} ms, "
            f"SecAgg+ {flower['server_s'] * 1e3:.1f} ms (ratio {row['server_ratio']:.2f}); "
            f"plain sum {ours['plain_sum_s'] * 1e3:.2f} ms"
        )
    report = {
        "what": "per-round secure-aggregation compute, ours vs Flower SecAgg+ (client stages "
        "verbatim, server unmask from its primitives); not end to end (legacy stack only)",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "secagg.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
