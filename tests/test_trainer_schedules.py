"""LR schedule values: warm-up from 1/10, re-warm-up after resampling, final linear decay."""

import math

import pytest

from train_sae.training.schedules import LRSchedule


def test_constant_without_warmup_or_decay():
    s = LRSchedule(base_lr=1e-3, total_steps=100)
    assert [s.lr(i) for i in (0, 50, 99)] == [1e-3, 1e-3, 1e-3]


def test_cosine_warmup_from_a_tenth_and_rewarm_after_resampling():
    s = LRSchedule(base_lr=1.0, total_steps=1000, warmup_steps=100, rewarm_at=(400, 700))
    assert s.factor(0) == pytest.approx(0.1)
    assert s.factor(50) == pytest.approx(0.1 + 0.9 * 0.5)  # cosine midpoint
    assert s.factor(25) == pytest.approx(0.1 + 0.9 * 0.5 * (1 - math.cos(math.pi / 4)))
    assert s.factor(100) == 1.0 and s.factor(399) == 1.0
    assert s.factor(400) == pytest.approx(0.1)  # drops to 1/10 at the resampling step
    assert s.factor(450) == pytest.approx(0.55)
    assert s.factor(500) == 1.0
    assert s.factor(700) == pytest.approx(0.1) and s.factor(800) == 1.0


def test_linear_decay_over_final_fraction_and_combined_with_warmup():
    s = LRSchedule(base_lr=2.0, total_steps=100, decay_frac=0.2)
    assert s.lr(79) == 2.0
    assert s.lr(80) == pytest.approx(2.0)
    assert s.lr(90) == pytest.approx(1.0)
    assert s.lr(99) == pytest.approx(2.0 / 20)
    both = LRSchedule(base_lr=1.0, total_steps=100, warmup_steps=30, decay_frac=0.2,
                      rewarm_at=(85,))
    assert both.factor(85) == pytest.approx(0.1 * 15 / 20)
