"""Issue 14: the region statistics' "top cell" claims come with CIs computed from mergeable sums."""

import numpy as np
import pytest

from pipeline.region_stats import RegionAccumulator, cell_vs_rest, mean_ci, stratum_difference

F, C = 2, 49


def _acc(cam: np.ndarray, key=("all", "all"), parts: int = 1) -> RegionAccumulator:
    total = RegionAccumulator(F, C)
    for chunk in np.array_split(np.arange(len(cam)), parts):
        a = RegionAccumulator(F, C)
        a.update(key, np.ones((len(chunk), F), bool), cam[chunk], cam[chunk])
        total = total + a
    return total


def test_cell_vs_rest_is_the_paired_difference_and_merges():
    rng = np.random.default_rng(0)
    cam = rng.normal(0, 1, (300, F, C)) + rng.normal(0, 2, (300, 1, 1))  # a per-image offset: pairing matters
    cam[:, 1, 10] += 0.3
    s = _acc(cam, parts=5).stats[("all", "all")]
    d = cam[:, 1] - (cam[:, 1].sum(1, keepdims=True) - cam[:, 1]) / (C - 1)
    half = 1.96 * d.std(0, ddof=1) / np.sqrt(len(d))
    diff, lo, hi = cell_vs_rest(s, 1)
    np.testing.assert_allclose(diff, d.mean(0), atol=1e-9)
    np.testing.assert_allclose(hi - diff, half, rtol=1e-3)
    assert lo[10] > 0 and (np.delete(lo, 10) < 0.3).all()
    # the paired interval is much narrower than one that ignores the per-image offset
    assert (hi - lo).mean() < 0.5 * (2 * 1.96 * cam[:, 1].std(0, ddof=1) / np.sqrt(300)).mean()
    m_lo, m_hi = mean_ci(s, 1)
    np.testing.assert_allclose((m_lo + m_hi) / 2, cam[:, 1].mean(0), atol=1e-9)


def test_stratum_difference_is_welch_and_covers():
    rng = np.random.default_rng(1)
    covered, trials = 0, 200
    for t in range(trials):
        a = rng.normal(0.2, 1.0, (80, F, C))
        b = rng.normal(0.0, 2.0, (120, F, C))
        acc = _acc(a, ("view_position", "AP")) + _acc(b, ("view_position", "PA"))
        diff, lo, hi = stratum_difference(acc.stats[("view_position", "AP")], acc.stats[("view_position", "PA")], 0)
        if t == 0:
            se = np.sqrt(a[:, 0].var(0, ddof=1) / 80 + b[:, 0].var(0, ddof=1) / 120)
            np.testing.assert_allclose(diff, a[:, 0].mean(0) - b[:, 0].mean(0), atol=1e-9)
            np.testing.assert_allclose(hi - lo, 2 * 1.96 * se, rtol=1e-3)
        covered += (lo[0] <= 0.2 <= hi[0])
    assert covered / trials == pytest.approx(0.95, abs=0.04)
