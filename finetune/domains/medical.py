"""Medical task suite: programmatic, seeded, verifiable.

Synthetic exercises for training and evaluation, not clinical guidance: drug doses and
caps below are illustrative.

Families:
    weight_dosing  mg/kg dose with a per-dose maximum (the cap is the trap), 1 decimal
    bmi            weight / height^2, 1 decimal
    egfr           CKD-EPI 2021 creatinine equation (race-free), whole mL/min/1.73 m2
    triage         referral department from templated presenting symptoms
"""

from __future__ import annotations

import random

from finetune.domains.common import Checker, Draft, Suite, Tolerance, fmt_number

SYSTEM_PROMPT = (
    "You are a careful clinical assistant. Reason step by step inside <think></think>, "
    "then give only the final answer inside <answer></answer>."
)

TENTH = Tolerance(abs=0.1)
WHOLE = Tolerance(abs=1.0)


def bmi(weight_kg: float, height_cm: float) -> float:
    """Body-mass index in kg/m2."""
    return weight_kg / (height_cm / 100) ** 2


def egfr_ckd_epi_2021(creatinine_mg_dl: float, age: float, female: bool) -> float:
    """eGFR in mL/min/1.73 m2 by the CKD-EPI 2021 creatinine equation (no race term).

    142 * min(Scr/k, 1)^a * max(Scr/k, 1)^-1.200 * 0.9938^age * (1.012 if female),
    k = 0.7 (F) / 0.9 (M), a = -0.241 (F) / -0.302 (M). Inker et al., NEJM 2021.
    """
    kappa, alpha = (0.7, -0.241) if female else (0.9, -0.302)
    ratio = creatinine_mg_dl / kappa
    value = 142 * min(ratio, 1.0) ** alpha * max(ratio, 1.0) ** -1.200 * 0.9938**age
    return value * (1.012 if female else 1.0)


# (drug, mg per kg per dose, maximum mg per dose)
_DRUGS = [
    ("amoxicillin", 25, 1000),
    ("paracetamol", 15, 1000),
    ("ibuprofen", 10, 400),
    ("ceftriaxone", 50, 2000),
    ("azithromycin", 10, 500),
    ("cefalexin", 25, 1000),
]


def _weight_dosing(rng: random.Random) -> Draft:
    drug, per_kg, cap = rng.choice(_DRUGS)
    weight = rng.randrange(40, 900) / 10
    raw = per_kg * weight
    dose = min(raw, cap)
    question = (
        f"A patient weighing {weight:.1f} kg is prescribed {drug} at {per_kg} mg/kg per "
        f"dose, with a maximum of {cap} mg per dose. What single dose should be given, "
        "in mg, rounded to 1 decimal place?"
    )
    capped = raw > cap
    think = f"{per_kg} mg/kg * {weight:.1f} kg = {raw:.1f} mg.\n" + (
        f"That exceeds the maximum of {cap} mg, so the dose is capped at {cap} mg."
        if capped
        else f"That is within the maximum of {cap} mg, so the dose is {raw:.1f} mg."
    )
    return Draft(
        question,
        fmt_number(dose, 1),
        think,
        Checker("number", TENTH),
        {"drug": drug, "weight_kg": weight, "max_mg": cap, "capped": capped},
    )


def _bmi(rng: random.Random) -> Draft:
    weight = rng.randrange(400, 1500) / 10
    height = rng.randrange(145, 201)
    value = bmi(weight, height)
    question = (
        f"An adult weighs {weight:.1f} kg and is {height} cm tall. What is their body-mass "
        "index in kg/m², rounded to 1 decimal place?"
    )
    think = (
        f"Height = {height / 100:.2f} m; height squared = {(height / 100) ** 2:.4f}.\n"
        f"BMI = {weight:.1f} / {(height / 100) ** 2:.4f} = {value:.3f}, "
        f"so {fmt_number(value, 1)}."
    )
    return Draft(question, fmt_number(value, 1), think, Checker("number", TENTH))


def _egfr(rng: random.Random) -> Draft:
    age = rng.randrange(18, 91)
    female = rng.random() < 0.5
    # Mostly near-normal kidneys, some impaired: both sides of kappa get exercised.
    creatinine = rng.randrange(40, 160 if rng.random() < 0.7 else 600) / 100
    value = egfr_ckd_epi_2021(creatinine, age, female)
    sex = "woman" if female else "man"
    question = (
        f"A {age}-year-old {sex} has a serum creatinine of {creatinine:.2f} mg/dL. Using the "
        "CKD-EPI 2021 creatinine equation (without a race term), what is the eGFR in "
        "mL/min/1.73 m², rounded to the nearest whole number?"
    )
    kappa, alpha = (0.7, -0.241) if female else (0.9, -0.302)
    ratio = creatinine / kappa
    think = (
        f"{'Female' if female else 'Male'}: kappa = {kappa}, alpha = {alpha}"
        f"{', factor 1.012' if female else ''}.\n"
        f"Scr/kappa = {ratio:.4f}; min(.,1)^alpha = {min(ratio, 1.0) ** alpha:.4f}; "
        f"max(.,1)^-1.200 = {max(ratio, 1.0) ** -1.2:.4f}; 0.9938^{age} = "
        f"{0.9938**age:.4f}.\n"
        f"eGFR = 142 * these{' * 1.012' if female else ''} = {value:.2f}, "
        f"so {fmt_number(value, 0)}."
    )
    return Draft(
        question,
        fmt_number(value, 0),
        think,
        Checker("number", WHOLE),
        {"age": age, "female": female, "creatinine_mg_dl": creatinine},
    )


# department -> (organ system, symptoms that point there and nowhere else in this list)
_DEPARTMENTS = {
    "cardiology": (
        "the heart",
        [
            "crushing chest pain spreading to the left arm",
            "palpitations with a racing, irregular heartbeat",
            "chest tightness that comes on with exertion",
            "swollen ankles and breathlessness when lying flat",
        ],
    ),
    "neurology": (
        "the nervous system",
        [
            "sudden weakness of one arm and leg",
            "slurred speech",
            "drooping of one side of the face",
            "a first seizure",
            "numbness spreading down one side of the body",
        ],
    ),
    "gastroenterology": (
        "the digestive tract",
        [
            "vomiting blood",
            "black, tarry stools",
            "yellowing of the skin and eyes",
            "difficulty swallowing solid food",
            "bloody diarrhoea with cramping",
        ],
    ),
    "pulmonology": (
        "the lungs",
        [
            "a chronic cough with wheezing",
            "coughing up blood-streaked sputum",
            "shortness of breath that worsens over months",
            "noisy breathing and a cough that will not clear",
        ],
    ),
    "orthopedics": (
        "bones and joints",
        [
            "a deformed, painful wrist after a fall",
            "inability to bear weight on a twisted ankle",
            "a swollen knee that locks after a sports injury",
            "hip pain after a fall with a shortened, rotated leg",
        ],
    ),
    "dermatology": (
        "the skin",
        [
            "a mole that has changed colour and shape",
            "an itchy, scaly rash on the elbows",
            "widespread itchy hives",
            "a non-healing ulcer on the sun-exposed skin of the face",
        ],
    ),
    "urology": (
        "the urinary tract",
        [
            "visible blood in the urine",
            "colicky pain from the flank to the groin",
            "difficulty starting to pass urine",
            "a painless lump in one testicle",
        ],
    ),
}
_DURATIONS = ["since this morning", "for two days", "for a week", "for several hours"]


def _triage(rng: random.Random) -> Draft:
    department = rng.choice(list(_DEPARTMENTS))
    system, symptoms = _DEPARTMENTS[department]
    first, second = rng.sample(symptoms, 2)
    age = rng.randrange(18, 90)
    person = rng.choice(["man", "woman"])
    options = ", ".join(_DEPARTMENTS)
    question = (
        f"A {age}-year-old {person} presents with {first} and {second} "
        f"{rng.choice(_DURATIONS)}. Which department should the patient be referred to? "
        f"Answer with one of: {options}."
    )
    think = f"{first.capitalize()} and {second} both point to {system}, so {department}."
    return Draft(
        question,
        department,
        think,
        Checker("label", labels=tuple(_DEPARTMENTS)),
        {"department": department},
    )


SUITE = Suite(
    "medical",
    SYSTEM_PROMPT,
    {
        "weight_dosing": _weight_dosing,
        "bmi": _bmi,
        "egfr": _egfr,
        "triage": _triage,
    },
)
