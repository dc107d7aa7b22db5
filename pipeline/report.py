"""A short, readable summary of one run (printed at the end of the demo)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .maps_store import open_maps
from .storage import join, read_parquet, url_to_fs


def load_predictions(out: str, model_version: str) -> pd.DataFrame:
    fs, base = url_to_fs(join(out, "runs", model_version, "predictions"))
    parts = sorted(p for p in fs.glob(base + "/part-*.parquet"))
    frames = [read_parquet(fs.unstrip_protocol(p)).to_pandas() for p in parts]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def short_report(out: str, model_version: str, finding: str = "Pneumonia") -> str:
    manifest = read_parquet(join(out, "manifest.parquet")).to_pandas()
    preds = load_predictions(out, model_version)
    if preds.empty or finding not in preds:
        return "no predictions to summarise"
    df = preds.merge(manifest[["row", "view_position"]], on="row")
    lines = [f"mean P({finding}) by view: " + ", ".join(f"{v} {g[finding].mean():.3f} (n={len(g)})" for v, g in df.groupby("view_position"))]
    maps = open_maps(join(out, "runs", model_version, "maps.zarr"))
    k = list(maps.attrs["findings"]).index(finding)
    cam = maps["cam"]
    means = {}
    for view in ("AP", "PA"):
        rows = np.sort(df.loc[df.view_position == view, "row"].to_numpy())
        if len(rows):
            means[view] = np.nanmean(cam.get_orthogonal_selection((rows, k)), axis=0)
    if len(means) == 2:
        means["AP - PA"] = means["AP"] - means["PA"]
    for name, m in means.items():
        lines.append(f"mean ln(p_cell/p_baseline) for {finding}, {name} films (row 0 = top of film):")
        lines += ["   " + " ".join(f"{v:+6.2f}" for v in r) for r in m]
    if "AP - PA" in means:
        i, j = np.unravel_index(np.argmax(means["AP - PA"]), means["AP - PA"].shape)
        lines.append(f"largest AP - PA difference at cell ({i}, {j}); region tables: {out}/runs/{model_version}/region_stats.parquet")
    return "\n".join(lines)
