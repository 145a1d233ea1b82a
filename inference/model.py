"""A DeepSeek-V2/V3-architecture decoder in one file, read top-down.

Papers:
  - RoFormer: rotary position embedding (Su et al., 2021, arXiv:2104.09864)
  - YaRN: efficient context window extension of LLMs (Peng et al., 2023, arXiv:2309.00071)
  - DeepSeekMoE: fine-grained and shared experts (Dai et al., 2024, arXiv:2401.06066)
  - DeepSeek-V2: multi-head latent attention, MLA (DeepSeek-AI, 2024, arXiv:2405.04434)
  - DeepSeek-V3: sigmoid gating with bias-based balancing, FP8 weights (arXiv:2412.19437)

Parameter names follow the Hugging Face ``DeepseekV3ForCausalLM`` checkpoint layout
(``model.layers.N.self_attn.q_a_proj.weight``, ``model.layers.N.mlp.experts.E.up_proj.weight``,
``lm_head.weight``, ...) so checkpoints and PEFT adapters map one to one. Routed experts
are separate ``nn.Linear`` modules, as DeepSeek ships them: PEFT can target them by name and
FP8 conversion swaps them like any other linear (see ``inference/fp8.py``; the model itself
never looks at dtypes). This forward is the full-sequence (prefill/training) path without
a cache; decode with absorbed MLA projections over a latent cache builds on
``MultiHeadLatentAttention.compress_kv``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from inference.config import ModelConfig


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in float32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# ---- rotary position embedding ----------------------------------------------------------


def rope_inv_freq(config: ModelConfig, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies of the qk_rope_head_dim / 2 rotary pairs, YaRN-corrected if configured.

    YaRN interpolates the low frequencies by ``factor`` and keeps the high ones, with a linear
    ramp between the dimensions that make beta_fast and beta_slow turns over the original
    context (the same arithmetic as DeepSeek's and transformers' reference code).
    """
    dim, base = config.qk_rope_head_dim, config.rope_theta
    freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    rs = config.rope_scaling
    if rs is None:
        return freq
    factor = config.yarn_factor
    original = rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = (
        (torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)
    ).clamp(0, 1)
    keep = 1 - ramp  # 1: keep the original (extrapolated) frequency, 0: interpolate
    return freq / factor * (1 - keep) + freq * keep


class RotaryEmbedding(nn.Module):
    """cos and sin of position * inv_freq, times YaRN's attention factor. Holds no buffers:
    the handful of frequencies is recomputed per call, so meta-device construction and
    ``.to(device)`` need no special care."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] (int) -> cos, sin [T, qk_rope_head_dim / 2] in float32."""
        inv_freq = rope_inv_freq(self.config, positions.device)
        angles = positions.float()[:, None] * inv_freq[None, :]
        scale = self.config.rope_attention_factor
        return angles.cos() * scale, angles.sin() * scale


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool
) -> torch.Tensor:
    """Rotate x [B, T, H, r] by position. With ``interleave`` the pairs are (x0, x1), (x2, x3),
    ... (DeepSeek's layout); otherwise (x_i, x_{i + r/2}) (the rotate-half layout).

    The result is written rotate-half style in both cases: q and k get the same permutation,
    so attention scores are unchanged and no re-interleaving copy is needed.
    """
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# ---- multi-head latent attention --------------------------------------------------------


class MultiHeadLatentAttention(nn.Module):
    """MLA (DeepSeek-V2 section 2.1). Keys and values are rebuilt from a shared kv_lora_rank
    latent; position enters through a separate qk_rope_head_dim key shared by all heads."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c, h = config, config.num_attention_heads
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, h * c.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank)
            self.q_b_proj = nn.Linear(c.q_lora_rank, h * c.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=False
        )
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank)
        self.kv_b_proj = nn.Linear(
            c.kv_lora_rank, h * (c.qk_nope_head_dim + c.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(h * c.v_head_dim, c.hidden_size, bias=False)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, hidden] -> q [B, T, H, qk_head_dim], before RoPE."""
        if self.config.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return q.view(*x.shape[:2], self.config.num_attention_heads, self.config.qk_head_dim)

    def compress_kv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, hidden] -> (normalised latent [B, T, kv_lora_rank], rotated key [B, T, 1, r]).
        These two are all a decode cache needs to keep."""
        c = self.config
        latent, k_rope = self.kv_a_proj_with_mqa(x).split(
            [c.kv_lora_rank, c.qk_rope_head_dim], dim=-1
        )
        k_rope = apply_rope(k_rope.unsqueeze(2), cos, sin, c.rope_interleave)
        return self.kv_a_layernorm(latent), k_rope

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        segments: list[int] | None = None,
    ) -> torch.Tensor:
        """Causal self-attention over the whole sequence: x [B, T, hidden] -> [B, T, hidden].
        ``segments``: x is [1, sum(segments), hidden], sequences laid end to end, each
        attending within itself only (padding-free batches, see ``Transformer.forward``)."""
        c = self.config
        bsz, seqlen, _ = x.shape
        h = c.num_attention_heads
        q_nope, q_rope = self.query(x).split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        q = torch.cat([q_nope, apply_rope(q_rope, cos, sin, c.rope_interleave)], dim=-1)

        latent, k_rope = self.compress_kv(x, cos, sin)
        kv = self.kv_b_proj(latent).view(bsz, seqlen, h, c.qk_nope_head_dim + c.v_head_dim)
        k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, -1, h, -1)], dim=-1)

        # PyTorch's fused CPU/GPU attention kernels want one head width for q, k and v: pad v
        # up to qk_head_dim (zeros add nothing) rather than fall back to the unfused path.
        pad = c.qk_head_dim - c.v_head_dim
        if pad > 0:
            v = F.pad(v, (0, pad))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if segments is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=c.softmax_scale)
        else:
            parts = zip(
                q.split(segments, 2), k.split(segments, 2), v.split(segments, 2), strict=True
            )
            out = torch.cat(
                [
                    F.scaled_dot_product_attention(*qkv, is_causal=True, scale=c.softmax_scale)
                    for qkv in parts
                ],
                dim=2,
            )
        out = out[..., : c.v_head_dim].transpose(1, 2).reshape(bsz, seqlen, h * c.v_head_dim)
        return self.o_proj(out)


# ---- feed-forward: dense MLP and DeepSeekMoE --------------------------------------------


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Used for dense layers, each routed
    expert, and the (fused) shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """The router: picks num_experts_per_tok experts per token and their weights.

    scores = sigmoid or softmax of x @ weight.T (in float32). With ``noaux_tc`` (V3) the
    correction bias is added for *choosing* experts only; the weights come from the unbiased
    scores. With groups, only the topk_group best groups are eligible (a group scores the sum
    of its two best experts under noaux_tc, its best expert under group_limited_greedy).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        nn.init.normal_(self.weight, std=config.hidden_size**-0.5)
        if config.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> (weights [N, k] float32, expert ids [N, k] int64)."""
        c = self.config
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if c.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = (
            scores
            if self.e_score_correction_bias is None
            else scores + self.e_score_correction_bias
        )
        if c.n_group > 1:
            grouped = choice.view(-1, c.n_group, c.experts_per_group)
            if c.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            keep = group_scores.topk(c.topk_group, dim=-1).indices
            mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            choice = grouped.masked_fill(mask[..., None], float("-inf")).flatten(1)
        indices = choice.topk(c.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, indices)
        if c.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * c.routed_scaling_factor, indices


class MoE(nn.Module):
    """DeepSeekMoE: routed experts chosen per token plus always-on shared experts."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.gate = Gate(config)
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, config.moe_intermediate_size)
            for _ in range(config.n_routed_experts)
        )
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, indices = self.gate(x)
        if not torch.is_grad_enabled():
            return self._infer(x, weights, indices).view(shape)
        # Grouped dispatch: sort the (token, expert) pairs by expert so each expert runs one
        # matmul over a contiguous block of its tokens, then scatter-add the results back.
        flat = indices.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.config.n_routed_experts).tolist()
        token_of = order // self.config.num_experts_per_tok
        # split/cat rather than writes into slices of one buffer: under autograd each slice
        # would give its expert a full-size zero gradient buffer (E of them per layer).
        parts = x[token_of].split(counts)
        pairs = zip(self.experts, parts, strict=True)
        routed_out = torch.cat([expert(part) if len(part) else part for expert, part in pairs])
        routed_out = routed_out * weights.flatten()[order, None].to(x.dtype)
        y = torch.zeros_like(x).index_add_(0, token_of, routed_out)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)

    def _infer(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The same function without autograd, expert by expert: gather the expert's rows,
        run it, scale by the router weights and add the result into the output in place.
        Every intermediate is one expert's block (a few hundred KiB, cache-resident) instead
        of the [tokens * k, hidden] gather, product and concatenation the autograd path
        makes: small's nine MoE layers took 0.73 s instead of 0.77-0.83 s in a 512-token
        float32 prefill."""
        flat = indices.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.config.n_routed_experts).tolist()
        token_of = order // self.config.num_experts_per_tok
        scale = weights.flatten()[order].to(x.dtype)
        y = self.shared_experts(x) if self.shared_experts is not None else torch.zeros_like(x)
        start = 0
        for expert, n in zip(self.experts, counts, strict=True):
            if n:
                rows = token_of[start : start + n]
                out = expert(x.index_select(0, rows))
                y.index_add_(0, rows, out.mul_(scale[start : start + n, None]))
                start += n
        return y


# ---- the decoder ------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MultiHeadLatentAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        dense = layer_id < config.first_k_dense_replace
        self.mlp = MLP(config.hidden_size, config.intermediate_size) if dense else MoE(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        segments: list[int] | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, segments)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Embedding, blocks and final norm: HF's ``model.`` prefix."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        compute_dtype: torch.dtype,
        segments: list[int] | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] -> hidden states [B, T, hidden]; with ``segments``, input_ids is
        [1, sum(segments)]: sequences end to end, positions restarting at each."""
        device = input_ids.device
        if segments is None:
            positions = torch.arange(input_ids.shape[1], device=device)
        else:
            positions = torch.cat([torch.arange(n, device=device) for n in segments])
        cos, sin = self.rotary_emb(positions)
        # The embedding may be stored narrower than the compute dtype (bf16 in FP8 checkpoints).
        x = self.embed_tokens(input_ids).to(compute_dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, segments)
        return self.norm(x)


class Transformer(nn.Module):
    """The causal LM. ``model(input_ids [B, T]) -> logits [B, T, vocab]``, no cache
    (``logits_at=mask`` for the logits of some positions only).

    ``compute_dtype`` is the activation dtype (float32, bfloat16, ...); weights may be
    stored in it or, for FP8-converted linears, in float8 with block scales.
    """

    def __init__(self, config: ModelConfig, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype
        self.model = Decoder(config)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        logits_at: torch.Tensor | None = None,
        segments: list[list[int]] | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab].

        ``logits_at``: a boolean mask [B, T]; then only the logits of those positions, as
        [n, vocab] in row-major order. Training scores a fraction of the positions (the
        assistant's tokens, a completion), and the vocabulary projection is a large share of
        a small model's work: it then runs on those rows alone.

        ``segments`` (requires ``logits_at``): for each row, the lengths of the sequences
        laid end to end from its first position, right padding after them. The padding is
        then never computed, and each sequence attends within itself only, its positions
        starting at 0: packed examples are kept apart, each computed as if it were alone.
        ``[[n_b] for each row b]`` just skips the padding (causal attention never looks
        right, so the real positions get the padded batch's results). ``logits_at`` must
        not select padding.
        """
        if logits_at is not None and (
            logits_at.shape != input_ids.shape or logits_at.dtype != torch.bool
        ):
            raise ValueError(
                f"logits_at must be a bool mask shaped like input_ids {tuple(input_ids.shape)},"
                f" got {logits_at.dtype} {tuple(logits_at.shape)}"
            )
        if segments is None:
            h = self.model(input_ids, self.compute_dtype)
            if logits_at is not None:
                h = h[logits_at]
        else:
            if logits_at is None:
                raise ValueError("segments needs logits_at: the padding has no logits")
            bsz, seqlen = input_ids.shape
            if len(segments) != bsz or any(
                not row or min(row) < 1 or sum(row) > seqlen for row in segments
            ):
                raise ValueError(
                    f"segments must give each of the {bsz} rows sequence lengths >= 1 that sum"
                    f" to at most {seqlen}, got {segments}"
                )
            lengths = torch.tensor([sum(row) for row in segments], device=input_ids.device)
            real = torch.arange(seqlen, device=input_ids.device) < lengths[:, None]
            if (logits_at & ~real).any():
                raise ValueError("logits_at selects padding positions (beyond the segments)")
            flat = [n for row in segments for n in row]
            h = self.model(input_ids[real][None], self.compute_dtype, flat)
            h = h[0][logits_at[real]]
        if self.lm_head is None:
            return F.linear(h, self.model.embed_tokens.weight.to(h.dtype))
        return self.lm_head(h)
