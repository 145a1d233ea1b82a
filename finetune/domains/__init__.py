"""Domain task suites: seeded, verifiable tasks with R1-style reward functions.

    from finetune.domains import SUITES, reward
    items = SUITES["finance"].generate(100, seed=0)
    reward(completion_text, items[0])  # in [0, 1]

See common.py for the completion format, the reward and the tolerance rules.
"""

from finetune.domains import finance, medical
from finetune.domains.common import (
    Checker,
    Score,
    Suite,
    TaskItem,
    Tolerance,
    parse_completion,
    parse_number,
    reward,
    score,
)

SUITES: dict[str, Suite] = {"finance": finance.SUITE, "medical": medical.SUITE}

__all__ = [
    "SUITES",
    "Checker",
    "Score",
    "Suite",
    "TaskItem",
    "Tolerance",
    "parse_completion",
    "parse_number",
    "reward",
    "score",
]
