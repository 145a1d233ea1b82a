"""Secure aggregation: correct sums, uniform-looking masked inputs, dropouts, aborts, replay."""

import math

import numpy as np
import pytest

from federated.secagg import (
    FixedPoint,
    SecAggAborted,
    SecAggClient,
    SecAggError,
    SecAggServer,
    mask_stream,
    pairwise_seed,
    run_round,
    secagg_overhead,
    shamir_combine,
    shamir_split,
    weighted_mean,
    weighted_payload,
)

IDS = [3, 7, 11, 19, 42]


def _vectors(n=400, seed=0):
    rng = np.random.default_rng(seed)
    return {c: rng.uniform(-1, 1, n) for c in IDS}


def _setup(round_id="fed/run/1", threshold=3, n=64, fp=None, ids=IDS):
    fp = fp or FixedPoint.for_sum(1.0, len(ids))
    server = SecAggServer(round_id, threshold, n, fp)
    clients = {c: SecAggClient(c, round_id, threshold, fp) for c in ids}
    for c, cl in clients.items():
        server.receive_advertisement(c, cl.advertise_keys())
    roster = server.close_advertise()
    for c, cl in clients.items():
        server.receive_shares(c, cl.share_keys(roster))
    return server, clients, server.close_share_keys(), roster


def _chi2_upper(df, z=4.75):
    # Wilson-Hilferty quantile of chi-square; z=4.75 is a one-sided p of about 1e-6.
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _byte_chi2(arr):
    counts = np.bincount(np.frombuffer(arr.tobytes(), dtype=np.uint8), minlength=256)
    expected = counts.sum() / 256
    return float(((counts - expected) ** 2 / expected).sum())


def _ks_uniform(u):
    u = np.sort(u)
    k = np.arange(1, len(u) + 1) / len(u)
    return float(max(np.max(k - u), np.max(u - (k - 1 / len(u)))))


def test_secure_weighted_sum_equals_fedavg_within_quantisation_error():
    vectors = _vectors()
    weights = {c: w for c, w in zip(IDS, [0.1, 0.5, 1.0, 0.25, 0.8], strict=True)}
    fp = FixedPoint.for_sum(1.0, len(IDS))
    payloads = {c: weighted_payload(vectors[c], weights[c]) for c in IDS}
    total = run_round(payloads, "fed/run/1", 3, fp)
    mean = weighted_mean(total)
    expected = np.average([vectors[c] for c in IDS], axis=0, weights=[weights[c] for c in IDS])
    # Each member's rounding is <= 0.5 / scale per coordinate, in numerator and denominator.
    bound = 2 * len(IDS) / fp.scale / sum(weights.values())
    assert np.max(np.abs(mean - expected)) <= bound
    assert np.max(np.abs(total[:-1] - sum(payloads[c][:-1] for c in IDS))) <= len(IDS) / fp.scale


def test_sum_with_64_bit_modulus():
    vectors = _vectors(100)
    fp = FixedPoint.for_sum(1.0, len(IDS), bits=64)
    total = run_round(vectors, "fed/run/64", 3, fp)
    # 64-bit sums are finer than float64: the float rounding of the result dominates.
    assert np.max(np.abs(total - sum(vectors.values()))) <= len(IDS) / fp.scale + 1e-14
    assert fp.frac_bits > 55


def test_masked_update_is_indistinguishable_from_uniform_while_plain_update_is_not():
    n = 20000
    vectors = {c: np.random.default_rng(c).normal(0, 0.05, n) for c in IDS}
    server, clients, inboxes, _ = _setup(n=n)
    fp = server.fixed_point
    masked = clients[3].masked_input(vectors[3], inboxes[3])
    plain = fp.quantize(vectors[3])
    limit = _chi2_upper(255)
    assert _byte_chi2(masked) < limit
    assert _byte_chi2(plain) > 10 * limit
    # Kolmogorov-Smirnov of the values / 2^32 against U[0, 1); critical value at p ~ 1e-6.
    ks_limit = math.sqrt(-math.log(0.5e-6) / (2 * n))
    assert _ks_uniform(masked.astype(np.float64) / 2**32) < ks_limit
    assert _ks_uniform(plain.astype(np.float64) / 2**32) > 10 * ks_limit


def test_member_dropping_before_its_masked_input_is_recovered_from_shares():
    vectors = _vectors()
    fp = FixedPoint.for_sum(1.0, len(IDS))
    total = run_round(vectors, "fed/run/2", 3, fp, drop_before_masking={7, 42})
    expected = sum(vectors[c] for c in IDS if c not in {7, 42})
    assert np.max(np.abs(total - expected)) <= len(IDS) / fp.scale


def test_member_dropping_after_masking_is_still_summed_via_its_self_mask_shares():
    vectors = _vectors()
    fp = FixedPoint.for_sum(1.0, len(IDS))
    total = run_round(vectors, "fed/run/3", 3, fp, drop_before_masking={19}, drop_before_unmask={3})
    expected = sum(vectors[c] for c in IDS if c != 19)
    assert np.max(np.abs(total - expected)) <= len(IDS) / fp.scale


def test_too_few_masked_inputs_aborts_and_yields_no_sum():
    server, clients, inboxes, _ = _setup(threshold=4)
    for c in IDS[:3]:
        server.receive_masked_input(c, clients[c].masked_input(np.zeros(64), inboxes[c]))
    with pytest.raises(SecAggAborted, match="threshold is 4"):
        server.close_masked_input()
    with pytest.raises(SecAggError):
        server.finalize()


def test_too_few_unmask_responses_aborts():
    server, clients, inboxes, _ = _setup(threshold=3)
    for c in IDS:
        server.receive_masked_input(c, clients[c].masked_input(np.ones(64) * 0.5, inboxes[c]))
    request = server.close_masked_input()
    for c in IDS[:2]:
        server.receive_unmask(c, clients[c].unmask(request))
    with pytest.raises(SecAggAborted, match="answered the unmask request"):
        server.finalize()


def test_client_refuses_to_unmask_below_threshold_or_twice():
    server, clients, inboxes, _ = _setup(threshold=3)
    for c in IDS:
        clients[c].masked_input(np.zeros(64), inboxes[c])
    with pytest.raises(SecAggAborted):
        clients[3].unmask({"survivors": [3, 7]})
    response = clients[7].unmask({"survivors": [3, 7, 11]})
    # Survivors' self-mask shares, dropped members' key shares: never both for one member.
    assert set(response) == {"b/3", "b/7", "b/11", "s/19", "s/42"}
    with pytest.raises(SecAggError):
        clients[7].unmask({"survivors": IDS})


def test_server_rejects_an_unmask_response_revealing_the_wrong_secret():
    server, clients, inboxes, _ = _setup(threshold=3)
    for c in IDS[:4]:
        server.receive_masked_input(c, clients[c].masked_input(np.zeros(64), inboxes[c]))
    request = server.close_masked_input()
    response = clients[3].unmask(request)
    response["s/7"] = response.pop("b/7")  # a key share for a survivor
    server.receive_unmask(3, response)
    assert 3 in server.rejected


def test_tampered_share_ciphertext_is_rejected():
    _, clients, inboxes, _ = _setup()
    inbox = dict(inboxes[3])
    blob = bytearray(inbox["7"])
    blob[20] ^= 1
    inbox["7"] = bytes(blob)
    with pytest.raises(SecAggError, match="failed authentication"):
        clients[3].masked_input(np.zeros(64), inbox)


def test_share_ciphertext_relabelled_as_from_another_member_is_rejected():
    _, clients, inboxes, _ = _setup()
    inbox = dict(inboxes[3])
    inbox["7"], inbox["11"] = inbox["11"], inbox["7"]
    with pytest.raises(SecAggError):
        clients[3].masked_input(np.zeros(64), inbox)


def test_share_ciphertext_replayed_into_next_round_fails_even_with_the_same_keys():
    _, clients1, inboxes1, roster = _setup(round_id="fed/run/1")
    fp = FixedPoint.for_sum(1.0, len(IDS))
    # Round 2 with the very same key pairs (worst case: a member reusing keys).
    server2 = SecAggServer("fed/run/2", 3, 64, fp)
    clients2 = {c: SecAggClient(c, "fed/run/2", 3, fp) for c in IDS}
    for c in IDS:
        clients2[c]._enc_key = clients1[c]._enc_key
        clients2[c]._mask_key = clients1[c]._mask_key
        server2.receive_advertisement(c, clients2[c].advertise_keys())
    assert server2.close_advertise() == roster
    for c in IDS:
        clients2[c].share_keys(roster)
    with pytest.raises(SecAggError, match="failed authentication"):
        clients2[3].masked_input(np.zeros(64), inboxes1[3])


def test_masks_are_bound_to_the_round():
    secret = bytes(range(32))
    assert pairwise_seed(secret, "r1", 1, 2) == pairwise_seed(secret, "r1", 2, 1)
    assert pairwise_seed(secret, "r1", 1, 2) != pairwise_seed(secret, "r2", 1, 2)
    a = mask_stream(secret, "r1", b"self", 1000, np.dtype(np.uint32))
    b = mask_stream(secret, "r2", b"self", 1000, np.dtype(np.uint32))
    assert np.mean(a == b) < 0.01


def test_masked_input_replayed_into_next_round_does_not_unmask():
    vectors = _vectors(64)
    server1, clients1, inboxes1, _ = _setup(round_id="fed/run/1")
    old = clients1[3].masked_input(vectors[3], inboxes1[3])
    server2, clients2, inboxes2, _ = _setup(round_id="fed/run/2")
    for c in IDS:
        fresh = clients2[c].masked_input(vectors[c], inboxes2[c])
        server2.receive_masked_input(c, old if c == 3 else fresh)
    request = server2.close_masked_input()
    for c in IDS:
        server2.receive_unmask(c, clients2[c].unmask(request))
    total = server2.finalize()
    # The stale round-1 masks stay in: the result is noise, not the true sum.
    assert np.max(np.abs(total - sum(vectors.values()))) > 1.0


def test_shamir_any_t_shares_recover_and_fewer_or_corrupt_shares_fail():
    secret = bytes(range(1, 33))
    shares = shamir_split(secret, 3, [1, 2, 3, 4, 5])
    assert shamir_combine({x: shares[x] for x in (1, 4, 5)}, 3) == secret
    assert shamir_combine({x: shares[x] for x in (2, 3, 5)}, 3) == secret
    with pytest.raises(SecAggAborted):
        shamir_combine({x: shares[x] for x in (1, 2)}, 3)
    bad = dict(shares)
    bad[5] = (bad[5] + 1) % (2**521 - 1)
    with pytest.raises(SecAggError, match="inconsistent"):
        shamir_combine(bad, 3)


def test_fixed_point_sum_never_wraps_at_its_capacity():
    fp = FixedPoint.for_sum(2.0, 1000)
    assert fp.max_clients() >= 1000
    top = fp.quantize(np.full(3, 5.0))  # clipped to +2
    total = np.zeros(3, dtype=fp.dtype)
    for _ in range(1000):
        total += top
    assert np.allclose(fp.dequantize(total), 2000.0)
    with pytest.raises(ValueError):
        fp.quantize(np.array([np.nan]))


def test_secagg_overhead_reports_client_and_server_seconds():
    out = secagg_overhead(4, 1000, dropouts=1)
    assert out["client_s"] > 0 and out["server_s"] > 0


def test_late_masked_input_of_a_dropped_member_stays_hidden_by_its_self_mask():
    # Sec. 3.3: the server learns a dropped member's mask key, so without the self mask a
    # late (or withheld) masked input would be exposed. Strip its pairwise masks with the
    # reconstructed key, as a curious server could: the rest is still uniform noise.
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )

    n = 20000
    server, clients, inboxes, roster = _setup(n=n)
    late = 42
    secret_input = np.random.default_rng(9).normal(0, 0.05, n)
    for c in IDS:
        if c != late:
            server.receive_masked_input(c, clients[c].masked_input(np.zeros(n), inboxes[c]))
    late_masked = clients[late].masked_input(secret_input, inboxes[late])
    request = server.close_masked_input()
    responses = {c: clients[c].unmask(request) for c in request["survivors"]}
    shares = {c + 1: int.from_bytes(r[f"s/{late}"], "big") for c, r in responses.items()}
    late_key = X25519PrivateKey.from_private_bytes(shamir_combine(shares, 3))
    stripped = late_masked.copy()
    for peer in IDS:
        if peer == late:
            continue
        shared = late_key.exchange(X25519PublicKey.from_public_bytes(roster[str(peer)][32:]))
        seed = pairwise_seed(shared, server.round_id, late, peer)
        mask = mask_stream(seed, server.round_id, b"pairwise", n, np.dtype(np.uint32))
        stripped = stripped - mask if late < peer else stripped + mask
    fp = server.fixed_point
    assert _byte_chi2(stripped) < _chi2_upper(255)
    # Sanity: stripping the self mask too (which the server never gets) reveals the input.
    self_mask = mask_stream(clients[late]._self_seed, server.round_id, b"self", n, fp.dtype)
    assert np.allclose(fp.dequantize(stripped - self_mask), secret_input, atol=1 / fp.scale)
