"""Mergeable per-cell statistics of the maps, per finding and stratum.

A ``RegionAccumulator`` holds, for every stratum value and finding and cell: count, sum, sum of
squares, min, max, count of map > 0, sum of max(map, 0), sum and sum of |.| of the exact
contribution, a fixed-bin histogram of the map, and the sum of squares of each image's "this cell
minus the mean of its other cells" (for the CI of a cell against the rest). ``a + b`` merges two,
so the dataset result is a tree reduction over shards and does not depend on how rows were split or
ordered.

CIs of the "top cell" claims come from these sums alone (95%, normal approximation):
- a cell's mean: mean +- 1.96 sd / sqrt(n);
- a cell against the rest of the film: the per-image difference d = v_c - mean of the other 48 cells
  is paired within an image, so its variance is (sum d^2 - n mean(d)^2) / (n - 1), from ``dev_sq``;
- a cell between two strata (AP vs PA): independent groups, Welch's standard error
  sqrt(s_a^2 / n_a + s_b^2 / n_b).

Quantiles come from the histogram (bins of 0.02 on [-16, 8]; values outside are clamped to the edge
bins): each reported quantile is the midpoint of the bin holding numpy's ``inverted_cdf`` quantile,
hence within 0.01 of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

HIST_LO, HIST_HI, HIST_W = -16.0, 8.0, 0.02
N_BINS = int(round((HIST_HI - HIST_LO) / HIST_W))
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass
class CellStats:
    """Statistics of one stratum value: arrays of shape (F, C) (hist: (F, C, N_BINS))."""

    count: np.ndarray
    total: np.ndarray
    total_sq: np.ndarray
    vmin: np.ndarray
    vmax: np.ndarray
    n_pos: np.ndarray
    pos_part: np.ndarray
    contrib: np.ndarray
    abs_contrib: np.ndarray
    hist: np.ndarray
    dev_sq: np.ndarray  # sum over images of (v_c - mean of the image's other cells)^2

    @classmethod
    def empty(cls, f: int, c: int) -> "CellStats":
        z = lambda: np.zeros((f, c), np.float64)  # noqa: E731
        return cls(np.zeros((f, c), np.int64), z(), z(), np.full((f, c), np.inf), np.full((f, c), -np.inf),
                   np.zeros((f, c), np.int64), z(), z(), z(), np.zeros((f, c, N_BINS), np.int32), z())

    def __getstate__(self) -> dict:
        """Pickled (Dask moves accumulators between processes) with the histogram as its non-zero
        bins where that is smaller: a small run's 14 x 49 x 1,200 histogram is nearly all zeros, and
        sent dense every stratum value made a 40-film run's accumulator 164 MB on the wire."""
        state = dict(self.__dict__)
        nz = np.flatnonzero(self.hist)
        if 2 * nz.size < self.hist.size < 2**31:  # int32 index + int32 count per bin: smaller below half full
            state["hist"] = ("sparse", self.hist.shape, nz.astype(np.int32), self.hist.reshape(-1)[nz])
        return state

    def __setstate__(self, state: dict) -> None:
        hist = state["hist"]
        if isinstance(hist, tuple):
            _, shape, nz, values = hist
            dense = np.zeros(shape, np.int32)
            dense.reshape(-1)[nz] = values
            state = {**state, "hist": dense}
        self.__dict__.update(state)

    def __add__(self, o: "CellStats") -> "CellStats":
        return CellStats(self.count + o.count, self.total + o.total, self.total_sq + o.total_sq,
                         np.minimum(self.vmin, o.vmin), np.maximum(self.vmax, o.vmax), self.n_pos + o.n_pos,
                         self.pos_part + o.pos_part, self.contrib + o.contrib, self.abs_contrib + o.abs_contrib,
                         self.hist + o.hist, self.dev_sq + o.dev_sq)

    def __iadd__(self, o: "CellStats") -> "CellStats":
        """In place, the same additions as ``+`` (bit-identical): a fold over a run's chunks holds
        one accumulator, not a fresh copy per chunk (each is ~3.3 MB of histogram per stratum value)."""
        for k in ("count", "total", "total_sq", "n_pos", "pos_part", "contrib", "abs_contrib", "hist", "dev_sq"):
            np.add(getattr(self, k), getattr(o, k), out=getattr(self, k))
        np.minimum(self.vmin, o.vmin, out=self.vmin)
        np.maximum(self.vmax, o.vmax, out=self.vmax)
        return self


@dataclass
class RegionAccumulator:
    """{(stratum, value): CellStats}. Mergeable with +; the empty accumulator is the identity."""

    n_findings: int
    n_cells: int
    stats: dict[tuple[str, str], CellStats] = field(default_factory=dict)

    def __add__(self, other: "RegionAccumulator") -> "RegionAccumulator":
        out = dict(self.stats)
        for k, v in other.stats.items():
            out[k] = out[k] + v if k in out else v
        return RegionAccumulator(self.n_findings, self.n_cells, out)

    def absorb(self, other: "RegionAccumulator") -> "RegionAccumulator":
        """``self + other`` in place (bit-identical): other's statistics are added into self's or taken
        over, so call it only with an ``other`` nobody else uses afterwards."""
        for k, v in other.stats.items():
            if k in self.stats:
                self.stats[k] += v
            else:
                self.stats[k] = v
        return self

    def update(self, key: tuple[str, str], weight: np.ndarray, cam: np.ndarray, contrib: np.ndarray) -> None:
        """Add rows where weight (n, F) is True: cam and contrib are (n, F, C), float64 preferably
        (converted per finding otherwise). The key's statistics are updated in place (a histogram
        is 14 x 49 x 1,200 counts: a fresh one per call cost more than the data), so call it on an
        accumulator of your own, before merging."""
        if not weight.any():
            return
        F, C = self.n_findings, self.n_cells
        s = self.stats.get(key)
        if s is None:
            s = self.stats[key] = CellStats.empty(F, C)
        flats = []
        for f in np.flatnonzero(weight.any(axis=0)):
            rows = weight[:, f]
            v = cam[rows, f]  # (m, C); fancy indexing copies
            c = contrib[rows, f]
            v = v if v.dtype == np.float64 else v.astype(np.float64)
            c = c if c.dtype == np.float64 else c.astype(np.float64)
            s.count[f] += v.shape[0]
            s.total[f] += v.sum(0)
            s.total_sq[f] += (v * v).sum(0)
            s.vmin[f] = np.minimum(s.vmin[f], v.min(0))
            s.vmax[f] = np.maximum(s.vmax[f], v.max(0))
            s.n_pos[f] += (v > 0).sum(0)
            s.pos_part[f] += np.maximum(v, 0).sum(0)
            s.contrib[f] += c.sum(0)
            s.abs_contrib[f] += np.abs(c).sum(0)
            d = v - (v.sum(1, keepdims=True) - v) / max(C - 1, 1)
            s.dev_sq[f] += (d * d).sum(0)
            bins = np.clip(((v - HIST_LO) / HIST_W).astype(np.int64), 0, N_BINS - 1)
            flats.append(((f * C + np.arange(C)) * N_BINS + bins).ravel())
        idx = np.concatenate(flats)
        hist = s.hist.reshape(-1)  # a view: the array is contiguous
        if idx.size * 16 < hist.size:  # few rows: scatter; many: one pass over every bin
            np.add.at(hist, idx, 1)
        else:
            hist += np.bincount(idx, minlength=hist.size).astype(np.int32)


def hist_quantiles(hist: np.ndarray, qs=QUANTILES) -> np.ndarray:
    """(..., N_BINS) counts -> (..., len(qs)) inverted-CDF quantiles at bin midpoints."""
    lead = hist.shape[:-1]
    cum = np.cumsum(hist.reshape(-1, N_BINS), axis=-1, dtype=np.int64)
    n = cum[:, -1]
    # Each row's running count, lifted above the previous row's: one sorted array, so the first bin
    # reaching each target is one binary search per row, not a pass over every bin per quantile.
    step = int(n.max(initial=0)) + 1
    base = np.arange(len(n), dtype=np.int64)
    flat = (cum + (base * step)[:, None]).ravel()
    out = []
    for q in qs:
        target = np.maximum(np.ceil(q * n), 1).astype(np.int64)  # inverted_cdf: smallest x with F(x) >= q
        idx = np.searchsorted(flat, target + base * step, side="left") - base * N_BINS
        out.append(HIST_LO + (np.minimum(idx, N_BINS - 1) + 0.5) * HIST_W)
    res = np.stack(out, axis=-1)
    res[n == 0] = np.nan
    return res.reshape(*lead, len(qs))


Z95 = 1.959963984540054


def _mean_var(s: CellStats, f: int) -> tuple[int, np.ndarray, np.ndarray]:
    n = int(s.count[f, 0])
    mean = s.total[f] / max(n, 1)
    var = (s.total_sq[f] - n * mean**2) / (n - 1) if n > 1 else np.full_like(mean, np.nan)
    return n, mean, np.maximum(var, 0)


def mean_ci(s: CellStats, f: int) -> tuple[np.ndarray, np.ndarray]:
    """95% CI of each cell's mean map value, finding f."""
    n, mean, var = _mean_var(s, f)
    half = Z95 * np.sqrt(var / max(n, 1))
    return mean - half, mean + half


def cell_vs_rest(s: CellStats, f: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(difference, lo, hi) per cell: its mean minus the mean of the other cells, paired per image."""
    n, mean, _ = _mean_var(s, f)
    c = mean.shape[0]
    diff = mean - (mean.sum() - mean) / max(c - 1, 1)
    var = (s.dev_sq[f] - n * diff**2) / (n - 1) if n > 1 else np.full_like(diff, np.nan)
    half = Z95 * np.sqrt(np.maximum(var, 0) / max(n, 1))
    return diff, diff - half, diff + half


def stratum_difference(a: CellStats, b: CellStats, f: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean_a - mean_b, lo, hi) per cell, Welch's standard error (two independent groups)."""
    na, ma, va = _mean_var(a, f)
    nb, mb, vb = _mean_var(b, f)
    half = Z95 * np.sqrt(va / max(na, 1) + vb / max(nb, 1))
    return ma - mb, ma - mb - half, ma - mb + half
