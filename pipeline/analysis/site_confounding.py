"""How much of a model's pooled AUC could the site alone give? (Zech et al. 2018: the hospital
system alone predicted pneumonia with AUC 0.861.)

Per finding, over the images labelled for it:

- ``auc_site_prevalence``: the AUC of scoring every image by its site's prevalence, ties within a
  site counted as ties (one half), i.e. how well the ordering of the sites alone ranks the images.
  A site-only score has one value per site, so nothing is fitted but the order of the sites: no
  held-out folds are needed. Sites with fewer than ``min_n`` labelled images are pooled into one
  group first (their own prevalence would memorise their few labels).
- ``auc_site_prevalence_oof``: the older out-of-fold variant (site prevalence estimated on the
  other folds). It is biased low: a fold whose test part holds more of a site's positives leaves
  fewer in its training part, so the score is anti-correlated with the labels it ranks.
- ``auc_model`` pooled, ``auc_model_within_site`` (the within-site AUCs weighted by their number
  of positive-negative pairs: the probability that the model orders a random positive and negative
  *of the same site* correctly, i.e. the model's AUC without the site signal), and
  ``auc_gap = auc_model - auc_site_prevalence``.

CIs are percentile intervals of a bootstrap over patients (every image of a resampled patient comes
with it); the site prevalences are re-estimated in every replicate.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from pipeline.analysis.metrics import auc_delong

POOLED_SITE = "(sites under min_n)"


def auc_from_level_counts(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC of a score with levels in increasing order; pos/neg: (weighted) counts per level. Ties
    within a level count one half (Mann-Whitney, as scikit-learn's roc_auc_score)."""
    p_tot, n_tot = pos.sum(), neg.sum()
    if p_tot <= 0 or n_tot <= 0:
        return math.nan
    below = np.cumsum(neg) - neg
    return float((pos * (below + 0.5 * neg)).sum() / (p_tot * n_tot))


def site_only_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Closed form of the site-prevalence AUC from per-site positive and negative counts: a pair
    (positive of site s, negative of site t) is concordant if prev_s > prev_t, a tie if equal."""
    n = pos + neg
    keep = n > 0
    pos, neg, n = pos[keep], neg[keep], n[keep]
    prev = pos / n
    cmp = np.sign(prev[:, None] - prev[None, :])  # [s, t]
    p_tot, n_tot = pos.sum(), neg.sum()
    if p_tot <= 0 or n_tot <= 0:
        return math.nan
    return float((pos[:, None] * neg[None, :] * (0.5 + 0.5 * cmp)).sum() / (p_tot * n_tot))


class _Levels:
    """Precomputed score levels so that each bootstrap replicate is a few bincounts."""

    def __init__(self, p: np.ndarray, y: np.ndarray):
        self.levels, self.inv = np.unique(p, return_inverse=True)
        self.y = y

    def auc(self, w: np.ndarray) -> tuple[float, float]:
        """(auc, number of positive-negative pairs) with image weights w."""
        g = len(self.levels)
        pos = np.bincount(self.inv, weights=w * self.y, minlength=g)
        neg = np.bincount(self.inv, weights=w * (1 - self.y), minlength=g)
        return auc_from_level_counts(pos, neg), float(pos.sum() * neg.sum())


def _site_codes(s: np.ndarray, min_n: int) -> tuple[np.ndarray, list[str]]:
    counts = pd.Series(s).value_counts()
    small = set(counts.index[counts < min_n])
    merged = np.where(np.isin(s, list(small)), POOLED_SITE, s) if small else s
    names, codes = np.unique(merged, return_inverse=True)
    return codes, list(names)


def _statistics(w, y, codes, n_sites, pooled: _Levels, per_site: dict[int, _Levels]) -> np.ndarray:
    """[site-only AUC, pooled model AUC, within-site model AUC, model AUC per scored site...]."""
    pos = np.bincount(codes, weights=w * y, minlength=n_sites)
    neg = np.bincount(codes, weights=w * (1 - y), minlength=n_sites)
    site = site_only_auc(pos, neg) if n_sites > 1 else math.nan
    model, _ = pooled.auc(w)
    num = den = 0.0
    each = []
    for k, lv in per_site.items():
        a, pairs = lv.auc(w[codes == k])
        each.append(a)
        if pairs > 0 and not math.isnan(a):
            num, den = num + a * pairs, den + pairs
    return np.array([site, model, num / den if den > 0 else math.nan, *each])


def _oof_site_auc(y, s, patients, folds: int, seed: int) -> float:
    from sklearn.model_selection import StratifiedGroupKFold  # here: sklearn's import is ~1.5 s, and most importers fit nothing

    score = np.full(len(y), np.nan)
    for train, test in StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y, patients):
        prev = pd.Series(y[train]).groupby(s[train]).mean()
        score[test] = pd.Series(s[test]).map(prev).fillna(y[train].mean()).to_numpy()
    return auc_delong(y, score)[0]


def _interval(values: np.ndarray) -> tuple[float | None, float | None]:
    v = values[np.isfinite(values)]
    if len(v) < 10:
        return None, None
    return float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))


def _num(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def prevalence_confounding(manifest: pd.DataFrame, rows: np.ndarray, probs: np.ndarray, findings, cfg, min_n: int = 20) -> list[dict]:
    """Rows of prevalence_confounding.parquet: per finding one 'all' row and one row per site.
    ``cfg``: a ProbeConfig (folds and seed of the out-of-fold variant, n_boot and seed of the CIs)."""
    m = manifest.set_index("row").loc[rows]
    site = m["site"].astype(str).to_numpy()
    patients = m["patient_id"].fillna(pd.Series([f"row{r}" for r in rows], index=m.index)).astype(str).to_numpy()
    rng_seed = cfg.seed
    out = []
    for k, f in enumerate(findings):
        if f not in m.columns:
            continue
        has = m[f].notna().to_numpy()
        if has.sum() < min_n:
            continue
        y = m[f][has].astype(bool).to_numpy().astype(np.float64)
        p, s, pat = probs[has, k], site[has], patients[has]
        if y.sum() == 0 or y.sum() == len(y):
            continue
        codes, names = _site_codes(s, min_n)
        scored = {c: _Levels(p[codes == c], y[codes == c]) for c in range(len(names))
                  if names[c] != POOLED_SITE and (codes == c).sum() >= min_n}
        pooled = _Levels(p, y)
        point = _statistics(np.ones(len(y)), y, codes, len(names), pooled, scored)
        pat_codes, pat_idx = np.unique(pat, return_inverse=True)
        rng = np.random.default_rng(rng_seed)
        boots = np.array([_statistics(rng.multinomial(len(pat_codes), np.full(len(pat_codes), 1 / len(pat_codes)))[pat_idx].astype(np.float64),
                                      y, codes, len(names), pooled, scored) for _ in range(cfg.n_boot)]).reshape(cfg.n_boot, len(point))
        ci = [_interval(boots[:, i]) for i in range(len(point))]
        gap_lo, gap_hi = _interval(boots[:, 1] - boots[:, 0])
        oof = (_oof_site_auc(y.astype(bool), s, pat, cfg.folds, cfg.seed)
               if len(names) > 1 and min(y.sum(), len(y) - y.sum()) >= cfg.folds else math.nan)
        out.append({"finding": f, "stratum": "all", "stratum_value": "all", "n": int(len(y)), "prevalence": float(y.mean()),
                    "n_sites": len(set(s)),
                    "auc_site_prevalence": _num(point[0]), "auc_site_prevalence_lo": ci[0][0], "auc_site_prevalence_hi": ci[0][1],
                    "auc_site_prevalence_oof": _num(oof),
                    "auc_model": _num(point[1]), "auc_model_lo": ci[1][0], "auc_model_hi": ci[1][1],
                    "auc_gap": _num(point[1] - point[0]), "auc_gap_lo": gap_lo, "auc_gap_hi": gap_hi,
                    "auc_model_within_site": _num(point[2]), "auc_model_within_site_lo": ci[2][0], "auc_model_within_site_hi": ci[2][1]})
        per_site = {names[c]: i for i, c in enumerate(scored)}
        for v in sorted(set(s)):
            sel = s == v
            i = per_site.get(v)
            a = point[3 + i] if i is not None else math.nan
            lo, hi = ci[3 + i] if i is not None else (None, None)
            out.append({"finding": f, "stratum": "site", "stratum_value": v, "n": int(sel.sum()), "prevalence": float(y[sel].mean()),
                        "auc_model": _num(a), "auc_model_lo": lo if _num(a) is not None else None, "auc_model_hi": hi if _num(a) is not None else None})
    return out
