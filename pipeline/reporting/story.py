"""Five lines read off the scorecard's tables: the demo's shortcut story (or any run's, given the
cells where its markers sit)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.reporting.data import load_run
from pipeline.reporting.scorecard import label_ties, readable


def _auc(r) -> str:
    return f"{r.auc:.2f} [{r.auc_lo:.2f}, {r.auc_hi:.2f}]" if pd.notna(r.auc_lo) else f"{r.auc:.2f}"


def story(out, marker_cells: dict[str, tuple[tuple[int, int], ...]], finding: str = "Pneumonia", model_version: str | None = None,
          storage_options: dict | None = None) -> list[str]:
    data = load_run(out, model_version, storage_options)
    lines = []
    met = data.table("metrics")
    if met is not None and (met.finding == finding).any():
        m = met[(met.finding == finding) & met.auc.notna()]
        pooled = m[m.stratum == "all"]
        within = m[m.stratum.isin(["view_position", "site"])]
        views = within[within.stratum == "view_position"].auc
        verdict = ""
        if len(pooled) and len(views) > 1:
            verdict = (" — above the AUC within every view: part of the pooled figure is telling AP from PA."
                       if pooled.auc.iloc[0] > views.max() else " — not above the within-view figures.")
        lines.append(f"1. {finding} AUC pooled {_auc(pooled.iloc[0]) if len(pooled) else 'n/a'}; within "
                     + ", ".join(f"{r.stratum_value} {r.auc:.2f}" for r in within.itertuples()) + verdict)
    rs = data.table("region_stats")
    if rs is not None:
        for i, (stratum, value, who) in enumerate((("all", "all", "all films"), ("view_position", "AP", "AP films")), start=2):
            g = rs[(rs.finding == finding) & (rs.stratum == stratum) & (rs.stratum_value == value)].dropna(subset=["mean_positive_part"])
            if not len(g):
                continue
            total = g.mean_positive_part.sum()
            parts = []
            for name, cells in marker_cells.items():
                sel = np.zeros(len(g), bool)
                for r, c in cells:
                    sel |= (g.cell_row.to_numpy() == r) & (g.cell_col.to_numpy() == c)
                parts.append(f"{g.mean_positive_part[sel].sum() / total:.0%} on the {name} cells {', '.join(map(str, cells))}")
            n_cells = sum(len(c) for c in marker_cells.values())
            lines.append(f"{i}. Share of {finding}'s positive evidence, {who}: " + "; ".join(parts) + f" ({n_cells} of 49 cells).")
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
