"""Uncertainty of a cross-validated probe's AUC, for every cell of the identifiability map.

- CI: a normal interval on the pooled out-of-fold (macro one-vs-rest) AUC with the DeLong variance,
  generalised to several classes through each image's influence on the macro AUC (for two classes
  it is DeLong's).
- Test of "differs from chance": the pooled out-of-fold AUC has no simple null distribution (the
  folds' models score on different scales), but within one test fold the model was trained on other
  patients, so under "the target is not in these features" the fold's labels are exchangeable with
  its scores: a permutation test. Its mean and variance are exact (linear rank statistics), so each
  fold's AUC is standardised without resampling; the folds are combined (weights: test-fold size,
  variance doubled for the folds' shared training labels, see ``within_fold_test``), and the
  one-sided p-value (above chance) comes from the normal approximation.
- The 49 cells of a target are one family: Holm's step-down correction controls the family-wise
  error rate at ``alpha``; ``significant`` is the Holm-adjusted p-value <= alpha.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import ndtr
from scipy.stats import rankdata

Z95 = 1.959963984540054


def _macro_parts(y_idx: np.ndarray, proba: np.ndarray):
    """Classes present, and per class its score column's midranks over all rows."""
    k = proba.shape[1]
    classes = [c for c in range(k) if 0 < (y_idx == c).sum() < len(y_idx)]
    if k == 2:
        classes = [1] if classes else []  # two classes: the AUC of class 1's probability
    return classes, {c: rankdata(proba[:, c]) for c in classes}


def macro_auc_se(y_idx: np.ndarray, proba: np.ndarray) -> tuple[float, float]:
    """(auc, se): macro one-vs-rest AUC and its standard error from each row's influence
    (DeLong's structural components, summed over classes)."""
    classes, ranks = _macro_parts(y_idx, proba)
    if not classes:
        return math.nan, math.nan
    n = len(y_idx)
    infl = np.zeros(n)
    auc = 0.0
    for c in classes:
        pos = y_idx == c
        m, q = pos.sum(), n - pos.sum()
        r = ranks[c]
        a = (r[pos].sum() - m * (m + 1) / 2) / (m * q)
        v = np.empty(n)
        v[pos] = (r[pos] - rankdata(proba[pos, c])) / q  # share of negatives below each positive
        v[~pos] = 1 - (r[~pos] - rankdata(proba[~pos, c])) / m  # share of positives above each negative
        infl += np.where(pos, (v - a) / m, (v - a) / q)
        auc += a
    auc /= len(classes)
    infl /= len(classes)
    return float(auc), math.sqrt(float((infl**2).sum()))


def macro_auc_ci(y_idx: np.ndarray, proba: np.ndarray) -> tuple[float, float, float]:
    """(auc, lo, hi): macro one-vs-rest AUC with a 95% normal CI (``macro_auc_se``)."""
    auc, se = macro_auc_se(y_idx, proba)
    if math.isnan(auc):
        return math.nan, math.nan, math.nan
    return float(auc), float(max(0.0, auc - Z95 * se)), float(min(1.0, auc + Z95 * se))


def _permutation_moments(y_idx: np.ndarray, proba: np.ndarray) -> tuple[float, float]:
    """(macro AUC, its variance under random permutation of the labels): exact, from linear rank
    statistics S_c = sum of class c's ranks, Var S_c = n_c(N-n_c)/(N(N-1)) sum (r - mean r)^2 and
    Cov(S_c, S_d) = -n_c n_d/(N(N-1)) sum (r_c - mean)(r_d - mean)."""
    classes, ranks = _macro_parts(y_idx, proba)
    n = len(y_idx)
    if not classes or n < 3:
        return math.nan, math.nan
    counts = np.array([(y_idx == c).sum() for c in classes], np.float64)
    coef = 1.0 / (len(classes) * counts * (n - counts))
    centred = np.stack([ranks[c] - ranks[c].mean() for c in classes])  # (K, N)
    gram = centred @ centred.T
    cov = -np.outer(counts, counts) * gram / (n * (n - 1))
    np.fill_diagonal(cov, counts * (n - counts) * np.diag(gram) / (n * (n - 1)))
    auc = float(np.mean([(ranks[c][y_idx == c].sum() - counts[i] * (counts[i] + 1) / 2) * coef[i] * len(classes)
                         for i, c in enumerate(classes)]))
    return auc, float(coef @ cov @ coef)


CROSS_FIT_VARIANCE_FACTOR = 2.0


def within_fold_auc(y_idx: np.ndarray, proba: np.ndarray, splits) -> tuple[float, float, float]:
    """(auc, lo, hi): a cross-validated probe's AUC that reads 0.5 when the target is not in the features.

    The pooled out-of-fold AUC ranks together scores of models fitted on different folds, and a
    test fold that holds more of a class was trained on fewer of it, so at chance it is biased low
    (the demo's age band read 0.430 [0.381, 0.474]). Here each test fold is ranked on its own (its
    model never saw its patients, so under no signal its labels are exchangeable with its scores:
    expectation 0.5 exactly) and the folds' AUCs are averaged, weighted by size. The variance is each
    fold's DeLong variance (macro one-vs-rest through the influences) summed with the weights, times
    ``CROSS_FIT_VARIANCE_FACTOR`` for the training labels the folds share (see ``within_fold_test``).
    A probe's expected AUC cannot be below chance, so the 95% CI is intersected with [0.5, 1]: an
    interval that would lie wholly below 0.5 reads [0.5, 0.5], "no signal"."""
    num = var = weight = 0.0
    for _, test in splits:
        auc, se = macro_auc_se(y_idx[test], proba[test])
        if math.isnan(auc):
            continue
        w = len(test)
        num, var, weight = num + w * auc, var + w * w * se * se, weight + w
    if weight == 0:
        return math.nan, math.nan, math.nan
    auc = num / weight
    half = Z95 * math.sqrt(CROSS_FIT_VARIANCE_FACTOR * var) / weight
    return float(auc), float(min(1.0, max(0.5, auc - half))), float(min(1.0, max(0.5, auc + half)))


def within_fold_test(y_idx: np.ndarray, proba: np.ndarray, splits) -> tuple[float, float]:
    """(z, one-sided p) that the probe ranks above chance, from each test fold's AUC against its
    exact permutation mean (0.5) and variance.

    The folds' statistics are not independent: to first order in the training labels, a fold's
    statistic is a sum over pairs (test image of this fold, training image of another fold), and
    each such pair enters the statistics of both its folds. The null variance of the combined
    statistic is therefore twice the sum of the folds' permutation variances (simulated: the null
    z has SD 1.37 without the factor, 0.97 with it, over 1,940 planted null cells)."""
    num = var = weight = 0.0
    for _, test in splits:
        a, v = _permutation_moments(y_idx[test], proba[test])
        if math.isnan(a) or v <= 0:
            continue
        w = len(test)
        num, var, weight = num + w * (a - 0.5), var + w * w * v, weight + w
    if weight == 0:
        return math.nan, math.nan
    z = num / math.sqrt(CROSS_FIT_VARIANCE_FACTOR * var)
    return float(z), float(ndtr(-z))


def holm(p: np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values (NaNs stay NaN and do not count)."""
    p = np.asarray(p, np.float64)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    if not len(ok):
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    adj = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    out[order] = adj
    return out
