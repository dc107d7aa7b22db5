"""The per-finding scorecard: the verdicts of scorecard.parquet (each mark a test, Holm-corrected;
pipeline/analysis/verdicts.py), then descriptions that are never marked.

Every number comes from a stored aggregate, except how strongly view and sex are tied to a label
(the AUC of scoring each film by its group's label prevalence), which is a count over the manifest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.analysis.grid import region_masks
from pipeline.analysis.metrics import auc_delong
from pipeline.reporting.data import RunData


# What a mark means, per rule (the verdicts are computed in pipeline/analysis/verdicts.py).
RULES = {
    "location": "a border cell separates positives from negatives better than the anatomy does (difference of Cohen's d, one-sided, Bonferroni over the border cells)",
    "stratum": "the pooled AUC is above the AUC within the stratum's values: the score orders films of different views/sites/sexes by their prevalence",
    "pointing": "the map's hottest cell lands in expert boxes less often than chance (exact test over the boxes)",
}
VERDICT_COLUMNS = (("location", "border vs anatomy (Δd)"), ("stratum:view_position", "leans on view (ΔAUC)"),
                   ("stratum:site", "leans on site (ΔAUC)"), ("stratum:sex", "leans on sex (ΔAUC)"), ("pointing", "pointing vs chance"))
CONFOUNDERS = (("site", "site"), ("view_position", "view"), ("sex", "sex"))


@dataclass
class Cell:
    text: str
    mark: bool = False
    title: str = ""


def _fmt(v, spec=".2f", none="–") -> str:
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _first(df: pd.DataFrame | None, **eq) -> pd.Series | None:
    if df is None:
        return None
    sel = np.ones(len(df), bool)
    for k, v in eq.items():
        sel &= (df[k] == v).to_numpy()
    return df[sel].iloc[0] if sel.any() else None


def readable(data: RunData) -> dict[str, dict]:
    """Per confounder target: AUC of reading it from the film (embedding probe) and the best cell."""
    ident, imap = data.table("identifiability"), data.table("identifiability_map")
    out = {}
    if ident is None:
        return out
    for target in ident.target.unique():
        r = _first(ident, target=target, features="embedding")
        if r is None or r.auc is None or pd.isna(r.auc):
            continue
        entry = {"auc": float(r.auc), "lo": r.auc_lo, "hi": r.auc_hi, "n": int(r.n), "notes": r.get("notes")}
        if imap is not None and (imap.target == target).any():
            g = imap[imap.target == target].dropna(subset=["auc"])
            if len(g):
                best = g.loc[g.auc.idxmax()]
                entry["best_cell"] = (int(best.cell_row), int(best.cell_col), float(best.auc))
        out[target] = entry
    return out


def label_ties(data: RunData) -> dict[tuple[str, str], float]:
    """AUC of predicting each finding's label from a confounder alone (its group's prevalence), over
    every labelled film. For the site: ``auc_site_prevalence`` of prevalence_confounding.parquet when
    the run has it (sites under min_n pooled), not the out-of-fold ``_oof`` column, which is biased low
    (pipeline/analysis/site_confounding.py); a one-value-per-group score fits only the groups' order."""
    m = data.manifest
    pc = data.table("prevalence_confounding")
    ties = {}
    for f in data.findings:
        if not data.has_labels(f):
            continue
        has = m[f].notna().to_numpy()
        y = m.loc[has, f].astype(bool).to_numpy()
        if y.all() or not y.any():
            continue
        for col, _ in CONFOUNDERS:
            stored = _first(pc, finding=f, stratum="all") if col == "site" else None
            if stored is not None and stored.auc_site_prevalence is not None and not pd.isna(stored.auc_site_prevalence):
                ties[(f, col)] = float(stored.auc_site_prevalence)  # the site ordering, not the out-of-fold variant
                continue
            if col not in m:
                continue
            known = m.loc[has, col].notna().to_numpy()  # a film without the value is left out, not a class "None"
            g = m.loc[has, col][known].astype(str).to_numpy()
            if len(set(g)) < 2 or y[known].all() or not y[known].any():
                continue
            score = pd.Series(y[known]).groupby(g).transform("mean").to_numpy()
            ties[(f, col)] = auc_delong(y[known], score)[0]
    return ties


def _verdict_cell(v: pd.Series | None) -> Cell:
    if v is None:
        return Cell("–")
    if v.p_value is None or pd.isna(v.p_value):
        return Cell("n.t.", title=str(v.reason))
    text = f"{v.statistic:+.2f} [{_fmt(v.ci_lo, '+.2f')}, {_fmt(v.ci_hi, '+.2f')}] p={_fmt(v.p_adjusted, '.2g')}"
    if v.rule == "pointing":
        text += f", n={int(v.n)}"  # boxes: the count decides whether the test can tell
    return Cell(text, bool(v.mark), f"{v.reason}; p={v.p_value:.2g} before, {_fmt(v.p_adjusted, '.2g')} after Holm")


def discriminating_share(data: RunData, finding: str, cells: np.ndarray) -> float | None:
    """Share of the mean positive-minus-negative logit (the pooled logit is the mean of the cells'
    logits, so each cell's exact contribution adds up to it) that sits on ``cells`` (a bool per grid cell)."""
    rs = data.table("region_stats")
    if rs is None:
        return None
    g = rs[(rs.finding == finding) & (rs.stratum == "label")].dropna(subset=["mean_contribution"])
    pos = g[g.stratum_value == "positive"].sort_values(["cell_row", "cell_col"]).mean_contribution.to_numpy()
    neg = g[g.stratum_value == "negative"].sort_values(["cell_row", "cell_col"]).mean_contribution.to_numpy()
    if len(pos) != len(cells) or len(neg) != len(cells):
        return None
    diff = pos - neg
    total = diff.sum()
    return float(diff[cells].sum() / total) if total > 0 else None


def unexaminable(data: RunData) -> list[str]:
    """Findings labelled in the run but with no positive film: nothing to examine, folded into one line."""
    m = data.manifest
    return [f for f in data.findings if data.has_labels(f) and not bool(m[f].fillna(False).astype(bool).any())]


def scorecard(data: RunData) -> tuple[list[str], list[tuple[str, list[Cell]]]]:
    """(column headers, [(finding, cells)]): verdict columns from scorecard.parquet (marks are tests),
    then descriptions (shares, top cell, label ties), never marked."""
    metrics, summary, region, card = (data.table(n) for n in ("metrics", "finding_summary", "region_stats", "scorecard"))
    ties = label_ties(data)
    ring = region_masks(data.grid)["ring"]
    cols = ["finding", "n labelled", "prevalence", "AUC [95% CI]"] + [name for _, name in VERDICT_COLUMNS]
    cols += ["discriminating evidence on the ring", "positive evidence on the ring", "top cell"]
    cols += [f"label ~ {name} (AUC)" for _, name in CONFOUNDERS]
    skip = set(unexaminable(data))
    rows = []
    for f in data.findings:
        if f in skip:
            continue
        m = _first(metrics, finding=f, stratum="all")
        auc = None if m is None or pd.isna(m.auc) else float(m.auc)
        cells = [Cell(_fmt(None if m is None else int(m.n), "d")), Cell(_fmt(None if m is None else m.prevalence, ".1%")),
                 Cell("–" if auc is None else f"{auc:.3f} [{_fmt(m.auc_lo, '.3f')}, {_fmt(m.auc_hi, '.3f')}]")]
        cells += [_verdict_cell(_first(card, finding=f, rule=rule)) for rule, _ in VERDICT_COLUMNS]
        cells.append(Cell(_fmt(discriminating_share(data, f, ring), ".0%"), title=f"share of the mean positive-minus-negative logit on the {int(ring.sum())} ring cells ({ring.mean():.0%} of the area)"))
        s = _first(summary, finding=f, stratum="all")
        cells.append(Cell(_fmt(None if s is None else s.pos_share_ring, ".0%"), title="share of max(map, 0) on the ring: mostly the finding's bias, a description"))
        top = None
        if region is not None:
            g = region[(region.finding == f) & (region.stratum == "all")].dropna(subset=["mean_positive_part"])
            if len(g):
                t = g.loc[g.mean_positive_part.idxmax()]
                top = (int(t.cell_row), int(t.cell_col))
        cells.append(Cell("–" if top is None else f"({top[0]}, {top[1]})", title="row, column; (0, 0) is the top-left of the film"))
        for col, _ in CONFOUNDERS:
            cells.append(Cell(_fmt(ties.get((f, col)), ".2f")))
        rows.append((f, cells))
    return cols, rows

