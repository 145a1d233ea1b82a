"""LoRA aggregation: FedAvg/FedAdam/FedProx, exact LoRA modes, robustness to a poisoned member."""

import numpy as np
import pytest
import torch

from federated.aggregation import (
    FedAdam,
    RejectedUpdate,
    aggregate,
    aggregate_lora,
    fedavg,
    fedprox_penalty,
    ffa_lora_aggregate,
    krum_select,
    lora_pairs,
    naive_lora_error,
    svd_lora_aggregate,
    update_norm,
)

MODULES = ["model.layers.0.self_attn.q_a_proj", "model.layers.0.mlp.down_proj"]
R, IN, OUT = 4, 24, 16


def _adapter(rng, shared_a=None):
    out = {}
    for i, m in enumerate(MODULES):
        out[f"{m}.lora_A.weight"] = (
            shared_a[i] if shared_a is not None else rng.normal(0, 1, (R, IN))
        ).astype(np.float32)
        out[f"{m}.lora_B.weight"] = rng.normal(0, 1, (OUT, R)).astype(np.float32)
    return out


def _product(params, m):
    return params[f"{m}.lora_B.weight"].astype(np.float64) @ params[f"{m}.lora_A.weight"].astype(
        np.float64
    )


def _avg_product(updates, weights, m):
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    return sum(wi * _product(u, m) for wi, u in zip(w, updates, strict=True))


def _rel(x, y):
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


def test_fedavg_is_the_example_weighted_mean_and_keeps_dtype():
    a = {"x": np.array([0.0, 2.0], dtype=np.float32)}
    b = {"x": torch.tensor([4.0, 6.0])}
    out = fedavg([a, b], [1, 3])
    assert np.allclose(out["x"], [3.0, 5.0]) and out["x"].dtype == np.float32


def test_lora_pairs_handles_saved_and_in_memory_peft_names():
    keys = ["m.q.lora_A.weight", "m.q.lora_B.weight", "m.k.lora_A.default.weight"]
    keys.append("m.k.lora_B.default.weight")
    assert lora_pairs(keys) == {
        "m.q": ("m.q.lora_A.weight", "m.q.lora_B.weight"),
        "m.k": ("m.k.lora_A.default.weight", "m.k.lora_B.default.weight"),
    }
    with pytest.raises(ValueError):
        lora_pairs(["m.q.lora_A.weight"])


def test_naive_averaging_is_inexact_but_ffa_and_svd_are_exact():
    rng = np.random.default_rng(0)
    weights = [10, 30, 20, 40]
    clients = [_adapter(rng) for _ in weights]
    naive = naive_lora_error(clients, weights)
    assert naive["__total__"] > 0.05
    avg = fedavg(clients, weights)
    m = MODULES[0]
    assert _rel(_product(avg, m), _avg_product(clients, weights, m)) == pytest.approx(
        naive[m], rel=1e-4
    )

    # FFA-LoRA: common frozen A, only B differs -> exact.
    shared = [rng.normal(0, 1, (R, IN)) for _ in MODULES]
    ffa_clients = [_adapter(rng, shared) for _ in weights]
    assert naive_lora_error(ffa_clients, weights)["__total__"] < 1e-6
    ffa = ffa_lora_aggregate(ffa_clients, weights)
    for m in MODULES:
        assert _rel(_product(ffa, m), _avg_product(ffa_clients, weights, m)) < 1e-6

    # SVD re-factoring at full rank (n * r) is exact; truncation error reported as ~0.
    full, err = svd_lora_aggregate(clients, weights, rank=R * len(weights))
    assert err["__max__"] < 1e-6
    for m in MODULES:
        assert _rel(_product(full, m), _avg_product(clients, weights, m)) < 1e-6


def test_svd_truncation_error_is_the_actual_error_at_rank_r():
    rng = np.random.default_rng(1)
    weights = [1, 2, 3]
    clients = [_adapter(rng) for _ in weights]
    out, err = svd_lora_aggregate(clients, weights)  # back to rank R
    for m in MODULES:
        assert out[f"{m}.lora_A.weight"].shape == (R, IN)
        assert out[f"{m}.lora_B.weight"].shape == (OUT, R)
        actual = _rel(_product(out, m), _avg_product(clients, weights, m))
        assert actual == pytest.approx(err[m], abs=1e-5)
        # Eckart-Young: the best rank-R error beats naive averaging.
        assert err[m] <= naive_lora_error(clients, weights)[m]


def test_fedprox_penalty_value_and_gradient():
    w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    g = np.array([0.0, 2.0, 5.0], dtype=np.float32)
    loss = fedprox_penalty({"p": w}, {"p": g}, mu=0.5)
    assert loss.item() == pytest.approx(0.25 * (1 + 0 + 4))
    loss.backward()
    assert torch.allclose(w.grad, 0.5 * (w.detach() - torch.from_numpy(g)))


def test_fedadam_follows_reddi_algorithm_2_across_rounds():
    opt = FedAdam(eta=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    x0 = {"p": np.array([1.0, -1.0])}
    agg = {"p": np.array([1.5, -1.0])}
    x1 = opt.step(x0, agg)
    d = np.array([0.5, 0.0])
    m, v = 0.1 * d, 0.01 * d**2
    assert np.allclose(x1["p"], x0["p"] + 0.1 * m / (np.sqrt(v) + 1e-3))
    state = opt.state_dict()
    resumed = FedAdam(eta=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    resumed.load_state_dict(state)
    x2a, x2b = opt.step(x1, x0), resumed.step(x1, x0)
    assert np.allclose(x2a["p"], x2b["p"]) and resumed.rounds == 2
    assert not np.allclose(x2a["p"], FedAdam(eta=0.1).step(x1, x0)["p"])  # momentum carried


def _honest_and_poisoned(rng, n_honest=6):
    global_params = _adapter(rng)
    direction = {k: rng.normal(0, 0.1, v.shape) for k, v in global_params.items()}
    honest = {
        i: {
            k: global_params[k] + direction[k] + rng.normal(0, 0.01, v.shape)
            for k, v in direction.items()
        }
        for i in range(n_honest)
    }
    honest_mean = {k: np.mean([h[k] for h in honest.values()], axis=0) for k in global_params}
    return global_params, honest, honest_mean


def _distance(params, reference, global_params):
    delta_ref = {k: reference[k] - global_params[k] for k in global_params}
    diff = {k: params[k] - reference[k] for k in global_params}
    return update_norm(diff) / update_norm(delta_ref)


@pytest.mark.parametrize("robust", ["mean", "trimmed_mean", "krum", "multi_krum"])
def test_scaled_poisoned_update_does_not_move_the_global_adapter(robust):
    rng = np.random.default_rng(2)
    g, honest, honest_mean = _honest_and_poisoned(rng)
    poisoned = {k: g[k] + 1000 * (honest[0][k] - g[k]) for k in g}
    updates = {**honest, "evil": poisoned}
    weights = dict.fromkeys(updates, 1.0)
    result = aggregate(g, updates, weights, robust=robust)
    # Clipped to 3x the median norm and outweighed: within 1/2 of an honest step.
    assert _distance(result.params, honest_mean, g) < 0.5
    assert result.clip_factors.get("evil", 0.0) < 0.01
    unprotected = aggregate(g, updates, weights, norm_bound_median_multiple=None)
    assert _distance(unprotected.params, honest_mean, g) > 50


def test_non_finite_updates_are_rejected_with_a_reason_and_huge_ones_clipped():
    rng = np.random.default_rng(3)
    g, honest, honest_mean = _honest_and_poisoned(rng)
    key = next(iter(g))
    nan = {k: v.copy() for k, v in honest[0].items()}
    nan[key][0, 0] = np.nan
    inf = {k: v.copy() for k, v in honest[1].items()}
    inf[key][0, 0] = np.inf
    huge = {k: np.full_like(v, 1e30) for k, v in g.items()}
    misshapen = {**honest[2], key: np.zeros((1, 1))}
    updates = {**honest, "nan": nan, "inf": inf, "huge": huge, "shape": misshapen}
    result = aggregate(g, updates, dict.fromkeys(updates, 1.0))
    assert "NaN or inf" in result.rejected["nan"] and "NaN or inf" in result.rejected["inf"]
    assert "shape" in result.rejected["shape"]
    assert "huge" in result.accepted and result.clip_factors["huge"] < 1e-20
    assert all(np.isfinite(v).all() for v in result.params.values())
    assert update_norm({k: result.params[k] - g[k] for k in g}) <= result.norm_bound
    with pytest.raises(RejectedUpdate):
        aggregate(g, {"nan": nan}, {"nan": 1.0})


def test_krum_picks_honest_members_and_checks_its_precondition():
    rng = np.random.default_rng(4)
    g, honest, _ = _honest_and_poisoned(rng, n_honest=5)
    deltas = [{k: u[k] - g[k] for k in g} for u in honest.values()]
    deltas.append({k: rng.normal(0, 5, v.shape) for k, v in g.items()})  # garbage
    assert 5 not in krum_select(deltas, n_byzantine=1, m=4)
    with pytest.raises(ValueError):
        krum_select(deltas[:4], n_byzantine=1)


def test_aggregate_ffa_and_svd_modes_report_errors():
    rng = np.random.default_rng(5)
    shared = [rng.normal(0, 1, (R, IN)) for _ in MODULES]
    g = _adapter(rng, shared)
    updates = {i: _adapter(rng, shared) for i in range(4)}
    weights = {i: float(i + 1) for i in range(4)}
    ffa = aggregate(g, updates, weights, lora_mode="ffa", norm_bound_median_multiple=None)
    for m in MODULES:
        assert np.array_equal(ffa.params[f"{m}.lora_A.weight"], g[f"{m}.lora_A.weight"])
        ups = list(updates.values())
        ws = list(weights.values())
        assert _rel(_product(ffa.params, m), _avg_product(ups, ws, m)) < 1e-6
    moved_a = {k: v + 1.0 if "lora_A" in k else v for k, v in updates[0].items()}
    rejected = aggregate(g, {**updates, 0: moved_a}, weights, lora_mode="ffa")
    assert "FFA-LoRA requires A frozen" in rejected.rejected[0]

    free = {i: _adapter(rng) for i in range(4)}
    svd = aggregate(g, free, weights, lora_mode="svd", norm_bound_median_multiple=None, rank=16)
    assert svd.truncation_error["__max__"] < 1e-6 and svd.naive_lora_error > 0.05


def test_aggregate_lora_adapter_takes_torch_state_dicts_and_returns_torch():
    rng = np.random.default_rng(6)
    g = {k: torch.from_numpy(v) for k, v in _adapter(rng).items()}
    ups = [{k: torch.from_numpy(v) for k, v in _adapter(rng).items()} for _ in range(6)]
    ups[4] = {k: v * float("nan") for k, v in ups[4].items()}
    tensors, report = aggregate_lora(
        ups, [1, 2, 3, 4, 5, 6], current=g, method="svd", robust="krum", lora_r=R
    )
    assert all(torch.is_tensor(t) and t.dtype == torch.float32 for t in tensors.values())
    assert "NaN" in report["rejected"]["4"] and report["truncation_error_max"] >= 0


def test_weight_cap_limits_a_member_over_reporting_its_examples():
    rng = np.random.default_rng(7)
    g, honest, honest_mean = _honest_and_poisoned(rng)
    poisoned = {k: g[k] + 1000 * (honest[0][k] - g[k]) for k in g}
    updates = {**honest, "evil": poisoned}
    weights = {**dict.fromkeys(honest, 100.0), "evil": 1e9}
    uncapped = aggregate(g, updates, weights)
    capped = aggregate(g, updates, weights, weight_cap_median_multiple=2.0)
    assert _distance(uncapped.params, honest_mean, g) > 1.0
    assert _distance(capped.params, honest_mean, g) < 0.6


def test_aggregate_lora_keeps_bfloat16_tensors():
    rng = np.random.default_rng(8)
    g = {k: torch.from_numpy(v).bfloat16() for k, v in _adapter(rng).items()}
    ups = [{k: torch.from_numpy(v).bfloat16() for k, v in _adapter(rng).items()} for _ in range(3)]
    tensors, _ = aggregate_lora(ups, [1, 1, 1], current=g, method="fedavg")
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    expected = sum(u[k].double() for u in ups for k in [next(iter(g))]) / 3
    assert torch.allclose(tensors[next(iter(g))].double(), expected, atol=1e-2)
