"""Issue 14: the region statistics' "top cell" claims come with CIs computed from mergeable sums."""

import numpy as np
import pytest

from pipeline.analysis.region_stats import RegionAccumulator, cell_vs_rest, mean_ci, stratum_difference

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


def test_region_contrasts_table_pairs_the_values_of_each_stratum():
    from pipeline.analysis.aggregate import region_contrasts_table

    rng = np.random.default_rng(2)
    ap, pa = rng.normal(0.5, 1, (40, F, C)), rng.normal(0, 1, (60, F, C))
    acc = _acc(np.concatenate([ap, pa]), ("all", "all")) + _acc(ap, ("view_position", "AP")) + _acc(pa, ("view_position", "PA"))
    acc = acc + _acc(pa[:5], ("sex", "F"))  # too few films: no contrast
    t = region_contrasts_table(acc, ("A", "B"), 20, {}).to_pandas()
    assert len(t) == F * C and set(t.stratum) == {"view_position"} and (t.value_a == "AP").all() and (t.value_b == "PA").all()
    row = t[(t.finding == "B") & (t.cell_row == 3) & (t.cell_col == 4)].iloc[0]
    assert row["diff"] == pytest.approx(ap[:, 1, 3 * 7 + 4].mean() - pa[:, 1, 3 * 7 + 4].mean()) and row.diff_lo < row["diff"] < row.diff_hi
    assert (row.n_a, row.n_b) == (40, 60)


@pytest.mark.parametrize("n", [40, 20_000])
def test_an_accumulator_crosses_processes_intact_and_small_runs_travel_sparse(n):
    """Dask pickles accumulators between workers: every statistic survives bit for bit, and a small
    run's mostly empty histograms travel as their non-zero bins (dense: 1,200 int32 per cell)."""
    import pickle

    rng = np.random.default_rng(n)
    cam = rng.normal(0, 3, (n, F, C))
    acc = _acc(cam, parts=2)
    back = pickle.loads(pickle.dumps(acc, protocol=5))
    for key, s in acc.stats.items():
        for name, a in vars(s).items():
            b = getattr(back.stats[key], name)
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), name
    dense = acc.stats[("all", "all")].hist.nbytes
    size = len(pickle.dumps(acc, protocol=5))
    assert size < dense / 4 if n == 40 else size > dense / 2  # 40 films: sparse; 20,000: dense is smaller
