"""Held-out accuracy of a model (optionally with a LoRA adapter) on a domain task suite.

    evaluate_suite(model_dir, "finance", n=200, seed=EVAL_SEED, adapter=None) -> dict

Items come from ``SUITES[suite].generate(n, seed)``: the families take turns, so each gets
n / len(families) items. Completions are greedy (temperature 0) and come from the serving
``inference.engine.Engine``, all prompts submitted together so its continuous batching
runs them side by side; the prompt is rendered by the model's (or the adapter's) chat
template, exactly as serving does. The suite's reward decides: an item counts as correct
when its completion is well formed and its answer passes the family's checker
(``finetune.domains.score``).

Seeds: the shipped base model was pre-trained on the suites' items of seed 0, and the
fine-tuning runs in its model card use seeds 1 (SFT) and 2 (GRPO); EVAL_SEED is none of
those, so its items are held out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

EVAL_SEED = 1234  # held out: pre-training uses seed 0, the model card's SFT 1 and GRPO 2
DEFAULT_MAX_TOKENS = 192  # the longest reference completion is about 150 tokens


def evaluate_suite(
    model_dir: str | Path,
    suite: str,
    *,
    n: int = 200,
    seed: int = EVAL_SEED,
    adapter: str | Path | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    chunk: int = 64,
    engine=None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Generate greedily for ``n`` items of ``suite`` and score them.

    ``engine``: an open ``Engine`` on ``model_dir`` to reuse (the caller closes it); None
    opens one and closes it here. ``chunk`` prompts are submitted at a time (memory: the
    KV cache holds them all); ``progress(done, n)`` is called after each chunk.

    Returns a JSON-safe dict: suite, model, adapter, n, seed, accuracy, format_rate,
    mean_reward, completion_tokens, elapsed_s, and per_family {family: {n, accuracy,
    format_rate, mean_reward}}. Raises KeyError for an unknown suite, ValueError for n < 1
    or a bad model or adapter directory (the engine's CheckpointError is a ValueError).
    """
    from finetune.domains import SUITES, score
    from inference.engine import Engine, Request
    from inference.sampling import SamplingParams

    if suite not in SUITES:
        raise KeyError(f"unknown suite {suite!r}; choose from {sorted(SUITES)}")
    if n < 1 or chunk < 1:
        raise ValueError("n and chunk must be at least 1")
    items = suite_items(suite, n, seed)
    own = engine is None
    if own:
        engine = Engine(model_dir, max_batch_tokens=2048)
    start = time.monotonic()
    completions = []
    try:
        for begin in range(0, n, chunk):
            requests = [
                Request(
                    messages=[dict(m) for m in item.messages],
                    sampling=SamplingParams(temperature=0.0, max_tokens=max_tokens),
                    adapter=str(adapter) if adapter is not None else None,
                )
                for item in items[begin : begin + chunk]
            ]
            completions.extend(engine.generate(requests))
            if progress is not None:
                progress(len(completions), n)
    finally:
        if own:
            engine.close()
    elapsed = time.monotonic() - start

    families: dict[str, dict] = {
        f: {"n": 0, "correct": 0, "formatted": 0, "reward": 0.0} for f in SUITES[suite].families
    }
    for item, done in zip(items, completions, strict=True):
        s = score(done.text, item)
        fam = families[item.family]
        fam["n"] += 1
        fam["correct"] += int(s.correct)
        fam["formatted"] += int(s.format)
        fam["reward"] += s.total
    per_family = {
        name: {
            "n": f["n"],
            "accuracy": _ratio(f["correct"], f["n"]),
            "format_rate": _ratio(f["formatted"], f["n"]),
            "mean_reward": _ratio(f["reward"], f["n"]),
        }
        for name, f in families.items()
        if f["n"]
    }
    return {
        "suite": suite,
        "model": str(model_dir),
        "adapter": str(adapter) if adapter is not None else None,
        "n": n,
        "seed": seed,
        "accuracy": _ratio(sum(f["correct"] for f in families.values()), n),
        "format_rate": _ratio(sum(f["formatted"] for f in families.values()), n),
        "mean_reward": _ratio(sum(f["reward"] for f in families.values()), n),
        "completion_tokens": sum(len(c.token_ids) for c in completions),
        "elapsed_s": round(elapsed, 2),
        "per_family": per_family,
    }


def suite_items(suite: str, n: int, seed: int) -> list:
    """``n`` items of ``SUITES[suite]`` for ``seed``, as ``Suite.generate`` makes them, except
    that a draw whose generator raises ZeroDivisionError (finance's balance sheet can draw a
    zero denominator) is replaced by the next index, so one bad draw cannot end a run."""
    from finetune.domains import SUITES

    s = SUITES[suite]
    items, index = [], 0
    while len(items) < n:
        family = s.families[len(items) % len(s.families)]
        try:
            items.append(s.item(index, seed, family))
        except ZeroDivisionError:
            pass
        index += 1
        if index > 10 * n + 100:
            raise RuntimeError(f"suite {suite!r} keeps failing to draw items for seed {seed}")
    return items


def _ratio(num: float, den: int) -> float:
    return round(num / den, 4) if den else 0.0
