"""AUCs as U-statistics with their influence on each film, so that any difference of two AUCs over the
same films has a closed-form standard error, clustered by patient.

An AUC here may be *pooled* (every positive-negative pair) or *within strata* (only pairs of the same
stratum: the probability that the score orders a random positive and negative of the same view, site
or label correctly; the strata's AUCs weighted by their number of pairs). Writing it as a ratio
``W = U / D`` of pair counts, a film's first-order influence is

- positive i of stratum k: ``n_k (V10_i - W) / D``, with V10_i the share of k's negatives it outranks;
- negative j of stratum k: ``m_k (V01_j - W) / D``, with V01_j the share of k's positives above it;

(one stratum: DeLong's structural components, ``(V10_i - A) / m`` and ``(V01_j - A) / n``). The
variance of any linear combination of such AUCs over the same films is the sum over patients of the
squared summed influences of their films, times G / (G - 1) for G patients (Obuchowski's clustered
AUC, 1997): the films of one patient are not independent, and at the NIH set's ~3.6 films per
patient ignoring that understates the variance.
"""

from __future__ import annotations

import math

import numpy as np


def _shares(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per film, from one sort: for a positive the share of negatives it outranks, for a negative the
    share of positives above it; ties count one half (DeLong's V10 and V01)."""
    order = np.argsort(x, kind="stable")
    xs, ys = x[order], y[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])  # groups of tied scores
    pos_in = np.add.reduceat(ys.astype(np.float64), starts)
    neg_in = np.add.reduceat((~ys).astype(np.float64), starts)
    m, n = pos_in.sum(), neg_in.sum()
    neg_below = np.cumsum(neg_in) - neg_in
    pos_above = m - np.cumsum(pos_in)
    sizes = np.diff(np.r_[starts, len(xs)])
    v_pos = np.repeat((neg_below + 0.5 * neg_in) / n, sizes)
    v_neg = np.repeat((pos_above + 0.5 * pos_in) / m, sizes)
    out = np.empty(len(x))
    out[order] = np.where(ys, v_pos, v_neg)
    return out


def auc_influence(y: np.ndarray, score: np.ndarray, strata: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """(AUC, influence per film). ``strata``: integer codes (None: one stratum, the pooled AUC);
    strata without both classes add no pairs. NaN and zeros when no stratum has both classes."""
    y = np.asarray(y, bool)
    score = np.asarray(score, np.float64)
    psi = np.zeros(len(y))
    v = np.zeros(len(y))  # V10 for positives, V01 for negatives
    weight = np.zeros(len(y))  # n_k for positives, m_k for negatives
    total_pairs = u = 0.0
    groups = [np.arange(len(y))] if strata is None else [np.flatnonzero(strata == k) for k in np.unique(strata)]
    for idx in groups:
        yk = y[idx]
        m, n = int(yk.sum()), int((~yk).sum())
        if m == 0 or n == 0:
            continue
        v[idx] = _shares(yk, score[idx])
        weight[idx] = np.where(yk, n, m)
        u += v[idx][yk].sum() * n
        total_pairs += m * n
    if total_pairs == 0:
        return math.nan, psi
    auc = u / total_pairs
    used = weight > 0
    psi[used] = weight[used] * (v[used] - auc) / total_pairs
    return float(auc), psi


def clustered_se(psi: np.ndarray, groups: np.ndarray | None) -> float:
    """Standard error from per-film influences, films of one group (patient) summed first."""
    if groups is None:
        sums = psi
    else:  # integer codes (pd.factorize) are summed directly: a 112k-film run calls this ~1,000 times
        inv = groups if groups.dtype.kind in "iu" else np.unique(groups, return_inverse=True)[1]
        sums = np.bincount(inv, weights=psi)
    g = int((sums != 0).sum())
    if g < 2:
        return math.nan
    return math.sqrt(float((sums**2).sum()) * g / (g - 1))


def t_test(estimate: float, se: float, df: float, null: float = 0.0, alternative: str = "greater") -> float:
    """p-value of ``(estimate - null) / se`` against Student's t with ``df`` degrees of freedom:
    'greater', 'less' or 'two-sided'. Why t and not the normal: with 10-30 positives the influence
    variance is itself noisy, and under label permutations of real films a normal reference gave
    a Bonferroni-over-24-cells p below 0.005 in 1.9% of null findings (4x nominal); t with
    df = (positive patients or negative patients, the fewer) - 1 gave 0.19% (tests/analysis)."""
    from scipy.stats import t as student

    if not (math.isfinite(estimate) and math.isfinite(se)) or se <= 0 or df < 1:
        return math.nan
    x = (estimate - null) / se
    if alternative == "greater":
        return float(student.sf(x, df))
    if alternative == "less":
        return float(student.cdf(x, df))
    return float(2 * student.sf(abs(x), df))


def t_ci(estimate: float, se: float, df: float, level: float = 0.95) -> tuple[float, float]:
    """Two-sided ``level`` interval, estimate +- t quantile x se."""
    from scipy.stats import t as student

    if not (math.isfinite(estimate) and math.isfinite(se)) or df < 1:
        return math.nan, math.nan
    half = float(student.ppf(0.5 + level / 2, df)) * se
    return estimate - half, estimate + half


def min_class_groups(y: np.ndarray, groups: np.ndarray) -> int:
    """Patients with a positive film and patients with a negative film: the fewer of the two."""
    y = np.asarray(y, bool)
    return int(min(len(np.unique(groups[y])), len(np.unique(groups[~y]))))


def std_diff_influence(y: np.ndarray, x: np.ndarray) -> tuple[float, np.ndarray]:
    """(d, influence per film): the standardised difference of means, (mean of positives - mean of
    negatives) / pooled SD (Cohen's d). Unlike an AUC it does not saturate: a cell that separates
    every film (AUC 1) still reads larger than one that nearly does, so a marker that is a perfect
    proxy stands out from anatomy that is nearly one. Influence: d = D / s with D the difference of
    means and s^2 the pooled variance, so a film moves d by its share of D over s minus
    d / (2 s^2) times its share of s^2."""
    y = np.asarray(y, bool)
    x = np.asarray(x, np.float64)
    m, n = int(y.sum()), int((~y).sum())
    psi = np.zeros(len(x))
    if m < 2 or n < 2:
        return math.nan, psi
    mu1, mu0 = x[y].mean(), x[~y].mean()
    dev = np.where(y, x - mu1, x - mu0)
    var = float((dev**2).sum() / (m + n - 2))
    if var <= 0:
        return math.nan, psi
    s = math.sqrt(var)
    d = (mu1 - mu0) / s
    psi = np.where(y, dev / m, -dev / n) / s - d * (dev**2 - var) / (2 * var * (m + n - 2))
    return float(d), psi
