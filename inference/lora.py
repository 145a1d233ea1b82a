"""Serving many LoRA adapters in one batch.

An adapter is a PEFT LoRA directory: ``adapter_config.json`` (``peft_type: "LORA"``, ``r``,
``lora_alpha``, optional ``rank_pattern``/``alpha_pattern``/``use_rslora``) and
``adapter_model.safetensors`` with keys like
``base_model.model.model.layers.0.self_attn.q_a_proj.lora_A.weight``. We read PEFT's files
directly rather than wrapping the model in ``PeftModel``: peft applies one active adapter to
the whole batch, while a serving step mixes rows of many adapters (and rows of none).

Per step a ``LoRABatch`` says which adapter each row (token) uses. For every target module
the base output gets ``scale * (x @ A.T) @ B.T`` added for the rows of each adapter: a
segment loop over the adapters present in the step (S-LoRA, Sheng et al., 2023,
arXiv:2311.03285; Punica, Chen et al., 2023, arXiv:2310.18547), never a loop over tokens.

Absorbed MLA decode never runs ``kv_b_proj`` as a linear layer; its LoRA delta
``scale * B @ A`` is applied in the same absorbed form (see ``absorbed_query`` and
``absorbed_output``), which is exact because everything involved is linear.

``AdapterCache`` loads adapters on demand and keeps at most ``max_active`` in memory,
evicting the least recently used one that no running request holds. It also holds
*in-memory* adapters registered by name (``register``, key ``memory:<name>``): a trainer
(GRPO) serves its current policy this way without writing it to disk, replacing the tensors
each step. Every registration is a new version with its own prefix-cache key, so latents
computed under old weights are never reused.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


MEMORY_PREFIX = "memory:"


@dataclass
class LoRAAdapter:
    """One loaded adapter: module name -> (A [r, in], B [out, r], scale).

    ``path`` is the resolved directory, or ``memory:<name>`` for a registered in-memory
    adapter, whose ``version`` counts its registrations (0 for directories)."""

    path: str
    weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)
    version: int = 0

    @property
    def key(self) -> str:
        """What prefix-cache hashes use to tell adapters apart (versions included)."""
        return f"{self.path}@{self.version}" if self.version else self.path


def check_adapter_dir(path: str | Path) -> Path:
    """Raise ValueError unless ``path`` is a PEFT LoRA directory; return it resolved."""
    p = Path(path)
    if not (p / CONFIG_NAME).is_file():
        raise ValueError(f"adapter {path}: no {CONFIG_NAME} (not a PEFT adapter directory)")
    if not (p / WEIGHTS_NAME).is_file():
        raise ValueError(f"adapter {path}: no {WEIGHTS_NAME}")
    return p.resolve()


def _scale(cfg: dict, module_name: str, r: int) -> float:
    alpha = cfg.get("lora_alpha", 8)
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){pattern}$", module_name):
            alpha = value
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def load_adapter(
    path: str | Path, model: nn.Module, dtype: torch.dtype, device: str | torch.device
) -> LoRAAdapter:
    """Read a PEFT LoRA adapter for ``model`` (an ``inference.model.Transformer``).

    Raises ValueError naming the file and tensor for: a missing file, a non-LoRA or DoRA
    config, a bias, a key that names no linear layer of the model, a missing A or B, or a
    shape that disagrees with the layer.
    """
    p = check_adapter_dir(path)
    cfg = json.loads((p / CONFIG_NAME).read_text())
    with safe_open(str(p / WEIGHTS_NAME), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    return adapter_from_state(
        str(p),
        cfg,
        tensors,
        model,
        dtype,
        device,
        config_label=str(p / CONFIG_NAME),
        weights_label=str(p / WEIGHTS_NAME),
    )


def adapter_from_state(
    path: str,
    cfg: dict,
    tensors: dict[str, torch.Tensor],
    model: nn.Module,
    dtype: torch.dtype,
    device: str | torch.device,
    *,
    version: int = 0,
    config_label: str = "adapter config",
    weights_label: str = "adapter tensors",
) -> LoRAAdapter:
    """A ``LoRAAdapter`` from a PEFT adapter config (``adapter_config.json`` as a dict) and
    its state dict (PEFT key names), checked against ``model`` as ``load_adapter`` checks
    files. The tensors are copied (cast to ``dtype`` on ``device``), so the caller may go on
    changing its own. Raises ValueError naming the label and tensor for what does not fit.
    """
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_label}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("use_dora"):
        raise ValueError(f"{config_label}: DoRA adapters are not supported")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{config_label}: bias {cfg['bias']!r} is not supported")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY_RE.match(key)
        if m is None:
            raise ValueError(f"{weights_label}: tensor {key} is not a LoRA A/B weight")
        pairs.setdefault(m.group(1), {})[m.group(2)] = tensor
    adapter = LoRAAdapter(path=path, version=version)
    for name, ab in sorted(pairs.items()):
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            layer = None
        # A linear layer, or the MoE router (peft adapts its weight via target_parameters).
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"{weights_label}: {name} is not a linear layer of the model")
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{weights_label}: {name} lacks lora_A or lora_B")
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        out_f, in_f = weight.shape
        if a.shape != (r, in_f) or b.shape != (out_f, r):
            raise ValueError(
                f"{weights_label}: {name} has A {list(a.shape)} and B {list(b.shape)}, "
                f"layer is {out_f}x{in_f}"
            )
        # clone: a trainer may update its tensors in place while this adapter is served.
        adapter.weights[name] = (
            a.detach().to(device=device, dtype=dtype).clone().contiguous(),
            b.detach().to(device=device, dtype=dtype).clone().contiguous(),
            _scale(cfg, name, r),
        )
    return adapter


class AdapterCache:
    """At most ``max_active`` loaded adapters, least recently used evicted first, plus any
    number of registered in-memory adapters (never evicted, not counted in ``max_active``).

    ``acquire(path)`` returns the adapter (loading it if needed) and pins it; ``release``
    unpins. Returns None from ``acquire`` when every slot is pinned (the caller waits).

    In-memory adapters: ``register`` adds a new version; a request takes a reference to
    the current version with ``resolve`` (which returns its versioned key, what ``acquire``
    then takes) and gives it back with ``unref`` when it ends, so a request keeps the
    weights it was admitted with even across a preemption, and an old version is dropped
    once no request refers to it. Thread-safe: ``register`` and ``resolve`` may run on any
    thread, the rest runs on the engine's scheduler thread.
    """

    def __init__(self, model: nn.Module, max_active: int, dtype: torch.dtype, device):
        if max_active < 1:
            raise ValueError(f"max_active_adapters must be >= 1, got {max_active}")
        self.model, self.max_active, self.dtype, self.device = model, max_active, dtype, device
        self._loaded: OrderedDict[str, LoRAAdapter] = OrderedDict()
        self._pins: dict[str, int] = {}
        self._memory: dict[str, LoRAAdapter] = {}  # memory:<name> -> its current version
        self._versions: dict[str, LoRAAdapter] = {}  # versioned key -> current or referred to
        self._refs: dict[str, int] = {}  # versioned key -> requests referring to it
        self._lock = threading.Lock()

    # ---- in-memory adapters -------------------------------------------------------------

    def register(self, name: str, cfg: dict, tensors: dict[str, torch.Tensor]) -> str:
        """Add or replace the in-memory adapter ``name`` from a PEFT config dict and state
        dict (see ``adapter_from_state``; tensors are copied). Returns ``memory:<name>``, the
        value for ``Request.adapter``. Requests that already resolved it keep the old
        weights; later ones get the new. Raises ValueError for an empty name or tensors
        that do not fit the model."""
        if not name or not isinstance(name, str):
            raise ValueError(f"an in-memory adapter needs a non-empty name, got {name!r}")
        path = MEMORY_PREFIX + name
        with self._lock:
            old = self._memory.get(path)
            version = (old.version if old else 0) + 1
        adapter = adapter_from_state(
            path,
            cfg,
            tensors,
            self.model,
            self.dtype,
            self.device,
            version=version,
            config_label=f"adapter {path}: config",
            weights_label=f"adapter {path}",
        )
        with self._lock:
            self._memory[path] = adapter
            self._versions[adapter.key] = adapter
            if old is not None:
                self._drop_if_unused(old.key)
        return path

    def unregister(self, name: str) -> None:
        """Forget the in-memory adapter ``name``; requests that resolved it finish with it."""
        path = name if name.startswith(MEMORY_PREFIX) else MEMORY_PREFIX + name
        with self._lock:
            old = self._memory.pop(path, None)
            if old is not None:
                self._drop_if_unused(old.key)

    def is_registered(self, path: str) -> bool:
        with self._lock:
            return path in self._memory

    def resolve(self, path: str) -> str:
        """The key ``acquire`` takes for a request's adapter. For an in-memory adapter: the
        current version's key, referenced until ``unref``; otherwise the path itself.
        Raises ValueError for an in-memory name that is not registered."""
        if not path.startswith(MEMORY_PREFIX):
            return path
        with self._lock:
            adapter = self._memory.get(path)
            if adapter is None:
                raise ValueError(f"adapter {path} is not registered with this engine")
            self._refs[adapter.key] = self._refs.get(adapter.key, 0) + 1
            return adapter.key

    def unref(self, key: str | None) -> None:
        """A request that ``resolve``d ``key`` has ended. Other keys are ignored."""
        if key is None or not key.startswith(MEMORY_PREFIX):
            return
        with self._lock:
            self._refs[key] = self._refs.get(key, 1) - 1
            self._drop_if_unused(key)

    def _drop_if_unused(self, key: str) -> None:
        adapter = self._versions.get(key)
        if adapter is None or self._refs.get(key, 0) > 0:
            return
        if self._memory.get(adapter.path) is not adapter:  # replaced or unregistered
            del self._versions[key]
            self._refs.pop(key, None)

    # ---- adapter directories (and the pins of both kinds) -------------------------------

    def acquire(self, path: str) -> LoRAAdapter | None:
        if path.startswith(MEMORY_PREFIX):
            with self._lock:
                return self._versions[path]  # referenced since resolve, so still here
        key = str(Path(path).resolve())
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
            else:
                if len(self._loaded) >= self.max_active:
                    victim = next((k for k in self._loaded if not self._pins.get(k)), None)
                    if victim is None:
                        return None
                    del self._loaded[victim]
                self._loaded[key] = load_adapter(key, self.model, self.dtype, self.device)
            self._pins[key] = self._pins.get(key, 0) + 1
            return self._loaded[key]

    def release(self, adapter: LoRAAdapter) -> None:
        if adapter.version:  # in-memory: never evicted, so never pinned; see unref
            return
        with self._lock:
            self._pins[adapter.path] -= 1

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)


class LoRABatch:
    """Which adapter each row of a step uses, and the per-module delta math.

    ``row_adapters``: one entry per row, an adapter or None. Rows with the same adapter
    need not be contiguous; each adapter's rows are gathered once per step. When every row
    uses the same adapter (one tenant's traffic, a GRPO step's groups), nothing is gathered:
    the deltas are added to whole tensors in place.
    """

    def __init__(self, row_adapters: list[LoRAAdapter | None], device):
        self.adapters: list[LoRAAdapter] = []
        slot_of: dict[str, int] = {}
        slots = []
        for a in row_adapters:
            if a is None:
                slots.append(-1)
                continue
            if a.key not in slot_of:  # the key: two versions of one in-memory adapter differ
                slot_of[a.key] = len(self.adapters)
                self.adapters.append(a)
            slots.append(slot_of[a.key])
        self.row_slot = torch.tensor(slots, dtype=torch.int64, device=device)
        self.whole = len(self.adapters) == 1 and -1 not in slots
        self.rows = [
            (a, (self.row_slot == i).nonzero().squeeze(1)) for i, a in enumerate(self.adapters)
        ]

    def __bool__(self) -> bool:
        return bool(self.adapters)

    def _segments(self, rows: torch.Tensor | None):
        """(adapter, its rows' indices, or None for every row) for each adapter present."""
        if self.whole:
            return [(self.adapters[0], None)]
        if rows is None:
            return self.rows
        slots = self.row_slot[rows]
        return [(a, (slots == i).nonzero().squeeze(1)) for i, a in enumerate(self.adapters)]

    def add(
        self, name: str, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """y[i] += scale * B @ A @ x[i] for each row with an adapter targeting ``name``.

        ``x`` [n, in], ``y`` [n, out]; ``rows`` maps them to step rows (None: identity).
        Returns y (updated in place).
        """
        for adapter, idx in self._segments(rows):
            w = adapter.weights.get(name)
            if w is None:
                continue
            a, b, s = w
            if idx is None:
                y.addmm_(x @ a.T, b.T, alpha=s)
            elif idx.numel():
                y.index_add_(0, idx, (x[idx] @ a.T) @ b.T, alpha=s)
        return y

    def add_one(self, name: str, adapter: LoRAAdapter | None, x: torch.Tensor, y: torch.Tensor):
        """y += scale * B @ A @ x for every row: all rows use ``adapter`` (or none)."""
        w = adapter.weights.get(name) if adapter is not None else None
        if w is not None:
            a, b, s = w
            y.add_((x @ a.T) @ b.T, alpha=s)
        return y

    def route(self, name: str, gate: nn.Module, x: torch.Tensor, weights, indices) -> None:
        """Redo the router's choice for rows whose adapter changes the router weight.

        The router's top-k and grouping are not linear, so the adapted weight
        W + s * B @ A (experts x hidden, small) is formed per adapter and the model's own
        ``Gate`` runs with it on that adapter's rows. ``weights``/``indices`` change in place.
        """
        for adapter, idx in self.rows:
            w = adapter.weights.get(name)
            if w is None or idx.numel() == 0:
                continue
            a, b, s = w
            merged = gate.weight + s * (b.float() @ a.float())
            wi, ii = torch.func.functional_call(gate, {"weight": merged}, (x[idx],))
            weights[idx], indices[idx] = wi, ii

    # Absorbed MLA: kv_b_proj's weight W [H*(dn+dv), R] enters decode as W_UK [H, dn, R]
    # (folded into the query) and W_UV [H, dv, R] (folded into the output). A LoRA delta
    # s * B @ A splits the same way: B [H*(dn+dv), r] -> B_UK [H, dn, r], B_UV [H, dv, r].

    def absorbed_query(
        self, name: str, q_nope: torch.Tensor, q_lat: torch.Tensor, rows: torch.Tensor, dn: int
    ) -> None:
        """q_lat [n, H, R] += s * (q_nope [n, H, dn] . B_UK) @ A for adapter rows."""
        for adapter, idx in self._segments(rows):
            w = adapter.weights.get(name)
            if w is None or (idx is not None and idx.numel() == 0):
                continue
            a, b, s = w
            h = q_lat.shape[1]
            b_uk = b.view(h, -1, b.shape[-1])[:, :dn]  # [H, dn, r]
            if idx is None:
                q_lat.add_(torch.einsum("nhd,hdk->nhk", q_nope, b_uk) @ a, alpha=s)
            else:
                t = torch.einsum("nhd,hdk->nhk", q_nope[idx], b_uk)
                q_lat.index_add_(0, idx, t @ a, alpha=s)

    def absorbed_output(
        self, name: str, o_lat: torch.Tensor, out: torch.Tensor, rows: torch.Tensor, dn: int
    ) -> None:
        """out [n, H, dv] += s * (o_lat [n, H, R] @ A.T) . B_UV for adapter rows."""
        for adapter, idx in self._segments(rows):
            w = adapter.weights.get(name)
            if w is None or (idx is not None and idx.numel() == 0):
                continue
            a, b, s = w
            h = out.shape[1]
            b_uv = b.view(h, -1, b.shape[-1])[:, dn:]  # [H, dv, r]
            if idx is None:
                out.add_(torch.einsum("nhk,hvk->nhv", o_lat @ a.T, b_uv), alpha=s)
            else:
                t = o_lat[idx] @ a.T  # [n, H, r]
                out.index_add_(0, idx, torch.einsum("nhk,hvk->nhv", t, b_uv), alpha=s)
