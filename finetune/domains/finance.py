"""Finance task suite: programmatic, seeded, verifiable.

Families:
    loan_payment        monthly payment of an amortised loan, to the cent
    compound_interest   balance of a deposit under periodic compounding, to the cent
    balance_sheet       a ratio (current, quick, debt-to-equity, debt) from a generated
                        balance sheet, to 2 decimals; the prompt states the definition
    headline_sentiment  positive/negative from a templated headline whose negation and
                        subject defeat keyword matching ("profits did not fall" is
                        positive, "losses climbed" negative). The label is the product
                        of three signs: the metric (profits +, losses -), the movement
                        (rise +, fall -) and the negation (-); so "profits did not rise"
                        counts as negative news, a disappointment.
"""

from __future__ import annotations

import random

from finetune.domains.common import Checker, Draft, Suite, Tolerance, fmt_number

SYSTEM_PROMPT = (
    "You are a careful financial analyst. Reason step by step inside <think></think>, "
    "then give only the final answer inside <answer></answer>."
)

CENT = Tolerance(abs=0.01)
HUNDREDTH = Tolerance(abs=0.01)


def money(value: float) -> str:
    return f"${value:,.2f}"


def loan_payment_amount(principal: float, annual_rate: float, months: int) -> float:
    """Level monthly payment: P * r / (1 - (1 + r)^-n) with r = annual_rate / 12.

    annual_rate is a fraction (0.06 for 6 %). ValueError for a non-positive rate or term,
    where the formula does not apply.
    """
    if annual_rate <= 0 or months <= 0:
        raise ValueError("rate and term must be positive")
    r = annual_rate / 12
    return principal * r / (1 - (1 + r) ** -months)


def compound_balance(principal: float, annual_rate: float, years: int, per_year: int) -> float:
    """P * (1 + r/n)^(n*t)."""
    return principal * (1 + annual_rate / per_year) ** (per_year * years)


def _loan_payment(rng: random.Random) -> Draft:
    principal = rng.randrange(10, 500) * 100
    rate_pct = rng.randrange(200, 1500) / 100
    months = rng.choice([12, 24, 36, 48, 60, 72, 120, 180, 240, 360])
    payment = loan_payment_amount(principal, rate_pct / 100, months)
    r = rate_pct / 100 / 12
    question = (
        f"A loan of {money(principal)} at {rate_pct:.2f}% annual interest, compounded "
        f"monthly, is repaid in {months} equal monthly payments. What is the monthly "
        "payment? Give the amount in dollars, rounded to the cent."
    )
    think = (
        f"Monthly rate r = {rate_pct:.2f}% / 12 = {r:.8f}; n = {months}.\n"
        f"Payment = P * r / (1 - (1 + r)^-n) = {principal} * {r:.8f} / "
        f"(1 - {1 + r:.8f}^-{months}) = {payment:.4f}, so {fmt_number(payment, 2)}."
    )
    return Draft(
        question,
        fmt_number(payment, 2),
        think,
        Checker("number", CENT),
        {"principal": principal, "annual_rate_pct": rate_pct, "months": months},
    )


_COMPOUNDING = {1: "annually", 4: "quarterly", 12: "monthly", 365: "daily"}


def _compound_interest(rng: random.Random) -> Draft:
    principal = rng.randrange(5, 1000) * 100
    rate_pct = rng.randrange(50, 1200) / 100
    years = rng.randrange(1, 31)
    per_year = rng.choice(list(_COMPOUNDING))
    balance = compound_balance(principal, rate_pct / 100, years, per_year)
    question = (
        f"{money(principal)} is deposited at {rate_pct:.2f}% annual interest, compounded "
        f"{_COMPOUNDING[per_year]}, with no withdrawals. What is the balance after {years} "
        f"year{'s' if years > 1 else ''}? Give the amount in dollars, rounded to the cent."
    )
    think = (
        f"A = P * (1 + r/n)^(n*t) with r = {rate_pct / 100:.4f}, n = {per_year}, "
        f"t = {years}.\n"
        f"A = {principal} * (1 + {rate_pct / 100:.4f}/{per_year})^{per_year * years} "
        f"= {balance:.4f}, so {fmt_number(balance, 2)}."
    )
    return Draft(
        question,
        fmt_number(balance, 2),
        think,
        Checker("number", CENT),
        {"principal": principal, "annual_rate_pct": rate_pct, "years": years, "n": per_year},
    )


_RATIOS = {
    "current ratio": "total current assets / total current liabilities",
    "quick ratio": "(cash + accounts receivable) / total current liabilities",
    "debt-to-equity ratio": "total liabilities / total shareholders' equity",
    "debt ratio": "total liabilities / total assets",
}


def _balance_sheet(rng: random.Random) -> Draft:
    scale = rng.choice([1_000, 10_000, 100_000])
    cash = rng.randrange(5, 200) * scale
    receivables = rng.randrange(5, 200) * scale
    inventory = rng.randrange(0, 200) * scale
    ppe = rng.randrange(20, 800) * scale
    current_assets = cash + receivables + inventory
    total_assets = current_assets + ppe
    # Liabilities are a share of assets, so equity stays positive and ratios sensible.
    payables = int(current_assets * rng.uniform(0.2, 0.9) / scale) * scale + scale
    long_term_debt = int(total_assets * rng.uniform(0.0, 0.5) / scale) * scale
    # Keep equity at least one unit of scale: some draws left it at zero or below, and the
    # debt-to-equity ratio then divided by zero (or meant nothing).
    long_term_debt = min(long_term_debt, total_assets - payables - scale)
    current_liabilities = payables
    total_liabilities = current_liabilities + long_term_debt
    equity = total_assets - total_liabilities
    values = {
        "current ratio": (current_assets, current_liabilities),
        "quick ratio": (cash + receivables, current_liabilities),
        "debt-to-equity ratio": (total_liabilities, equity),
        "debt ratio": (total_liabilities, total_assets),
    }
    ratio = rng.choice(list(_RATIOS))
    numerator, denominator = values[ratio]
    value = numerator / denominator
    company = _company(rng)
    sheet = "\n".join(
        [
            f"Balance sheet of {company} (USD)",
            f"Cash: {cash:,}",
            f"Accounts receivable: {receivables:,}",
            f"Inventory: {inventory:,}",
            f"Property, plant and equipment: {ppe:,}",
            f"Accounts payable (current): {payables:,}",
            f"Long-term debt: {long_term_debt:,}",
            f"Shareholders' equity: {equity:,}",
        ]
    )
    question = (
        f"{sheet}\n\nCompute the {ratio}, defined as {_RATIOS[ratio]}. "
        "Current assets are cash, accounts receivable and inventory. "
        "Give the ratio rounded to 2 decimal places."
    )
    think = (
        f"{ratio} = {_RATIOS[ratio]}.\n"
        f"Current assets = {cash:,} + {receivables:,} + {inventory:,} = {current_assets:,}; "
        f"total assets = {total_assets:,}; total liabilities = {payables:,} + "
        f"{long_term_debt:,} = {total_liabilities:,}.\n"
        f"{numerator:,} / {denominator:,} = {value:.4f}, so {fmt_number(value, 2)}."
    )
    return Draft(
        question, fmt_number(value, 2), think, Checker("number", HUNDREDTH), {"ratio": ratio}
    )


_COMPANIES = [
    "Northwind Bank",
    "Acme Holdings",
    "Globex Capital",
    "Société Lumière",
    "Initech Insurance",
    "Umbrella Logistics",
    "Müller & Söhne",
    "Vandelay Industries",
    "Stark Credit Union",
    "Kōbe Trading",
]


def _company(rng: random.Random) -> str:
    return rng.choice(_COMPANIES)


# (metric, +1 when a rise is good news for shareholders, -1 when a rise is bad news)
_METRICS = [
    ("profits", 1),
    ("revenue", 1),
    ("net income", 1),
    ("operating margin", 1),
    ("quarterly sales", 1),
    ("market share", 1),
    ("losses", -1),
    ("costs", -1),
    ("loan defaults", -1),
    ("debt", -1),
    ("expenses", -1),
    ("customer complaints", -1),
]
# (past tense, base form, direction)
_MOVES = [
    ("rose", "rise", 1),
    ("climbed", "climb", 1),
    ("increased", "increase", 1),
    ("jumped", "jump", 1),
    ("grew", "grow", 1),
    ("fell", "fall", -1),
    ("dropped", "drop", -1),
    ("declined", "decline", -1),
    ("shrank", "shrink", -1),
    ("slid", "slide", -1),
]
_NEGATIONS = ["did not {}", "didn't {}", "failed to {}", "did not {} at all"]
_WHEN = ["in the third quarter", "last year", "this quarter", "year over year", "in March", ""]


def _headline_sentiment(rng: random.Random) -> Draft:
    metric, metric_sign = rng.choice(_METRICS)
    past, base, direction = rng.choice(_MOVES)
    negated = rng.random() < 0.5
    verb = rng.choice(_NEGATIONS).format(base) if negated else past
    when = rng.choice(_WHEN)
    headline = f"{_company(rng)} {metric} {verb}{' ' + when if when else ''}"
    polarity = metric_sign * direction * (-1 if negated else 1)
    label = "positive" if polarity > 0 else "negative"
    question = (
        f'Headline: "{headline}"\n'
        "Is this headline positive or negative news for the company's shareholders? "
        "Answer with one word: positive or negative."
    )
    movement = "going up" if direction > 0 else "going down"
    good = "good" if metric_sign > 0 else "bad"
    think = (
        f"The subject is {metric}; more {metric} is {good} for shareholders.\n"
        f"The verb says {metric} {'did not end up ' if negated else 'ended up '}{movement}"
        f"{' (negated)' if negated else ''}.\n"
        f"So the news is {label}."
    )
    return Draft(
        question,
        label,
        think,
        Checker("label", labels=("positive", "negative")),
        {"headline": headline, "negated": negated},
    )


SUITE = Suite(
    "finance",
    SYSTEM_PROMPT,
    {
        "loan_payment": _loan_payment,
        "compound_interest": _compound_interest,
        "balance_sheet": _balance_sheet,
        "headline_sentiment": _headline_sentiment,
    },
)
