"""Can the site (or view, sex, age band, any column) be read from what the model computes, and
where in the film? Cross-validated logistic-regression probes, 5 folds grouped by patient.

Feature sources: the pooled ``embedding``; the ``maps`` (F x 7 x 7 ln-ratio maps); and each grid
cell alone (its full relu(features) vector in ``cell_features``), which gives a 7x7 identifiability
map with a CI and a Holm-corrected test on every cell (``probe_stats``). The per-cell probes run on
a seeded subsample of at most ``cell_max_images`` images: 49 probes on 1,024 features each.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.analysis.metrics import auc_delong
from pipeline.analysis.probe_stats import holm, macro_auc_ci, within_fold_test
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
    probe: str = "logistic"  # a key of PROBES
    cell_max_images: int = 4_000  # per-cell probes: a seeded subsample (AUC SE about 0.01 at this size)
    cell_max_classes: int = 5  # no per-cell map for targets with more classes (age_band): 49 multinomial fits on 1,024 features


def target_labels(manifest: pd.DataFrame, target: str) -> pd.Series | None:
    """The target per row: a manifest column, 'age_band', or a key of the 'extra' JSON (ward, scanner...)."""
    if target == "age_band":
        return manifest["age"].map(age_band)
    if target in manifest.columns:
        return manifest[target].where(manifest[target].notna(), None)
    values = manifest["extra"].map(lambda e: json.loads(e).get(target) if isinstance(e, str) else None)
    return None if values.isna().all() else values.where(values.notna(), None).map(lambda v: None if v is None else str(v))


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
    return list(StratifiedGroupKFold(n_splits=cfg.folds, shuffle=True, random_state=cfg.seed).split(np.zeros(len(y)), y, groups))


def _logistic(x, y):
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300, C=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a probe capped at 300 iterations is still a probe
        clf.fit(x, y)
    return clf.classes_, clf.predict_proba


def _ridge(x, y):
    """Closed-form least-squares probe on standardised features (one-hot targets): a small fraction
    of the logistic fit's time, for statistical property tests."""
    x = x.astype(np.float64)
    mu, sd = x.mean(0), x.std(0)
    sd[sd == 0] = 1
    classes = np.unique(y)
    a = np.c_[np.ones(len(x)), (x - mu) / sd]
    reg = np.eye(a.shape[1])
    reg[0, 0] = 0  # no penalty on the intercept
    w = np.linalg.solve(a.T @ a + reg, a.T @ (y[:, None] == classes[None, :]))
    return classes, lambda z: np.c_[np.ones(len(z)), (z.astype(np.float64) - mu) / sd] @ w


PROBES = {"logistic": _logistic, "ridge": _ridge}  # name -> fit(x, y) -> (classes, scores(x)); AUCs use only the ranks


def oof_proba(x: np.ndarray, y_idx: np.ndarray, splits, n_classes: int, cfg: ProbeConfig = ProbeConfig()) -> np.ndarray:
    """Out-of-fold class scores (probabilities for 'logistic') for every row; each fold trains on at
    most cfg.max_rows of its training rows (a seeded, class-stratified subsample), so large runs stay fast."""
    out = np.zeros((len(y_idx), n_classes))
    for train, test in splits:
        train = train[subsample(y_idx[train], cfg)]
        classes, score = PROBES[cfg.probe](x[train].astype(np.float32), y_idx[train])
        p = np.zeros((len(test), n_classes))
        p[:, classes] = score(x[test].astype(np.float32))
        out[test] = p
    return out


def probe_metrics(y_idx: np.ndarray, proba: np.ndarray, cfg: ProbeConfig) -> dict:
    k = proba.shape[1]
    if k == 2:
        auc, lo, hi = auc_delong(y_idx == 1, proba[:, 1])
    else:
        auc = float(roc_auc_score(y_idx, proba, multi_class="ovr", average="macro", labels=np.arange(k)))
        rng = np.random.default_rng(cfg.seed)
        boots = []
        for _ in range(cfg.n_boot):
            i = rng.integers(0, len(y_idx), len(y_idx))
            if len(np.unique(y_idx[i])) == k:
                boots.append(roc_auc_score(y_idx[i], proba[i], multi_class="ovr", average="macro", labels=np.arange(k)))
        lo, hi = (float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))) if boots else (math.nan, math.nan)
    return {"auc": float(auc), "auc_lo": lo, "auc_hi": hi,
            "balanced_accuracy": float(balanced_accuracy_score(y_idx, proba.argmax(1))), "chance": 1.0 / k}


def _constant(x: np.ndarray) -> bool:
    return bool(np.all(np.nanstd(x, axis=0) == 0))


def cell_sample(rows: np.ndarray, cfg: ProbeConfig) -> np.ndarray:
    """The sorted rows whose cell features the per-cell probes read: all, or a seeded subsample."""
    if len(rows) <= cfg.cell_max_images:
        return rows
    return np.sort(np.random.default_rng(cfg.seed).choice(rows, cfg.cell_max_images, replace=False))


def run_probes(manifest: pd.DataFrame, rows: np.ndarray, features: dict, cell_features: np.ndarray | None, cfg: ProbeConfig,
               cell_rows: np.ndarray | None = None):
    """Returns (summary rows, map rows, per-image score rows). ``features``: name -> (N, d) aligned
    with rows; ``cell_features`` (n, cells, D) aligned with ``cell_rows`` (default: rows)."""
    m = manifest.set_index("row").loc[rows]
    patients = m["patient_id"].fillna(pd.Series([f"row{r}" for r in rows], index=m.index)).astype(str)
    summary, cells, scores = [], [], []
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
        for name, x in features.items():
            proba = oof_proba(x[ok], y_idx, splits, len(classes), cfg)
            summary.append({**base, "features": name, **probe_metrics(y_idx, proba, cfg)})
            if name == "embedding":
                true_p = proba[np.arange(len(y_idx)), y_idx]
                for r, img, p, pred in zip(rows[ok], m["image_id"][ok], true_p, proba.argmax(1)):
                    scores.append({"row": int(r), "image_id": img, "target": target, "score": float(p), "predicted": classes[pred]})
        if cell_features is not None and cfg.cells and len(classes) <= cfg.cell_max_classes:
            cells += _cell_map(cell_features, pos, y, patients, cfg, target)
    return summary, cells, scores


def _cell_map(cell_features: np.ndarray, pos: np.ndarray, y: pd.Series, patients: pd.Series, cfg: ProbeConfig, target: str) -> list[dict]:
    """The per-cell probes on the rows at ``pos`` (the cell sample), with their own folds."""
    yc, pc = y.iloc[pos], patients.iloc[pos]
    ok, _ = prepare_target(yc, pc, cfg)
    classes = sorted(set(yc[ok]))
    if len(classes) < 2:
        return []
    y_idx = np.searchsorted(classes, yc[ok].to_numpy())
    splits = folds(y_idx, pc[ok].to_numpy(), cfg)
    return cell_probes(cell_features[ok], y_idx, splits, len(classes), cfg, {"target": target, "n": int(ok.sum())})


def cell_probes(cell_features: np.ndarray, y_idx: np.ndarray, splits, n_classes: int, cfg: ProbeConfig, base: dict) -> list[dict]:
    """One probe per grid cell: AUC with a 95% CI, the within-fold permutation test of "above
    chance", and Holm's correction over the cells (pipeline/analysis/probe_stats.py)."""
    n_cells = cell_features.shape[1]
    grid = int(round(n_cells**0.5))
    rows = []
    for c in range(n_cells):
        x = cell_features[:, c, :]
        if _constant(x):
            metrics = {"auc": 0.5, "auc_lo": 0.5, "auc_hi": 0.5, "balanced_accuracy": 1.0 / n_classes, "z": 0.0, "p_value": 1.0}
        else:
            proba = oof_proba(x, y_idx, splits, n_classes, cfg)
            auc, lo, hi = macro_auc_ci(y_idx, proba)
            z, p = within_fold_test(y_idx, proba, splits)
            metrics = {"auc": auc, "auc_lo": lo, "auc_hi": hi, "balanced_accuracy": float(balanced_accuracy_score(y_idx, proba.argmax(1))),
                       "z": z, "p_value": p}
        rows.append({**base, "cell_row": c // grid, "cell_col": c % grid, "chance": 1.0 / n_classes, **metrics})
    adjusted = holm(np.array([r["p_value"] for r in rows], np.float64))
    for r, q in zip(rows, adjusted):
        r["p_holm"] = None if math.isnan(q) else float(q)
        r["significant"] = bool(q <= cfg.alpha) if not math.isnan(q) else False
    return rows


def format_map(cells: pd.DataFrame) -> str:
    """The 7x7 identifiability map per target as text, showing a cell's AUC only where it differs
    from chance after Holm's correction (``significant``); '.' elsewhere, so noise is not read."""
    lines = []
    for target, t in cells.groupby("target", sort=True):
        grid = int(t.cell_row.max()) + 1
        shown = {(int(r.cell_row), int(r.cell_col)): r.auc for r in t.itertuples() if r.significant}
        lines.append(f"identifiability map, target {target}: AUC where above chance (Holm, 49 cells), '.' elsewhere; "
                     f"{len(shown)} of {len(t)} cells")
        lines += ["   " + " ".join(f"{shown[(i, j)]:5.2f}" if (i, j) in shown else "    ." for j in range(grid)) for i in range(grid)]
    return "\n".join(lines)
