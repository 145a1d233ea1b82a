"""Sampling parameters and next-token selection for one sequence.

Each request owns a ``torch.Generator`` seeded from ``SamplingParams.seed``: its random
draws depend only on its own seed and its own logits, never on which other requests share
the batch. Penalties follow the OpenAI API (presence, frequency: on generated tokens) and
the CTRL/transformers repetition penalty (on prompt and generated tokens).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import MISSING, dataclass, field

import torch

MAX_TEMPERATURE = 100.0  # above this the distribution is uniform for any practical purpose


@dataclass
class SamplingParams:
    """How to pick tokens. ``validate()`` raises ValueError naming the bad field."""

    temperature: float = 1.0  # 0: greedy (argmax)
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens with this much mass
    top_k: int = 0  # keep the k most likely tokens (0: all)
    seed: int | None = None  # per-request RNG seed; None: a random one
    max_tokens: int = 16  # tokens to generate at most
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the text)
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop ids (besides eos)
    ignore_eos: bool = False  # keep going past the model's eos
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in prompt or output
    presence_penalty: float = 0.0  # subtracted once from tokens present in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    logprobs: bool = False  # return the chosen token's log-probability
    top_logprobs: int = 0  # and this many most likely alternatives

    def validate(self) -> None:
        # None (what an API layer passes for an omitted field) means the default.
        for f in dataclasses.fields(self):
            if f.name != "seed" and getattr(self, f.name) is None:
                default = f.default_factory() if f.default_factory is not MISSING else f.default
                setattr(self, f.name, default)

        def number(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            return v

        if not 0 <= number("temperature") <= MAX_TEMPERATURE:
            raise ValueError(
                f"temperature must be in [0, {MAX_TEMPERATURE}], got {self.temperature}"
            )
        if not 0 < number("top_p") <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("top_k", "max_tokens", "top_logprobs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        if self.top_logprobs > 20:
            raise ValueError(f"top_logprobs must be at most 20, got {self.top_logprobs}")
        if not 0 < number("repetition_penalty") <= 10:
            raise ValueError(
                f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= number(name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be non-negative integers")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")


@dataclass
class TokenLogprob:
    """The chosen token's log-probability and the top alternatives (id, logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def apply_penalties(
    logits: torch.Tensor,
    params: SamplingParams,
    prompt_ids: torch.Tensor,
    output_ids: torch.Tensor,
) -> torch.Tensor:
    """Penalised copy of ``logits`` [vocab] (float32). ``*_ids`` are int64 tensors."""
    logits = logits.float().clone()
    if params.repetition_penalty != 1.0:
        seen = torch.cat([prompt_ids, output_ids]).unique()
        vals = logits[seen]
        logits[seen] = torch.where(
            vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty
        )
    if output_ids.numel() and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(output_ids, minlength=logits.shape[0]).float()
        logits -= params.frequency_penalty * counts
        logits -= params.presence_penalty * (counts > 0).float()
    return logits


def _draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from ``probs`` [vocab] by inverse transform: a single uniform draw placed
    on the cumulative distribution. Exact, like ``torch.multinomial``, which draws one
    exponential variate per vocabulary entry instead (5x slower at a 8k vocabulary, and
    run for every sequence of every decode step). ``right=True``: the first token whose
    cumulative mass exceeds the draw, so a zero-probability token is never picked."""
    cdf = probs.cumsum(-1)
    u = torch.rand((1,), generator=generator, dtype=cdf.dtype, device=cdf.device) * cdf[-1]
    return int(torch.searchsorted(cdf, u, right=True).clamp_max(cdf.shape[0] - 1))


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    prompt_ids: torch.Tensor,
    output_ids: torch.Tensor,
) -> tuple[int, TokenLogprob | None]:
    """Pick the next token from ``logits`` [vocab] (on any device).

    Returns (token id, logprob info or None). Log-probabilities are those of the model's
    own distribution (log-softmax of the raw logits), as the OpenAI API reports them.
    """
    raw = logits.float().cpu()
    x = apply_penalties(raw, params, prompt_ids, output_ids)
    if params.temperature == 0:
        token = int(x.argmax())
    else:
        # A tiny temperature (1e-300 is valid) would be 0 in float32, and the softmax NaN:
        # in float64, shifted so the best logit is 0, the others just go to -inf.
        x = (x - x.max()).double() / params.temperature
        if 0 < params.top_k < x.shape[0]:
            kth = x.topk(params.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if params.top_p < 1:
            sorted_x, idx = x.sort(descending=True)
            probs = sorted_x.softmax(-1)
            # Drop a token once the mass before it already reaches top_p (keeps at least one).
            drop = probs.cumsum(-1) - probs >= params.top_p
            x = x.scatter(0, idx, sorted_x.masked_fill(drop, float("-inf")))
        token = _draw(x.softmax(-1), generator)
    info = None
    if params.logprobs or params.top_logprobs:
        lp = raw.log_softmax(-1)
        top = []
        if params.top_logprobs:
            v, i = lp.topk(params.top_logprobs)
            top = list(zip(i.tolist(), v.tolist(), strict=True))
        info = TokenLogprob(token, float(lp[token]), top)
    return token, info
