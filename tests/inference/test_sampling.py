"""Next-token selection: greedy, top-k/top-p, penalties, seeds, logprobs, validation."""

from __future__ import annotations

import pytest
import torch

from inference.sampling import SamplingParams, apply_penalties, make_generator, sample

EMPTY = torch.tensor([], dtype=torch.int64)


def draw(logits, n=200, **kw):
    p = SamplingParams(**kw)
    g = make_generator(0)
    return [sample(logits, p, g, EMPTY, EMPTY)[0] for _ in range(n)]


def test_greedy_top_k_1_and_tiny_top_p_pick_the_argmax():
    logits = torch.tensor([0.1, 2.0, 1.9, -1.0])
    assert set(draw(logits, temperature=0)) == {1}
    assert set(draw(logits, temperature=1.0, top_k=1)) == {1}
    assert set(draw(logits, temperature=1.0, top_p=0.01)) == {1}
    assert set(draw(logits, temperature=1.0, top_k=2)) == {1, 2}
    assert len(set(draw(logits, temperature=5.0))) == 4


def test_samples_follow_the_distribution_and_never_a_masked_token():
    """Inverse-transform sampling draws each token at its softmax probability (4,000 draws:
    within 0.03) and never one that top-k or top-p removed, the first or the last included."""
    logits = torch.tensor([-9.0, 0.0, 1.0, 2.0, -9.0]).log_softmax(-1)
    probs = logits[1:4].softmax(-1)  # top_k=3 keeps tokens 1..3
    drawn = torch.tensor(draw(logits, n=4000, temperature=1.0, top_k=3))
    assert set(drawn.tolist()) == {1, 2, 3}
    freq = torch.bincount(drawn, minlength=5)[1:4].double() / len(drawn)
    assert torch.allclose(freq, probs.double(), atol=0.03), (freq, probs)
    assert set(draw(torch.tensor([5.0, 0.0, 0.0]), n=300, temperature=1.0, top_p=0.5)) == {0}


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = torch.zeros(50)
    p = SamplingParams(temperature=1.0, seed=7)

    def run(seed):
        g = make_generator(seed)
        return [sample(logits, p, g, EMPTY, EMPTY)[0] for _ in range(20)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_penalties():
    logits = torch.tensor([2.0, -2.0, 1.0, 1.0])
    prompt = torch.tensor([0, 1])
    out = torch.tensor([2, 2])
    rep = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), prompt, out)
    assert rep.tolist() == [1.0, -4.0, 0.5, 1.0]
    pf = apply_penalties(
        logits, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt, out
    )
    assert pf.tolist() == [2.0, -2.0, 0.0, 1.0]


def test_logprobs_and_top_logprobs():
    logits = torch.tensor([1.0, 3.0, 2.0])
    p = SamplingParams(temperature=0, logprobs=True, top_logprobs=2)
    token, info = sample(logits, p, make_generator(0), EMPTY, EMPTY)
    lp = logits.log_softmax(-1)
    assert token == 1 and abs(info.logprob - lp[1].item()) < 1e-6
    assert [t for t, _ in info.top] == [1, 2]


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_k", -1),
        ("max_tokens", -5),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 3.0),
        ("top_logprobs", 50),
        ("stop", [""]),
        ("seed", "x"),
    ],
)
def test_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value}).validate()


def test_none_means_the_default_and_a_bare_stop_string_is_a_list():
    p = SamplingParams(stop="END", top_p=None, top_logprobs=None, presence_penalty=None)
    p.validate()
    assert (p.stop, p.top_p, p.top_logprobs, p.presence_penalty) == (["END"], 1.0, 0, 0.0)
    q = SamplingParams(stop=None, temperature=None)
    q.validate()
    assert q.stop == [] and q.temperature == 1.0
