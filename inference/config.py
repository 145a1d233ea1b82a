"""ModelConfig: the shape of a DeepSeek-V2/V3-architecture model, read from and written to
a Hugging Face ``config.json``.

One dataclass holds every number the engine needs. ``from_hf_dict`` understands
``model_type`` ``deepseek_v3`` (sigmoid gating with a correction bias, ``noaux_tc``) and
``deepseek_v2`` (softmax gating, ``greedy`` or ``group_limited_greedy``, no bias,
``q_lora_rank: null`` as in V2-Lite), in both the transformers-5 ``rope_parameters`` form
and the older ``rope_scaling`` + ``rope_theta`` form DeepSeek ships. ``to_hf_dict`` writes a
dict that transformers' ``DeepseekV3Config``/``DeepseekV2Config`` accepts; keys we do not
model are kept in ``extra`` and written back untouched.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
_TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
_ROPE_TYPES = ("default", "yarn")

# HF keys that ModelConfig reads into fields, so they are not copied into `extra`.
_ROPE_KEYS = ("rope_parameters", "rope_scaling", "rope_theta")
_DERIVED_HF_KEYS = (
    "qk_head_dim",
    "head_dim",
    "num_key_value_heads",
    "num_nextn_predict_layers",
    "architectures",
)


@dataclass
class ModelConfig:
    """Every size and switch of the model. Derived sizes are filled in by ``__post_init__``."""

    vocab_size: int  # number of token ids
    hidden_size: int  # width of the residual stream
    intermediate_size: int  # hidden width of the dense MLP (first_k_dense_replace layers)
    moe_intermediate_size: int  # hidden width of one routed (or shared) expert
    num_hidden_layers: int  # decoder blocks
    num_attention_heads: int  # MLA heads (every head has its own K and V: no GQA)
    q_lora_rank: int | None  # rank of the compressed query; None: one plain q_proj (V2-Lite)
    kv_lora_rank: int  # rank of the compressed KV latent, the thing a decode cache keeps
    qk_nope_head_dim: int  # per-head query/key width without rotary position
    qk_rope_head_dim: int  # per-head query/key width carrying RoPE (the key part is shared)
    v_head_dim: int  # per-head value width
    n_routed_experts: int  # routed experts per MoE layer
    num_experts_per_tok: int  # routed experts each token is sent to (top-k)
    n_shared_experts: int  # shared experts, fused into one MLP of n * moe_intermediate_size
    n_group: int  # expert groups for group-limited routing (1: no grouping)
    topk_group: int  # groups a token may pick its experts from
    first_k_dense_replace: int  # the first k layers use the dense MLP instead of MoE
    routed_scaling_factor: float  # routed expert output multiplier
    norm_topk_prob: bool  # renormalise the top-k weights to sum to 1
    scoring_func: str = "sigmoid"  # expert affinity: "sigmoid" (V3) or "softmax" (V2)
    topk_method: str = (
        "noaux_tc"  # "noaux_tc" (V3, correction bias), "greedy", "group_limited_greedy"
    )
    max_position_embeddings: int = 4096  # longest sequence the model is meant for
    rms_norm_eps: float = 1e-6  # epsilon of the residual-stream RMSNorms
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: dict[str, Any] | None = (
        None  # None, or YaRN: {"rope_type": "yarn", "factor", ...}
    )
    rope_interleave: bool = True  # rotary pairs are (x0, x1), (x2, x3) as DeepSeek stores them
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix
    hidden_act: str = "silu"  # MLP activation; only SiLU (SwiGLU) is built
    num_mtp_layers: int = 0  # multi-token-prediction layers in the checkpoint; loaded as ignored
    bos_token_id: int | None = 0  # begin-of-sequence id, written back to config.json
    eos_token_id: int | list[int] | None = 1  # end-of-sequence id(s)
    pad_token_id: int | None = None  # padding id (embedding row is not special-cased)
    model_type: str = "deepseek_v3"  # "deepseek_v3" or "deepseek_v2": decides the HF class
    quantization_config: dict[str, Any] | None = None  # DeepSeek FP8 block config, or None
    extra: dict[str, Any] = field(default_factory=dict)  # HF keys we carry but do not use

    # Derived in __post_init__ (not constructor arguments).
    qk_head_dim: int = field(init=False)  # qk_nope_head_dim + qk_rope_head_dim
    experts_per_group: int = field(init=False)  # n_routed_experts // n_group
    rope_attention_factor: float = field(init=False)  # YaRN scale applied to cos and sin
    softmax_scale: float = field(init=False)  # attention logit scale, YaRN mscale included

    def __post_init__(self) -> None:
        self.validate()
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.experts_per_group = self.n_routed_experts // self.n_group
        self.softmax_scale = self.qk_head_dim**-0.5
        self.rope_attention_factor = 1.0
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            factor = self.yarn_factor
            if rs.get("attention_factor") is not None:
                self.rope_attention_factor = float(rs["attention_factor"])
            elif rs.get("mscale") and rs.get("mscale_all_dim"):
                self.rope_attention_factor = _yarn_mscale(factor, rs["mscale"]) / _yarn_mscale(
                    factor, rs["mscale_all_dim"]
                )
            else:
                self.rope_attention_factor = _yarn_mscale(factor)
            # DeepSeek scales the logits by mscale_all_dim twice (once for q, once for k).
            if rs.get("mscale_all_dim"):
                self.softmax_scale *= _yarn_mscale(factor, rs["mscale_all_dim"]) ** 2

    @property
    def yarn_factor(self) -> float:
        """YaRN context-extension factor (max_position / original_max_position if unset)."""
        rs = self.rope_scaling or {}
        if rs.get("factor") is not None:
            return float(rs["factor"])
        return self.max_position_embeddings / rs["original_max_position_embeddings"]

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value cannot describe a model."""
        positive = (
            "vocab_size hidden_size intermediate_size moe_intermediate_size num_hidden_layers "
            "num_attention_heads kv_lora_rank qk_nope_head_dim qk_rope_head_dim v_head_dim "
            "n_routed_experts num_experts_per_tok n_group topk_group"
        ).split()
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.q_lora_rank is not None and (
            not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0
        ):
            raise ValueError(
                f"q_lora_rank must be a positive integer or null, got {self.q_lora_rank!r}"
            )
        if self.model_type not in _MODEL_TYPES:
            raise ValueError(f"model_type must be one of {_MODEL_TYPES}, got {self.model_type!r}")
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise ValueError(
                f"scoring_func must be 'sigmoid' or 'softmax', got {self.scoring_func!r}"
            )
        if self.topk_method not in _TOPK_METHODS:
            raise ValueError(
                f"topk_method must be one of {_TOPK_METHODS}, got {self.topk_method!r}"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu', got {self.hidden_act!r}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.n_shared_experts < 0:
            raise ValueError(f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                f"n_routed_experts ({self.n_routed_experts})"
            )
        if self.n_routed_experts % self.n_group:
            raise ValueError(
                f"n_group ({self.n_group}) does not divide n_routed_experts ({self.n_routed_experts})"
            )
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group ({self.topk_group}) exceeds n_group ({self.n_group})")
        per_group = self.n_routed_experts // self.n_group
        if self.num_experts_per_tok > self.topk_group * per_group:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts in "
                f"topk_group ({self.topk_group}) groups of {per_group}"
            )
        if self.topk_method == "noaux_tc" and self.n_group > 1 and per_group < 2:
            # A group's score is the sum of its two best experts.
            raise ValueError(f"n_group ({self.n_group}) leaves fewer than 2 experts per group")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ValueError(
                f"first_k_dense_replace must be in [0, num_hidden_layers], "
                f"got {self.first_k_dense_replace}"
            )
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type")
            if rope_type != "yarn":
                raise ValueError(
                    f"rope_scaling.rope_type must be 'yarn' (or no scaling), got {rope_type!r}"
                )
            if "original_max_position_embeddings" not in self.rope_scaling:
                raise ValueError("rope_scaling.original_max_position_embeddings is missing")
        if self.quantization_config is not None:
            _validate_quantization(self.quantization_config)

    # ---- Hugging Face config.json ----------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a parsed HF ``config.json``. Raises ValueError naming a missing or bad field."""
        d = dict(d)
        model_type = d.get("model_type")
        if model_type not in _MODEL_TYPES:
            raise ValueError(f"model_type must be one of {_MODEL_TYPES}, got {model_type!r}")
        v3 = model_type == "deepseek_v3"

        def need(name: str) -> Any:
            if name not in d:
                raise ValueError(f"config field {name!r} is missing")
            return d[name]

        heads = need("num_attention_heads")
        kv_heads = d.get("num_key_value_heads")
        if kv_heads not in (None, heads):
            raise ValueError(
                f"num_key_value_heads ({kv_heads}) must equal num_attention_heads ({heads}): "
                "MLA has no grouped KV heads"
            )
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise ValueError(f"{flag}: true is not supported")
        if not v3 and "rope_interleave" in d and not d["rope_interleave"]:
            raise ValueError("rope_interleave: deepseek_v2 always uses interleaved RoPE")

        rope_theta, rope_scaling = _read_rope(d)
        topk_method = d.get("topk_method") or ("noaux_tc" if v3 else "greedy")
        n_group = d.get("n_group") or 1
        topk_group = d.get("topk_group") or 1
        if not v3 and topk_method == "greedy":
            n_group, topk_group = 1, 1  # plain top-k: V2 configs may still carry group sizes
        known = {f.name for f in dataclasses.fields(cls)}
        extra = {
            k: v
            for k, v in d.items()
            if k not in known and k not in _ROPE_KEYS and k not in _DERIVED_HF_KEYS
        }
        return cls(
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            moe_intermediate_size=need("moe_intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            q_lora_rank=need("q_lora_rank"),
            kv_lora_rank=need("kv_lora_rank"),
            qk_nope_head_dim=need("qk_nope_head_dim"),
            qk_rope_head_dim=need("qk_rope_head_dim"),
            v_head_dim=need("v_head_dim"),
            n_routed_experts=need("n_routed_experts"),
            num_experts_per_tok=need("num_experts_per_tok"),
            n_shared_experts=d.get("n_shared_experts") or 0,
            n_group=n_group,
            topk_group=topk_group,
            first_k_dense_replace=d.get("first_k_dense_replace", 0),
            routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(d.get("norm_topk_prob", v3)),
            scoring_func=d.get("scoring_func") or ("sigmoid" if v3 else "softmax"),
            topk_method=topk_method,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rope_interleave=bool(d.get("rope_interleave", True)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            hidden_act=d.get("hidden_act", "silu"),
            num_mtp_layers=d.get("num_nextn_predict_layers", d.get("num_mtp_layers", 0)) or 0,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            model_type=model_type,
            quantization_config=d.get("quantization_config"),
            extra=extra,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF ``config.json`` dict (transformers-5 ``rope_parameters`` form)."""
        v3 = self.model_type == "deepseek_v3"
        skip = {"extra", "rope_theta", "rope_scaling", "num_mtp_layers", "quantization_config"}
        skip |= {f.name for f in dataclasses.fields(self) if not f.init}
        out: dict[str, Any] = dict(self.extra)
        out.update(
            {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        )
        out["num_key_value_heads"] = self.num_attention_heads
        out["num_nextn_predict_layers"] = self.num_mtp_layers
        out["architectures"] = ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"]
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope.update(self.rope_scaling)
        out["rope_parameters"] = rope
        if not v3:
            del out["rope_interleave"]  # V2 is always interleaved; its HF class has no field
        if self.quantization_config is not None:
            out["quantization_config"] = dict(self.quantization_config)
        return out

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        """Read a ``config.json`` file (or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read config: {e}") from e
        try:
            return cls.from_hf_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    def save(self, path: str | Path) -> None:
        """Write ``config.json`` to ``path`` (a file, or a directory that gets config.json)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        path.write_text(json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes`` applied (and validated)."""
        init = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        init.update(changes)
        return ModelConfig(**init)


FP8_QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}


def _validate_quantization(q: dict[str, Any]) -> None:
    if q.get("quant_method") != "fp8":
        raise ValueError(
            f"quantization_config.quant_method must be 'fp8', got {q.get('quant_method')!r}"
        )
    if q.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"quantization_config.fmt must be 'e4m3', got {q.get('fmt')!r}")
    if list(q.get("weight_block_size", [128, 128])) != [128, 128]:
        raise ValueError(
            f"quantization_config.weight_block_size must be [128, 128], got {q.get('weight_block_size')!r}"
        )


def _read_rope(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, yarn dict or None) from either rope_parameters or rope_scaling + rope_theta."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    params = dict(params)
    theta = float(params.pop("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ValueError(
            f"rope_parameters.rope_type must be one of {_ROPE_TYPES}, got {rope_type!r}"
        )
    if rope_type == "default":
        return theta, None
    params.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 4096))
    return theta, {"rope_type": "yarn", **params}


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction, 0.1 * mscale * ln(scale) + 1 (1 if no scaling)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0
