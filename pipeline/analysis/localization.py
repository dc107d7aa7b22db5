"""Expert boxes (NIH BBox_List_2017) projected onto the 7x7 grid through the exact preprocessing.

A box in original pixels goes through Resize(224) (shorter side to 224, torchvision's rounding) and
CenterCrop(224); each grid cell's coverage is the fraction of its area inside the projected box.
"""

from __future__ import annotations

import io

import fsspec
import numpy as np
import pandas as pd

from pipeline.analysis.settings import AggregateConfig

BBOX_LABELS = {"Infiltrate": "Infiltration"}


def resized_size(width: int, height: int, size: int = 224) -> tuple[int, int]:
    """torchvision Resize(size) output (width, height) for a PIL image."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def box_coverage(box: tuple[float, float, float, float], width: int, height: int, size: int = 224, grid: int = 7) -> np.ndarray:
    """(grid, grid) coverage in [0, 1] of each cell by the box (x, y, w, h) in original pixels."""
    x, y, w, h = box
    new_w, new_h = resized_size(width, height, size)
    sx, sy = new_w / width, new_h / height
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    x0, x1 = np.clip([x * sx - left, (x + w) * sx - left], 0, size)
    y0, y1 = np.clip([y * sy - top, (y + h) * sy - top], 0, size)
    edges = np.arange(grid + 1) * (size / grid)
    cell = size / grid
    ox = np.clip(np.minimum(x1, edges[1:]) - np.maximum(x0, edges[:-1]), 0, None) / cell
    oy = np.clip(np.minimum(y1, edges[1:]) - np.maximum(y0, edges[:-1]), 0, None) / cell
    return np.outer(oy, ox)


def read_bbox_list(url: str, storage_options: dict | None = None) -> pd.DataFrame:
    """image_id, finding, x, y, w, h from BBox_List_2017.csv (its three trailing empty columns ignored),
    opened with the input options."""
    with fsspec.open(url, "rb", compression="infer", **(storage_options or {})) as f:
        raw = pd.read_csv(io.BytesIO(f.read()))
    df = raw.iloc[:, :6].copy()
    df.columns = ["image_id", "finding", "x", "y", "w", "h"]
    df["finding"] = df["finding"].replace(BBOX_LABELS)
    return df


def box_scores(cam: np.ndarray, coverage: np.ndarray) -> tuple[float, bool, float, float]:
    """For one finding's (7, 7) map: (share of positive evidence in box, pointing-game hit,
    chance share (box area / crop), chance of a random cell hitting the box)."""
    pos = np.maximum(cam, 0)
    total = pos.sum()
    share = float((pos * coverage).sum() / total) if total > 0 else np.nan
    hit = bool(coverage.flat[int(np.argmax(cam))] > 0)
    return share, hit, float(coverage.mean()), float((coverage > 0).mean())


def bootstrap_ci(values: np.ndarray, n_boot: int = AggregateConfig.n_boot, seed: int = 0) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    v = v[~np.isnan(v)]
    if len(v) < 2:
        return np.nan, np.nan
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))
