"""The scorecard's verdicts: for each finding, the tests whose mark says "likely shortcut", each with
an estimate, a CI, a p-value and Holm's correction over every finding x rule of the run.

A mark is a rejected null hypothesis, never a threshold on a raw share. The rules (``RULES``):

- ``location`` — the discriminating evidence lies on the border, not the anatomy. Per cell, the
  standardised difference (Cohen's d) of the cell's logit between positive and negative films (how
  well that cell alone separates them; the map's level, mostly the finding's bias, cancels); the
  anatomy's is that of the mean logit over the anatomy cells (the inner 5x5, or the anatomy mask).
  The statistic is the best border cell's d minus the anatomy's; its p-value is one-sided (border
  better), Bonferroni over the border cells; the CI is simultaneous at that level. d, not the AUC:
  a planted marker separates every film (AUC 1.0) while the demo's opacity nearly does (0.9), and
  on the AUC's bounded scale that difference could not be told from noise (8 of 20 planted seeds).
- ``stratum:COL`` — the pooled AUC leans on a stratum (view, site, sex): pooled AUC minus the
  within-stratum AUC (only pairs of films of the same stratum value), one-sided. Positive when the
  score orders films of different strata by the strata's prevalence: the model reads the stratum
  and it pays.
- ``pointing`` — the map's hottest cell lands outside expert boxes more often than chance would:
  exact Poisson-binomial lower tail of the hits, given each box's chance of a hit.
- ``reads:COL`` — Zech's test, described but never marked: does the finding's score predict the
  stratum among films of the same label (within-label AUC, in the direction that would pay)? Every
  model reads the view, a random one too (a seeded random DenseNet-121 on the 120 real films: AUC
  0.2-0.9 for AP vs PA within label, direction at random, p < 1e-8 for 4-5 findings per seed), so
  reading alone accuses models that learned nothing; ``stratum:COL`` marks when the reading pays.

Every AUC difference is a difference of U-statistics over the same films: its variance is the
patient-clustered sum of squared influences (``auc_tests``), referred to Student's t with
(positive or negative patients, the fewer) - 1 degrees of freedom. A rule needs ``min_class``
patients of each class (of each stratum value used, for ``stratum``); else its row says why and
has no p-value.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from pipeline.analysis.auc_tests import auc_influence, clustered_se, min_class_groups, std_diff_influence, t_ci, t_test
from pipeline.analysis.grid import region_masks, square_grid
from pipeline.analysis.probe_stats import holm

STRATUM_COLUMNS = ("view_position", "site", "sex")


@dataclass(frozen=True)
class VerdictConfig:
    alpha: float = 0.05  # family-wise error rate over every finding x rule of a run (Holm)
    min_class: int = 10  # patients of each class (of each stratum value, for stratum rules) a test needs


@dataclass(frozen=True)
class Verdict:
    """One row of scorecard.parquet."""

    finding: str
    rule: str
    n: int
    n_positive: int
    statistic: float | None = None
    ci_lo: float | None = None
    ci_hi: float | None = None
    p_value: float | None = None
    p_adjusted: float | None = None
    mark: bool = False
    reason: str = ""


@dataclass(frozen=True)
class FindingData:
    """One finding over its labelled films: label, pooled score, cell logits (n, C), patient, strata."""

    name: str
    y: np.ndarray
    score: np.ndarray
    cells: np.ndarray
    groups: np.ndarray
    strata: dict[str, np.ndarray]

    @property
    def base(self) -> dict:
        return {"finding": self.name, "n": int(len(self.y)), "n_positive": int(self.y.sum())}

    def too_few(self, min_class: int) -> str | None:
        k = min_class_groups(self.y, self.groups)
        return None if k >= min_class else f"not tested: {k} patients in the smaller class (< {min_class})"


def _num(x) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def grid_masks(n_cells: int, anatomy: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, str]:
    """(anatomy cells, border cells, how the anatomy was chosen)."""
    g, _ = square_grid(n_cells)
    ring = region_masks((g, g))["ring"]
    if anatomy is not None:
        a = np.asarray(anatomy, bool).reshape(-1)
        return a, ~a, "the anatomy mask"
    return ~ring, ring, f"the inner {g - 2}x{g - 2}"


def location_rule(d: FindingData, cfg: VerdictConfig, anatomy: np.ndarray | None) -> Verdict:
    why = d.too_few(cfg.min_class)
    if why:
        return Verdict(**d.base, rule="location", reason=why)
    inner, border, where = grid_masks(d.cells.shape[1], anatomy)
    anat = d.cells[:, inner].mean(1, dtype=np.float64)
    d_in, psi_in = std_diff_influence(d.y, anat)
    df = min_class_groups(d.y, d.groups) - 1
    best = None
    for c in np.flatnonzero(border):
        dc, psi = std_diff_influence(d.y, d.cells[:, c])
        se = clustered_se(psi - psi_in, d.groups)
        p = t_test(dc - d_in, se, df)
        if best is None or (not math.isnan(p) and (math.isnan(best[2]) or p < best[2])):
            best = (c, dc, p, se)
    c, dc, p, se = best
    k = int(border.sum())
    lo, hi = t_ci(dc - d_in, se, df, 1 - 2 * cfg.alpha / k)
    g, _ = square_grid(d.cells.shape[1])
    a_c, a_in = auc_influence(d.y, d.cells[:, c])[0], auc_influence(d.y, anat)[0]
    return Verdict(**d.base, rule="location", statistic=_num(dc - d_in), ci_lo=_num(lo), ci_hi=_num(hi),
                   p_value=_num(min(1.0, k * p)) if not math.isnan(p) else None,
                   reason=f"cell ({c // g}, {c % g}) separates positives from negatives by d={dc:.2f} (AUC {a_c:.3f}); "
                          f"{where} by d={d_in:.2f} (AUC {a_in:.3f})")


def _codes(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    names, codes = np.unique(values.astype(str), return_inverse=True)
    return codes, list(names)


def stratum_rule(d: FindingData, col: str, cfg: VerdictConfig) -> Verdict | None:
    s = d.strata.get(col)
    if s is None:
        return None
    rule = f"stratum:{col}"
    known = np.array([v is not None for v in s])
    codes, names = _codes(np.where(known, s, ""))
    # a value takes part when it has both classes (its pairs enter the within AUC, weighted by their number)
    usable = [k for k, name in enumerate(names) if name and min_class_groups(d.y[codes == k], d.groups[codes == k]) >= 2]
    if len(names[1:] if "" in names else names) < 2:
        return None  # one value: nothing to lean on
    if len(usable) < 2:
        return Verdict(**d.base, rule=rule, reason=f"not tested: fewer than 2 {col} values with 2 patients of each class")
    sel = np.isin(codes, usable)
    if min_class_groups(d.y[sel], d.groups[sel]) < cfg.min_class:
        return Verdict(**d.base, rule=rule, reason=f"not tested: {min_class_groups(d.y[sel], d.groups[sel])} patients in the smaller class (< {cfg.min_class})")
    y, score, groups = d.y[sel], d.score[sel], d.groups[sel]
    pooled, psi_p = auc_influence(y, score)
    within, psi_w = auc_influence(y, score, codes[sel])
    se = clustered_se(psi_p - psi_w, groups)
    df = min_class_groups(y, groups) - 1
    lo, hi = t_ci(pooled - within, se, df)
    return Verdict(finding=d.name, rule=rule, n=int(sel.sum()), n_positive=int(y.sum()), statistic=_num(pooled - within),
                   ci_lo=_num(lo), ci_hi=_num(hi), p_value=_num(t_test(pooled - within, se, df)),
                   reason=f"AUC pooled {pooled:.3f}, within {col} {within:.3f} ({', '.join(names[k] for k in usable)})")


def reads_rule(d: FindingData, col: str, cfg: VerdictConfig) -> Verdict | None:
    """Zech's test, as a description (see the module docstring): the strongest-read value vs the rest."""
    s = d.strata.get(col)
    if s is None:
        return None
    known = np.array([v is not None for v in s])
    codes, names = _codes(np.where(known, s, ""))
    values = [k for k, name in enumerate(names) if name]
    if len(values) < 2:
        return None
    best = None
    for k in values[:1] if len(values) == 2 else values:
        level = (codes == k)[known]
        y, score, groups = d.y[known], d.score[known], d.groups[known]
        if min(level.sum(), (~level).sum()) < 2:
            continue
        auc, psi = auc_influence(level, score, y.astype(np.int64))
        pays = y[level].mean() >= y[~level].mean()  # the direction that would raise the AUC
        se = clustered_se(psi, groups)
        df = min(len(np.unique(groups[level])), len(np.unique(groups[~level]))) - 1
        p = t_test(auc, se, df, 0.5, "greater" if pays else "less")
        if best is None or (not math.isnan(p) and (math.isnan(best[1]) or p < best[1])):
            best = (names[k], p, auc, se, df, pays)
    if best is None:
        return None
    name, p, auc, se, df, pays = best
    lo, hi = t_ci(auc, se, df)
    return Verdict(**d.base, rule=f"reads:{col}", statistic=_num(auc), ci_lo=_num(lo), ci_hi=_num(hi), p_value=_num(p),
                   reason=f"within-label AUC of the score for {col}={name} vs the rest; paying direction: "
                          f"{'higher' if pays else 'lower'} scores for {name} (described, never marked)")


def poisson_binomial_cdf(k: int, probs: np.ndarray) -> float:
    """P(hits <= k) for independent trials of success probabilities ``probs``."""
    dist = np.zeros(len(probs) + 1)
    dist[0] = 1.0
    for q in probs:
        dist[1:] = dist[1:] * (1 - q) + dist[:-1] * q
        dist[0] *= 1 - q
    return float(min(1.0, dist[: k + 1].sum()))


def pointing_rule(name: str, boxes: pd.DataFrame, cfg: VerdictConfig) -> Verdict | None:
    g = boxes[boxes.finding == name]
    if g.empty:
        return None
    hits = g.pointing_hit.astype(bool).to_numpy()
    chance = g.chance_pointing.astype(float).to_numpy()
    n, k = len(g), int(hits.sum())
    p = poisson_binomial_cdf(k, chance)
    need = math.ceil(math.log(cfg.alpha) / math.log(1 - float(chance.mean()))) if 0 < chance.mean() < 1 else None
    rate, lo, hi = _wilson(k, n)
    return Verdict(finding=name, rule="pointing", n=n, n_positive=n, statistic=_num(rate - chance.mean()), ci_lo=_num(lo - chance.mean()),
                   ci_hi=_num(hi - chance.mean()), p_value=_num(p),
                   reason=f"{k} of {n} boxes hit, chance {chance.mean():.0%}; below chance can be shown from "
                          f"{need if need else '?'} boxes on (0 hits, p <= {cfg.alpha} before correction)")


def _wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return p, centre - half, centre + half


MARKING = ("location", "stratum", "pointing")  # rule families whose rows may be marked; reads: is described only


def verdicts(data: list[FindingData], findings, boxes: pd.DataFrame | None, cfg: VerdictConfig = VerdictConfig(),
             anatomy: np.ndarray | None = None) -> list[Verdict]:
    """Every rule for every finding (one row each, findings in ``findings`` order), Holm-adjusted
    over the rows of marking rules that have a p-value; mark = p_adjusted <= alpha."""
    by_name = {d.name: d for d in data}

    def rows_of(f: str) -> list[Verdict]:
        d = by_name.get(f)
        if d is None:
            out = [Verdict(finding=f, rule="location", n=0, n_positive=0, reason="not labelled in this dataset")]
        elif d.y.all() or not d.y.any():
            out = [Verdict(**d.base, rule="location", reason="no positive film" if not d.y.any() else "no negative film")]
        else:
            out = [location_rule(d, cfg, anatomy)]
            for col in STRATUM_COLUMNS:
                out += [v for v in (stratum_rule(d, col, cfg), reads_rule(d, col, cfg)) if v is not None]
        if boxes is not None and len(boxes):
            v = pointing_rule(f, boxes, cfg)
            out += [v] if v is not None else []
        return out

    rows = [r for rs in _each(rows_of, list(findings)) for r in rs]
    family = [i for i, r in enumerate(rows) if r.rule.split(":")[0] in MARKING and r.p_value is not None]
    adjusted = holm(np.array([rows[i].p_value for i in family], np.float64))
    out = list(rows)
    for i, q in zip(family, adjusted):
        out[i] = Verdict(**{**asdict(rows[i]), "p_adjusted": float(q), "mark": bool(q <= cfg.alpha)})
    return out


def _each(fn, items: list) -> list:
    """fn over items on a thread per core: the work is numpy sorts, which release the GIL (a finding
    of 112k films takes ~1.5 s of rules and ~2 s of per-cell AUCs on one core)."""
    with ThreadPoolExecutor(max(1, min(len(items), os.cpu_count() or 1))) as pool:
        return list(pool.map(fn, items))


def separations(data: list[FindingData], grid: int) -> list[dict]:
    """cell_separation of every finding with both classes, findings in parallel."""
    both = [d for d in data if d.y.any() and not d.y.all()]
    return [c for cells in _each(lambda d: cell_separation(d, grid), both) for c in cells]


def cell_separation(d: FindingData, grid: int) -> list[dict]:
    """Per cell: the AUC of the cell's logit for the label, with its patient-clustered 95% CI."""
    df = min_class_groups(d.y, d.groups) - 1
    out = []
    for c in range(d.cells.shape[1]):
        a, psi = auc_influence(d.y, d.cells[:, c])
        lo, hi = t_ci(a, clustered_se(psi, d.groups), df) if df >= 1 else (math.nan, math.nan)
        out.append({**d.base, "cell_row": c // grid, "cell_col": c % grid, "auc": _num(a), "auc_lo": _num(lo), "auc_hi": _num(hi)})
    return out


def finding_data(manifest: pd.DataFrame, ctx, probs: np.ndarray, logits: np.ndarray, findings) -> list[FindingData]:
    """Per labelled finding, its labelled films. ``ctx``: the run's StrataContext (rows, labels, by);
    ``probs`` (N, F) and ``logits`` (N, F, C) aligned with ``ctx.rows``."""
    m = manifest.set_index("row").loc[ctx.rows]
    patients = m["patient_id"].astype(object).where(m["patient_id"].notna(), pd.Series([f"row{r}" for r in ctx.rows], index=m.index))
    patients = pd.factorize(patients.astype(str))[0]  # integer codes: clustered sums are bincounts
    strata = {c: ctx.by[c] for c in STRATUM_COLUMNS if c in ctx.by}
    out = []
    for k, f in enumerate(findings):
        has = ctx.labels[:, k] >= 0
        if not has.any():
            continue
        take = slice(None) if has.all() else has  # every film labelled: views, not 22 MB copies per finding at 112k
        out.append(FindingData(f, ctx.labels[take, k] == 1, probs[take, k], logits[take, k], patients[take],
                               {c: v[take] for c, v in strata.items()}))
    return out
