"""Per-finding evaluation: AUC (Mann-Whitney, equal to scikit-learn's roc_auc_score) with a DeLong
95% CI, the paired DeLong CI of two scores' AUC difference, and expected calibration error (10 equal-width bins)."""

from __future__ import annotations

import math

import numpy as np


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank (scipy's rankdata "average", without its
    per-call overhead: a run ranks thousands of small arrays). NaN anywhere: all NaN, as scipy's."""
    if np.isnan(x).any():
        return np.full(len(x), np.nan)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def _delong_components(y: np.ndarray, p: np.ndarray):
    """(auc, v10, v01): DeLong et al. (1988) structural components via midranks (Sun & Xu 2014);
    None when one class is missing."""
    pos, neg = p[y], p[~y]
    m, n = len(pos), len(neg)
    if m == 0 or n == 0:
        return None
    r_all = _midranks(np.concatenate([pos, neg]))  # midranks: ties count one half
    auc = (r_all[:m].sum() - m * (m + 1) / 2) / (m * n)
    v10 = (r_all[:m] - _midranks(pos)) / n
    v01 = 1 - (r_all[m:] - _midranks(neg)) / m
    return auc, v10, v01


def _delong_var(v10: np.ndarray, v01: np.ndarray) -> float:
    m, n = len(v10), len(v01)
    return (np.var(v10, ddof=1) / m if m > 1 else 0.0) + (np.var(v01, ddof=1) / n if n > 1 else 0.0)


def _ci(est: float, var: float, lo: float, hi: float) -> tuple[float, float, float]:
    se = math.sqrt(max(var, 0.0))
    return float(est), float(max(lo, est - 1.96 * se)), float(min(hi, est + 1.96 * se))


def auc_delong(y: np.ndarray, p: np.ndarray) -> tuple[float, float, float]:
    """(auc, lo, hi). NaNs when one class is missing."""
    y = np.asarray(y, bool)
    c = _delong_components(y, np.asarray(p, np.float64))
    if c is None:
        return math.nan, math.nan, math.nan
    auc, v10, v01 = c
    return _ci(auc, _delong_var(v10, v01), 0.0, 1.0)


def paired_auc_delta_delong(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """(auc(b) - auc(a), lo, hi) for two scores of the same images: DeLong's paired test, whose
    variance subtracts the covariance of the two AUCs (pROC's ``roc.test(paired=TRUE)``). Closed
    form, so it costs two rankings rather than a bootstrap of them. NaNs when one class is missing."""
    y = np.asarray(y, bool)
    ca, cb = _delong_components(y, np.asarray(a, np.float64)), _delong_components(y, np.asarray(b, np.float64))
    if ca is None:
        return math.nan, math.nan, math.nan
    # var(x - y) = var x + var y - 2 cov(x, y), per class: the variance of the components' differences
    return _ci(cb[0] - ca[0], _delong_var(cb[1] - ca[1], cb[2] - ca[2]), -1.0, 1.0)


def ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    y = np.asarray(y, np.float64)
    p = np.asarray(p, np.float64)
    if len(p) == 0:
        return math.nan
    idx = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            total += sel.sum() / len(p) * abs(p[sel].mean() - y[sel].mean())
    return float(total)
