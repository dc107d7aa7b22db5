"""Can the site (or view, sex, age band, any column) be read from what the model computes, and
where in the film? Cross-validated logistic-regression probes, 5 folds grouped by patient.

Feature sources: the pooled ``embedding``; the ``maps`` (F x 7 x 7 ln-ratio maps); and each grid
cell alone (its full relu(features) vector in ``cell_features``), which gives a 7x7 identifiability
map with a CI and a Holm-corrected test on every cell (``probe_stats``). The per-cell probes run on
a seeded subsample of at most ``cell_max_images`` images, as one independent task per cell
(``cell_fits.fit_cell``: closed-form ridge sharing one Gram matrix over targets and folds), sent
through ``map_fn`` (default: ``threads_map``, in process).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
# scikit-learn is imported by the functions that use it: the report and jobs.aggregate import this
# module for its settings, and sklearn's import costs them ~1.5 s of a run's fixed cost.
from threadpoolctl import threadpool_limits

from pipeline.analysis.cell_fits import CellTarget, cell_metrics, constant_metrics, fit_cell
from pipeline.analysis.probe_stats import holm, within_fold_auc, within_fold_test
from pipeline.analysis.strata import age_band

from pipeline.analysis.settings import DEFAULT_TARGETS  # noqa: E402 - one home for the default targets


@dataclass(frozen=True)
class ProbeConfig:
    targets: tuple[str, ...] = DEFAULT_TARGETS
    folds: int = 5
    min_patients: int = 5  # a class with fewer patients is dropped (with a note)
    max_rows: int = 20_000  # per probe: a seeded, class-stratified subsample keeps 112k-image runs in minutes
    seed: int = 0
    n_boot: int = 200
    alpha: float = 0.05  # family-wise error rate over a target's 49 cells (Holm)
    cells: bool = True  # the per-cell probes (the 7x7 map); False skips them
    probe: str = "logistic"  # a key of PROBES: the embedding and maps probes
    cell_probe: str = "ridge"  # a key of PROBES: the per-cell probes ("ridge": the shared-Gram fit of cell_fits)
    cell_ridge: float = 16.0  # the per-cell ridge penalty on standardised features (README: why 16)
    cell_max_images: int = 4_000  # per-cell probes: a seeded subsample (AUC SE about 0.01 at this size)
    cell_max_classes: int = 20  # no per-cell map for targets with more classes (one-vs-rest: one right-hand side per class)


def target_labels(manifest: pd.DataFrame, target: str) -> pd.Series | None:
    """The target per row: a manifest column, 'age_band', or a key of the 'extra' JSON (ward, scanner...)."""
    if target == "age_band":
        return manifest["age"].map(age_band)
    if target in manifest.columns:
        return manifest[target].map(_category)
    values = manifest["extra"].map(lambda e: json.loads(e).get(target) if isinstance(e, str) else None)
    return None if values.isna().all() else values.map(_category)


def _category(v) -> str | None:
    """A class label, or None for a blank: NaN, None and empty strings are missing, not a class "nan"."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    text = str(v).strip()
    return text if text and text.lower() not in ("nan", "none", "null") else None


def prepare_target(y: pd.Series, patients: pd.Series, cfg: ProbeConfig) -> tuple[np.ndarray, list[str]]:
    """Row mask of usable rows and notes on dropped classes."""
    notes = []
    ok = y.notna().to_numpy().copy()
    per_class = pd.DataFrame({"y": y, "p": patients})[ok].groupby("y")["p"].nunique()
    for cls, n in per_class.items():
        if n < max(cfg.min_patients, cfg.folds):
            notes.append(f"class {cls!r} dropped: {n} patients (< {max(cfg.min_patients, cfg.folds)})")
            ok &= (y != cls).to_numpy()
    return ok, notes


def subsample(y: np.ndarray, cfg: ProbeConfig) -> np.ndarray:
    idx = np.arange(len(y))
    if len(y) <= cfg.max_rows:
        return idx
    rng = np.random.default_rng(cfg.seed)
    keep = []
    for cls in np.unique(y):
        members = idx[y == cls]
        k = max(1, int(round(cfg.max_rows * len(members) / len(y))))
        keep.append(rng.choice(members, min(k, len(members)), replace=False))
    return np.sort(np.concatenate(keep))


def folds(y: np.ndarray, groups: np.ndarray, cfg: ProbeConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds in which no patient is in both train and test."""
    from sklearn.model_selection import StratifiedGroupKFold

    return list(StratifiedGroupKFold(n_splits=cfg.folds, shuffle=True, random_state=cfg.seed).split(np.zeros(len(y)), y, groups))


def _logistic(x, y):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # Not catch_warnings(): it swaps the process-wide filter list, and the fits run on several threads,
    # so one thread's exit restored a list without the filter while another was fitting (the warning
    # then reached the user's terminal). Convergence is read off n_iter_ instead, and the probe table's
    # notes say so (run_probes).
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=LOGISTIC_MAX_ITER, C=1.0))
    clf.fit(x, y)
    return clf.classes_, clf.predict_proba, bool((clf[-1].n_iter_ < LOGISTIC_MAX_ITER).all())


def _ridge(x, y, lam: float = 1.0):
    """Closed-form least-squares probe on standardised features (one-hot targets, unpenalised
    intercept): the per-cell probe, fitted one fold at a time (cell_fits.ridge_oof is the same fit)."""
    x = x.astype(np.float64)
    mu, sd = x.mean(0), x.std(0)
    sd[sd == 0] = 1
    classes = np.unique(y)
    a = np.c_[np.ones(len(x)), (x - mu) / sd]
    reg = lam * np.eye(a.shape[1])
    reg[0, 0] = 0  # no penalty on the intercept
    w = np.linalg.solve(a.T @ a + reg, a.T @ (y[:, None] == classes[None, :]))
    return classes, lambda z: np.c_[np.ones(len(z)), (z.astype(np.float64) - mu) / sd] @ w, True


PROBES = {"logistic": _logistic, "ridge": _ridge}  # name -> fit(x, y) -> (classes, scores(x), converged); AUCs use only the ranks
LOGISTIC_MAX_ITER = 300


def convergence_note(unconverged: int, n_folds: int) -> str:
    return (f"lbfgs stopped at max_iter={LOGISTIC_MAX_ITER} before converging in {unconverged} of {n_folds} folds; "
            "those folds' probes were scored as fitted at the cap (out-of-fold, so the AUC stays an honest estimate of that fit)")


def oof_proba(x: np.ndarray, y_idx: np.ndarray, splits, n_classes: int, cfg: ProbeConfig = ProbeConfig(), probe: str | None = None,
              unconverged: list | None = None, at: np.ndarray | None = None) -> np.ndarray:
    """Out-of-fold class scores (probabilities for 'logistic') for every row; each fold trains on at
    most cfg.max_rows of its training rows (a seeded, class-stratified subsample), so large runs stay fast.
    ``unconverged``: a list that gets one entry per fold whose fit stopped before converging.
    ``at``: the rows of x that y_idx describes (default: all), so that a target with unlabelled
    films indexes the shared matrix instead of copying it (the maps are ~300 MB at 112k films)."""
    out = np.zeros((len(y_idx), n_classes))
    at = np.arange(len(y_idx)) if at is None else at
    for k, (train, test) in enumerate(splits):
        train = train[subsample(y_idx[train], cfg)]
        # copy=False: the fold's rows are already a copy (fancy indexing)
        classes, score, converged = PROBES[probe or cfg.probe](x[at[train]].astype(np.float32, copy=False), y_idx[train])
        if not converged and unconverged is not None:
            unconverged.append(k)
        p = np.zeros((len(test), n_classes))
        for lo in range(0, len(test), SCORE_BLOCK):  # the test rows a block at a time: no fold-sized copy
            block = test[lo:lo + SCORE_BLOCK]
            p[lo:lo + len(block), classes] = score(x[at[block]].astype(np.float32, copy=False))
        out[test] = p
    return out


SCORE_BLOCK = 8192  # rows scored at once by oof_proba


def probe_metrics(y_idx: np.ndarray, proba: np.ndarray, splits) -> dict:
    """AUC within folds (0.5 at chance, CI bounded below by it: ``probe_stats.within_fold_auc``), the
    within-fold permutation p-value (above chance), balanced accuracy of the out-of-fold argmax."""
    from sklearn.metrics import balanced_accuracy_score

    auc, lo, hi = within_fold_auc(y_idx, proba, splits)
    _, p = within_fold_test(y_idx, proba, splits)
    return {"auc": auc, "auc_lo": lo, "auc_hi": hi, "p_value": p,
            "balanced_accuracy": float(balanced_accuracy_score(y_idx, proba.argmax(1))), "chance": 1.0 / proba.shape[1]}


def cell_sample(rows: np.ndarray, cfg: ProbeConfig) -> np.ndarray:
    """The sorted rows whose cell features the per-cell probes read: all, or a seeded subsample."""
    if len(rows) <= cfg.cell_max_images:
        return rows
    return np.sort(np.random.default_rng(cfg.seed).choice(rows, cfg.cell_max_images, replace=False))


def run_probes(manifest: pd.DataFrame, rows: np.ndarray, features: dict, cell_features: np.ndarray | None, cfg: ProbeConfig,
               cell_rows: np.ndarray | None = None, map_fn=None):
    """Returns (summary rows, map rows, per-image scores as columns: SCORE_COLUMNS). ``features``: name -> (N, d) aligned
    with rows; ``cell_features`` (n, cells, D) aligned with ``cell_rows`` (default: rows).
    ``map_fn(fn, iterable)`` runs the per-cell tasks (default: ``threads_map``; see ``cell_map``)."""
    m = manifest.set_index("row").loc[rows]
    patients = m["patient_id"].fillna(pd.Series([f"row{r}" for r in rows], index=m.index)).astype(str)
    summary, scores, cell_targets, fits = [], [], [], []
    image_ids = m["image_id"].to_numpy(object) if "embedding" in features else None
    pos = np.arange(len(rows)) if cell_rows is None else pd.Index(rows).get_indexer(cell_rows)
    if (pos < 0).any():
        raise ValueError("cell_rows must be a subset of rows")
    for target in cfg.targets:
        y = target_labels(m, target)
        if y is None:
            summary.append({"target": target, "features": "-", "n": 0, "notes": f"no column {target!r} in the manifest"})
            continue
        ok, notes = prepare_target(y, patients, cfg)
        classes = sorted(set(y[ok]))
        if len(classes) < 2:
            summary.append({"target": target, "features": "-", "n": int(ok.sum()), "notes": "; ".join(notes + [f"fewer than 2 classes ({classes})"])})
            continue
        y_idx = np.searchsorted(classes, y[ok].to_numpy())
        groups = patients[ok].to_numpy()
        splits = folds(y_idx, groups, cfg)
        counts = {c: int((y_idx == i).sum()) for i, c in enumerate(classes)}
        if cell_features is not None and cfg.cells and len(classes) > cfg.cell_max_classes:
            notes.append(f"no per-cell map: {len(classes)} classes > cell_max_classes ({cfg.cell_max_classes})")
        base = {"target": target, "n": int(ok.sum()), "n_per_class": str(counts), "notes": "; ".join(notes) or None}
        for name in features:
            fits.append((len(summary), base, name, ok, y_idx, splits, classes))
            summary.append(None)  # filled below, when the fits are done
        if cell_features is not None and cfg.cells and len(classes) <= cfg.cell_max_classes:
            t = cell_target(target, y.iloc[pos], patients.iloc[pos], cfg)
            if t is not None:
                cell_targets.append(t)

    def fit(job):  # one target x feature source: an independent task, BLAS on one thread (threads_map)
        _, _, name, ok, y_idx, splits, classes = job
        unconverged: list[int] = []
        proba = oof_proba(features[name], y_idx, splits, len(classes), cfg, unconverged=unconverged, at=np.flatnonzero(ok))
        return proba, probe_metrics(y_idx, proba, splits), (convergence_note(len(unconverged), len(splits)) if unconverged else None)

    for (slot, base, name, ok, y_idx, _, classes), (proba, metrics, note) in zip(fits, threads_map(fit, fits)):
        summary[slot] = {**base, "features": name, **metrics}
        below = "AUC below 0.5 reads as chance (CI bounded at 0.5)" if metrics["auc"] < 0.5 else None  # noise, not "worse than chance"
        if note or below:
            summary[slot]["notes"] = "; ".join(n for n in (base["notes"], note, below) if n)
        if name == "embedding":  # columns, not a dict per film: 4 targets x 112k films
            scores.append({"row": rows[ok].astype(np.int64), "image_id": image_ids[ok], "target": np.full(int(ok.sum()), base["target"], object),
                           "score": proba[np.arange(len(y_idx)), y_idx], "predicted": np.asarray(classes, object)[proba.argmax(1)]})
    cells = cell_map(cell_features, cell_targets, cfg, map_fn) if cell_targets else []
    return summary, cells, {k: np.concatenate([s[k] for s in scores]) if scores else np.array([], object) for k in SCORE_COLUMNS}


SCORE_COLUMNS = ("row", "image_id", "target", "score", "predicted")  # run_probes' per-image scores, a column each


def cell_target(target: str, y: pd.Series, patients: pd.Series, cfg: ProbeConfig) -> CellTarget | None:
    """A target's labels and its own folds (stratified by it, grouped by patient) over the cell
    sample; None: < 2 classes there. (Folds shared by all targets would let a cell share one
    factorisation per fold, but unstratified folds moved the per-cell AUCs of the 120 real films by
    0.03-0.05 (median) from the stratified ones, at 120 films the fold split matters.)"""
    ok, _ = prepare_target(y, patients, cfg)
    classes = sorted(set(y[ok]))
    if len(classes) < 2:
        return None
    y_idx = np.full(len(y), -1, np.int64)
    y_idx[ok] = np.searchsorted(classes, y[ok].to_numpy())
    fold = np.full(len(y), -1, np.int64)
    for k, (_, test) in enumerate(folds(y_idx[ok], patients[ok].to_numpy(), cfg)):
        fold[np.flatnonzero(ok)[test]] = k
    return CellTarget(target, y_idx, fold, len(classes))


def cell_map(cell_features, targets: list[CellTarget], cfg: ProbeConfig, map_fn=None) -> list[dict]:
    """The identifiability map of every target: one task per grid cell, given that cell's features
    (n, D) over the cell sample and every target, so each cell's features are read once and sent
    once. ``map_fn(fn, iterable)`` -> results in order: ``threads_map`` by default (in process);
    on a Dask cluster e.g. ``lambda f, xs: client.gather(client.map(f, client.scatter(list(xs))))``. Then
    Holm's correction over each target's cells (pipeline/analysis/probe_stats.py)."""
    n_cells = cell_features.shape[1]
    grid = int(round(n_cells**0.5))
    targets = tuple(targets)
    if cfg.cell_probe == "ridge":
        fn, label = partial(fit_cell, targets=targets, lam=cfg.cell_ridge), f"ridge(lam={cfg.cell_ridge:g})"
    else:
        fn, label = partial(fit_cell_with_probe, targets=targets, cfg=cfg), cfg.cell_probe
    results = list((map_fn or threads_map)(fn, (cell_features[:, c, :] for c in range(n_cells))))
    rows = []
    for i, t in enumerate(targets):
        trows = [{"target": t.name, "n": int(t.used.sum()), "cell_row": c // grid, "cell_col": c % grid, "chance": 1.0 / t.n_classes,
                  "probe": label, **results[c][i]} for c in range(n_cells)]
        adjusted = holm(np.array([r["p_value"] for r in trows], np.float64))
        for r, q in zip(trows, adjusted):
            r["p_holm"] = None if math.isnan(q) else float(q)
            r["significant"] = bool(q <= cfg.alpha) if not math.isnan(q) else False
        rows += trows
    return rows


def threads_map(fn, items) -> list:
    """The default ``map_fn``: in process, a thread per core, BLAS on one thread each. The cells'
    work is BLAS, which releases the GIL; a multi-threaded BLAS per task instead oversubscribes the
    cores (measured: 4-5x slower per cell on a loaded 2-core machine). Dask's workers already
    start with OPENBLAS_NUM_THREADS=1."""
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return list(pool.map(fn, items))


def fit_cell_with_probe(x: np.ndarray, targets: tuple[CellTarget, ...], cfg: ProbeConfig) -> list[dict]:
    """``cell_fits.fit_cell`` with any probe of PROBES, one fold at a time (``cell_probe="logistic"``:
    the probe of the first per-cell maps; about 50x slower than the shared-Gram ridge)."""
    out = []
    for t in targets:
        xt = x[t.used]
        if bool(np.all(np.nanstd(xt, axis=0) == 0)):
            out.append(constant_metrics(t.n_classes))
            continue
        y_idx, splits = t.y[t.used], t.splits()
        out.append(cell_metrics(y_idx, oof_proba(xt, y_idx, splits, t.n_classes, cfg, probe=cfg.cell_probe), splits))
    return out


def format_map(cells: pd.DataFrame) -> str:
    """The 7x7 identifiability map per target as text, showing a cell's AUC only where it differs
    from chance after Holm's correction (``significant``); '.' elsewhere, so noise is not read."""
    lines = []
    for target, t in cells.groupby("target", sort=True):
        grid = int(t.cell_row.max()) + 1
        shown = {(int(r.cell_row), int(r.cell_col)): r.auc for r in t.itertuples() if r.significant}
        lines.append(f"identifiability map, target {target}: AUC where above chance (Holm, {len(t)} cells), '.' elsewhere; "
                     f"{len(shown)} of {len(t)} cells")
        lines += ["   " + " ".join(f"{shown[(i, j)]:5.2f}" if (i, j) in shown else "    ." for j in range(grid)) for i in range(grid)]
    return "\n".join(lines)
