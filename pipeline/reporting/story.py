"""Five lines read off the scorecard's tables and verdicts: the demo's shortcut story (or any run's,
given the cells where its markers sit)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.reporting.data import load_run
from pipeline.reporting.scorecard import _first, discriminating_share, label_ties, readable


def _auc(r) -> str:
    return f"{r.auc:.2f} [{r.auc_lo:.2f}, {r.auc_hi:.2f}]" if pd.notna(r.auc_lo) else f"{r.auc:.2f}"


def story(out, marker_cells: dict[str, tuple[tuple[int, int], ...]], finding: str = "Pneumonia", model_version: str | None = None,
          storage_options: dict | None = None) -> list[str]:
    data = load_run(out, model_version, storage_options)
    lines = []
    met, card = data.table("metrics"), data.table("scorecard")
    if met is not None and (met.finding == finding).any():
        m = met[(met.finding == finding) & met.auc.notna()]
        pooled = m[m.stratum == "all"]
        within = m[m.stratum.isin(["view_position", "site"])]
        lean = _first(card, finding=finding, rule="stratum:view_position")
        verdict = ""
        if lean is not None and pd.notna(lean.p_value):
            verdict = (f"; pooled minus within-view AUC {lean.statistic:+.2f} [{lean.ci_lo:+.2f}, {lean.ci_hi:+.2f}], Holm p={lean.p_adjusted:.2g}"
                       + (" — marked: part of the pooled figure is telling AP from PA." if lean.mark else " — not shown to lean on the view."))
        lines.append(f"1. {finding} AUC pooled {_auc(pooled.iloc[0]) if len(pooled) else 'n/a'}; within "
                     + ", ".join(f"{r.stratum_value} {r.auc:.2f}" for r in within.itertuples()) + verdict)
    (_, W), n_cells = data.grid, int(np.prod(data.grid))
    all_cells = np.zeros(n_cells, bool)
    parts, where = [], {}
    for name, cells in marker_cells.items():
        sel = np.zeros(n_cells, bool)
        for r, c in cells:
            sel[r * W + c] = True
        where[name] = sel
        all_cells |= sel
        share = discriminating_share(data, finding, sel)
        if share is not None:
            parts.append(f"{share:.0%} on the {name} cells {', '.join(map(str, cells))}")
    if not parts and data.table("region_stats") is not None:
        lines.append(f"2. The model's logit does not separate {finding} positives from negatives on average (mean difference <= 0), "
                     "so no share of it sits anywhere.")
    elif parts:
        lines.append(f"2. What separates {finding} positives from negatives in the model's logit (mean positive minus negative, "
                     f"cell by cell): " + "; ".join(parts) + f" — {int(all_cells.sum())} of {n_cells} cells, {all_cells.mean():.0%} of the film.")
    sep = data.table("cell_separation")
    if sep is not None and (sep.finding == finding).any():
        s = sep[sep.finding == finding]
        best = {name: s[[bool(where[name][int(r.cell_row) * W + int(r.cell_col)]) for r in s.itertuples()]].auc.max() for name in where}
        loc = _first(card, finding=finding, rule="location")
        tail = ""
        if loc is not None and pd.notna(loc.p_value):
            tail = f"; location test ({loc.reason}): Holm p={loc.p_adjusted:.2g}" + (", marked" if loc.mark else ", not marked")
        lines.append(f"3. Alone, the best cell of each marker separates {finding} positives from negatives at AUC "
                     + ", ".join(f"{v:.2f} ({k})" for k, v in best.items() if pd.notna(v)) + tail + ".")
    read = readable(data)
    if "site" in read:
        e = read["site"]
        cell = e.get("best_cell")
        lines.append(f"4. The site is read from the film at AUC {e['auc']:.2f} (embedding probe)"
                     + (f"; the best single cell is {cell[:2]} at AUC {cell[2]:.2f}." if cell else "."))
    ties = label_ties(data)
    tie_txt = ", ".join(f"{name} {ties[(finding, col)]:.2f}" for col, name in (("site", "site"), ("view_position", "view")) if (finding, col) in ties)
    if tie_txt:
        shown = ", ".join(f"the {name} at {read[col]['auc']:.2f}" for col, name in (("site", "site"), ("view_position", "view")) if col in read)
        lines.append(f"5. Without looking at the lungs, {finding} is predicted from {tie_txt} (AUC of the group's prevalence)"
                     + (f"; the film tells {shown}: reading a marker pays." if shown else "."))
    return lines
