"""Per-finding evaluation: AUC (Mann-Whitney, equal to scikit-learn's roc_auc_score) with a DeLong
95% CI, and expected calibration error (10 equal-width bins)."""

from __future__ import annotations

import math

import numpy as np


def auc_delong(y: np.ndarray, p: np.ndarray) -> tuple[float, float, float]:
    """(auc, lo, hi). NaNs when one class is missing."""
    from scipy.stats import rankdata  # here: workers import this module for the region reduction, which needs no scipy (0.6 s)

    y = np.asarray(y, bool)
    p = np.asarray(p, np.float64)
    pos, neg = p[y], p[~y]
    m, n = len(pos), len(neg)
    if m == 0 or n == 0:
        return math.nan, math.nan, math.nan
    r_all = rankdata(np.concatenate([pos, neg]))  # midranks: ties count one half
    auc = (r_all[:m].sum() - m * (m + 1) / 2) / (m * n)
    # DeLong et al. (1988) structural components, via midranks (Sun & Xu 2014).
    v10 = (r_all[:m] - rankdata(pos)) / n
    v01 = 1 - (r_all[m:] - rankdata(neg)) / m
    var = (np.var(v10, ddof=1) / m if m > 1 else 0.0) + (np.var(v01, ddof=1) / n if n > 1 else 0.0)
    se = math.sqrt(max(var, 0.0))
    return float(auc), float(max(0.0, auc - 1.96 * se)), float(min(1.0, auc + 1.96 * se))


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
