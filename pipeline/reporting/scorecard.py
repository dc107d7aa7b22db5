"""The per-finding scorecard and the rule that marks a likely shortcut.

Every number comes from a stored aggregate, except how strongly view and sex are tied to a label
(the AUC of scoring each film by its group's label prevalence), which is a count over the manifest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.analysis.metrics import auc_delong
from pipeline.reporting.data import RunData

GRID = 7
RING_AREA = 24 / 49
CORNER_AREA = 4 / 49

# The marking rule; each threshold is stated under the table (see RULES).
RING_SHARE_MARK = 0.60  # ring holds 49% of the cells
CORNER_SHARE_MARK = 2 * CORNER_AREA  # twice the corners' area share (8%)
ANATOMY_SHARE_MARK = 0.50
AUC_DROP_MARK = 0.10  # pooled AUC minus the lowest AUC within one view or site
TIE_MARK = 0.65  # a confounder alone predicts the label at least this well ...
READ_MARK = 0.80  # ... and the film tells that confounder at least this well

RULES = [
    f"positive evidence in the border ring above {RING_SHARE_MARK:.0%} (the ring is {RING_AREA:.0%} of the cells)",
    f"in the four corners above {CORNER_SHARE_MARK:.0%} (twice their {CORNER_AREA:.0%} of the cells)",
    f"inside the anatomy mask below {ANATOMY_SHARE_MARK:.0%} (when a mask was given)",
    "the cell with most positive evidence on the border ring",
    "(none of these four for a finding that is labelled but has no positive film)",
    "pointing hit rate against expert boxes whose 95% CI does not clear its chance rate",
    f"pooled AUC at least {AUC_DROP_MARK:.2f} above the AUC within some view or site (the pooled figure leans on the stratum)",
    f"site, view or sex predicting the label at AUC >= {TIE_MARK:.2f} while the film tells that confounder at AUC >= {READ_MARK:.2f}",
]

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
    """AUC of predicting each finding's label from a confounder alone (its group's prevalence)."""
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
                ties[(f, col)] = float(stored.auc_site_prevalence)  # out-of-fold, from the probes
                continue
            if col not in m:
                continue
            g = m.loc[has, col].astype(object).where(m.loc[has, col].notna(), None).astype(str).to_numpy()
            if len(set(g)) < 2:
                continue
            score = pd.Series(y).groupby(g).transform("mean").to_numpy()
            ties[(f, col)] = auc_delong(y, score)[0]
    return ties


def scorecard(data: RunData) -> tuple[list[str], list[tuple[str, list[Cell]]]]:
    """(column headers, [(finding, cells)]) — one row per finding of the run."""
    metrics, summary, region, loc = (data.table(n) for n in ("metrics", "finding_summary", "region_stats", "localization"))
    has_mask = summary is not None and summary.pos_share_anatomy.notna().any()
    read = readable(data)
    ties = label_ties(data)
    cols = ["finding", "n labelled", "prevalence", "AUC [95% CI]", "AUC within view / site", "ring share", "corner share"]
    cols += ["anatomy share"] if has_mask else []
    cols += ["top cell", "pointing hit (chance)"]
    cols += [f"label ~ {name} (AUC)" for _, name in CONFOUNDERS]
    rows = []
    for f in data.findings:
        cells = []
        m = _first(metrics, finding=f, stratum="all")
        auc = None if m is None or pd.isna(m.auc) else float(m.auc)
        cells.append(Cell(_fmt(None if m is None else int(m.n), "d")))
        cells.append(Cell(_fmt(None if m is None else m.prevalence, ".1%")))
        cells.append(Cell("–" if auc is None else f"{auc:.3f} [{_fmt(m.auc_lo, '.3f')}, {_fmt(m.auc_hi, '.3f')}]"))
        within = metrics[(metrics.finding == f) & metrics.stratum.isin(["view_position", "site"]) & metrics.auc.notna()] if metrics is not None else pd.DataFrame()
        if len(within) and auc is not None:
            low = float(within.auc.min())
            text = " · ".join(f"{r.stratum_value} {r.auc:.2f}" for r in within.itertuples())
            cells.append(Cell(text, auc - low >= AUC_DROP_MARK, f"pooled {auc:.3f}, lowest within {low:.3f}"))
        else:
            cells.append(Cell("–"))
        # A finding labelled but never positive has no disease to find: its shares are not marked.
        can_mark = m is None or m.prevalence is None or pd.isna(m.prevalence) or m.prevalence > 0
        s = _first(summary, finding=f, stratum="all")
        ring = None if s is None or pd.isna(s.pos_share_ring) else float(s.pos_share_ring)
        corners = None if s is None or pd.isna(s.pos_share_corners) else float(s.pos_share_corners)
        cells.append(Cell(_fmt(ring, ".0%"), can_mark and ring is not None and ring > RING_SHARE_MARK))
        cells.append(Cell(_fmt(corners, ".0%"), can_mark and corners is not None and corners > CORNER_SHARE_MARK))
        if has_mask:
            an = None if s is None or pd.isna(s.pos_share_anatomy) else float(s.pos_share_anatomy)
            cells.append(Cell(_fmt(an, ".0%"), can_mark and an is not None and an < ANATOMY_SHARE_MARK))
        top = None
        if region is not None:
            g = region[(region.finding == f) & (region.stratum == "all")].dropna(subset=["mean_positive_part"])
            if len(g):
                t = g.loc[g.mean_positive_part.idxmax()]
                top = (int(t.cell_row), int(t.cell_col))
        on_ring = can_mark and top is not None and (top[0] in (0, GRID - 1) or top[1] in (0, GRID - 1))
        cells.append(Cell("–" if top is None else f"({top[0]}, {top[1]})", on_ring, "row, column; (0, 0) is the top-left of the film"))
        lr = _first(loc, finding=f)
        if lr is not None and not pd.isna(lr.pointing_hit_rate):
            cells.append(Cell(f"{lr.pointing_hit_rate:.0%} [{_fmt(lr.pointing_lo, '.0%')}, {_fmt(lr.pointing_hi, '.0%')}] ({lr.chance_pointing:.0%}), n={int(lr.n)}",
                              not pd.isna(lr.pointing_lo) and lr.pointing_lo <= lr.chance_pointing))
        else:
            cells.append(Cell("–"))
        for col, _ in CONFOUNDERS:
            tie = ties.get((f, col))
            film = read.get(col, {}).get("auc")
            cells.append(Cell(_fmt(tie, ".2f"), tie is not None and film is not None and tie >= TIE_MARK and film >= READ_MARK,
                              "" if film is None else f"read from the film at AUC {film:.2f}"))
        rows.append((f, cells))
    return cols, rows
