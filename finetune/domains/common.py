"""What every domain task suite shares: task items, answer checkers, the reward, the suite.

A task item is a prompt (chat messages), a gold answer, a reference completion and a
checker. Completions are R1-style::

    <think>short reasoning</think>
    <answer>86.07</answer>

The reward is ``FORMAT_WEIGHT`` for a well-formed completion plus ``CORRECT_WEIGHT`` when
the answer is also right, so it lies in [0, 1] and only a well-formed completion can earn
anything. "Well-formed" is strict on purpose, because a policy trained with GRPO finds any
slack (see ``parse_completion``).

Numeric answers are compared with a ``Tolerance``: accepted when
``|given - gold| <= max(abs, rel * |gold|)``. Each family sets ``abs`` to one unit in the
last place the prompt asks for (a cent, 0.1 kg/m2, 1 mL/min), so an answer rounded the
other way, or computed from a rounded intermediate, still passes, and nothing coarser does.
The relative part is kept tiny (1e-6) and exists only for float noise on large sums: a
percentage tolerance such as 0.1 % would accept a $3 error on a $3,000 payment, which
is a wrong answer to a question that asks for cents.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

FORMAT_WEIGHT = 0.2
CORRECT_WEIGHT = 0.8

# Float noise only; see the module docstring for why this is not a percentage.
FLOAT_NOISE_REL = 1e-6
# Keeps a tolerance edge inclusive when the subtraction itself is inexact
# (86.08 - 86.07 == 0.010000000000005116).
_EDGE_EPS = 1e-9

_COMPLETION = re.compile(
    r"\A\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*\Z", re.DOTALL
)
# A number as people write answers: optional sign, thousands separators, decimals.
_NUMBER = re.compile(r"[-+]?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?|[-+]?\.[0-9]+")


def round_half_up(value: float, places: int) -> float:
    """Round the way a calculator and a textbook do (2.675 -> 2.68), not banker's rounding."""
    quantum = Decimal(1).scaleb(-places)
    return float(Decimal(repr(value)).quantize(quantum, rounding=ROUND_HALF_UP))


def fmt_number(value: float, places: int) -> str:
    """`value` rounded half-up to `places` decimals, written without separators."""
    return f"{round_half_up(value, places):.{places}f}"


@dataclass(frozen=True)
class Tolerance:
    """How far a numeric answer may be from the gold one: max(abs, rel * |gold|)."""

    abs: float
    rel: float = FLOAT_NOISE_REL

    def accepts(self, given: float, gold: float) -> bool:
        allowed = max(self.abs, self.rel * abs(gold))
        return math.isfinite(given) and abs(given - gold) <= allowed + _EDGE_EPS


@dataclass(frozen=True)
class Checker:
    """Decides whether the text inside <answer> is right. JSON-safe, so items can be stored.

    kind "number": the answer must contain exactly one number (currency signs, units and
    words around it are fine), within `tolerance` of the gold value.
    kind "label": the answer, lower-cased and stripped of surrounding spaces and a final
    full stop, must equal the gold label; `labels` are the options the prompt offers.
    """

    kind: str
    tolerance: Tolerance | None = None
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind == "number" and self.tolerance is None:
            raise ValueError("a numeric checker needs a tolerance")
        if self.kind == "label" and not self.labels:
            raise ValueError("a label checker needs its labels")
        if self.kind not in ("number", "label"):
            raise ValueError(f"unknown checker kind {self.kind!r}")

    def is_correct(self, answer: str, gold: str) -> bool:
        if self.kind == "number":
            given = parse_number(answer)
            return given is not None and self.tolerance.accepts(given, float(gold))
        return normalise_label(answer) == normalise_label(gold)


def parse_number(text: str) -> float | None:
    """The one number in `text`, or None when there is none or more than one.

    More than one number is refused rather than "take the first/last": otherwise a policy
    learns to list many candidates ("86.06 86.07 86.08") and collect the reward.
    """
    found = _NUMBER.findall(text)
    if len(found) != 1:
        return None
    try:
        return float(found[0].replace(",", ""))
    except ValueError:
        return None


def normalise_label(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


@dataclass(frozen=True)
class ParsedCompletion:
    think: str
    answer: str


def parse_completion(text: str) -> ParsedCompletion | None:
    """Split an R1-style completion, or None when its format is wrong.

    Wrong means any of: not starting with <think> (leading whitespace aside), an empty or
    whitespace-only think block, any tag appearing other than exactly once, anything but
    whitespace between </think> and <answer> or after </answer>, an empty answer.
    Pass the decoded text without special tokens (skip_special_tokens=True).
    """
    if any(text.count(tag) != 1 for tag in TAGS):
        return None
    match = _COMPLETION.match(text)
    if match is None:
        return None
    think, answer = match["think"].strip(), match["answer"].strip()
    if not think or not answer:
        return None
    return ParsedCompletion(think=think, answer=answer)


@dataclass(frozen=True)
class TaskItem:
    """One verifiable task.

    messages: the prompt as chat messages (system + user), without the answer.
    answer: the gold answer as text ("86.07", "positive").
    reference: a completion that earns the full reward, with a short reasoning.
    checker: how an answer is compared with `answer`.
    """

    id: str
    family: str
    messages: tuple[dict[str, str], ...]
    answer: str
    reference: str
    checker: Checker
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-safe form (for task files and GRPO prompt sets)."""
        return asdict(self) | {"messages": [dict(m) for m in self.messages]}

    @classmethod
    def from_dict(cls, data: dict) -> TaskItem:
        """Inverse of to_dict; KeyError or TypeError when fields are missing or wrong."""
        checker = dict(data["checker"])
        if checker.get("tolerance") is not None:
            checker["tolerance"] = Tolerance(**checker["tolerance"])
        checker["labels"] = tuple(checker.get("labels", ()))
        return cls(
            id=data["id"],
            family=data["family"],
            messages=tuple(dict(m) for m in data["messages"]),
            answer=data["answer"],
            reference=data["reference"],
            checker=Checker(**checker),
            meta=dict(data.get("meta", {})),
        )

    @property
    def prompt(self) -> list[dict[str, str]]:
        """The prompt messages as a fresh list (what a policy is asked)."""
        return [dict(m) for m in self.messages]

    def sft_messages(self) -> list[dict[str, str]]:
        """The prompt followed by the reference completion as the assistant turn."""
        return [dict(m) for m in self.messages] + [{"role": "assistant", "content": self.reference}]


@dataclass(frozen=True)
class Score:
    format: float
    correct: float

    @property
    def total(self) -> float:
        return FORMAT_WEIGHT * self.format + CORRECT_WEIGHT * self.correct


def score(completion: str, item: TaskItem) -> Score:
    """Format and correctness of `completion` for `item`, each 0.0 or 1.0.

    Correctness is 0.0 whenever the format is wrong: an answer we cannot locate
    unambiguously is not an answer.
    """
    parsed = parse_completion(completion)
    if parsed is None:
        return Score(format=0.0, correct=0.0)
    correct = item.checker.is_correct(parsed.answer, item.answer)
    return Score(format=1.0, correct=1.0 if correct else 0.0)


def reward(completion: str, item: TaskItem) -> float:
    """The GRPO reward in [0, 1]: FORMAT_WEIGHT * format + CORRECT_WEIGHT * correct."""
    return score(completion, item).total


def completion(think: str, answer: str) -> str:
    """Write a completion in the format `parse_completion` accepts."""
    return f"{THINK_OPEN}\n{think}\n{THINK_CLOSE}\n{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


@dataclass(frozen=True)
class Draft:
    """What a family generator returns; the suite adds id, family and system prompt."""

    question: str
    answer: str
    think: str
    checker: Checker
    meta: dict = field(default_factory=dict)


Generator = Callable[[random.Random], Draft]


class Suite:
    """A named set of task families sharing a system prompt.

    Item i of seed s is drawn from its own random stream ("<suite>:<s>:<i>"), so
    generate(10, s) is a prefix of generate(100, s) and results do not depend on the
    Python hash seed. Families take turns (i mod the number of families), so every
    family is equally represented.
    """

    def __init__(self, name: str, system_prompt: str, generators: dict[str, Generator]):
        if not generators:
            raise ValueError("a suite needs at least one family")
        self.name = name
        self.system_prompt = system_prompt
        self._generators = dict(generators)

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(self._generators)

    def item(self, index: int, seed: int, family: str | None = None) -> TaskItem:
        """Item `index` of `seed`; `family` overrides the round-robin choice."""
        family = family or self.families[index % len(self.families)]
        rng = random.Random(f"{self.name}:{seed}:{index}:{family}")
        draft = self._generators[family](rng)
        return TaskItem(
            id=f"{self.name}-{family}-{seed}-{index}",
            family=family,
            messages=(
                {"role": "system", "content": self.system_prompt},
                {"role": "user", "content": draft.question},
            ),
            answer=draft.answer,
            reference=completion(draft.think, draft.answer),
            checker=draft.checker,
            meta=draft.meta,
        )

    def generate(
        self, n: int, seed: int = 0, families: Sequence[str] | None = None
    ) -> list[TaskItem]:
        """`n` items; `families` restricts (and orders) the round-robin. KeyError if unknown."""
        chosen = tuple(families) if families else self.families
        for family in chosen:
            if family not in self._generators:
                raise KeyError(f"suite {self.name!r} has no family {family!r}")
        return [self.item(i, seed, chosen[i % len(chosen)]) for i in range(n)]

    def to_sft_jsonl(self, path: str | Path, n: int, seed: int = 0) -> int:
        """Write `n` items as OpenAI chat JSONL (system, user, reference); returns n."""
        with open(path, "w", encoding="utf-8") as out:
            for item in self.generate(n, seed):
                out.write(json.dumps({"messages": item.sft_messages()}, ensure_ascii=False))
                out.write("\n")
        return n

    def __repr__(self) -> str:
        return f"Suite({self.name!r}, families={self.families})"
