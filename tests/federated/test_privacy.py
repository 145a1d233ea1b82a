"""Client-level DP: clipping, noise scale, RDP accounting against independent references."""

import math

import numpy as np
import pytest
import torch

from federated.privacy import (
    BudgetExceeded,
    DPConfig,
    PrivacyAccountant,
    clip_and_noise,
    new_noise_rng,
    rdp_gaussian,
)


def _phi(x):
    return 0.5 * math.erfc(-x / math.sqrt(2))


def _exact_gaussian_epsilon(mu, delta):
    # Analytic Gaussian mechanism (Balle & Wang 2018, Thm. 8): the tight (eps, delta) curve
    # of a Gaussian with sensitivity/std = mu; T rounds at sigma compose exactly to
    # mu = sqrt(T) / sigma (Dong, Roth & Su 2019, Gaussian DP).
    def delta_of(eps):
        return _phi(-eps / mu + mu / 2) - math.exp(eps) * _phi(-eps / mu - mu / 2)

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


def _eps_by_hand(rounds, sigma, delta):
    # An independent evaluation of the RDP route for full participation on a fine grid.
    a = np.linspace(1.0005, 400, 400_000)
    eps = (
        rounds * a / (2 * sigma**2) + np.log((a - 1) / a) - (math.log(delta) + np.log(a)) / (a - 1)
    )
    return float(eps.min())


def test_clipping_bounds_the_whole_update_norm():
    cfg = DPConfig(clip_norm=1.0, noise_multiplier=0.0)
    rng = np.random.default_rng(0)
    big = {"a": torch.full((3, 4), 2.0), "b": np.full(8, 2.0)}  # norm 2 * sqrt(20)
    out, factor = clip_and_noise(big, cfg, rng)
    norm = math.sqrt(sum(float(np.sum(v**2)) for v in out.values()))
    assert norm == pytest.approx(1.0) and factor == pytest.approx(1 / (2 * math.sqrt(20)))
    small = np.array([0.3, 0.4])
    out_small, factor_small = clip_and_noise(small, cfg, rng)
    assert factor_small == 1.0 and np.allclose(out_small, small)
    with pytest.raises(ValueError):
        clip_and_noise(np.array([np.nan]), cfg, rng)


def test_noise_std_is_multiplier_times_clip_and_split_across_shares():
    cfg = DPConfig(clip_norm=0.4, noise_multiplier=1.5)
    zeros = np.zeros(200_000)
    noised, _ = clip_and_noise(zeros, cfg, np.random.default_rng(1))
    assert np.std(noised) == pytest.approx(0.6, rel=0.01)
    assert abs(np.mean(noised)) < 0.01
    shared, _ = clip_and_noise(zeros, cfg, np.random.default_rng(2), noise_shares=4)
    assert np.std(shared) == pytest.approx(0.3, rel=0.01)
    assert not np.allclose(clip_and_noise(zeros[:10], cfg, new_noise_rng())[0], 0.0)


@pytest.mark.parametrize(("sigma", "rounds"), [(1.0, 1), (2.0, 10), (5.0, 100)])
def test_epsilon_lies_between_the_exact_gaussian_and_the_zcdp_closed_form(sigma, rounds):
    delta = 1e-5
    acc = PrivacyAccountant(DPConfig(clip_norm=1.0, noise_multiplier=sigma, delta=delta))
    eps = acc.epsilon_after(rounds)
    exact = _exact_gaussian_epsilon(math.sqrt(rounds) / sigma, delta)
    rho = rounds / (2 * sigma**2)
    zcdp = rho + 2 * math.sqrt(rho * math.log(1 / delta))  # Bun & Steinke 2016, Prop. 1.3
    assert exact <= eps <= zcdp
    assert eps < 1.35 * exact  # RDP is a close upper bound for the Gaussian
    assert eps == pytest.approx(_eps_by_hand(rounds, sigma, delta), rel=1e-3)


def test_epsilon_grows_with_rounds():
    acc = PrivacyAccountant(DPConfig(clip_norm=1.0, noise_multiplier=1.2))
    eps = [acc.epsilon_after(r) for r in range(0, 30, 3)]
    assert eps[0] == 0.0 and all(b > a for a, b in zip(eps, eps[1:], strict=False))


def test_round_is_refused_exactly_when_it_would_pass_the_budget():
    sigma, delta = 4.0, 1e-5
    budget = (_eps_by_hand(6, sigma, delta) + _eps_by_hand(7, sigma, delta)) / 2
    cfg = DPConfig(clip_norm=1.0, noise_multiplier=sigma, delta=delta, max_epsilon=budget)
    acc = PrivacyAccountant(cfg)
    assert acc.max_rounds() == 6
    assert not acc.would_exceed(5) and acc.would_exceed(6)
    spent = [acc.step() for _ in range(6)]
    assert spent[-1] == pytest.approx(acc.epsilon_after(6)) and spent[-1] <= budget
    with pytest.raises(BudgetExceeded, match="round 7"):
        acc.step()
    assert acc.rounds_done == 6 and acc.epsilon == pytest.approx(spent[-1])
    restored = PrivacyAccountant(cfg, **acc.state_dict())
    with pytest.raises(BudgetExceeded):
        restored.step()
    flower_style = PrivacyAccountant(noise_multiplier=sigma, delta=delta, epsilon_budget=budget)
    assert flower_style.max_rounds() == 6


def test_sampled_gaussian_rdp_matches_numerical_renyi_divergence():
    sigma, q = 1.5, 0.1
    x = np.linspace(-40, 40, 400_001)
    base = np.exp(-(x**2) / (2 * sigma**2)) / math.sqrt(2 * math.pi * sigma**2)
    ratio = 1 - q + q * np.exp((2 * x - 1) / (2 * sigma**2))  # mixture / base density
    for alpha in (2, 5, 12):
        integral = np.trapezoid(base * ratio**alpha, x)
        expected = math.log(integral) / (alpha - 1)
        assert rdp_gaussian(np.array([alpha]), sigma, q)[0] == pytest.approx(expected, rel=1e-6)
    # q = 1 reduces to the Gaussian's alpha / (2 sigma^2); subsampling helps.
    assert rdp_gaussian(np.array([4.0]), sigma, 1.0)[0] == pytest.approx(4 / (2 * sigma**2))
    sampled = PrivacyAccountant(
        DPConfig(clip_norm=1.0, noise_multiplier=sigma, sample_rate=q)
    ).epsilon_after(50)
    full = PrivacyAccountant(DPConfig(clip_norm=1.0, noise_multiplier=sigma)).epsilon_after(50)
    assert sampled < full / 3
