"""Domain suites: known values, tolerance edges, reward-hacking probes, determinism."""

import json

import pytest

from finetune.domains import SUITES, Checker, Tolerance, parse_number, reward, score
from finetune.domains.common import FORMAT_WEIGHT, TaskItem, completion
from finetune.domains.finance import compound_balance, loan_payment_amount
from finetune.domains.medical import bmi, egfr_ckd_epi_2021


def _item(answer: str, checker: Checker) -> TaskItem:
    return TaskItem(
        id="t",
        family="test",
        messages=({"role": "user", "content": "q"},),
        answer=answer,
        reference=completion("r", answer),
        checker=checker,
    )


PAYMENT = _item("86.07", Checker("number", Tolerance(abs=0.01)))
LABEL = _item("positive", Checker("label", labels=("positive", "negative")))


def test_loan_payment_known_value():
    assert round(loan_payment_amount(1000, 0.06, 12), 2) == 86.07
    # 30-year mortgage: 200,000 at 6.5 % pays 1,264.14 a month.
    assert round(loan_payment_amount(200_000, 0.065, 360), 2) == 1264.14


def test_compound_interest_known_value():
    # 1,000 at 5 % compounded monthly for 10 years grows to 1,647.01.
    assert round(compound_balance(1000, 0.05, 10, 12), 2) == 1647.01


def test_bmi_and_egfr_known_values():
    assert round(bmi(70, 175), 1) == 22.9
    # CKD-EPI 2021 at creatinine 1.0 mg/dL, age 50: 69 (female) and 92 (male).
    assert round(egfr_ckd_epi_2021(1.0, 50, female=True)) == 69
    assert round(egfr_ckd_epi_2021(1.0, 50, female=False)) == 92
    # Below kappa the alpha branch applies, 40-year-old woman at 0.5 mg/dL, by hand:
    # 142 * (0.5/0.7)^-0.241 * 0.9938^40 * 1.012 = 142 * 1.08447 * 0.77975 * 1.012 = 121.5
    assert round(egfr_ckd_epi_2021(0.5, 40, female=True), 1) == 121.5


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("86.07", 1.0),
        ("$86.07", 1.0),
        ("86.07 dollars per month", 1.0),
        ("86.08", 1.0),  # one cent: rounding the other way
        ("86.06", 1.0),
        ("86.09", FORMAT_WEIGHT),  # two cents off is wrong
        ("86.05", FORMAT_WEIGHT),
        ("86", FORMAT_WEIGHT),
    ],
)
def test_numeric_tolerance_edges(answer, expected):
    assert reward(completion("monthly payment", answer), PAYMENT) == pytest.approx(expected)


def test_relative_tolerance_does_not_accept_dollars_on_thousands():
    big = _item("3000.00", Checker("number", Tolerance(abs=0.01)))
    assert score(completion("r", "3,000.01"), big).correct == 1.0
    assert score(completion("r", "3003.00"), big).correct == 0.0
    assert score(completion("r", "2997"), big).correct == 0.0
    assert score(completion("r", "3,000.02"), big).correct == 0.0


@pytest.mark.parametrize(
    "text",
    [
        "86.07 86.08 86.06",  # answer spam
        "86.07 or 86.08",
        "between 86 and 87",
        "no idea",
        "",
    ],
)
def test_answer_must_hold_exactly_one_number(text):
    assert score(completion("r", text), PAYMENT).correct == 0.0


@pytest.mark.parametrize(
    "bad",
    [
        "<think>r</think><answer>86.07</answer><answer>86.07</answer>",  # two answers
        "<think>  </think><answer>86.07</answer>",  # empty think
        "<think></think><answer>86.07</answer>",
        "<think>r</think><answer>86.07</answer> Actually 90.",  # text after </answer>
        "<think>r</think>",  # answer missing
        "<think>r</think>86.07",
        "The answer is 86.07",
        "<answer>86.07</answer>",  # think missing
        "<think>r <answer>1</answer></think><answer>86.07</answer>",
        "<think>r</think> so <answer>86.07</answer>",  # text between the blocks
        "<think>r</think><answer></answer>",
        "Sure! <think>r</think><answer>86.07</answer>",  # text before <think>
    ],
)
def test_reward_hacking_probes_score_zero(bad):
    result = score(bad, PAYMENT)
    assert result.correct == 0.0
    assert result.format == 0.0
    assert reward(bad, PAYMENT) == 0.0


def test_label_answers():
    assert reward(completion("r", "Positive."), LABEL) == 1.0
    assert reward(completion("r", "negative"), LABEL) == FORMAT_WEIGHT
    assert score(completion("r", "positive negative"), LABEL).correct == 0.0
    assert score(completion("r", "positive, I think"), LABEL).correct == 0.0


def test_parse_number_separators_and_signs():
    assert parse_number("$1,264.14") == 1264.14
    assert parse_number("-3.5 units") == -3.5
    assert parse_number("1,23") is None  # malformed grouping reads as two numbers
    assert parse_number("kg/m2 22.9") is None


@pytest.mark.parametrize("suite_name", sorted(SUITES))
def test_every_family_reference_scores_full_reward(suite_name):
    suite = SUITES[suite_name]
    assert len(suite.families) >= 4
    items = suite.generate(20 * len(suite.families), seed=3)
    assert {item.family for item in items} == set(suite.families)
    for item in items:
        assert reward(item.reference, item) == 1.0, item.id
        assert item.messages[0]["role"] == "system"
        assert item.messages[-1]["role"] == "user"
        stored = json.loads(json.dumps(item.to_dict()))  # storable, and back
        assert TaskItem.from_dict(stored) == item


@pytest.mark.parametrize("suite_name", sorted(SUITES))
def test_generation_is_deterministic_by_seed(suite_name):
    suite = SUITES[suite_name]
    first = [item.to_dict() for item in suite.generate(16, seed=7)]
    again = [item.to_dict() for item in suite.generate(16, seed=7)]
    other = [item.to_dict() for item in suite.generate(16, seed=8)]
    assert first == again
    assert first != other
    assert [item.to_dict() for item in suite.generate(4, seed=7)] == first[:4]


def test_sentiment_negation_defeats_keywords():
    items = SUITES["finance"].generate(200, seed=0, families=["headline_sentiment"])
    negated_fall_positive = [
        item
        for item in items
        if item.meta["negated"]
        and any(word in item.meta["headline"] for word in ("fall", "drop", "decline"))
        and item.answer == "positive"
    ]
    # e.g. "profits did not fall": a keyword rule would call these negative.
    assert negated_fall_positive
    assert {item.answer for item in items} == {"positive", "negative"}


def test_dosing_cap_applies():
    items = SUITES["medical"].generate(100, seed=0, families=["weight_dosing"])
    capped = [item for item in items if item.meta["capped"]]
    assert capped and len(capped) < len(items)
    for item in capped:
        assert "capped" in item.reference
        assert float(item.answer) == item.meta["max_mg"]


def test_unknown_family_is_refused():
    with pytest.raises(KeyError):
        SUITES["finance"].generate(2, families=["astrology"])


def test_balance_sheets_keep_positive_equity_on_every_seed():
    """Some draws once left equity at zero, and the debt-to-equity ratio divided by zero."""
    from finetune.domains import SUITES

    items = [i for seed in range(4) for i in SUITES["finance"].generate(600, seed=seed)]
    sheets = [i for i in items if i.family == "balance_sheet"]
    assert len(sheets) >= 300
    assert all(i.answer for i in sheets)
