"""Client-level differential privacy for federated LoRA: clip, add Gaussian noise, account.

Each member clips its whole adapter update (all tensors together) to L2 norm ``clip_norm``
and adds N(0, (noise_multiplier * clip_norm)^2) to every coordinate (DP-FedAvg,
McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"). One
member's presence changes the sum of clipped updates by at most ``clip_norm``, so each
round is a Gaussian mechanism with noise multiplier sigma at the member level.

Accounting is Rényi DP (Mironov 2017), written out here because Flower's accountant
(flwr.supercore.privacy_accounting) wraps Google's dp-accounting, which is not a
dependency of ours:

- full participation (sample_rate = 1): RDP(alpha) = alpha / (2 sigma^2) per round
  (Mironov 2017, Prop. 7), over a dense grid of real orders;
- Poisson sampling of members with rate q < 1: the integer-order bound of Mironov, Talwar
  and Zhang 2019 ("Rényi DP of the Sampled Gaussian Mechanism", Sec. 3.3),
  A_alpha = sum_k C(alpha, k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 sigma^2));
- rounds compose by adding RDP; (epsilon, delta) by the conversion of Balle et al. 2020
  ("Hypothesis testing interpretations and Rényi DP", Thm. 21; also Canonne, Kamath and
  Steinke 2020): eps = rdp + log((alpha-1)/alpha) - (log delta + log alpha) / (alpha - 1),
  minimised over orders. This is the conversion Opacus and TF-Privacy use.

Noise RNG: ``new_noise_rng`` seeds numpy's PCG64 with 128 bits from `secrets`. That is
adequate against an observer who cannot see the generator's state, but PCG64 is not a
CSPRNG and floating-point Gaussian sampling leaks in its low bits (Mironov 2012); a
discrete Gaussian over the fixed-point grid would close that gap and is not done here.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

# Real orders for full participation; integer orders (required by the sampled bound) for q<1.
_REAL_ORDERS = np.concatenate([np.linspace(1.01, 12.0, 1100), np.geomspace(12.0, 4096.0, 600)])
_INT_ORDERS = np.arange(2, 257, dtype=np.float64)


class BudgetExceeded(Exception):
    """Running one more round would take the federation past its epsilon budget."""


@dataclass(frozen=True)
class DPConfig:
    """Member-level DP settings of a federation.

    clip_norm: L2 bound C on each member's whole update. noise_multiplier: sigma, noise std
    over C. delta: the delta of (epsilon, delta)-DP (well below 1 / number of members).
    max_epsilon: the budget; a round that would exceed it is refused. sample_rate: the
    probability each member takes part in a round (Poisson); 1.0 = every member, every round.
    """

    clip_norm: float
    noise_multiplier: float
    delta: float = 1e-5
    max_epsilon: float = 10.0
    sample_rate: float = 1.0

    def __post_init__(self) -> None:
        if not self.clip_norm > 0 or not self.noise_multiplier >= 0:
            raise ValueError("clip_norm must be > 0 and noise_multiplier >= 0")
        if not 0 < self.delta < 1 or not self.max_epsilon > 0 or not 0 < self.sample_rate <= 1:
            raise ValueError("need 0 < delta < 1, max_epsilon > 0, 0 < sample_rate <= 1")

    @property
    def noise_std(self) -> float:
        """Std of the Gaussian noise the sum must carry: sigma * C."""
        return self.noise_multiplier * self.clip_norm


def new_noise_rng() -> np.random.Generator:
    """A fresh generator for production noise, seeded with 128 bits from `secrets`."""
    return np.random.default_rng(secrets.randbits(128))


def _to_numpy(update: Any) -> tuple[dict[str, np.ndarray], bool]:
    if isinstance(update, Mapping):
        items, single = dict(update), False
    else:
        items, single = {"": update}, True
    out = {}
    for k, v in items.items():
        if hasattr(v, "detach"):
            v = v.detach().to("cpu").double().numpy()
        out[k] = np.array(v, dtype=np.float64)
    return out, single


def clip_and_noise(
    update: Any, config: DPConfig, rng: np.random.Generator, noise_shares: int = 1
) -> tuple[Any, float]:
    """Clip a member's update to L2 norm <= clip_norm and add Gaussian noise.

    ``update``: a dict name -> array/tensor (the adapter delta, all tensors clipped
    together) or one array. ``noise_shares``: 1 = local DP, each member adds the full
    sigma*C. With secure aggregation the server sees only the sum, so n members may each
    add sigma*C/sqrt(n) ("distributed DP"); the sum then carries sigma*C only if all n
    contribute, so pass a lower bound on the survivors (the SecAgg threshold t), never more.
    Returns (noised update as float64 numpy, same structure; clip factor in (0, 1]).
    Raises ValueError on NaN/inf (they cannot be clipped).
    """
    arrays, single = _to_numpy(update)
    if noise_shares < 1:
        raise ValueError("noise_shares must be >= 1")
    flat = [a.ravel() for a in arrays.values()]
    if not all(np.isfinite(a).all() for a in flat):
        raise ValueError("update contains NaN or inf")
    norm = float(np.sqrt(sum(float(a @ a) for a in flat)))
    factor = 1.0 if norm <= config.clip_norm else config.clip_norm / norm
    std = config.noise_std / math.sqrt(noise_shares)
    out = {k: a * factor + rng.normal(0.0, std, a.shape) for k, a in arrays.items()}
    return (out[""] if single else out), factor


def rdp_gaussian(
    orders: np.ndarray, noise_multiplier: float, sample_rate: float = 1.0
) -> np.ndarray:
    """RDP of one round of the (Poisson-subsampled) Gaussian mechanism at each order.

    sample_rate = 1: alpha / (2 sigma^2) at any real order > 1. sample_rate < 1: the
    Mironov-Talwar-Zhang bound, valid at integer orders only (ValueError otherwise).
    noise_multiplier 0 gives infinity (no privacy).
    """
    orders = np.asarray(orders, dtype=np.float64)
    if noise_multiplier == 0:
        return np.full_like(orders, np.inf)
    if sample_rate == 1.0:
        return orders / (2 * noise_multiplier**2)
    if np.any(orders != np.round(orders)) or np.any(orders < 2):
        raise ValueError("the sampled Gaussian bound needs integer orders >= 2")
    q, out = sample_rate, []
    for alpha in orders.astype(int):
        k = np.arange(alpha + 1)
        log_binom = (
            math.lgamma(alpha + 1)
            - np.array([math.lgamma(i + 1) for i in k])
            - np.array([math.lgamma(alpha - i + 1) for i in k])
        )
        log_terms = (
            log_binom
            + k * math.log(q)
            + (alpha - k) * math.log1p(-q)
            + (k * k - k) / (2 * noise_multiplier**2)
        )
        peak = log_terms.max()
        log_a = peak + math.log(np.exp(log_terms - peak).sum())
        out.append(log_a / (alpha - 1))
    return np.asarray(out)


def rdp_to_epsilon(rdp: np.ndarray, orders: np.ndarray, delta: float) -> tuple[float, float]:
    """Best (epsilon, order) over the orders at ``delta`` (Balle et al. 2020, Thm. 21)."""
    orders = np.asarray(orders, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        eps = (
            np.asarray(rdp)
            + np.log1p(-1 / orders)
            - (math.log(delta) + np.log(orders)) / (orders - 1)
        )
    eps = np.where(np.isnan(eps), np.inf, eps)
    i = int(np.argmin(eps))
    return max(0.0, float(eps[i])), float(orders[i])


class PrivacyAccountant:
    """The (epsilon, delta) a federation has spent, round by round, and the budget gate.

    Build with a DPConfig (``PrivacyAccountant(config)``) or the keywords
    ``noise_multiplier, delta, epsilon_budget`` (clip_norm is irrelevant to accounting).
    ``rounds_done``/``rdp`` restore a federation's state (from `state_dict`).

    epsilon_after(r): epsilon after r rounds at the config's sample rate.
    would_exceed(rounds_done, more=1): True when that many more rounds pass the budget.
    step(): account one round and return the new epsilon; raises BudgetExceeded (and
    records nothing) when the round would pass the budget, so call it before sending.
    """

    def __init__(
        self,
        config: DPConfig | None = None,
        *,
        noise_multiplier: float | None = None,
        delta: float | None = None,
        epsilon_budget: float | None = None,
        sample_rate: float = 1.0,
        rounds_done: int = 0,
        rdp: list[float] | None = None,
    ):
        if config is None:
            if noise_multiplier is None or delta is None or epsilon_budget is None:
                raise ValueError("pass a DPConfig or noise_multiplier, delta, epsilon_budget")
            config = DPConfig(
                clip_norm=1.0,
                noise_multiplier=noise_multiplier,
                delta=delta,
                max_epsilon=epsilon_budget,
                sample_rate=sample_rate,
            )
        self.config = config
        # Integer orders whenever any round may be subsampled, so all rounds share a grid.
        self.orders = _REAL_ORDERS if config.sample_rate == 1.0 else _INT_ORDERS
        self.rounds_done = rounds_done
        self._rdp = (
            np.asarray(rdp, dtype=np.float64)
            if rdp is not None
            else rounds_done * self._per_round(config.sample_rate)
        )

    def _per_round(self, sample_rate: float) -> np.ndarray:
        return rdp_gaussian(self.orders, self.config.noise_multiplier, sample_rate)

    def epsilon_after(self, rounds: int) -> float:
        """Epsilon (at the config's delta) after ``rounds`` rounds; 0 for 0 rounds."""
        if rounds <= 0:
            return 0.0
        rdp = rounds * self._per_round(self.config.sample_rate)
        return rdp_to_epsilon(rdp, self.orders, self.config.delta)[0]

    def would_exceed(self, rounds_done: int, more: int = 1) -> bool:
        """Whether ``rounds_done + more`` rounds would spend more than max_epsilon."""
        return self.epsilon_after(rounds_done + more) > self.config.max_epsilon

    def max_rounds(self, limit: int = 1_000_000) -> int:
        """The most rounds the budget allows (binary search; capped at ``limit``)."""
        lo, hi = 0, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.epsilon_after(mid) <= self.config.max_epsilon:
                lo = mid
            else:
                hi = mid - 1
        return lo

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far by the rounds recorded with `step`."""
        if self.rounds_done == 0:
            return 0.0
        return rdp_to_epsilon(self._rdp, self.orders, self.config.delta)[0]

    def step(self, sample_rate: float | None = None) -> float:
        """Record one round (at ``sample_rate``, default the config's); return epsilon.

        Raises BudgetExceeded, recording nothing, if the round would pass max_epsilon, and
        ValueError for a subsampled round on an accountant built for full participation.
        """
        rate = self.config.sample_rate if sample_rate is None else sample_rate
        if rate < 1.0 and self.config.sample_rate == 1.0:
            raise ValueError("build the accountant with sample_rate < 1 for subsampled rounds")
        rdp = self._rdp + self._per_round(rate)
        eps = rdp_to_epsilon(rdp, self.orders, self.config.delta)[0]
        if eps > self.config.max_epsilon:
            raise BudgetExceeded(
                f"round {self.rounds_done + 1} would reach epsilon {eps:.3f} > budget "
                f"{self.config.max_epsilon} (delta {self.config.delta})"
            )
        self._rdp, self.rounds_done = rdp, self.rounds_done + 1
        return eps

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state; restore with PrivacyAccountant(config, **state)."""
        return {"rounds_done": self.rounds_done, "rdp": [float(x) for x in self._rdp]}
