"""One forward step over a mixed batch of sequences against the paged latent cache.

A step holds, for each scheduled sequence, a *chunk* of new tokens: one token for a
sequence that is decoding, up to a prefill budget for one that is still reading its prompt
(chunked prefill). All chunks' tokens run through the linear layers and the MoE as one flat
batch of rows; only attention is per sequence.

Attention comes in the two forms DeepSeek-V2 (section 2.1.2) and vLLM's MLA backend use:

- one-token chunks (decode) run in latent space. ``kv_b_proj``'s weight splits into W_UK
  [H, dn, R] and W_UV [H, dv, R]; the query is moved into the latent space
  (``q_lat = q_nope . W_UK``), scores are ``q_lat . c_kv + q_rope . k_rope`` against the
  cached latents directly, and W_UV is applied to the attention-weighted latent. The cache
  is read once per step, at (kv_lora_rank + qk_rope_head_dim) values per token: it is
  never expanded into per-head keys and values. All decoding sequences share one batched
  computation (padded to the longest context, masked).
- multi-token chunks (prefill) are compute-bound, where the absorbed form costs several
  times more FLOPs (R + r wide scores and R wide values instead of dn + r and dv). They
  up-project the chunk's context to per-head K and V transiently, inside this call, and
  use PyTorch's fused attention; nothing expanded is kept.

The model's modules and weights are used as they are (``inference/model.py`` is not
changed); LoRA deltas of the step's adapters are added around each linear
(``inference/lora.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from inference import fp8_cpu
from inference.fp8 import FP8Linear
from inference.kv_cache import PagedLatentCache
from inference.lora import LoRAAdapter, LoRABatch
from inference.model import MLP, MoE, Transformer, apply_rope


@dataclass
class Chunk:
    """New tokens of one sequence for this step.

    ``tokens`` sit at positions ``start .. start+len-1``; the cache already holds positions
    ``0 .. start-1``; ``block_table`` has room for all of them. ``logits``: return the
    next-token logits after the chunk's last token.
    """

    tokens: list[int]
    start: int
    block_table: list[int]
    adapter: LoRAAdapter | None = None
    logits: bool = True


@dataclass
class _Step:
    input_ids: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    slots: torch.Tensor  # [N] cache slot of each new token
    n_decode: int  # rows 0..n_decode-1 are one-token chunks
    decode_slots: torch.Tensor | None  # [n_decode, L] context slots, padded
    decode_mask: torch.Tensor | None  # [n_decode, 1, L] additive (0 or -inf)
    prefills: list[tuple[int, int, torch.Tensor, LoRAAdapter | None]]  # row range, ctx slots
    logit_rows: torch.Tensor  # [S]
    lora: LoRABatch | None


def _weight(linear: torch.nn.Linear) -> torch.Tensor:
    if isinstance(linear, FP8Linear):
        return linear.dequantized_weight()
    return linear.weight


class LatentRunner:
    """Runs ``Transformer`` steps over a ``PagedLatentCache``.

    ``runner.step(chunks) -> logits [number of chunks with logits=True, vocab]`` in chunk
    order. Writes every new token's latent and rope key into the cache. Must run under
    ``torch.inference_mode()`` (the engine's thread does) or no_grad.
    """

    def __init__(self, model: Transformer, cache: PagedLatentCache):
        self.model, self.cache, self.config = model, cache, model.config
        c = self.config
        self.dtype = model.compute_dtype
        self.device = model.model.embed_tokens.weight.device
        h, dn, dv = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim
        # Absorbed projections per layer: views of kv_b_proj's weight (a dequantised copy
        # for FP8, made once: these are small, H * (dn + dv) * R values per layer).
        self.w_uk, self.w_uv = [], []
        for layer in model.model.layers:
            w = _weight(layer.self_attn.kv_b_proj).view(h, dn + dv, c.kv_lora_rank)
            self.w_uk.append(w[:, :dn])  # [H, dn, R]
            self.w_uv.append(w[:, dn:].transpose(1, 2))  # [H, R, dv]
        self._tables: dict = {}  # layer -> fp8_cpu.ExpertTable or None (see _expert_table)
        self.names = [
            {
                k: f"model.layers.{i}.self_attn.{k}"
                for k in ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
                + ("o_proj",)
            }
            for i in range(c.num_hidden_layers)
        ]

    # ---- batch preparation -------------------------------------------------------------

    def _prepare(self, chunks: list[Chunk]) -> tuple[_Step, list[int]]:
        order = sorted(range(len(chunks)), key=lambda i: len(chunks[i].tokens) != 1)
        ids, pos, slots, row_adapters = [], [], [], []
        decode_ctx: list[list[int]] = []
        prefills = []
        logit_rows: list[int] = []
        logit_order: list[int] = []
        n_decode = 0
        for i in order:
            ch = chunks[i]
            n, end = len(ch.tokens), ch.start + len(ch.tokens)
            row0 = len(ids)
            ids += ch.tokens
            pos += range(ch.start, end)
            slots += self.cache.slots(ch.block_table, ch.start, end)
            row_adapters += [ch.adapter] * n
            if n == 1:
                n_decode += 1
                decode_ctx.append(self.cache.slots(ch.block_table, 0, end))
            else:
                ctx = self.cache.slot_tensor(ch.block_table, end)
                prefills.append((row0, row0 + n, ctx, ch.adapter))
            if ch.logits:
                logit_rows.append(row0 + n - 1)
                logit_order.append(i)
        dev = self.device
        decode_slots = decode_mask = None
        if n_decode:
            width = max(len(s) for s in decode_ctx)
            padded = torch.zeros(n_decode, width, dtype=torch.int64)
            mask = torch.full((n_decode, 1, width), float("-inf"), dtype=self.dtype)
            for r, s in enumerate(decode_ctx):
                padded[r, : len(s)] = torch.tensor(s)
                mask[r, 0, : len(s)] = 0
            decode_slots, decode_mask = padded.to(dev), mask.to(dev)
        lora = LoRABatch(row_adapters, dev) if any(a is not None for a in row_adapters) else None
        step = _Step(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(pos, dtype=torch.int64, device=dev),
            slots=torch.tensor(slots, dtype=torch.int64, device=dev),
            n_decode=n_decode,
            decode_slots=decode_slots,
            decode_mask=decode_mask,
            prefills=prefills,
            logit_rows=torch.tensor(logit_rows, dtype=torch.int64, device=dev),
            lora=lora,
        )
        # logits come out in row order; map them back to chunk order.
        return step, logit_order

    # ---- the step ----------------------------------------------------------------------

    def step(self, chunks: list[Chunk]) -> torch.Tensor:
        """Run one step; see the class docstring. Raises ValueError for no chunks."""
        if not chunks:
            raise ValueError("a step needs at least one chunk")
        s, logit_order = self._prepare(chunks)
        m = self.model
        cos, sin = m.model.rotary_emb(s.positions)
        x = m.model.embed_tokens(s.input_ids).to(self.dtype)
        for i, layer in enumerate(m.model.layers):
            x = x + self._attention(i, layer.self_attn, layer.input_layernorm(x), cos, sin, s)
            h = layer.post_attention_layernorm(x)
            x = x + self._feed_forward(i, layer.mlp, h, s.lora)
        h = m.model.norm(x[s.logit_rows])
        if m.lm_head is None:
            logits = F.linear(h, m.model.embed_tokens.weight.to(h.dtype))
        else:
            logits = m.lm_head(h)
        # Rows were ordered decode-first; put the logits back in the caller's chunk order.
        perm = sorted(range(len(logit_order)), key=logit_order.__getitem__)
        return logits[torch.tensor(perm, dtype=torch.int64, device=logits.device)]

    def _linear(self, name: str, linear, x: torch.Tensor, lora: LoRABatch | None, rows=None):
        y = linear(x)
        if lora is not None:
            lora.add(name, x, y, rows)
        return y

    def _attention(self, i: int, attn, x: torch.Tensor, cos, sin, s: _Step) -> torch.Tensor:
        c, names, lora = self.config, self.names[i], s.lora
        n, h = x.shape[0], c.num_attention_heads
        dn, dr, dv, rank = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        if c.q_lora_rank is None:
            q = self._linear(names["q_proj"], attn.q_proj, x, lora)
        else:
            qa = attn.q_a_layernorm(self._linear(names["q_a_proj"], attn.q_a_proj, x, lora))
            q = self._linear(names["q_b_proj"], attn.q_b_proj, qa, lora)
        q_nope, q_rope = q.view(n, h, dn + dr).split([dn, dr], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin, c.rope_interleave)

        kv = self._linear(names["kv_a_proj_with_mqa"], attn.kv_a_proj_with_mqa, x, lora)
        latent, k_rope = kv.split([rank, dr], dim=-1)
        k_rope = apply_rope(k_rope[:, None, :], cos, sin, c.rope_interleave)[:, 0]
        self.cache.write(i, s.slots, torch.cat([attn.kv_a_layernorm(latent), k_rope], dim=-1))

        out = torch.empty(n, h, dv, dtype=x.dtype, device=x.device)
        nd = s.n_decode
        if nd:
            # Latent-space decode: W_UK into the query, W_UV onto the output.
            qn = q_nope[:nd]
            q_lat = torch.bmm(qn.transpose(0, 1), self.w_uk[i]).transpose(0, 1)  # [B, H, R]
            rows = torch.arange(nd, device=x.device) if lora is not None else None
            if lora is not None:
                q_lat = q_lat.contiguous()
                lora.absorbed_query(names["kv_b_proj"], qn, q_lat, rows, dn)
            ctx = self.cache.read(i, s.decode_slots)  # [B, L, R + dr]
            query = torch.cat([q_lat, q_rope[:nd]], dim=-1)  # [B, H, R + dr]
            scores = torch.baddbmm(
                s.decode_mask, query, ctx.transpose(1, 2), alpha=c.softmax_scale
            )  # [B, H, L]
            probs = scores.float().softmax(dim=-1).to(x.dtype)
            o_lat = torch.bmm(probs, ctx[..., :rank])  # [B, H, R]
            o = torch.bmm(o_lat.transpose(0, 1), self.w_uv[i]).transpose(0, 1)  # [B, H, dv]
            if lora is not None:
                o = o.contiguous()
                lora.absorbed_output(names["kv_b_proj"], o_lat, o, rows, dn)
            out[:nd] = o
        for r0, r1, ctx_slots, adapter in s.prefills:
            # Prefill: expand this chunk's context to per-head K/V transiently (see module doc).
            ctx = self.cache.read(i, ctx_slots)  # [Lc, R + dr]
            lat, kr = ctx.split([rank, dr], dim=-1)
            kvb = attn.kv_b_proj(lat)
            if lora is not None:
                lora.add_one(names["kv_b_proj"], adapter, lat, kvb)
            k_nope, v = kvb.view(-1, h, dn + dv).split([dn, dv], dim=-1)
            k = torch.cat([k_nope, kr[:, None, :].expand(-1, h, -1)], dim=-1)
            qc = torch.cat([q_nope[r0:r1], q_rope[r0:r1]], dim=-1)
            if dn + dr > dv:  # fused kernels want one head width (zeros add nothing)
                v = F.pad(v, (0, dn + dr - dv))
            t, lc = r1 - r0, ctx.shape[0]
            if t == lc:
                mask, causal = None, True
            else:
                mask = torch.arange(lc, device=x.device)[None, :] <= s.positions[r0:r1, None]
                causal = False
            o = F.scaled_dot_product_attention(
                qc.transpose(0, 1)[None],
                k.transpose(0, 1)[None],
                v.transpose(0, 1)[None],
                attn_mask=mask,
                is_causal=causal,
                scale=c.softmax_scale,
            )
            out[r0:r1] = o[0, :, :, :dv].transpose(0, 1)
        return self._linear(names["o_proj"], attn.o_proj, out.view(n, h * dv), lora)

    def _feed_forward(self, i: int, mlp, x: torch.Tensor, lora: LoRABatch | None):
        if lora is None:
            if isinstance(mlp, MoE) and x.shape[0] <= fp8_cpu.F32_MAX_ROWS:
                table = self._expert_table(i, mlp, x)
                if table is not None:
                    # Decode-sized: the routed experts in one C call (fp8_cpu.moe_small).
                    weights, indices = mlp.gate(x)
                    y = fp8_cpu.moe_small(x, indices, weights, table)
                    if mlp.shared_experts is not None:
                        y = y + mlp.shared_experts(x)
                    return y
            return mlp(x)  # the model's own dense MLP or grouped-dispatch MoE
        prefix = f"model.layers.{i}.mlp"
        if isinstance(mlp, MLP):
            return self._mlp(prefix, mlp, x, lora, None)
        assert isinstance(mlp, MoE)
        # The model's MoE dispatch, with LoRA rows mapped through the token permutation.
        k = self.config.num_experts_per_tok
        weights, indices = mlp.gate(x)
        lora.route(f"{prefix}.gate", mlp.gate, x, weights, indices)
        flat = indices.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.config.n_routed_experts).tolist()
        token_of = order // k
        routed_in = x[token_of]
        routed_out = torch.empty_like(routed_in)
        start = 0
        for e, (expert, count) in enumerate(zip(mlp.experts, counts, strict=True)):
            if count:
                sl = slice(start, start + count)
                routed_out[sl] = self._mlp(
                    f"{prefix}.experts.{e}", expert, routed_in[sl], lora, token_of[sl]
                )
                start += count
        routed_out *= weights.flatten()[order, None].to(x.dtype)
        y = torch.zeros_like(x).index_add_(0, token_of, routed_out)
        if mlp.shared_experts is not None:
            y = y + self._mlp(f"{prefix}.shared_experts", mlp.shared_experts, x, lora, None)
        return y

    def _expert_table(self, i: int, moe: MoE, x: torch.Tensor):
        """Layer i's ExpertTable for fp8_cpu.moe_small, or None where it does not apply
        (non-CPU or mixed experts, no C kernels, activations not float32)."""
        table = self._tables.get(i, False)
        if table is False or (table is not None and not table.matches(moe.experts)):
            table = None
            if x.device.type == "cpu" and x.dtype == torch.float32 and fp8_cpu.available():
                try:
                    table = fp8_cpu.ExpertTable(moe.experts)
                except (RuntimeError, AttributeError):
                    table = None  # the model's own dispatch runs them
            self._tables[i] = table
        return table

    def _mlp(self, prefix: str, mlp: MLP, x, lora: LoRABatch, rows):
        g = self._linear(f"{prefix}.gate_proj", mlp.gate_proj, x, lora, rows)
        u = self._linear(f"{prefix}.up_proj", mlp.up_proj, x, lora, rows)
        return self._linear(f"{prefix}.down_proj", mlp.down_proj, F.silu(g) * u, lora, rows)
