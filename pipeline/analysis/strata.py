"""Strata: which (row, finding) pairs count towards each stratum value.

Stratum names: ``all``; ``label`` (the finding's own label: positive / negative); each ``--by``
column alone and crossed with the label (``view_position+label`` with values like ``AP|positive``);
``confidence`` (``top10%``: the finding's 10% most confident predictions).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.analysis.settings import DEFAULT_BY  # noqa: E402,F401 - one home for the default strata
LABEL_NAMES = {1: "positive", 0: "negative"}


@dataclass
class StrataContext:
    """Per-row arrays, indexed by position in ``rows`` (sorted manifest rows that were scored)."""

    rows: np.ndarray  # (N,) int64
    labels: np.ndarray  # (N, F) int8: 1, 0, -1 = not labelled
    top: np.ndarray  # (N, F) bool
    by: dict[str, np.ndarray]  # column -> (N,) object array of strings (None = missing)

    def slice(self, lo: int, hi: int) -> "StrataContext":
        return self.take(slice(lo, hi))

    def take(self, idx) -> "StrataContext":
        """The rows at ``idx`` (a slice or positions)."""
        return StrataContext(self.rows[idx], self.labels[idx], self.top[idx], {k: v[idx] for k, v in self.by.items()})


def age_band(age) -> str | None:
    if age is None or pd.isna(age):
        return None
    lo = int(age) // 10 * 10
    return f"{lo:02d}-{lo + 9:02d}"


def build_context(manifest: pd.DataFrame, preds: pd.DataFrame, findings: tuple[str, ...], by: tuple[str, ...], top_share: float = 0.1) -> StrataContext:
    df = preds[["row", *findings]].merge(manifest, on="row", how="left", suffixes=("", "_label")).sort_values("row")
    labels = np.full((len(df), len(findings)), -1, np.int8)
    top = np.zeros((len(df), len(findings)), bool)
    for k, f in enumerate(findings):
        lab = df[f + "_label"] if f + "_label" in df else pd.Series([None] * len(df))
        labels[:, k] = [(-1 if v is None or pd.isna(v) else int(bool(v))) for v in lab]
        p = df[f].to_numpy()
        if len(p):
            top[:, k] = p >= np.quantile(p, 1 - top_share, method="inverted_cdf")
    cols = {}
    for col in by:
        if col == "age_band":
            cols[col] = np.asarray([age_band(a) for a in df["age"]], dtype=object)
        elif col in df:
            cols[col] = np.asarray([None if v is None or pd.isna(v) else str(v) for v in df[col]], dtype=object)
        else:
            raise KeyError(col)
    return StrataContext(df["row"].to_numpy(np.int64), labels, top, cols)


def strata_weights(ctx: StrataContext, n_findings: int):
    """Yield ((stratum, value), weight (n, F) bool) for every stratum value present in ctx."""
    n = len(ctx.rows)
    yield ("all", "all"), np.ones((n, n_findings), bool)
    for code, name in LABEL_NAMES.items():
        yield ("label", name), ctx.labels == code
    yield ("confidence", "top10%"), ctx.top
    for col, values in ctx.by.items():
        for v in sorted({x for x in values if x is not None}):
            m = (values == v)[:, None]
            yield (col, v), np.broadcast_to(m, (n, n_findings))
            for code, name in LABEL_NAMES.items():
                yield (f"{col}+label", f"{v}|{name}"), m & (ctx.labels == code)
