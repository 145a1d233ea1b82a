"""Server-side aggregation of LoRA adapters: FedAvg, FedAdam, LoRA-exact modes, robustness.

Everything works on plain dicts ``name -> array`` of PEFT adapter weights (numpy arrays or
torch tensors in, numpy arrays out, in the dtype of the first update), keyed as PEFT saves
them: ``...q_a_proj.lora_A.weight`` / ``...q_a_proj.lora_B.weight`` (the in-memory form
``lora_A.default.weight`` works too). No Flower import: the ServerApp converts its
ArrayRecords with ``record.to_numpy_ndarrays()`` / ``ArrayRecord(dict)`` around these calls.

Why LoRA needs care: a LoRA module contributes dW = B A (times a scale common to all
members). Averaging B and A separately gives avg(B) avg(A), which is not avg(B A) once the
members' factors differ (the "aggregation error" of naive FedAvg on LoRA). Two exact modes:

- FFA-LoRA (Sun et al., ICLR 2024): A stays frozen at its shared initialisation, only B
  trains and is averaged; with a common A, avg(B) A = avg(B A) exactly.
- SVD re-factoring (in the spirit of FLoRA / FedEx-LoRA): aggregate dW = sum_i w_i B_i A_i
  and split it back into rank-r factors by truncated SVD. Exact up to the rank-r
  truncation, whose relative Frobenius error is returned (the true rank of the sum is up
  to n*r). The scale alpha/r is the same for every member, so it factors out.

Robustness against a poisoned member (on deltas = update - global): non-finite or
misshapen updates are rejected with a reason; every delta may be clipped to a norm bound
(a multiple of the median norm, after Sun et al. 2019, "Can you really backdoor FL?");
then a coordinate-wise trimmed mean (Yin et al. 2018) or Krum / multi-Krum (Blanchard et
al. 2017) replaces the weighted mean.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Params = Mapping[str, Any]  # name -> numpy array or torch tensor

_LORA_A = re.compile(r"(^|\.)lora_A(\.|$)")


class RejectedUpdate(ValueError):
    """A member's update cannot be aggregated; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def to_numpy(params: Params) -> dict[str, np.ndarray]:
    """Copy a dict of numpy arrays / torch tensors into float64 numpy arrays."""
    out = {}
    for name, value in params.items():
        if hasattr(value, "detach"):  # torch tensor, without importing torch here
            value = value.detach().to("cpu").double().numpy()
        out[name] = np.array(value, dtype=np.float64)
    return out


def _dtypes(params: Params) -> dict[str, np.dtype]:
    out = {}
    for name, value in params.items():
        if hasattr(value, "detach"):
            try:
                out[name] = np.dtype(str(value.dtype).removeprefix("torch."))
            except TypeError:  # bfloat16 and friends have no numpy dtype
                out[name] = np.dtype(np.float32)
        else:
            out[name] = np.asarray(value).dtype
    return out


def _cast(params: dict[str, np.ndarray], dtypes: Mapping[str, np.dtype]) -> dict[str, np.ndarray]:
    return {k: v.astype(dtypes.get(k, np.float32)) for k, v in params.items()}


def validate_update(update: Params, reference: Params | None = None) -> None:
    """Raise RejectedUpdate unless every tensor is finite and matches ``reference``'s keys/shapes."""
    if reference is not None and set(update) != set(reference):
        missing = sorted(set(reference) - set(update))[:3]
        extra = sorted(set(update) - set(reference))[:3]
        raise RejectedUpdate(
            f"keys differ from the global adapter (missing {missing}, extra {extra})"
        )
    for name, value in to_numpy(update).items():
        if reference is not None and value.shape != tuple(np.shape(reference[name])):
            raise RejectedUpdate(
                f"{name}: shape {value.shape} != {tuple(np.shape(reference[name]))}"
            )
        if not np.all(np.isfinite(value)):
            raise RejectedUpdate(f"{name}: contains NaN or inf")


def _normalise(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError("weights must be non-negative, finite, with a positive sum")
    return w / w.sum()


# --------------------------------------------------------------------------------------
# FedAvg, FedProx, FedAdam
# --------------------------------------------------------------------------------------


def fedavg(updates: Sequence[Params], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Weighted mean of each tensor (McMahan et al. 2017); weights are example counts.

    Raises ValueError on empty input, bad weights or differing keys/shapes.
    """
    if not updates or len(updates) != len(weights):
        raise ValueError("need one weight per update and at least one update")
    w = _normalise(weights)
    arrays = [to_numpy(u) for u in updates]
    keys = set(arrays[0])
    if any(set(a) != keys for a in arrays):
        raise ValueError("updates have different keys")
    out = {k: sum(wi * a[k] for wi, a in zip(w, arrays, strict=True)) for k in arrays[0]}
    return _cast(out, _dtypes(updates[0]))


def fedprox_penalty(params: Any, global_params: Any, mu: float):
    """FedProx proximal term (Li et al. 2020, Eq. 2): (mu / 2) * sum ||w - w_global||^2.

    ``params``: dict name -> trainable torch tensor (or an iterable of (name, tensor), e.g.
    ``model.named_parameters()`` filtered to the adapter); ``global_params``: dict name ->
    tensor/array of the round's global adapter (treated as constants). Returns a scalar
    torch tensor to add to the client's loss; the server side of FedProx is plain FedAvg.
    Raises KeyError when a trainable name is missing from ``global_params``.
    """
    import torch

    items = params.items() if isinstance(params, Mapping) else params
    total = None
    for name, w in items:
        ref = global_params[name]
        g = ref if torch.is_tensor(ref) else torch.as_tensor(np.asarray(ref))
        term = (w - g.to(device=w.device, dtype=w.dtype).detach()).pow(2).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return 0.5 * mu * total


@dataclass
class FedAdam:
    """Server-side Adam on the pseudo-gradient (Reddi et al. 2021, "Adaptive Federated
    Optimization", Algorithm 2, FedAdam), with state kept across rounds.

    delta = aggregate - global; m = b1 m + (1-b1) delta; v = b2 v + (1-b2) delta^2;
    global += eta * m / (sqrt(v) + tau). As in the paper there is no bias correction.
    Use with the naive or FFA LoRA modes: SVD re-factoring changes the factors' basis every
    round, so per-coordinate moments on B and A would not mean anything.
    """

    eta: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    m: dict[str, np.ndarray] = field(default_factory=dict)
    v: dict[str, np.ndarray] = field(default_factory=dict)
    rounds: int = 0

    def step(self, global_params: Params, aggregated: Params) -> dict[str, np.ndarray]:
        """One server round: returns the new global adapter (global's dtypes)."""
        g, a = to_numpy(global_params), to_numpy(aggregated)
        if set(g) != set(a):
            raise ValueError("aggregate and global adapter have different keys")
        out = {}
        for k in g:
            delta = a[k] - g[k]
            self.m[k] = self.beta1 * self.m.get(k, np.zeros_like(delta)) + (1 - self.beta1) * delta
            self.v[k] = (
                self.beta2 * self.v.get(k, np.zeros_like(delta)) + (1 - self.beta2) * delta**2
            )
            out[k] = g[k] + self.eta * self.m[k] / (np.sqrt(self.v[k]) + self.tau)
        self.rounds += 1
        return _cast(out, _dtypes(global_params))

    def state_dict(self) -> dict[str, Any]:
        """Arrays and counters to checkpoint between rounds (restore with load_state_dict)."""
        return {"m": dict(self.m), "v": dict(self.v), "rounds": self.rounds}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.m = {k: np.asarray(v, dtype=np.float64) for k, v in state["m"].items()}
        self.v = {k: np.asarray(v, dtype=np.float64) for k, v in state["v"].items()}
        self.rounds = int(state["rounds"])


# --------------------------------------------------------------------------------------
# LoRA-aware aggregation
# --------------------------------------------------------------------------------------


def lora_pairs(keys: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Map each LoRA module to its (A key, B key). Raises ValueError on an A without its B."""
    keyset = set(keys)
    pairs = {}
    for k in keys:
        if _LORA_A.search(k):
            b = _LORA_A.sub(lambda m: f"{m.group(1)}lora_B{m.group(2)}", k, count=1)
            if b not in keyset:
                raise ValueError(f"{k} has no matching lora_B tensor")
            pairs[_LORA_A.split(k, maxsplit=1)[0]] = (k, b)
    return pairs


def naive_lora_error(updates: Sequence[Params], weights: Sequence[float]) -> dict[str, float]:
    """Relative error of averaging factors separately, per module and ``"__total__"``.

    ||avg(B) avg(A) - avg(B A)||_F / ||avg(B A)||_F, weighted by ``weights``; the total
    pools numerators and denominators over modules. 0 when all members share A (or B).
    """
    w = _normalise(weights)
    arrays = [to_numpy(u) for u in updates]
    out, num2, den2 = {}, 0.0, 0.0
    for module, (ka, kb) in lora_pairs(list(arrays[0])).items():
        avg_a = sum(wi * a[ka] for wi, a in zip(w, arrays, strict=True))
        avg_b = sum(wi * a[kb] for wi, a in zip(w, arrays, strict=True))
        avg_ba = sum(wi * a[kb] @ a[ka] for wi, a in zip(w, arrays, strict=True))
        num = np.linalg.norm(avg_b @ avg_a - avg_ba)
        den = np.linalg.norm(avg_ba)
        out[module] = float(num / den) if den > 0 else 0.0
        num2 += num**2
        den2 += den**2
    out["__total__"] = float(np.sqrt(num2 / den2)) if den2 > 0 else 0.0
    return out


def ffa_lora_aggregate(
    updates: Sequence[Params], weights: Sequence[float], atol: float = 0.0
) -> dict[str, np.ndarray]:
    """FFA-LoRA: average B (and any non-LoRA tensor); A must be identical everywhere.

    Raises ValueError when a member's A differs from the first member's by more than
    ``atol`` (A must stay frozen at its shared initialisation for this to be exact).
    """
    first = to_numpy(updates[0])
    pairs = lora_pairs(list(first))
    a_keys = {ka for ka, _ in pairs.values()}
    for u in updates[1:]:
        arr = to_numpy(u)
        for ka in a_keys:
            if np.max(np.abs(arr[ka] - first[ka]), initial=0.0) > atol:
                raise ValueError(f"FFA-LoRA: {ka} differs between members (A must be frozen)")
    avg = fedavg(updates, weights)
    dtypes = _dtypes(updates[0])
    for ka in a_keys:
        avg[ka] = first[ka].astype(dtypes[ka])
    return avg


def _refactor(
    b_cat: np.ndarray, a_cat: np.ndarray, rank: int
) -> tuple[np.ndarray, np.ndarray, float]:
    # dW = b_cat @ a_cat with inner size n*r; QR both sides so the SVD is of an (nr x nr)
    # matrix instead of (out x in): same singular values, far cheaper for wide layers.
    qb, rb = np.linalg.qr(b_cat)
    qa, ra = np.linalg.qr(a_cat.T)
    u, s, vt = np.linalg.svd(rb @ ra.T)
    root = np.sqrt(s[:rank])
    b_new = (qb @ u[:, :rank]) * root
    a_new = root[:, None] * (vt[:rank] @ qa.T)
    total = float(np.sum(s**2))
    err = float(np.sqrt(np.sum(s[rank:] ** 2) / total)) if total > 0 else 0.0
    return b_new, a_new, err


def svd_lora_aggregate(
    updates: Sequence[Params], weights: Sequence[float], rank: int | None = None
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Aggregate dW = sum_i w_i B_i A_i per module and re-factor it to rank r by SVD.

    ``rank`` defaults to each module's current rank (A's first dimension). Returns the new
    adapter (B = U_r S_r^1/2, A = S_r^1/2 V_r^T, so the same PEFT shapes) and, per module
    plus ``"__max__"``, the relative Frobenius truncation error ||dW - B A|| / ||dW||.
    Non-LoRA tensors are weight-averaged.
    """
    w = _normalise(weights)
    arrays = [to_numpy(u) for u in updates]
    out = fedavg(updates, weights)
    dtypes = _dtypes(updates[0])
    errors = {}
    for module, (ka, kb) in lora_pairs(list(arrays[0])).items():
        r = rank or arrays[0][ka].shape[0]
        b_cat = np.concatenate([wi * a[kb] for wi, a in zip(w, arrays, strict=True)], axis=1)
        a_cat = np.concatenate([a[ka] for a in arrays], axis=0)
        b_new, a_new, errors[module] = _refactor(b_cat, a_cat, r)
        out[kb], out[ka] = b_new.astype(dtypes[kb]), a_new.astype(dtypes[ka])
    errors["__max__"] = max(errors.values(), default=0.0)
    return out, errors


# --------------------------------------------------------------------------------------
# Robust aggregation
# --------------------------------------------------------------------------------------


def _flat(params: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.ravel(params[k]) for k in sorted(params)])


def update_norm(delta: Mapping[str, np.ndarray]) -> float:
    """L2 norm of a whole update (all tensors), robust to overflow of huge finite values."""
    flat = _flat(delta)
    peak = float(np.max(np.abs(flat), initial=0.0))
    if peak == 0.0:
        return 0.0
    return peak * float(np.linalg.norm(flat / peak))


def clip_to_norm_bound(
    deltas: Sequence[Mapping[str, np.ndarray]],
    bound: float | None = None,
    median_multiple: float = 3.0,
) -> tuple[list[dict[str, np.ndarray]], float, list[float]]:
    """Scale each delta down to L2 norm <= bound (default: median_multiple x median norm).

    Returns (clipped deltas, the bound used, per-member factors in [0, 1]). The median is a
    robust reference as long as fewer than half the members are poisoned.
    """
    norms = [update_norm(d) for d in deltas]
    if bound is None:
        bound = median_multiple * float(np.median(norms))
    clipped, factors = [], []
    for d, n in zip(deltas, norms, strict=True):
        f = 1.0 if n <= bound else (bound / n if n > 0 else 1.0)
        clipped.append({k: v * f for k, v in d.items()})
        factors.append(f)
    return clipped, bound, factors


def trimmed_mean(
    arrays: Sequence[Mapping[str, np.ndarray]], trim_ratio: float = 0.2
) -> dict[str, np.ndarray]:
    """Coordinate-wise trimmed mean (Yin et al. 2018): per coordinate drop the k largest and
    k smallest values, k = floor(trim_ratio * n), and average the rest (unweighted).

    Raises ValueError when nothing would be left (trim_ratio must be < 0.5).
    """
    n = len(arrays)
    k = int(np.floor(trim_ratio * n))
    if not 0 <= trim_ratio < 0.5 or n - 2 * k < 1:
        raise ValueError("trim_ratio must be in [0, 0.5) and leave at least one value")
    out = {}
    for name in arrays[0]:
        stacked = np.sort(np.stack([a[name] for a in arrays]), axis=0)
        out[name] = stacked[k : n - k].mean(axis=0)
    return out


def krum_select(
    deltas: Sequence[Mapping[str, np.ndarray]], n_byzantine: int, m: int = 1
) -> list[int]:
    """Indices of the m members with the lowest Krum scores (Blanchard et al. 2017).

    score(i) = sum of squared distances to its n - f - 2 nearest other members. Requires
    n > 2f + 2 (ValueError otherwise).
    """
    n = len(deltas)
    if n <= 2 * n_byzantine + 2:
        raise ValueError(f"Krum needs n > 2f + 2 (n={n}, f={n_byzantine})")
    flat = np.stack([_flat(d) for d in deltas])
    sq = np.sum(flat**2, axis=1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2 * flat @ flat.T, 0.0)
    scores = []
    for i in range(n):
        others = np.sort(np.delete(dist[i], i))
        scores.append(float(others[: n - n_byzantine - 2].sum()))
    return [int(i) for i in np.argsort(scores, kind="stable")[:m]]


@dataclass
class AggregationResult:
    """What one aggregation produced, for the server to apply and log.

    params: the new global adapter. accepted: member ids used. rejected: {id: reason}.
    clip_factors: {id: factor} from the norm bound (1.0 = untouched). norm_bound: the bound.
    naive_lora_error: relative error naive averaging would have (or has) made.
    truncation_error: per-module SVD truncation error (SVD mode only).
    """

    params: dict[str, np.ndarray]
    accepted: list[Any]
    rejected: dict[Any, str]
    clip_factors: dict[Any, float]
    norm_bound: float | None
    naive_lora_error: float
    truncation_error: dict[str, float] = field(default_factory=dict)


def aggregate(
    global_params: Params,
    updates: Mapping[Any, Params],
    weights: Mapping[Any, float],
    *,
    lora_mode: str = "naive",
    robust: str = "mean",
    norm_bound: float | None = None,
    norm_bound_median_multiple: float | None = 3.0,
    trim_ratio: float = 0.2,
    n_byzantine: int = 1,
    multi_krum_m: int | None = None,
    rank: int | None = None,
    weight_cap_median_multiple: float | None = None,
) -> AggregationResult:
    """One round of server-side aggregation; the entry point for the ServerApp.

    Args:
        global_params: the adapter sent out this round.
        updates: {member id: that member's returned adapter}.
        weights: {member id: example count}.
        lora_mode: "naive" (average factors), "ffa" (A frozen, average B) or "svd"
            (aggregate dW = sum w B A, re-factor to ``rank``).
        robust: "mean" (weighted), "trimmed_mean", "krum" (one member) or "multi_krum"
            (weighted mean of the ``multi_krum_m`` best, default n - f).
        norm_bound / norm_bound_median_multiple: clip every delta to this L2 bound, or to
            the multiple of the median delta norm; both None turns clipping off.
        weight_cap_median_multiple: cap each weight at this multiple of the median weight,
            so a member cannot buy influence by over-reporting its example count (off by
            default: genuinely large members would lose weight too).
    Returns an AggregationResult. Non-finite or misshapen updates are rejected (listed
    with reasons), never averaged. Raises RejectedUpdate when no update is left, and
    ValueError for an unknown mode or an infeasible Krum/trim setting.
    """
    if lora_mode not in ("naive", "ffa", "svd") or robust not in (
        "mean",
        "trimmed_mean",
        "krum",
        "multi_krum",
    ):
        raise ValueError(f"unknown lora_mode {lora_mode!r} or robust {robust!r}")
    g = to_numpy(global_params)
    dtypes = _dtypes(global_params)
    rejected: dict[Any, str] = {}
    ids, deltas = [], []
    for cid, update in updates.items():
        try:
            validate_update(update, global_params)
            if not (weights.get(cid, 0) > 0 and np.isfinite(weights[cid])):
                raise RejectedUpdate("weight is not a positive finite number")
            if lora_mode == "ffa":
                for ka, _ in lora_pairs(list(g)).values():
                    if not np.allclose(to_numpy({ka: update[ka]})[ka], g[ka], rtol=0, atol=1e-6):
                        raise RejectedUpdate(f"{ka} changed; FFA-LoRA requires A frozen")
        except RejectedUpdate as exc:
            rejected[cid] = exc.reason
            continue
        u = to_numpy(update)
        ids.append(cid)
        deltas.append({k: u[k] - g[k] for k in g})
    if not ids:
        raise RejectedUpdate(f"no acceptable update this round: {rejected}")

    factors = [1.0] * len(ids)
    bound = None
    if norm_bound is not None or norm_bound_median_multiple is not None:
        deltas, bound, factors = clip_to_norm_bound(
            deltas, norm_bound, norm_bound_median_multiple or 3.0
        )
    w = [float(weights[c]) for c in ids]
    if weight_cap_median_multiple is not None:
        cap = weight_cap_median_multiple * float(np.median(w))
        w = [min(x, cap) for x in w]
    if robust in ("krum", "multi_krum"):
        m = 1 if robust == "krum" else (multi_krum_m or len(ids) - n_byzantine)
        keep = krum_select(deltas, n_byzantine, m)
        for i in sorted(set(range(len(ids))) - set(keep)):
            rejected[ids[i]] = "not selected by Krum"
        ids, deltas, w, factors = ([x[i] for i in keep] for x in (ids, deltas, w, factors))
    params_i = [{k: g[k] + d[k] for k in g} for d in deltas]
    naive_err = naive_lora_error(params_i, w)["__total__"] if lora_pairs(list(g)) else 0.0

    truncation: dict[str, float] = {}
    if robust == "trimmed_mean":
        if lora_mode == "svd":
            raise ValueError("trimmed_mean with lora_mode='svd' is not supported; use krum")
        new = {k: g[k] + v for k, v in trimmed_mean(deltas, trim_ratio).items()}
        if lora_mode == "ffa":
            for ka, _ in lora_pairs(list(g)).values():
                new[ka] = g[ka]
    elif lora_mode == "naive":
        new = fedavg(params_i, w)
    elif lora_mode == "ffa":
        new = ffa_lora_aggregate(params_i, w, atol=1e-6)
        for ka, _ in lora_pairs(list(g)).values():
            new[ka] = g[ka]
    else:
        new, truncation = svd_lora_aggregate(params_i, w, rank)
    return AggregationResult(
        params=_cast(to_numpy(new), dtypes),
        accepted=list(ids),
        rejected=rejected,
        clip_factors=dict(zip(ids, factors, strict=True)),
        norm_bound=bound,
        naive_lora_error=naive_err,
        truncation_error=truncation,
    )


def aggregate_lora(
    updates: Sequence[Params],
    weights: Sequence[float],
    *,
    current: Params,
    method: str = "fedavg",
    robust: str = "none",
    norm_bound: float | None = None,
    trim_fraction: float = 0.2,
    lora_alpha: float | None = None,
    lora_r: int | None = None,
    n_byzantine: int = 1,
    weight_cap_median_multiple: float | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Thin adapter for the Flower strategy: list in, (tensors, JSON-able report) out.

    ``method``: fedavg / fedprox / fedadam (all a weighted mean of the members' adapters
    here; FedProx's term is client-side and FedAdam's server step is `FedAdam.step`), ffa or
    svd (re-factored to ``lora_r``). ``robust``: none / trimmed_mean / krum / multi_krum.
    ``norm_bound``: a fixed L2 bound on each delta; None bounds robust rules by 3x the median
    norm and leaves plain means unclipped. ``lora_alpha`` is accepted for symmetry: the
    alpha/r scale is common to all members and factors out of every rule. Tensors come back
    as torch tensors when the updates were torch tensors (so ``ArrayRecord(tensors)``
    works), numpy arrays otherwise. Raises like `aggregate`.
    """
    del lora_alpha
    lora_mode = {"ffa": "ffa", "svd": "svd"}.get(method, "naive")
    if method not in ("fedavg", "fedprox", "fedadam", "ffa", "svd"):
        raise ValueError(f"unknown aggregation method {method!r}")
    rule = {"none": "mean"}.get(robust, robust)
    multiple = None if (norm_bound is not None or rule == "mean") else 3.0
    result = aggregate(
        current,
        dict(enumerate(updates)),
        dict(enumerate(weights)),
        lora_mode=lora_mode,
        robust=rule,
        norm_bound=norm_bound,
        norm_bound_median_multiple=multiple,
        trim_ratio=trim_fraction,
        n_byzantine=n_byzantine,
        rank=lora_r,
        weight_cap_median_multiple=weight_cap_median_multiple,
    )
    tensors: dict[str, Any] = result.params
    if updates and hasattr(next(iter(updates[0].values())), "detach"):
        import torch

        like = updates[0]
        tensors = {
            k: torch.from_numpy(np.ascontiguousarray(v)).to(like[k].dtype)
            for k, v in tensors.items()
        }
    report = {
        "accepted": [int(i) for i in result.accepted],
        "rejected": {str(k): v for k, v in result.rejected.items()},
        "clip_factors": {str(k): float(v) for k, v in result.clip_factors.items()},
        "norm_bound": result.norm_bound,
        "naive_lora_error": result.naive_lora_error,
        "truncation_error_max": result.truncation_error.get("__max__"),
    }
    return tensors, report
