"""Metrics with known answers and bootstrap intervals that cover the truth at about the stated rate."""
from __future__ import annotations

import numpy as np
import pytest

from gemel.errors import GemelError
from gemel.eval.metrics import bootstrap_interval, paired_bootstrap


def test_bootstrap_interval_covers_true_mean_at_about_the_stated_rate():
    rng = np.random.default_rng(123)
    p_true, n, reps = 0.7, 200, 300
    covered = 0
    for rep in range(reps):
        hits = rng.random(n) < p_true
        lo, hi = bootstrap_interval(hits, n_resamples=400, seed=rep)
        covered += lo <= 100 * p_true <= hi
    # 95% nominal; percentile intervals run slightly narrow at n=200 and the band allows ~3 sd of
    # the 300-repetition estimate
    assert 0.90 <= covered / reps <= 0.985


def test_bootstrap_interval_is_in_percent_ordered_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.random(100) < 0.5, rng.random(10_000) < 0.5
    lo_s, hi_s = bootstrap_interval(small)
    lo_l, hi_l = bootstrap_interval(large)
    assert 0 <= lo_s < 100 * small.mean() < hi_s <= 100
    assert lo_l < 100 * large.mean() < hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 5  # width ~ 1/sqrt(n): 10x for 100x the mentions
    # reproducible for a seed, a constant sample has a zero-width interval
    assert bootstrap_interval(small, seed=3) == bootstrap_interval(small, seed=3)
    assert bootstrap_interval([1, 1, 1]) == (100.0, 100.0)
    # reciprocal ranks are fine too
    lo, hi = bootstrap_interval([1.0, 0.5, 1 / 3, 0.0])
    assert 0 <= lo <= 100 * np.mean([1.0, 0.5, 1 / 3, 0.0]) <= hi <= 100


def test_paired_bootstrap_detects_a_planted_difference():
    rng = np.random.default_rng(7)
    n = 2000
    a = (rng.random(n) < 0.6).astype(float)
    b = a.copy()
    flip = rng.choice(np.flatnonzero(a == 0), size=200, replace=False)  # +10 points planted
    b[flip] = 1
    out = paired_bootstrap(a, b)
    assert set(out) == {"diff", "lo", "hi", "p"}
    assert out["diff"] == pytest.approx(10.0)
    assert 0 < out["lo"] < 10 < out["hi"]
    assert out["p"] < 0.01
    # the sign follows the order: diff = mean(b) - mean(a)
    back = paired_bootstrap(b, a)
    assert back["diff"] == pytest.approx(-10.0) and back["hi"] < 0 and back["p"] < 0.01
    # no difference at all: p is 1, interval is zero
    same = paired_bootstrap(a, a)
    assert same == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "p": 1.0}


def test_paired_bootstrap_false_positive_rate_near_nominal():
    rng = np.random.default_rng(11)
    reps, n = 200, 300
    rejections = 0
    for rep in range(reps):
        a, b = rng.random(n) < 0.5, rng.random(n) < 0.5  # same system quality, no real gain
        rejections += paired_bootstrap(a, b, n_resamples=400, seed=rep)["p"] < 0.05
    assert 0.01 <= rejections / reps <= 0.11


def test_interval_inputs_are_checked():
    with pytest.raises(GemelError, match="empty"):
        bootstrap_interval([])
    with pytest.raises(GemelError, match="aligned"):
        paired_bootstrap([1, 0], [1, 0, 1])
    with pytest.raises(GemelError, match="confidence"):
        bootstrap_interval([1, 0], confidence=95)
