"""Learning-rate schedule against hand-computed values."""

import math

import pytest

from slimtune.train.schedule import lr_multiplier, warmup_steps


def test_warmup_is_linear_and_starts_above_zero():
    # 10 steps, 4 warmup: multipliers 1/4, 2/4, 3/4, 4/4 for steps 0..3.
    assert [lr_multiplier(s, 10, 4, "constant") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_cosine_by_hand():
    # T=10, w=2: step 2 is progress 0 -> 1.0; step 6 is progress 0.5 -> 0.5; step 8 -> 0.5(1+cos(0.75 pi)).
    assert lr_multiplier(2, 10, 2, "cosine") == pytest.approx(1.0)
    assert lr_multiplier(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(8, 10, 2, "cosine") == pytest.approx(0.5 * (1 + math.cos(0.75 * math.pi)))


def test_linear_by_hand():
    assert lr_multiplier(0, 5, 0, "linear") == pytest.approx(1.0)
    assert lr_multiplier(4, 5, 0, "linear") == pytest.approx(0.2)


def test_warmup_steps_rounds_up():
    assert warmup_steps(100, 0.03) == 3
    assert warmup_steps(10, 0.05) == 1
    assert warmup_steps(10, 0.0) == 0


def test_unknown_schedule_raises():
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_multiplier(5, 10, 0, "exponential")
