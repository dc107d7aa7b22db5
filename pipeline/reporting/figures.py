"""matplotlib figures (Agg canvas, no pyplot state): 7x7 grids over films, identifiability maps,
examples in the seed's style (map over the 224x224 crop, values in the cells), single-film sheets."""

from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

CMAP = "RdBu_r"  # diverging: blue = evidence against, red = evidence for, white = 0
ALPHA = 0.55
CROP = 224


def new_figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), dpi=80)
    FigureCanvasAgg(fig)
    return fig


def to_png(fig: Figure, dpi: int = 80) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.1)  # legends never clipped
    return buf.getvalue()


def symmetric_limit(arrays, floor: float = 0.05) -> float:
    vals = np.concatenate([np.abs(np.asarray(a, float)).ravel() for a in arrays]) if arrays else np.zeros(1)
    vals = vals[np.isfinite(vals)]
    return max(floor, float(np.max(vals))) if len(vals) else 1.0


# Values are written in the cells of grids up to this size; a 16x16 grid's 256 labels would overlap
# (its colours say the same, the tables hold the numbers).
MAX_LABELLED_GRID = 8


def _background(ax, film: np.ndarray | None, grid: int) -> None:
    if film is not None:
        ax.imshow(film, cmap="gray", vmin=0, vmax=255, extent=(0, grid, grid, 0), interpolation="bilinear")
    else:
        ax.add_patch(Rectangle((0, 0), grid, grid, color="0.85"))


def overlay(ax, film: np.ndarray | None, grid_values: np.ndarray, vmax: float, values: bool = False, fontsize: float = 7) -> object:
    """Film under its map (7x7, 16x16: the model's grid), each cell a block of the crop (nearest upsampling)."""
    g = grid_values.shape[0]
    _background(ax, film, g)
    im = ax.imshow(np.ma.masked_invalid(grid_values), cmap=CMAP, norm=Normalize(-vmax, vmax), alpha=ALPHA,
                   extent=(0, g, g, 0), interpolation="nearest")
    if values and g <= MAX_LABELLED_GRID:
        for (i, j), v in np.ndenumerate(grid_values):
            if np.isfinite(v):
                ax.text(j + 0.5, i + 0.5, f"{v:+.1f}", ha="center", va="center", fontsize=fontsize,
                        color="black", bbox={"boxstyle": "square,pad=0.05", "fc": "white", "ec": "none", "alpha": 0.5})
    ax.set_xlim(0, g)
    ax.set_ylim(g, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def ln_colorbar(fig: Figure, im, ax, vmax: float) -> None:
    """Legend in ln units and as the probability ratio p_cell / p_baseline."""
    ticks = np.linspace(-vmax, vmax, 5)
    cb = fig.colorbar(im, ax=ax, ticks=ticks, fraction=0.04, pad=0.02)
    cb.ax.set_yticklabels([f"{t:+.2f}  (×{math.exp(t):.2g})" for t in ticks], fontsize=7)
    cb.set_label("ln(p_cell / p_baseline)  (× probability ratio)", fontsize=7)


def _overlay_row(panels: list[tuple[str, np.ndarray | None, np.ndarray]], width: float, height: float, values: bool, fontsize: float) -> Figure:
    """One row of (title, film, 7x7 map) panels sharing a diverging colour scale and its legend."""
    vmax = symmetric_limit([p[2] for p in panels])
    fig = new_figure(width * len(panels) + 1.5, height)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    im = None
    for ax, (title, film, grid_values) in zip(axes, panels):
        im = overlay(ax, film, grid_values, vmax, values=values, fontsize=6)
        ax.set_title(title, fontsize=fontsize)
    ln_colorbar(fig, im, list(axes), vmax)
    return fig


def grid_figure(finding: str, panels: list[tuple[str, np.ndarray, np.ndarray | None]]) -> bytes:
    """7x7 mean maps of groups (title, values, mean film of the group) over their mean films."""
    fig = _overlay_row([(t, film, v) for t, v, film in panels], 1.9, 2.4, values=False, fontsize=8)
    fig.suptitle(f"{finding}: mean ln(p_cell / p_baseline)", fontsize=9, x=0.02, ha="left")
    return to_png(fig)


def identifiability_figure(panels: list[tuple[str, np.ndarray, np.ndarray | None]]) -> bytes:
    """Per target: 7x7 AUC of the single-cell probes; cells flagged significant get a black frame."""
    n = len(panels)
    fig = new_figure(2.6 * n + 1.2, 2.9)
    axes = fig.subplots(1, n, squeeze=False)[0]
    im = None
    for ax, (title, auc, significant) in zip(axes, panels):
        g = auc.shape[0]
        im = ax.imshow(np.ma.masked_invalid(auc), cmap="viridis", norm=Normalize(0.5, 1.0), extent=(0, g, g, 0), interpolation="nearest")
        for (i, j), v in np.ndenumerate(auc):
            if np.isfinite(v) and g <= MAX_LABELLED_GRID:
                ax.text(j + 0.5, i + 0.5, f"{v:.2f}"[1:] if v < 1 else "1.0", ha="center", va="center", fontsize=6,
                        color="white" if v < 0.8 else "black")
            if significant is not None and significant[i, j]:
                ax.add_patch(Rectangle((j + 0.04, i + 0.04), 0.92, 0.92, fill=False, ec="red", lw=1.6))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=7)
    cb = fig.colorbar(im, ax=list(axes), fraction=0.04, pad=0.02)
    cb.set_label("AUC of the cell's probe", fontsize=7)
    cb.ax.tick_params(labelsize=7)
    return to_png(fig)


def example_figure(examples: list[tuple[str, np.ndarray | None, np.ndarray]]) -> bytes:
    """Seed style: each film's 224x224 crop with its map over it and the ln values in the cells."""
    return to_png(_overlay_row(examples, 3.0, 3.5, values=True, fontsize=7), dpi=90)


def film_sheet(film: np.ndarray | None, maps: np.ndarray, names: list[str], probs: list[float | None], title: str) -> bytes:
    """The film, then one panel per finding (values in the cells), for looking at a single case."""
    n = len(names)
    cols = 1 + n if n <= 4 else 5
    rows = math.ceil((1 + n) / cols)
    vmax = symmetric_limit(list(maps))
    fig = new_figure(3.0 * cols + 1.2, 3.1 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    g = maps[0].shape[0] if len(maps) else 7  # the model's grid
    _background(axes[0], film, g)
    axes[0].set_xlim(0, g)
    axes[0].set_ylim(g, 0)
    axes[0].set_xticks([])
    axes[0].set_yticks([])
    axes[0].set_title("film (224x224 crop)" if film is not None else "film unreadable", fontsize=8)
    im = None
    for ax, name, values, p in zip(axes[1:], names, maps, probs):
        im = overlay(ax, film, values, vmax, values=True, fontsize=6)
        ax.set_title(name + ("" if p is None else f"  p={p:.3f}"), fontsize=8)
    for ax in axes[1 + n:]:
        ax.set_visible(False)
    ln_colorbar(fig, im, list(axes), vmax)
    fig.suptitle(title, fontsize=9, x=0.02, ha="left")
    return to_png(fig, dpi=90)


def discrimination_figure(finding: str, auc: np.ndarray, diff: np.ndarray, film: np.ndarray | None, n_pos: int, n_neg: int) -> bytes:
    """Where the evidence *discriminates*: per cell, the AUC of the cell's logit for the label (0.5 =
    the cell does not separate positives from negatives), and the mean map of positives minus that
    of negatives; each on its own scale centred at zero difference."""
    fig = new_figure(6.4, 2.9)
    axes = fig.subplots(1, 2, squeeze=False)[0]
    im = overlay(axes[0], film, auc - 0.5, 0.5, values=False)
    for (i, j), v in (np.ndenumerate(auc) if auc.shape[0] <= MAX_LABELLED_GRID else ()):
        if np.isfinite(v):
            axes[0].text(j + 0.5, i + 0.5, f"{v:.2f}"[1:] if v < 1 else "1.0", ha="center", va="center", fontsize=6)
    axes[0].set_title(f"AUC of each cell ({n_pos} pos, {n_neg} neg)", fontsize=8)
    cb = fig.colorbar(im, ax=axes[0], ticks=[-0.5, -0.25, 0, 0.25, 0.5], fraction=0.05, pad=0.02)
    cb.ax.set_yticklabels(["0", ".25", ".5", ".75", "1"], fontsize=7)
    vmax = symmetric_limit([diff])
    im2 = overlay(axes[1], film, diff, vmax, values=False)
    axes[1].set_title("mean map, positives − negatives", fontsize=8)
    cb2 = fig.colorbar(im2, ax=axes[1], fraction=0.05, pad=0.02)
    cb2.ax.tick_params(labelsize=7)
    cb2.set_label("Δ ln(p_cell / p_baseline)", fontsize=7)
    fig.suptitle(f"{finding}: where positives and negatives differ", fontsize=9, x=0.02, ha="left")
    return to_png(fig)
