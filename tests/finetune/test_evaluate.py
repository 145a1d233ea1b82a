"""finetune.evaluate: per-family accuracy decided by the suite's reward, on held-out items,
with completions from the serving engine."""

import pytest

from finetune.domains import SUITES
from finetune.evaluate import EVAL_SEED, evaluate_suite
from tests.finetune.test_pretrain import build_toy_model


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory, tiny_tokenizer_dir):
    return build_toy_model(tmp_path_factory.mktemp("evalmodel") / "toy", tiny_tokenizer_dir)


class AnsweringEngine:
    """Stands in for the Engine: answers each prompt with the item's reference completion,
    except for one family, which gets a well-formed wrong answer."""

    def __init__(self, items, wrong_family):
        self.by_question = {i.messages[-1]["content"]: i for i in items}
        self.wrong_family = wrong_family
        self.requests = []

    def generate(self, requests):
        self.requests.extend(requests)
        out = []
        for r in requests:
            item = self.by_question[r.messages[-1]["content"]]
            text = item.reference
            if item.family == self.wrong_family:
                text = "<think>guess</think><answer>-1</answer>"
            out.append(type("C", (), {"text": text, "token_ids": [0] * 7})())
        return out


def test_accuracy_per_family_follows_the_reward():
    suite = SUITES["medical"]
    items = suite.generate(16, EVAL_SEED)
    engine = AnsweringEngine(items, wrong_family="bmi")
    report = evaluate_suite("unused", "medical", n=16, engine=engine, chunk=5)

    assert set(report["per_family"]) == set(suite.families)
    assert report["per_family"]["bmi"] == {
        "n": 4,
        "accuracy": 0.0,
        "format_rate": 1.0,
        "mean_reward": 0.2,
    }
    for family in ("weight_dosing", "egfr", "triage"):
        assert report["per_family"][family]["accuracy"] == 1.0
    assert report["accuracy"] == 0.75 and report["format_rate"] == 1.0
    assert report["completion_tokens"] == 16 * 7
    # Greedy, in chunks, every item once.
    assert len(engine.requests) == 16
    assert all(r.sampling.temperature == 0.0 for r in engine.requests)


def test_held_out_seed_differs_from_training_seeds():
    # Pre-training draws the suites' items of seed 0; the card's SFT 1 and GRPO 2.
    assert EVAL_SEED not in (0, 1, 2)
    held_out = {i.messages[-1]["content"] for i in SUITES["finance"].generate(40, EVAL_SEED)}
    seen = {i.messages[-1]["content"] for i in SUITES["finance"].generate(40, 0)}
    numeric = {q for q in held_out if "loan" in q or "deposited" in q}
    assert numeric and not numeric & seen


def test_real_engine_on_a_toy_model(toy_model):
    report = evaluate_suite(toy_model, "finance", n=8, max_tokens=6, chunk=8)
    assert report["n"] == 8 and sum(f["n"] for f in report["per_family"].values()) == 8
    # An untrained toy model cannot close the tags in 6 tokens.
    assert report["format_rate"] == 0.0 and report["accuracy"] == 0.0
    assert 8 <= report["completion_tokens"] <= 8 * 6


def test_unknown_suite_and_bad_n():
    with pytest.raises(KeyError):
        evaluate_suite("unused", "law", n=4, engine=object())
    with pytest.raises(ValueError):
        evaluate_suite("unused", "finance", n=0, engine=object())


def test_suite_items_matches_generate_and_keeps_families_in_turn():
    from finetune.evaluate import suite_items

    items = suite_items("medical", 12, EVAL_SEED)
    assert [i.id for i in items] == [i.id for i in SUITES["medical"].generate(12, EVAL_SEED)]
    # Finance seed 2 holds a balance sheet with a zero denominator in its first 512 draws;
    # suite_items still returns 512 distinct items with the families taking turns.
    finance = suite_items("finance", 512, 2)
    assert len({i.id for i in finance}) == 512
    families = SUITES["finance"].families
    assert [i.family for i in finance[:8]] == [*families, *families]
