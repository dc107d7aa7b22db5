"""The per-cell probes of the identifiability map as independent tasks, one per grid cell, each a
closed-form ridge fit for every target and fold that shares one Gram matrix.

A cell's probe is a one-vs-rest ridge regression on standardised features with an unpenalised
intercept (the estimator of ``identifiability._ridge``, exactly; the tests compare the two to 1e-8).
Standardising with a fold's training mean ``mu`` and SD ``s`` makes the fold's normal equations
``(R + lam I) v = S^-1 (X_tr - mu)^T (Y_tr - ybar)`` with ``R = S^-1 (G_tr - n mu mu^T) S^-1``,
so everything a fold needs comes from the uncentred Gram ``G_tr = X_tr^T X_tr``, and
``G_tr = G_all - G_unused - G_test``: one D x D Gram per cell, a downdate per fold (the fold's
test rows) and one Cholesky solve, whatever the number of targets or classes (more classes are more
right-hand sides). Where a fold trains on fewer rows than features the dual form
``v = Z^T (Z Z^T + lam I)^-1 (Y - ybar)`` is cheaper and gives the same fit.

``fit_cell`` is a plain function of one cell's features and the targets' labels and folds, so the
49 cells can run anywhere ``map_fn`` sends them (in process by default; a Dask client's map on a
cluster).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import cho_factor, cho_solve

from pipeline.analysis.probe_stats import within_fold_auc, within_fold_test

# Below this share of its mean square a training column counts as constant (a dead ReLU unit in
# that fold): the Gram downdate leaves round-off where a direct np.std gives 0.
_CONSTANT_REL = 1e-12


@dataclass(frozen=True, eq=False)
class CellTarget:
    """One target over the cell sample: ``y[i]`` its class index and ``fold[i]`` the test fold of
    sample row i (-1: row not used for this target). eq=False: hashed by identity, arrays inside."""

    name: str
    y: np.ndarray  # int64, -1 where unused
    fold: np.ndarray  # int64, -1 where unused
    n_classes: int

    def __repr__(self) -> str:
        return f"CellTarget({self.name!r}, n={int((self.fold >= 0).sum())}, classes={self.n_classes}, folds={int(self.fold.max()) + 1})"

    @property
    def used(self) -> np.ndarray:
        return self.fold >= 0

    def splits(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(train, test) positions within the used rows, in fold order."""
        f = self.fold[self.used]
        return [(np.flatnonzero(f != k), np.flatnonzero(f == k)) for k in range(int(f.max()) + 1)]


def ridge_oof(x: np.ndarray, targets: tuple[CellTarget, ...], lam: float) -> list[np.ndarray]:
    """Out-of-fold ridge scores, one (n_used, K) array per target, for one cell's features x (n, D).
    Targets with the same folds (the same rows in each training set) share each fold's
    factorisation: their one-hot labels are right-hand sides of one solve."""
    x = np.asarray(x, np.float64)
    d = x.shape[1]
    shared: dict[bytes, list[int]] = {}
    for i, t in enumerate(targets):
        shared.setdefault(t.fold.tobytes(), []).append(i)
    gram_all = sum_all = None
    out: list[np.ndarray | None] = [None] * len(targets)
    for members in shared.values():
        fold = targets[members[0]].fold
        used = fold >= 0
        xu, fu = x[used], fold[used]
        yu = np.concatenate([np.eye(targets[i].n_classes)[targets[i].y[used]] for i in members], axis=1)
        if (~used).sum() < used.sum():  # the Gram of the used rows as a downdate of the Gram of all
            if gram_all is None:
                gram_all, sum_all = x.T @ x, x.sum(0)
            xn = x[~used]
            base_g, base_s = gram_all - xn.T @ xn, sum_all - xn.sum(0)
        else:
            base_g, base_s = xu.T @ xu, xu.sum(0)
        base_xy, base_y = xu.T @ yu, yu.sum(0)
        scores = np.zeros(yu.shape)
        for k in range(int(fu.max()) + 1):
            test = fu == k
            xt, yt = xu[test], yu[test]
            n_tr = len(xu) - len(xt)
            if n_tr < d:
                scores[test] = _dual_fold(xu[~test], yu[~test], xt, lam)
                continue
            mu = (base_s - xt.sum(0)) / n_tr
            ybar = (base_y - yt.sum(0)) / n_tr
            cov = base_g - xt.T @ xt - n_tr * np.outer(mu, mu)  # centred scatter of the training rows
            sd = _safe_sd(np.diag(cov), mu, n_tr)
            r = cov / np.outer(sd, sd)
            rhs = ((base_xy - xt.T @ yt) - n_tr * np.outer(mu, ybar)) / sd[:, None]
            r[np.diag_indices(d)] += lam
            v = cho_solve(cho_factor(r, overwrite_a=True, check_finite=False), rhs, check_finite=False)
            scores[test] = ybar + ((xt - mu) / sd) @ v
        col = 0
        for i in members:
            out[i] = scores[:, col:col + targets[i].n_classes]
            col += targets[i].n_classes
    return out


def _safe_sd(var: np.ndarray, mu: np.ndarray, n_tr: int) -> np.ndarray:
    """Training SDs (ddof 0) from the centred scatter's diagonal; constant columns get 1."""
    mean_sq = var / n_tr + mu**2
    var = np.where(var <= _CONSTANT_REL * n_tr * mean_sq, 0.0, var)
    sd = np.sqrt(np.maximum(var, 0.0) / n_tr)
    sd[sd == 0] = 1.0
    return sd


def _dual_fold(xtr: np.ndarray, ytr: np.ndarray, xt: np.ndarray, lam: float) -> np.ndarray:
    mu, sd = xtr.mean(0), xtr.std(0)
    sd[sd == 0] = 1.0
    ybar = ytr.mean(0)
    z = (xtr - mu) / sd
    kern = z @ z.T
    kern[np.diag_indices(len(z))] += lam
    alpha = cho_solve(cho_factor(kern, check_finite=False), ytr - ybar, check_finite=False)
    return ybar + ((xt - mu) / sd) @ (z.T @ alpha)


def cell_metrics(y_idx: np.ndarray, scores: np.ndarray, splits) -> dict:
    """AUC with its CI, balanced accuracy and the within-fold permutation test of one cell's scores."""
    from sklearn.metrics import balanced_accuracy_score  # here, as in identifiability: sklearn's import is ~1.5 s

    auc, lo, hi = within_fold_auc(y_idx, scores, splits)  # 0.5 at chance, as the map's test
    z, p = within_fold_test(y_idx, scores, splits)
    return {"auc": auc, "auc_lo": lo, "auc_hi": hi, "balanced_accuracy": float(balanced_accuracy_score(y_idx, scores.argmax(1))),
            "z": z, "p_value": p}


def constant_metrics(n_classes: int) -> dict:
    """A cell whose features never vary holds nothing: chance, and p = 1."""
    return {"auc": 0.5, "auc_lo": 0.5, "auc_hi": 0.5, "balanced_accuracy": 1.0 / n_classes, "z": 0.0, "p_value": 1.0}


def fit_cell(x: np.ndarray, targets: tuple[CellTarget, ...], lam: float) -> list[dict]:
    """One grid cell: its features x (n, D) over the cell sample -> one metrics dict per target."""
    x = np.asarray(x)
    if bool(np.all(np.nanstd(x.astype(np.float32), axis=0) == 0)):
        return [constant_metrics(t.n_classes) for t in targets]
    return [cell_metrics(t.y[t.used], s, t.splits()) for t, s in zip(targets, ridge_oof(x, targets, lam))]
