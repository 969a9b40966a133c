"""Token choice: greedy is argmax, the nucleus is the smallest top set with mass >= top_p, sampling draws
from the (tempered, truncated) distribution, and a seed fixes a row's draws whatever its batch."""

from __future__ import annotations

import math

import torch

from slimtune.serve.sampling import SamplingParams, make_generator, next_tokens, nucleus_mask


def test_nucleus_by_hand():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3], [0.15, 0.5, 0.05, 0.3]])
    outside = nucleus_mask(probs, torch.tensor([0.85, 0.4]))
    # Ranked 0.5, 0.3, 0.15, 0.05: mass above each is 0, 0.5, 0.8, 0.95.
    assert outside.tolist() == [[False, False, True, False], [True, False, True, True]], \
        "top_p=0.85 keeps 0.5, 0.3, 0.15 (mass above 0.8 < 0.85); top_p=0.4 keeps only the most likely token"


def test_greedy_is_argmax():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, -1.0, 4.9]])
    params = [SamplingParams(max_tokens=1, temperature=0)] * 2
    assert next_tokens(logits, params, [make_generator(0)] * 2) == [1, 0]


def test_sampling_follows_the_tempered_distribution():
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    rows = 4000
    params = [SamplingParams(max_tokens=1, temperature=0.5)] * rows
    tokens = next_tokens(logits.expand(rows, 4), params, [make_generator(i) for i in range(rows)])
    counts = torch.bincount(torch.tensor(tokens), minlength=4).double() / rows
    expected = torch.tensor([0.1, 0.2, 0.3, 0.4]) ** 2  # temperature 0.5 squares the probabilities
    expected /= expected.sum()
    tolerance = 4 * math.sqrt(0.25 / rows)  # four standard deviations of a frequency
    assert (counts - expected).abs().max() < tolerance, f"frequencies {counts.tolist()} vs {expected.tolist()}"


def test_top_p_never_draws_outside_the_nucleus():
    logits = torch.log(torch.tensor([0.05, 0.6, 0.05, 0.3]))
    rows = 500
    tokens = next_tokens(logits.expand(rows, 4), [SamplingParams(max_tokens=1, temperature=1.0, top_p=0.8)] * rows,
                         [make_generator(i) for i in range(rows)])
    assert set(tokens) == {1, 3}, f"top_p=0.8 keeps tokens 1 and 3 only: got {sorted(set(tokens))}"


def test_a_seeded_row_draws_the_same_in_any_batch():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    sampled = SamplingParams(max_tokens=1, temperature=1.0, seed=42)
    alone = [next_tokens(logits[2:3], [sampled], [make_generator(42)]) for _ in range(3)]
    mixed = next_tokens(logits, [SamplingParams(max_tokens=1, temperature=0.7)] * 2 + [sampled] +
                        [SamplingParams(max_tokens=1, temperature=0)] * 2,
                        [make_generator(1), make_generator(2), make_generator(42), make_generator(3), make_generator(4)])
    assert alone[0] == alone[1] == alone[2] == [mixed[2]], "the seeded row's token must not depend on its batch"
