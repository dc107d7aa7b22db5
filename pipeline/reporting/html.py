"""Assemble the self-contained HTML report of one run (figures inline as base64 PNG, no scripts,
no network). Sections without data are left out with a sentence saying why."""

from __future__ import annotations

import base64
import gc
import html
import time
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from pipeline.store.layout import OutputStore
from pipeline.reporting.figures import discrimination_figure, example_figure, grid_figure, identifiability_figure
from pipeline.reporting.data import RunData, load_run
from pipeline.reporting.scorecard import RULES, readable, scorecard, unexaminable

GROUP_FILMS = 8  # films averaged into each group's mean film
EXAMPLES = 3  # films per example row
CSS = """
body{font-family:system-ui,-apple-system,'DejaVu Sans',sans-serif;margin:1.5em auto;max-width:1400px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;margin-top:1.8em}h3{font-size:1em;margin-bottom:.2em}
table{border-collapse:collapse;font-size:.82em;margin:.5em 0}th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}td.mark{background:#fde0dc;font-weight:600}
td.mark::after{content:" \\25B2";color:#c0392b}.note{color:#555;font-size:.9em}.missing{color:#8a5300;font-style:italic}
img{max-width:100%;display:block;margin:.3em 0}footer{margin-top:2em;font-size:.8em;color:#555;border-top:1px solid #ccc}
code{background:#f3f3f3;padding:0 .2em}
"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _missing(text: str) -> str:
    return f'<p class="missing">{html.escape(text)}</p>'


def _table(headers: list[str], rows: list[list], cls: str = "") -> str:
    out = [f'<table class="{cls}"><thead><tr>' + "".join(f"<th>{html.escape(str(h))}</th>" for h in headers) + "</tr></thead><tbody>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>")
    return "".join(out) + "</tbody></table>"


def _fmt(v, spec=".3f"):
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


# ---- mean films -------------------------------------------------------------------------------

def _groups(data: RunData) -> dict[tuple, np.ndarray]:
    """Manifest rows of each group drawn in the grids (scored rows only)."""
    m = data.manifest.set_index("row").loc[np.sort(data.predictions.row.to_numpy())]
    groups = {("all", "all"): m.index.to_numpy()}
    for col in ("view_position", "site"):
        if col in m:
            for v, g in m.groupby(col, dropna=True):
                groups[(col, str(v))] = g.index.to_numpy()
    for f in data.findings:
        if data.has_labels(f):
            lab = m[f]
            groups[(f, "positive")] = m.index[(lab == True).to_numpy()].to_numpy()  # noqa: E712 - nullable booleans
            groups[(f, "negative")] = m.index[(lab == False).to_numpy()].to_numpy()  # noqa: E712
    return groups


def mean_films(data: RunData) -> dict[tuple, np.ndarray | None]:
    rng = np.random.default_rng(0)
    groups = _groups(data)
    picks = {k: (rng.choice(rows, min(GROUP_FILMS, len(rows)), replace=False) if len(rows) else rows) for k, rows in groups.items()}
    wanted = sorted({int(r) for rows in picks.values() for r in rows})
    with ThreadPoolExecutor(2) as pool:  # PIL decodes without the GIL
        list(pool.map(data.film, wanted))
    means = {}
    for k, rows in picks.items():
        films = [data.film(int(r)) for r in rows]
        films = [f for f in films if f is not None]
        means[k] = np.mean(films, axis=0) if films else None
    return means


# ---- sections ---------------------------------------------------------------------------------

def section_scorecard(data: RunData) -> str:
    cols, rows = scorecard(data)
    out = ["<h2 id='scorecard'>1. Scorecard</h2>",
           "<p class='note'>One row per finding. The verdict columns are tests (estimate [95% CI] and the Holm-adjusted "
           "p-value; n.t. = not tested, hover for why); the columns after them describe where the evidence lies and are never marked. "
           "The top cell is (row, column) with (0, 0) at the top-left of the film.</p>",
           '<table id="scorecard-table"><thead><tr>' + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr></thead><tbody>"]
    for f, cells in rows:
        tds = "".join(f'<td class="{"mark" if c.mark else ""}" title="{html.escape(c.title)}">{html.escape(c.text)}</td>' for c in cells)
        out.append(f'<tr class="finding-row"><td>{html.escape(f)}</td>{tds}</tr>')
    out.append("</tbody></table>")
    empty = unexaminable(data)
    if empty:
        out.append(f"<p class='note' id='no-positive'>Labelled but with no positive film, so nothing to examine: {html.escape(', '.join(empty))}.</p>")
    if data.table("scorecard") is None:
        out.append(_missing("No verdicts: this run's aggregates predate scorecard.parquet (python -m jobs.aggregate --out OUT recomputes them)."))
    out.append("<p class='note'><b>A marked cell (&#9650;) is a test that rejected its null</b> at a family-wise error rate of 5% "
               "(Holm over every finding x rule of the run): "
               + "; ".join(f"<i>{html.escape(k)}</i>: {html.escape(v)}" for k, v in RULES.items())
               + ". Measured false marks: none for a seeded random DenseNet-121 on the 120 real NIH films (5 seeds) and 1 in 20 "
               "label permutations of the demo; a marker planted on one cell of the positive films is marked by the location rule "
               "(README, Report). Unmarked means the test could not tell, not that the finding is clean.</p>")
    if not any(data.has_labels(f) for f in data.findings):
        out.append(_missing("No finding is labelled in this dataset: AUC, prevalence and label ties are left empty."))
    if data.table("localization") is None:
        out.append(_missing("No expert boxes (BBox_List_2017.csv or --bbox) were given: the pointing column is empty."))
    read = readable(data)
    if read:
        rows_ = []
        for target, e in read.items():
            cell = e.get("best_cell")
            rows_.append([target, e["n"], f"{e['auc']:.3f} [{_fmt(e['lo'])}, {_fmt(e['hi'])}]",
                          "–" if cell is None else f"({cell[0]}, {cell[1]}) AUC {cell[2]:.3f}", e.get("notes") if isinstance(e.get("notes"), str) else ""])
        out.append("<h3>What the film tells besides disease</h3>")
        out.append(_table(["target", "n", "AUC from the embedding [95% CI]", "best single cell", "notes"], rows_, "readable"))
    else:
        out.append(_missing("How well site, view and sex are read from the film is left out: this run has no identifiability "
                            "tables (score with --identifiability, or python -m jobs.aggregate --identifiability)."))
    return "\n".join(out)


def section_grids(data: RunData) -> str:
    rs = data.table("region_stats")
    out = [f"<h2 id='grids'>2. Where the evidence lies: {data.grid[0]}x{data.grid[1]} grids per finding</h2>"]
    if rs is None:
        return out[0] + _missing("Left out: this run has no region_stats.parquet (python -m jobs.aggregate --out OUT writes it).")
    films = mean_films(data)
    if all(v is None for v in films.values()):
        out.append(_missing("The films could not be read from their paths, so the grids are drawn without the mean film under them."))
    out.append("<p class='note'>First, per finding with positive films, where the evidence <i>discriminates</i>: the AUC of each "
               "cell's logit for the label (0.5 = the cell does not tell positives from negatives) and the mean map of the "
               "positives minus that of the negatives, both centred at zero on a diverging scale. Then the mean maps, which "
               "show the model's level (mostly the finding's bias and calibration), not where it looks. "
               "Mean of the map ln(p_cell / p_baseline) per cell over each group, drawn over the group's mean film "
               f"(average of {GROUP_FILMS} of its films). Red: the cell raises the probability above the baseline; blue: lowers it. "
               "The colour bar reads in ln units and, in brackets, as the probability ratio.</p>")
    rs = rs[rs.stratum.isin(["all", "view_position", "label", "site"])].dropna(subset=["mean"])
    n_sites = rs[rs.stratum == "site"].stratum_value.nunique()
    if not (rs.stratum == "label").any():
        out.append(_missing("Positives vs negatives are left out: no finding has labels (or every group is under --min-n)."))
    if n_sites < 2:
        out.append(_missing("Per-site grids are left out: the run has one site."))
    sep = data.table("cell_separation")
    skip = set(unexaminable(data))
    for f in data.findings:
        if f in skip:
            continue
        g = rs[rs.finding == f]
        head = f"<h3 id='grid-{html.escape(f)}'>{html.escape(f)}</h3>"
        disc = _discrimination(f, g, sep, films.get(("all", "all")), data.grid)
        panels = []
        for stratum in ("all", "view_position", "label", "site"):
            if stratum == "site" and n_sites < 2:
                continue
            for value, sub in g[g.stratum == stratum].groupby("stratum_value", sort=True):
                grid = np.full(data.grid, np.nan)
                grid[sub.cell_row.to_numpy(), sub.cell_col.to_numpy()] = sub["mean"].to_numpy()
                key = ("all", "all") if stratum == "all" else (f, value) if stratum == "label" else (stratum, value)
                panels.append((f"{'all films' if stratum == 'all' else value} (n={int(sub.n.iloc[0])})", grid, films.get(key)))
        if panels or disc:
            out.append(head + disc + (_img(grid_figure(f, panels), f"{data.grid[0]}x{data.grid[1]} mean maps for {f}: " + "; ".join(p[0] for p in panels)) if panels else ""))
    if skip:
        out.append(f"<p class='note'>No grids for the findings labelled but never positive: {html.escape(', '.join(sorted(skip)))}.</p>")
    return "\n".join(out)


def _calibration_note(data: RunData) -> str:
    """For a calibrated model (torchxrayvision's op_threshs), what its probabilities and maps are."""
    model = data.run.get("model") or {}
    if not model.get("op_threshs"):
        return ""
    return (" The model is calibrated (torchxrayvision's operating points): probabilities are op_norm(sigmoid(z)); "
            "the maps use the uncalibrated cell probability sigmoid(z_ij), which op_norm, being increasing, orders the same way.")


def _discrimination(finding: str, g: pd.DataFrame, sep: pd.DataFrame | None, film, grid: tuple[int, int] = (7, 7)) -> str:
    """The discrimination panels of one finding: per-cell AUC (cell_separation) and positives minus negatives."""
    if sep is None or not (sep.finding == finding).any():
        return ""
    s = sep[sep.finding == finding]
    auc = np.full(grid, np.nan)
    auc[s.cell_row.to_numpy(), s.cell_col.to_numpy()] = s.auc.astype(float).to_numpy()
    lab = g[g.stratum == "label"]
    pos, neg = lab[lab.stratum_value == "positive"], lab[lab.stratum_value == "negative"]
    diff = np.full(grid, np.nan)
    if len(pos) and len(neg):
        d = pos.set_index(["cell_row", "cell_col"])["mean"] - neg.set_index(["cell_row", "cell_col"])["mean"]
        d = d.dropna()
        diff[d.index.get_level_values(0).to_numpy(), d.index.get_level_values(1).to_numpy()] = d.to_numpy()
    n_pos = int(s.n_positive.iloc[0])
    return _img(discrimination_figure(finding, auc, diff, film, n_pos, int(s.n.iloc[0]) - n_pos), f"where {finding} positives and negatives differ")


def section_identifiability(data: RunData) -> str:
    head = "<h2 id='identifiability'>3. Identifiability maps: where the film tells site, view and sex</h2>"
    ident, imap = data.table("identifiability"), data.table("identifiability_map")
    if ident is None or imap is None:
        return head + _missing("Left out: this run has no identifiability tables (score with --identifiability, or "
                               "python -m jobs.aggregate --out OUT --identifiability).")
    out = [head]
    has_sig = "significant" in imap.columns
    panels = []
    for target, g in imap.groupby("target", sort=False):
        auc = np.full(data.grid, np.nan)
        auc[g.cell_row.to_numpy(), g.cell_col.to_numpy()] = g.auc.astype(float).to_numpy()
        sig = None
        if has_sig:
            sig = np.zeros(data.grid, bool)
            sig[g.cell_row.to_numpy(), g.cell_col.to_numpy()] = g.significant.fillna(False).astype(bool).to_numpy()
        e = ident[(ident.target == target) & (ident.features == "embedding")]
        glob = "" if e.empty or pd.isna(e.auc.iloc[0]) else f"\nAUC {e.auc.iloc[0]:.3f} [{_fmt(e.auc_lo.iloc[0])}, {_fmt(e.auc_hi.iloc[0])}]"
        panels.append((f"{target}{glob}", auc, sig))
    if panels:
        out.append(_img(identifiability_figure(panels), "identifiability maps"))
    out.append("<p class='note'>Each cell: cross-validated AUC of a probe that sees only that cell's features (0.5 = chance); "
               "each title gives the global AUC of the embedding probe with its 95% CI. "
               + ("Cells framed in red are those the run's identifiability_map.parquet marks <code>significant</code>.</p>" if has_sig else
                  "</p>" + _missing("No cell is marked: this run's identifiability_map.parquet has no 'significant' column "
                                    "(written by newer versions of the aggregate), so no per-cell test was stored.")))
    rows = [[r.target, r.features, r.n, f"{_fmt(r.auc)} [{_fmt(r.auc_lo)}, {_fmt(r.auc_hi)}]", _fmt(r.balanced_accuracy), _fmt(r.chance), r.notes if isinstance(r.notes, str) else ""]
            for r in ident.itertuples()]
    out.append(_table(["target", "features", "n", "AUC [95% CI]", "balanced accuracy", "chance", "notes"], rows))
    return "\n".join(out)


def _example_findings(data: RunData) -> list[str]:
    chosen = ["Pneumonia"] if "Pneumonia" in data.findings else [data.findings[0]]
    fs = data.table("finding_summary")
    if fs is not None:
        a = fs[fs.stratum == "all"].dropna(subset=["pos_share_corners"])
        # a finding labelled but never positive has nothing to show
        a = a[[not data.has_labels(f) or bool(data.manifest[f].fillna(False).astype(bool).any()) for f in a.finding]]
        if len(a):
            worst = a.loc[(a.pos_share_corners + a.pos_share_ring).idxmax(), "finding"]
            if worst not in chosen:
                chosen.append(worst)
    return chosen


def section_examples(data: RunData) -> str:
    head = "<h2 id='examples'>4. Examples in the seed's style</h2>"
    preds = data.predictions
    if preds.empty:
        return head + _missing("Left out: the run has no predictions.")
    m = data.manifest.set_index("row")
    out = [head, f"<p class='note'>Each film as the model saw it (the square crop) with its {data.grid[0]}x{data.grid[1]} map upsampled over it and the "
           "ln(p_cell / p_baseline) value written in each cell.</p>"]
    ring = np.zeros(data.grid, bool)
    ring[[0, -1], :] = ring[:, [0, -1]] = True
    unreadable = False
    for f in _example_findings(data):
        k = data.findings.index(f)
        p = preds.set_index("row")[f]
        labelled = data.has_labels(f)
        pos = m.loc[p.index, f] == True if labelled else pd.Series(True, index=p.index)  # noqa: E712
        pos_rows = p[pos.to_numpy()].sort_values(ascending=False).index[:EXAMPLES].to_numpy()
        top = p.sort_values(ascending=False).index[: max(EXAMPLES, int(0.1 * len(p)))].to_numpy()
        cams = data.cams(top, k)
        posm = np.maximum(cams, 0).reshape(len(top), -1)
        share = np.where(posm.sum(1) > 0, posm[:, ring.ravel()].sum(1) / np.maximum(posm.sum(1), 1e-12), 0)
        border_rows = top[np.argsort(-share, kind="stable")[:EXAMPLES]]
        for title, rows in ((f"{f}: most confident {'labelled positives' if labelled else 'predictions (no labels)'}", pos_rows),
                            (f"{f}: confident films where the border ring dominates", border_rows)):
            if not len(rows):
                continue
            maps_ = data.cams(rows, k)
            ex = []
            for r, cam in zip(rows, maps_):
                film = data.film(int(r))
                unreadable |= film is None
                lab = m.at[r, f] if f in m else None
                lab_txt = "unlabelled" if lab is None or pd.isna(lab) else ("positive" if lab else "negative")
                pm = np.maximum(cam, 0)
                ex.append((f"{m.at[r, 'image_id']}  p={p[r]:.3f}\n{m.at[r, 'view_position'] or '?'} · {m.at[r, 'site']} · {lab_txt}"
                           f" · ring {pm[ring].sum() / max(pm.sum(), 1e-12):.0%}", film, cam))
            out.append(f"<h3>{html.escape(title)}</h3>" + _img(example_figure(ex), title))
    if unreadable:
        out.append(_missing("Some films could not be read from their paths; they are drawn as grey squares."))
    return "\n".join(out)


def section_drift(data: RunData) -> str:
    head = "<h2 id='drift'>5. Drift against the previous run</h2>"
    if data.previous is None:
        return head + _missing("Left out: this is the first complete run under this output; there is nothing to compare with.")
    if not data.drift:
        return head + _missing(f"Left out: no drift tables for {data.previous} -> {data.model_version} "
                               f"(python -m jobs.drift --out OUT --from {data.previous} --to {data.model_version} writes them).")
    out = [head, f"<p class='note'>From {html.escape(data.previous)} to {html.escape(data.model_version)}.</p>"]
    fd = data.drift.get("finding_drift")
    if fd is not None:
        out.append(_table(["finding", "n", "mean Δp", "rank correlation", "AUC before", "AUC after", "ΔAUC [95% CI]"],
                          [[r.finding, r.n, _fmt(r.mean_prob_delta, "+.4f"), _fmt(r.rank_correlation), _fmt(r.auc_from), _fmt(r.auc_to),
                            f"{_fmt(r.auc_delta, '+.3f')} [{_fmt(r.auc_delta_lo, '+.3f')}, {_fmt(r.auc_delta_hi, '+.3f')}]"] for r in fd.itertuples()]))
    rd = data.drift.get("region_drift")
    if rd is not None and len(rd):
        top = rd[(rd["rank"] == 1) & (rd.stratum == "all")]
        out.append("<h3>Cell whose mean exact contribution moved most, per finding</h3>")
        out.append(_table(["finding", "cell", "mean map before", "after", "Δ contribution"],
                          [[r.finding, f"({r.cell_row}, {r.cell_col})", _fmt(r.mean_from), _fmt(r.mean_to), _fmt(r.mean_contribution_delta, "+.4f")]
                           for r in top.itertuples()]))
    idd = data.drift.get("identifiability_drift")
    if idd is not None and len(idd):
        out.append("<h3>Identifiability</h3>" + _table(list(idd.columns), [[_fmt(v) if isinstance(v, float) else v for v in r] for r in idd.itertuples(index=False)]))
    return "\n".join(out)


def footer(data: RunData, seconds: float) -> str:
    run = data.run
    counts = run.get("counts", {})
    items = [("model version", data.model_version), ("dataset fingerprint", run.get("dataset_fingerprint", "–")),
             ("code version", run.get("code_version", "–")), ("images", counts.get("images", "–")), ("scored", counts.get("scored", "–")),
             ("failed", counts.get("failed", "–")), ("run finished", run.get("finished", "–")),
             ("report built", f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC in {seconds:.1f} s")]
    return "<footer><p>" + " · ".join(f"{k}: <code>{html.escape(str(v))}</code>" for k, v in items) + "</p></footer>"


SECTIONS = (section_scorecard, section_grids, section_identifiability, section_examples, section_drift)


@contextmanager
def _heap_frozen():
    """matplotlib allocates some 10^5 objects per figure, and each full collection would walk the
    whole heap of a run's process (torch, pandas, Dask); objects alive before the report are kept
    out of those walks (measured: the demo's report 8.4-9.6 -> 6.9-7.4 s). A caller that froze objects
    itself (a preforking server, a notebook) keeps its freeze: unfreezing would undo it."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def build_report(out, model_version: str | None = None, storage_options: dict | None = None, inputs=None) -> str:
    t = time.perf_counter()
    data = load_run(out, model_version, storage_options, inputs)
    with _heap_frozen():
        body = [s(data) for s in SECTIONS]
    title = f"cxr-audit report: run {data.model_version}"
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p class='note'>Output <code>{html.escape(data.out)}</code>; {len(data.findings)} findings. "
            f"Maps are ln(p_cell / p_baseline) per {data.grid[0]}x{data.grid[1]} cell (Zech et al., PLOS Medicine 2018).{_calibration_note(data)}</p>"
            + "\n".join(body) + footer(data, time.perf_counter() - t) + "</body></html>")


def default_path(out, model_version: str) -> str:
    return OutputStore.of(out).report(model_version)


def write_report(out, model_version: str | None = None, path: str | None = None, storage_options: dict | None = None,
                 inputs=None) -> str:
    """Build and write the report atomically; returns its path. out: an OutputStore, or a URL
    opened with storage_options (a given path is written with the same options); ``inputs``: the
    options the films it shows are read with (pipeline.io.location.InputOptions)."""
    from pipeline.analysis.aggregate import latest_complete_run

    store = OutputStore.of(out, storage_options)
    data_mv = model_version or latest_complete_run(store)
    page = build_report(store, data_mv, inputs=inputs)
    path = path or store.report(data_mv)
    store.write_bytes(path, page.encode())
    return path
