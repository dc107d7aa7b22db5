"""Issue 14: the per-cell probes as shared-Gram ridge tasks. The fast fit is the fold-by-fold ridge
to round-off; it stays close to the logistic probe it replaced; multi-class targets get a map; the
cells run through any map function."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest

from pipeline.analysis.cell_fits import CellTarget, fit_cell, ridge_oof
from pipeline.analysis.identifiability import ProbeConfig, _ridge, run_probes


def _fold_by_fold(x, t: CellTarget, lam):
    xu, yu = x[t.used].astype(np.float32), t.y[t.used]
    ref = np.zeros((len(yu), t.n_classes))
    for train, test in t.splits():
        classes, score, _ = _ridge(xu[train], yu[train], lam)
        ref[test[:, None], classes[None, :]] = score(xu[test])
    return ref


@pytest.mark.parametrize("n, d, k", [(300, 40, 2), (150, 200, 3), (400, 30, 6)])  # primal; dual (train rows < features); 6 classes
def test_shared_gram_ridge_is_the_fold_by_fold_ridge(n, d, k):
    rng = np.random.default_rng(n)
    x = np.maximum(rng.normal(size=(n, d)), 0).astype(np.float16)
    x[:, 1] = 0  # a dead unit
    x[: n // 2, 2] = 1  # a unit constant in some folds' training rows
    y, fold = rng.integers(0, k, n), rng.integers(0, 5, n)
    fold[:9] = -1  # rows a target does not use (missing label, dropped class)
    fold2 = np.where(np.arange(n) < n // 2 + 5, rng.integers(0, 5, n), -1)  # a target on about half the rows
    targets = (CellTarget("a", np.where(fold >= 0, y, -1), fold, k), CellTarget("b", np.where(fold2 >= 0, y % 2, -1), fold2, 2),
               CellTarget("c", np.where(fold >= 0, (y + 1) % 2, -1), fold, 2))  # shares a's folds, so a's solves
    for lam in (1.0, 4.0):
        for t, fast in zip(targets, ridge_oof(x, targets, lam)):
            np.testing.assert_allclose(fast, _fold_by_fold(x, t, lam), rtol=0, atol=1e-8)


def _planted(seed: int, n: int = 240, cells: int = 9, dim: int = 8, k: int = 2, shift: float = 1.0):
    """n films of n/2 patients; cell 0's first feature carries the class (k classes) of each patient."""
    rng = np.random.default_rng(seed)
    patient = np.arange(n) // 2
    y = rng.integers(0, k, n // 2)[patient]
    x = np.maximum(rng.normal(size=(n, cells, dim)), 0)
    x[:, 0, 0] += shift * y
    m = pd.DataFrame({"row": np.arange(n), "patient_id": patient.astype(str), "label": y.astype(str)})
    return m, x.astype(np.float16)


def test_ridge_map_agrees_with_the_logistic_map():
    # the estimator change of the fast path: the same cells flagged, AUCs within 0.03 (measured
    # gaps on real films and at the production sample size: README "Hospital identifiability")
    gaps, flags = [], []
    for seed in range(3):
        m, x = _planted(seed)
        maps = {}
        for probe in ("ridge", "logistic"):
            _, cells, _ = run_probes(m, m.row.to_numpy(), {}, x, ProbeConfig(targets=("label",), seed=seed, cell_probe=probe))
            maps[probe] = pd.DataFrame(cells).sort_values(["cell_row", "cell_col"])
        gaps.append(np.abs(maps["ridge"].auc.to_numpy() - maps["logistic"].auc.to_numpy()))
        flags.append((maps["ridge"].significant.to_numpy(), maps["logistic"].significant.to_numpy()))
        assert maps["ridge"].probe.iloc[0] == "ridge(lam=16)" and maps["logistic"].probe.iloc[0] == "logistic"
    gaps = np.concatenate(gaps)
    assert np.median(gaps) <= 0.01 and gaps.max() <= 0.03, (np.median(gaps), gaps.max())
    for ridge, logistic in flags:
        assert ridge[0] and logistic[0]
        assert (ridge != logistic).sum() <= 1


def test_a_ten_class_target_gets_a_map_with_the_same_statistics():
    hits, others = 0, 0
    for seed in range(4):
        m, x = _planted(10 + seed, n=400, k=10, shift=1.5)
        summary, cells, _ = run_probes(m, m.row.to_numpy(), {}, x, ProbeConfig(targets=("label",), seed=seed))
        t = pd.DataFrame(cells).set_index(["cell_row", "cell_col"])
        assert len(t) == 9 and (t.chance == 0.1).all() and t.n.iloc[0] == 400
        assert ((t.auc_lo <= t.auc.clip(lower=0.5)) & (t.auc.clip(lower=0.5) <= t.auc_hi) & (t.auc_lo >= 0.5)).all()  # CI bounded at chance and t.p_value.between(0, 1).all()
        hits += bool(t.loc[(0, 0), "significant"])
        others += int(t.significant.sum()) - bool(t.loc[(0, 0), "significant"])
    assert hits == 4 and others <= 1


def test_age_band_has_a_map():
    m, x = _planted(3, n=300)
    m["age"], m["image_id"] = np.random.default_rng(0).integers(1, 95, len(m)), [f"{i}.png" for i in range(len(m))]
    summary, cells, _ = run_probes(m, m.row.to_numpy(), {"embedding": x[:, 0].astype(np.float32)}, x, ProbeConfig(targets=("age_band",)))
    assert {r["target"] for r in cells} == {"age_band"} and len(cells) == 9
    assert not any("no per-cell map" in (r.get("notes") or "") for r in summary)


def test_cells_run_as_independent_tasks_through_map_fn():
    m, x = _planted(7, k=3)
    cfg = ProbeConfig(targets=("label",))
    calls = []

    def threads(fn, items):
        items = list(items)
        calls.append(len(items))
        with ThreadPoolExecutor(2) as pool:
            return list(pool.map(fn, items))

    _, default, _ = run_probes(m, m.row.to_numpy(), {}, x, cfg)
    _, mapped, _ = run_probes(m, m.row.to_numpy(), {}, x, cfg, map_fn=threads)
    assert calls == [9] and pd.DataFrame(mapped).equals(pd.DataFrame(default))
    # a task is a plain function of one cell's features: the same result when called alone
    _, cells, _ = run_probes(m, m.row.to_numpy(), {}, x[:, :1], cfg)
    from pipeline.analysis.identifiability import cell_target

    t = cell_target("label", m.label, m.patient_id, cfg)
    alone = fit_cell(x[:, 0], (t,), cfg.cell_ridge)[0]
    assert alone["auc"] == pytest.approx(cells[0]["auc"], abs=1e-12) and alone["p_value"] == pytest.approx(cells[0]["p_value"], abs=1e-12)
