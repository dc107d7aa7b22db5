"""Dataset-level aggregates of one run, from its stored outputs: region statistics, finding
summaries, per-finding metrics and localisation against expert boxes.

The region statistics are a Dask tree reduction of per-partition ``RegionAccumulator``s; each
partition task reads only its own rows of maps.zarr, one chunk at a time.
"""

from __future__ import annotations

import logging
import os
import math
import time

import dask
import numpy as np
import pandas as pd
import pyarrow as pa

from schemas.aggregates import (
    FINDING_SUMMARY_SHARES,
    finding_summary_schema,
    localization_boxes_schema,
    region_contrasts_schema,
    localization_schema,
    metrics_schema,
    region_stats_schema,
)

from pipeline.core.errors import ConfigError, OutputError
from pipeline.analysis.localization import bootstrap_ci, box_coverage, box_scores, read_bbox_list
from pipeline.store.maps_store import open_maps
from pipeline.analysis.metrics import auc_delong, ece
from pipeline.analysis.region_stats import QUANTILES, RegionAccumulator, cell_vs_rest, hist_quantiles, mean_ci, stratum_difference
from pipeline.store.predictions import load_predictions
from pipeline.store.run_index import complete_runs
from pipeline.store.layout import RUNS, OutputStore
from pipeline.io.fs import join
from pipeline.store.storage import exists
from pipeline.io.location import InputOptions
from pipeline.analysis.settings import AggregateConfig  # noqa: F401 - re-exported
from pipeline.analysis.grid import region_masks
from pipeline.analysis.probe_reuse import chunk_states, fit_record, kept_fit, outputs_fingerprint
from pipeline.analysis.region_partials import chunk_fingerprint, partials_dir
from pipeline.analysis.strata import StrataContext, build_context, strata_weights

log = logging.getLogger(__name__)

def grid_of(maps) -> tuple[int, int]:
    """(rows, columns) of a run's maps: the model's grid (7x7 for 224-px DenseNets, 16x16 for
    torchxrayvision's 512-px ResNet), never assumed."""
    h, w = maps["cam"].shape[2:]
    return int(h), int(w)


def latest_complete_run(out, storage_options: dict | None = None) -> str:
    store = OutputStore.of(out, storage_options)
    runs = complete_runs(store)
    if not runs:
        raise OutputError(f"no complete run under {store.runs_root}; run python -m jobs.score_dataset first")
    return runs[-1]


def _partition_accumulator(maps_url: str, ctx: StrataContext, bias: np.ndarray, chunk: int, storage_options: dict | None = None,
                           fingerprints: dict[int, str] | None = None, partials: str | None = None) -> tuple[RegionAccumulator, dict[int, list[str]]]:
    """The partition's chunks, each its own accumulator (kept under ``partials`` for chunks with a
    fingerprint, region_partials), folded in row order. Returns it and, per chunk whose maps were
    read, the entries recomputed."""
    from pipeline.analysis import region_partials

    g = open_maps(maps_url, "r", storage_options)
    F, C = len(bias), int(np.prod(g["cam"].shape[2:]))
    total, read = None, {}
    chunk_of = ctx.rows // chunk
    for k in np.unique(chunk_of):
        sel = np.flatnonzero(chunk_of == k)
        part = ctx.slice(sel[0], sel[-1] + 1)  # rows are sorted, so a chunk's rows are contiguous
        wanted = [(key, w) for key, w in strata_weights(part, F) if w.any()]  # an empty mask has no statistics
        fp = (fingerprints or {}).get(int(k)) if partials else None
        digests = None if fp is None else [region_partials.entry_digest(fp, bias, part.rows, key, w) for key, w in wanted]
        url = region_partials.partial_url(partials, int(k)) if fp is not None else None
        acc, new = region_partials.chunk_accumulator(wanted, digests, url, lambda keys, k=k, part=part: _chunk_stats(g, part, bias, int(k), chunk, keys),
                                                       F, C, storage_options)
        if new:
            read[int(k)] = new
        total = acc if total is None else total.absorb(acc)  # both this function's own: in place
    return (total if total is not None else RegionAccumulator(F, C)), read


def _chunk_stats(g, part: StrataContext, bias: np.ndarray, k: int, chunk: int, keys) -> RegionAccumulator:
    """The statistics of the given (stratum value, mask)s over one chunk's rows, read from the maps."""
    F = len(bias)
    lo = k * chunk
    hi = int(part.rows[-1]) + 1
    idx = part.rows - lo
    cam = g["cam"][lo:hi][idx].reshape(len(idx), F, -1).astype(np.float64)  # once per chunk, not per stratum
    contrib = (g["cell_logit"][lo:hi][idx].reshape(len(idx), F, -1) - bias[None, :, None]) / cam.shape[-1]
    acc = RegionAccumulator(F, cam.shape[-1])
    for key, w in keys:
        acc.update(key, w, cam, contrib)
    return acc


def _merge(a: tuple[RegionAccumulator, dict], b: tuple[RegionAccumulator, dict]) -> tuple[RegionAccumulator, dict]:
    return a[0] + b[0], {**a[1], **b[1]}


ROWS_PER_PART = 4096  # a partition carries ~3 MB of histogram per stratum value: small runs get one


def default_parts() -> int:
    """One partition per core: each holds a whole accumulator (~160 MB at NIH's 48 stratum values),
    so partitions beyond the threads that fold them only wait in memory (8 of them: 1.3 GB)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def accumulate(maps_url: str, ctx: StrataContext, bias: np.ndarray, chunk: int, n_parts: int | None = None, scheduler="threads",
               storage_options: dict | None = None, fingerprints: dict[int, str] | None = None, partials: str | None = None,
               report: dict | None = None) -> RegionAccumulator:
    """Tree reduction over partitions of whole chunks; independent of partitioning by construction.
    n_parts: at most how many (default: default_parts(); never more than one per ROWS_PER_PART rows).
    scheduler: a dask scheduler name, or a Dask client's ``get`` to run on its cluster.
    fingerprints ({chunk: fingerprint}) and partials (a folder): keep each chunk's statistics there
    and reuse them while the chunk and its rows' strata are unchanged (region_partials); the result
    is bit-identical either way. report: filled with the number of chunks and, per chunk whose maps
    were read, the entries (stratum=value) recomputed."""
    n_parts = min(n_parts or default_parts(), -(-len(ctx.rows) // ROWS_PER_PART))
    chunk_of = ctx.rows // chunk
    chunks = np.unique(chunk_of)
    groups = [g for g in np.array_split(chunks, max(1, min(n_parts, len(chunks)))) if len(g)]
    tasks = []
    for grp in groups:
        sel = np.flatnonzero(np.isin(chunk_of, grp))
        tasks.append(dask.delayed(_partition_accumulator)(maps_url, ctx.slice(sel[0], sel[-1] + 1), bias, chunk, storage_options,
                                                          fingerprints, partials))
    while len(tasks) > 1:
        tasks = [dask.delayed(_merge)(tasks[i], tasks[i + 1]) if i + 1 < len(tasks) else tasks[i] for i in range(0, len(tasks), 2)]
    if not tasks:
        return RegionAccumulator(len(bias), int(np.prod(open_maps(maps_url, "r", storage_options)["cam"].shape[2:])))
    ((acc, read),) = dask.compute(tasks[0], scheduler=scheduler)
    if report is not None:
        report.update(chunks=len(chunks), recomputed={str(k): v for k, v in sorted(read.items())})
    return acc


def reuse_line(read: dict) -> str:
    """How much of the region statistics came from the maps: whole chunks (new or rescored), chunks
    read for a few strata whose rows changed (the top-10% confidence threshold moves with every film
    added), the rest merged from kept statistics."""
    redone = read.get("recomputed", {})
    whole = [k for k, v in redone.items() if "all=all" in v]
    few = [k for k in redone if k not in whole]
    parts = [f"{len(whole)} of {read.get('chunks', 0)} chunks computed from the maps"]
    if few:
        parts.append(f"{len(few)} read again for {sum(len(redone[k]) for k in few)} strata whose rows changed")
    return ", ".join(parts) + ", the rest merged from kept statistics"


def shard_records(store: OutputStore, model_version: str) -> dict[int, dict]:
    """{shard: its record} of the run (a shard is one chunk of maps.zarr); unreadable ones left out."""
    import json

    fs, pattern = store.fs(store.records_glob(model_version))
    out = {}
    for p in sorted(fs.glob(pattern)):
        try:
            with fs.open(p, "rb") as f:
                rec = json.loads(f.read())
        except (ValueError, OSError):
            continue  # no fingerprint: that chunk is read and counts as changed, as without one
        if isinstance(rec, dict) and isinstance(rec.get("shard"), int):
            out[rec["shard"]] = rec
    return out


def region_stats_table(acc: RegionAccumulator, findings, min_n: int, meta: dict, grid: tuple[int, int] = (7, 7)) -> pa.Table:
    C, W = acc.n_cells, grid[1]
    schema = region_stats_schema(**meta)
    keys: dict[str, list] = {k: [] for k in ("finding", "stratum", "stratum_value", "n")}
    blocks: list[dict[str, np.ndarray]] = []  # one per (stratum value, finding): C values per statistic
    ok: list[bool] = []
    for (stratum, value), s in sorted(acc.stats.items()):
        # quantiles only where they are shown (n >= min_n): a small run's strata are mostly hidden,
        # and the histograms' cumulative sums were most of its aggregation time
        shown = np.flatnonzero(s.count[:, 0] >= min_n)
        q = np.full(s.hist.shape[:2] + (len(QUANTILES),), np.nan)
        if len(shown):
            q[shown] = hist_quantiles(s.hist[shown])
        for f, name in enumerate(findings):
            n = int(s.count[f, 0])
            if n == 0:
                continue
            mean = s.total[f] / n
            var = (s.total_sq[f] - n * mean**2) / (n - 1) if n > 1 else np.full_like(mean, np.nan)
            stats = {
                "mean": mean, "std": np.sqrt(np.maximum(var, 0)), "min": s.vmin[f], "max": s.vmax[f],
                "p05": q[f, :, 0], "p25": q[f, :, 1], "p50": q[f, :, 2], "p75": q[f, :, 3], "p95": q[f, :, 4],
                "share_positive": s.n_pos[f] / n, "mean_positive_part": s.pos_part[f] / n,
                "mean_contribution": s.contrib[f] / n, "mean_abs_contribution": s.abs_contrib[f] / n,
            }
            stats["mean_lo"], stats["mean_hi"] = mean_ci(s, f)
            stats["diff_rest"], stats["diff_rest_lo"], stats["diff_rest_hi"] = cell_vs_rest(s, f)
            for k, v in (("finding", name), ("stratum", stratum), ("stratum_value", value), ("n", n)):
                keys[k].append(v)
            blocks.append(stats)
            ok.append(n >= min_n)
    cells = np.arange(C)
    cols = {
        "finding": np.repeat(np.asarray(keys["finding"], dtype=object), C),
        "cell_row": np.tile(cells // W, len(blocks)).astype(np.int8),
        "cell_col": np.tile(cells % W, len(blocks)).astype(np.int8),
        "stratum": np.repeat(np.asarray(keys["stratum"], dtype=object), C),
        "stratum_value": np.repeat(np.asarray(keys["stratum_value"], dtype=object), C),
        "n": np.repeat(np.asarray(keys["n"], dtype=np.int64), C),
    }
    hidden = np.repeat(~np.asarray(ok, bool), C)  # under min_n: every statistic is null
    arrays = []
    for field in schema:
        if field.name in cols:
            arrays.append(pa.array(cols[field.name], type=field.type))
        else:
            values = np.concatenate([np.asarray(b[field.name], np.float64) for b in blocks]) if blocks else np.zeros(0)
            arrays.append(pa.array(values, type=field.type, mask=hidden))
    return pa.Table.from_arrays(arrays, schema=schema)


def region_contrasts_table(acc: RegionAccumulator, findings, min_n: int, meta: dict, grid: tuple[int, int] = (7, 7)) -> pa.Table:
    """Every pair of values of each stratum column (AP vs PA, F vs M, ...), per finding and cell."""
    cols: dict[str, list] = {k: [] for k in region_contrasts_schema().names}
    by_stratum: dict[str, list] = {}
    for (stratum, value) in sorted(acc.stats):
        if stratum != "all":
            by_stratum.setdefault(stratum, []).append(value)
    for stratum, values in sorted(by_stratum.items()):
        for i, a in enumerate(values):
            for b in values[i + 1:]:
                sa, sb = acc.stats[(stratum, a)], acc.stats[(stratum, b)]
                for f, name in enumerate(findings):
                    na, nb = int(sa.count[f, 0]), int(sb.count[f, 0])
                    if na < min_n or nb < min_n:
                        continue
                    diff, lo, hi = stratum_difference(sa, sb, f)
                    for c in range(acc.n_cells):
                        for k, v in (("finding", name), ("cell_row", c // grid[1]), ("cell_col", c % grid[1]), ("stratum", stratum), ("value_a", a),
                                     ("value_b", b), ("n_a", na), ("n_b", nb), ("diff", float(diff[c])), ("diff_lo", float(lo[c])), ("diff_hi", float(hi[c]))):
                            cols[k].append(v)
    return pa.Table.from_pydict(cols, schema=region_contrasts_schema(**meta))


def finding_summary_table(acc: RegionAccumulator, findings, min_n: int, anatomy: np.ndarray | None, meta: dict,
                          grid: tuple[int, int] = (7, 7)) -> pa.Table:
    regions = {**region_masks(grid), "anatomy": anatomy}
    cols: dict[str, list] = {k: [] for k in finding_summary_schema().names}
    for (stratum, value), s in sorted(acc.stats.items()):
        for f, name in enumerate(findings):
            n = int(s.count[f, 0])
            if n == 0:
                continue
            cols["finding"].append(name)
            cols["stratum"].append(stratum)
            cols["stratum_value"].append(value)
            cols["n"].append(n)
            for share in FINDING_SUMMARY_SHARES:
                kind, region = share.split("_share_")
                arr = s.pos_part[f] if kind == "pos" else s.abs_contrib[f]
                mask = regions[region]
                total = arr.sum()
                cols[share].append(float(arr[mask].sum() / total) if n >= min_n and mask is not None and total > 0 else None)
    return pa.Table.from_pydict(cols, schema=finding_summary_schema(**meta))


def metrics_table(ctx: StrataContext, probs: np.ndarray, findings, min_n: int, meta: dict) -> pa.Table:
    cols: dict[str, list] = {k: [] for k in metrics_schema().names}
    groups = [("all", "all", np.ones(len(ctx.rows), bool))]
    for col, values in ctx.by.items():
        groups += [(col, v, values == v) for v in sorted({x for x in values if x is not None})]
    for f, name in enumerate(findings):
        for stratum, value, mask in groups:
            sel = mask & (ctx.labels[:, f] >= 0)
            n = int(sel.sum())
            if n == 0:
                continue
            y, p = ctx.labels[sel, f].astype(bool), probs[sel, f]
            ok = n >= min_n
            auc, lo, hi = auc_delong(y, p) if ok else (None, None, None)
            cols["finding"].append(name)
            cols["stratum"].append(stratum)
            cols["stratum_value"].append(value)
            cols["n"].append(n)
            cols["prevalence"].append(float(y.mean()) if ok else None)
            for k, v in (("auc", auc), ("auc_lo", lo), ("auc_hi", hi)):
                cols[k].append(None if v is None or (isinstance(v, float) and math.isnan(v)) else v)
            cols["ece"].append(ece(y, p) if ok else None)
    return pa.Table.from_pydict(cols, schema=metrics_schema(**meta))


def _find_bbox(run: dict, inputs: InputOptions) -> str | None:
    for d in run["config"]["datasets"]:
        spec = d.split("=", 1)[1] if "=" in d.split(":", 1)[0] else d
        adapter, loc = spec.split(":", 1)
        if adapter == "nih":
            for name in ("BBox_List_2017.csv", "BBox_List_2017.csv.gz"):
                if exists(join(loc, name), inputs.options_for(join(loc, name))):
                    return join(loc, name)
    return None


def localization_tables(bbox_url: str, manifest: pd.DataFrame, ctx: StrataContext, maps, findings, n_boot: int, meta: dict,
                        inputs: InputOptions = InputOptions()):
    from PIL import Image
    import fsspec

    boxes = read_bbox_list(bbox_url, inputs.options_for(bbox_url))
    by_id = manifest.set_index("image_id")[["row", "path"]]
    scored = set(ctx.rows.tolist())
    boxes = boxes[boxes.image_id.isin(by_id.index) & boxes.finding.isin(findings)].copy()
    boxes["row"] = by_id.loc[boxes.image_id, "row"].to_numpy()
    boxes = boxes[boxes.row.isin(scored)].sort_values(["row", "finding"])
    rows = np.unique(boxes.row.to_numpy())
    grid = grid_of(maps)
    cams = maps["cam"].get_orthogonal_selection((rows,)) if len(rows) else np.zeros((0, len(findings)) + grid)
    pos_of = {r: i for i, r in enumerate(rows)}
    sizes: dict[int, tuple[int, int]] = {}
    per_box: dict[str, list] = {k: [] for k in localization_boxes_schema().names}
    for b in boxes.itertuples():
        if b.row not in sizes:
            path = by_id.loc[b.image_id, "path"]
            with fsspec.open(path, "rb", **inputs.options_for(path)) as fh:
                sizes[b.row] = Image.open(fh).size  # reads the header only
        cov = box_coverage((b.x, b.y, b.w, b.h), *sizes[b.row], grid=grid[0])
        share, hit, chance, chance_pt = box_scores(cams[pos_of[b.row], findings.index(b.finding)], cov)
        for k, v in (("row", int(b.row)), ("image_id", b.image_id), ("finding", b.finding), ("x", b.x), ("y", b.y), ("w", b.w), ("h", b.h),
                     ("inbox_share", None if np.isnan(share) else share), ("pointing_hit", hit), ("chance", chance), ("chance_pointing", chance_pt)):
            per_box[k].append(v)
    box_table = pa.Table.from_pydict(per_box, schema=localization_boxes_schema(**meta))
    df = box_table.to_pandas()
    summary: dict[str, list] = {k: [] for k in localization_schema().names}
    for name, g in df.groupby("finding", sort=True):
        share = g.inbox_share.astype(float).to_numpy()
        hits = g.pointing_hit.astype(float).to_numpy()
        s_lo, s_hi = bootstrap_ci(share, n_boot)
        h_lo, h_hi = bootstrap_ci(hits, n_boot)
        for k, v in (("finding", name), ("n", len(g)), ("inbox_share", float(np.nanmean(share)) if np.isfinite(share).any() else None),
                     ("inbox_share_lo", s_lo), ("inbox_share_hi", s_hi), ("pointing_hit_rate", float(hits.mean())),
                     ("pointing_lo", h_lo), ("pointing_hi", h_hi), ("chance", float(g.chance.mean())), ("chance_pointing", float(g.chance_pointing.mean()))):
            summary[k].append(None if isinstance(v, float) and math.isnan(v) else v)
    return pa.Table.from_pydict(summary, schema=localization_schema(**meta)), box_table


def aggregate_run(out, model_version: str | None = None, config: AggregateConfig = AggregateConfig(), scheduler="threads", n_parts: int | None = None,
                  storage_options: dict | None = None, map_fn=None, inputs: InputOptions | None = None) -> dict[str, pa.Table]:
    """Compute and write every aggregate of a run from its stored outputs; returns the tables.

    out: an OutputStore, or a URL opened with storage_options. inputs: the options the inputs it
    reads (the bounding boxes, the films' sizes) are opened with (never --out's). scheduler: where the region
    statistics' tree reduction runs (a dask scheduler name, or a client's ``get``); ``map_fn(fn,
    iterable)`` runs the per-cell identifiability fits (default: in process; the lifecycle passes
    one that runs them on the scoring cluster)."""
    store = OutputStore.of(out, storage_options)
    model_version = model_version or latest_complete_run(store)
    run = store.read_json(store.run_json(model_version))
    if run is None:
        raise OutputError(f"no run {model_version} under {store.runs_root}")
    maps = store.open_maps(store.maps(model_version))
    findings = tuple(maps.attrs["findings"])
    if "classifier_bias" not in maps.attrs:
        raise OutputError(f"{store.maps(model_version)} predates exact contributions (no classifier_bias); rescore it")
    bias = np.asarray(maps.attrs["classifier_bias"], np.float64)
    manifest = store.read_parquet(store.manifest).to_pandas()
    preds = load_predictions(store, model_version)
    unknown = [c for c in config.by if c != "age_band" and c not in manifest.columns]
    if unknown:
        raise ConfigError(f"--by {unknown}: not manifest columns; choose from {sorted(manifest.columns)} or age_band")
    ctx = build_context(manifest, preds, findings, config.by)
    probs = preds.set_index("row").loc[ctx.rows, list(findings)].to_numpy(np.float64)
    meta = {"findings": list(findings), "model_version": model_version, "by": list(config.by), "min_n": config.min_n}

    log.info(f"aggregates: region statistics over {len(ctx.rows):,} films")
    t, read, seconds = time.perf_counter(), {}, {}
    records, chunk = shard_records(store, model_version), maps["cam"].chunks[0]
    fingerprints = {k: fp for k, r in records.items() if (fp := chunk_fingerprint(r)) is not None}
    acc = accumulate(store.maps(model_version), ctx, bias, chunk, n_parts, scheduler, store.options,
                     fingerprints=fingerprints, partials=partials_dir(store.join(RUNS, model_version)), report=read)
    seconds["region_statistics"] = time.perf_counter() - t
    log.info(f"aggregates: region statistics in {seconds['region_statistics']:.1f} s ({reuse_line(read)})")
    grid = grid_of(maps)
    anatomy = None if config.anatomy_mask is None else np.asarray(config.anatomy_mask, bool)
    if anatomy is not None and anatomy.shape != grid:
        raise ConfigError(f"--anatomy-mask is {anatomy.shape[0]}x{anatomy.shape[1]} but this run's maps are {grid[0]}x{grid[1]} "
                          f"(the model's grid): give {grid[0]} rows of {grid[1]} zeros and ones")
    anatomy = None if anatomy is None else anatomy.reshape(-1)
    tables = {
        "region_stats": region_stats_table(acc, findings, config.min_n, meta, grid),
        "region_contrasts": region_contrasts_table(acc, findings, config.min_n, meta, grid),
        "finding_summary": finding_summary_table(acc, findings, config.min_n, anatomy, meta, grid),
        "metrics": metrics_table(ctx, probs, findings, config.min_n, meta),
    }
    del acc  # ~160 MB of histograms, not needed by the probes and verdicts that follow
    inputs = inputs or InputOptions()
    bbox = config.bbox or _find_bbox(run, inputs)
    if bbox:
        tables["localization"], tables["localization_boxes"] = localization_tables(bbox, manifest, ctx, maps, findings, config.n_boot,
                                                                                   {**meta, "bbox": bbox}, inputs)
    seconds["tables"] = time.perf_counter() - t - seconds["region_statistics"]
    probes = {}
    if config.identifiability:
        # cross-validated fits do not merge: kept while few films changed since, else refitted (probe_reuse)
        t = time.perf_counter()
        states = chunk_states(manifest, ctx.rows, chunk, {k: outputs_fingerprint(r) for k, r in records.items()})
        kept, probes = kept_fit(store, model_version, config, states)
        if kept is None:
            log.info(f"probes: fitting {', '.join(config.targets)} from the embedding, the maps and each cell")
            kept, probes = identifiability_tables(manifest, ctx, probs, maps, findings, config, meta, map_fn), fit_record(config, states)
        tables.update(kept)
        seconds["probes"] = time.perf_counter() - t
    t = time.perf_counter()
    tables.update(verdict_tables(manifest, ctx, probs, maps, findings, anatomy, tables.get("localization_boxes"), meta))
    seconds["verdicts"] = time.perf_counter() - t
    from schemas.meta import with_model_version

    for name, table in tables.items():
        tables[name] = table = with_model_version(table, model_version)  # so runs/*/ queries can tell runs apart
        store.write_parquet(store.table(model_version, name), table)
    from pipeline.analysis.aggregate_inputs import record_inputs

    record_inputs(store, model_version, config, list(tables), region_partials=read, seconds=seconds,
                  **({"probes": probes} if probes else {}))  # after the tables: a kill leaves them stale
    return tables


def verdict_tables(manifest, ctx, probs, maps, findings, anatomy, boxes: pa.Table | None, meta) -> dict[str, pa.Table]:
    """scorecard.parquet (the verdicts, pipeline/analysis/verdicts.py) and cell_separation.parquet."""
    from schemas.aggregates import cell_separation_schema, scorecard_schema

    from pipeline.analysis.verdicts import finding_data, separations, verdicts

    labelled = np.flatnonzero((ctx.labels >= 0).any(axis=1))  # only labelled films enter a verdict: read only theirs
    sub = ctx if len(labelled) == len(ctx.rows) else ctx.take(labelled)
    logits = _cell_logits(maps["cell_logit"], sub.rows, len(findings))
    data = finding_data(manifest, sub, probs[labelled], logits, findings)
    rows = verdicts(data, findings, None if boxes is None else boxes.to_pandas(), anatomy=anatomy)
    cells = separations(data, grid_of(maps)[1])
    return {"scorecard": _rows_table([r.__dict__ for r in rows], scorecard_schema(**meta)),
            "cell_separation": _rows_table(cells, cell_separation_schema(**meta))}


def _cell_logits(arr, rows: np.ndarray, n_findings: int) -> np.ndarray:
    """(len(rows), F, cells) float32 of the sorted ``rows``, read one Zarr chunk at a time into one
    buffer (a whole-array orthogonal selection held a second copy: ~0.3 GB at full NIH size)."""
    out = np.empty((len(rows), n_findings, int(np.prod(arr.shape[2:]))), np.float32)  # the model's grid
    chunk = arr.chunks[0]
    of = rows // chunk
    for k in np.unique(of):
        sel = np.flatnonzero(of == k)
        lo = int(k * chunk)
        block = arr[lo:int(rows[sel[-1]]) + 1]
        out[sel] = block[rows[sel] - lo].reshape(len(sel), n_findings, -1)
    return out


def _rows_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    cols = {f.name: [r.get(f.name) for r in rows] for f in schema}
    cols = {k: [None if isinstance(v, float) and math.isnan(v) else v for v in vs] for k, vs in cols.items()}
    return pa.Table.from_pydict(cols, schema=schema)


def identifiability_tables(manifest, ctx, probs, maps, findings, config: AggregateConfig, meta, map_fn=None) -> dict[str, pa.Table]:
    from schemas.identifiability import (
        identifiability_map_schema,
        identifiability_schema,
        identifiability_scores_schema,
        prevalence_confounding_schema,
    )

    from pipeline.analysis.identifiability import ProbeConfig, cell_sample, run_probes
    from pipeline.analysis.site_confounding import prevalence_confounding

    cfg = ProbeConfig(targets=config.targets, cells=config.cell_probes)
    rows = ctx.rows
    features = {"embedding": maps["embedding"].get_orthogonal_selection((rows,)),
                "maps": maps["cam"].get_orthogonal_selection((rows,)).reshape(len(rows), -1)}
    cell_rows = cell_sample(rows, cfg)
    cellf = maps["cell_features"].get_orthogonal_selection((cell_rows,)) if "cell_features" in maps and cfg.cells else None
    summary, cells, scores = run_probes(manifest, rows, features, cellf, cfg, cell_rows=cell_rows, map_fn=map_fn)

    table = _rows_table
    return {
        "identifiability": table(summary, identifiability_schema(**meta)),
        "identifiability_map": table(cells, identifiability_map_schema(**meta)),
        "identifiability_scores": pa.Table.from_pydict(scores, schema=identifiability_scores_schema(**meta)),
        "prevalence_confounding": table(prevalence_confounding(manifest, rows, probs, findings, cfg, config.min_n), prevalence_confounding_schema(**meta)),
    }
