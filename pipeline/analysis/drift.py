"""What moved between two runs: per-finding prediction and AUC changes, and the region statistics
whose mean contribution moved most (per finding and view)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy.stats import spearmanr

from schemas.drift import finding_drift_schema, region_drift_schema, with_versions

from pipeline.core.errors import OutputError
from pipeline.analysis.metrics import auc_delong, paired_auc_delta_delong
from pipeline.store.predictions import load_predictions
from pipeline.store.run_index import complete_runs
from pipeline.store.layout import OutputStore


def _logit(p):
    p = np.clip(p.astype(np.float64), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def drift(out, from_mv: str | None = None, to_mv: str | None = None, top_cells: int = 5,
          storage_options: dict | None = None) -> dict:
    """Compare two runs of OUT (an OutputStore, or a URL opened with storage_options) and write
    OUT/drift/<from>__<to>/."""
    store = OutputStore.of(out, storage_options)
    runs = complete_runs(store)
    if from_mv is None or to_mv is None:
        if len(runs) < 2:
            raise OutputError(f"drift needs two complete runs under {store.runs_root}; found {len(runs)}")
        from_mv, to_mv = from_mv or runs[-2], to_mv or runs[-1]
    a, b = load_predictions(store, from_mv), load_predictions(store, to_mv)
    findings = [c for c in a.columns if c not in ("row", "image_id", "model_version") and c in b.columns]
    both = a.merge(b, on=["row", "image_id"], suffixes=("_from", "_to"))
    manifest = store.read_parquet(store.manifest).to_pandas().set_index("row")
    cols: dict[str, list] = {k: [] for k in finding_drift_schema().names}
    for f in findings:
        pa_, pb_ = both[f + "_from"].to_numpy(np.float64), both[f + "_to"].to_numpy(np.float64)
        d = pb_ - pa_
        dl = _logit(pb_) - _logit(pa_)
        lab = manifest.loc[both.row, f].to_numpy() if f in manifest else np.full(len(both), None)
        has = np.array([v is not None and not pd.isna(v) for v in lab])
        y = lab[has].astype(bool)
        auc_a = auc_b = lo = hi = math.nan
        if has.any() and y.any() and not y.all():
            auc_a, auc_b = auc_delong(y, pa_[has])[0], auc_delong(y, pb_[has])[0]
            _, lo, hi = paired_auc_delta_delong(y, pa_[has], pb_[has])
        rho = spearmanr(pa_, pb_).statistic if len(d) > 2 and np.std(pa_) > 0 and np.std(pb_) > 0 else math.nan
        vals = {"finding": f, "n": len(d), "n_labelled": int(has.sum()), "mean_prob_delta": float(d.mean()) if len(d) else math.nan,
                "p05_prob_delta": float(np.quantile(d, 0.05)) if len(d) else math.nan, "p50_prob_delta": float(np.quantile(d, 0.5)) if len(d) else math.nan,
                "p95_prob_delta": float(np.quantile(d, 0.95)) if len(d) else math.nan, "mean_logit_delta": float(dl.mean()) if len(d) else math.nan,
                "max_abs_logit_delta": float(np.abs(dl).max()) if len(d) else math.nan, "rank_correlation": float(rho),
                "auc_from": auc_a, "auc_to": auc_b, "auc_delta": auc_b - auc_a, "auc_delta_lo": lo, "auc_delta_hi": hi}
        for k, v in vals.items():
            cols[k].append(None if isinstance(v, float) and math.isnan(v) else v)
    meta = {"from": from_mv, "to": to_mv}
    finding_table = pa.Table.from_pydict(cols, schema=finding_drift_schema(**meta))
    top_a = both[[f + "_from" for f in findings]].to_numpy().argmax(1)
    top_b = both[[f + "_to" for f in findings]].to_numpy().argmax(1)
    top_changed = float((top_a != top_b).mean()) if len(both) else math.nan

    region_table = _region_drift(store, from_mv, to_mv, top_cells, meta)
    dest = store.drift_dir(from_mv, to_mv)
    finding_table = with_versions(finding_table, from_mv, to_mv)
    store.write_parquet(store.drift_table(from_mv, to_mv, "finding_drift"), finding_table)
    if region_table is not None:
        region_table = with_versions(region_table, from_mv, to_mv)
        store.write_parquet(store.drift_table(from_mv, to_mv, "region_drift"), region_table)
    ident = _identifiability_drift(store, from_mv, to_mv)
    if ident is not None:
        ident = with_versions(ident, from_mv, to_mv)
        store.write_parquet(store.drift_table(from_mv, to_mv, "identifiability_drift"), ident)
    summary = {"from": from_mv, "to": to_mv, "images_compared": len(both), "top_finding_changed_share": top_changed,
               "identifiability": ("compared: identifiability_drift.parquet" if ident is not None
                                   else "not compared: both runs need identifiability.parquet (jobs.aggregate --identifiability)")}
    store.write_json(store.drift_summary(from_mv, to_mv), summary)
    return {"findings": finding_table, "regions": region_table, "summary": summary, "dest": dest}


def _region_drift(store: OutputStore, from_mv, to_mv, top_cells, meta):
    ua, ub = (store.table(mv, "region_stats") for mv in (from_mv, to_mv))
    if not (store.exists(ua) and store.exists(ub)):
        return None
    keys = ["finding", "cell_row", "cell_col", "stratum", "stratum_value"]
    ra, rb = (store.read_parquet(u).to_pandas() for u in (ua, ub))
    ra, rb = (r[r.stratum.isin(["all", "view_position"])] for r in (ra, rb))
    m = ra[keys + ["n", "mean", "mean_contribution"]].merge(rb[keys + ["mean", "mean_contribution"]], on=keys, suffixes=("_from", "_to"))
    m["mean_delta"] = m.mean_to - m.mean_from
    m["mean_contribution_delta"] = m.mean_contribution_to - m.mean_contribution_from
    m["abs"] = m.mean_contribution_delta.abs().fillna(-1)
    m = m.sort_values(["finding", "stratum", "stratum_value", "abs"], ascending=[True, True, True, False])
    m["rank"] = m.groupby(["finding", "stratum", "stratum_value"]).cumcount() + 1
    m = m[m["rank"] <= top_cells]
    cols = {f.name: m[f.name].tolist() for f in region_drift_schema()}
    cols = {k: [None if isinstance(v, float) and math.isnan(v) else v for v in vs] for k, vs in cols.items()}
    return pa.Table.from_pydict(cols, schema=region_drift_schema(**meta))


def _identifiability_drift(store: OutputStore, from_mv, to_mv) -> pa.Table | None:
    ua, ub = (store.table(mv, "identifiability") for mv in (from_mv, to_mv))
    if not (store.exists(ua) and store.exists(ub)):
        return None
    keys = ["target", "features"]
    a, b = (store.read_parquet(u).to_pandas()[keys + ["n", "auc", "balanced_accuracy"]] for u in (ua, ub))
    m = a.merge(b, on=keys, suffixes=("_from", "_to"))
    m["auc_delta"] = m.auc_to - m.auc_from
    m["balanced_accuracy_delta"] = m.balanced_accuracy_to - m.balanced_accuracy_from
    schema = pa.schema([pa.field("target", pa.string()), pa.field("features", pa.string()), pa.field("n_from", pa.int64()), pa.field("n_to", pa.int64()),
                        pa.field("auc_from", pa.float64()), pa.field("auc_to", pa.float64()), pa.field("auc_delta", pa.float64()),
                        pa.field("balanced_accuracy_from", pa.float64()), pa.field("balanced_accuracy_to", pa.float64()),
                        pa.field("balanced_accuracy_delta", pa.float64())])
    cols = {f.name: [None if isinstance(v, float) and math.isnan(v) else v for v in m[f.name].tolist()] for f in schema}
    return pa.Table.from_pydict(cols, schema=schema)


def summary_text(result: dict, max_lines: int = 6) -> str:
    s = result["summary"]
    df = result["findings"].to_pandas()
    lines = [f"drift {s['from']} -> {s['to']}: {s['images_compared']} images compared; top finding changed for {s['top_finding_changed_share']:.1%}"]
    df["abs"] = df.mean_prob_delta.abs()
    for r in df.sort_values("abs", ascending=False).head(max_lines).itertuples():
        auc = f", AUC {r.auc_from:.3f} -> {r.auc_to:.3f} ({r.auc_delta:+.3f}, 95% CI {r.auc_delta_lo:+.3f}..{r.auc_delta_hi:+.3f})" if pd.notna(r.auc_delta) and pd.notna(r.auc_delta_lo) else ""
        lines.append(f"  {r.finding:18} mean P change {r.mean_prob_delta:+.4f}, logit {r.mean_logit_delta:+.3f}, rank corr {r.rank_correlation:.3f}{auc}")
    lines.append(f"  tables: {result['dest']}/")
    return "\n".join(lines)
