"""One film and its maps as a PNG, for looking at a single case."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.core.errors import ConfigError
from pipeline.reporting.figures import film_sheet
from pipeline.reporting.data import load_run


def write_film_png(out, image_id: str, finding: str | None = None, model_version: str | None = None, path: str | None = None,
                   storage_options: dict | None = None, inputs=None) -> str:
    data = load_run(out, model_version, storage_options, inputs)
    m = data.manifest
    hit = m[m.image_id == image_id]
    if hit.empty:
        raise ConfigError(f"--film {image_id}: no such image_id in {data.store.manifest}")
    r = hit.iloc[0]
    if finding is not None and finding not in data.findings:
        raise ConfigError(f"--finding {finding}: not one of the run's findings {list(data.findings)}")
    names = [finding] if finding else list(data.findings)
    cams = data.cams(np.array([int(r.row)]))[0]  # (F, 7, 7)
    if not np.isfinite(cams).any():
        raise ConfigError(f"--film {image_id}: it was not scored in run {data.model_version} (see errors.parquet)")
    preds = data.predictions.set_index("row")
    probs = [float(preds.at[int(r.row), n]) if int(r.row) in preds.index else None for n in names]
    maps = np.stack([cams[data.findings.index(n)] for n in names])
    title = film_title(r, data.findings, any(data.has_labels(f) for f in data.findings), data.model_version)
    png = film_sheet(data.film(int(r.row)), maps, names, probs, title)
    stem = image_id.rsplit(".", 1)[0] + (f"-{finding}" if finding else "")
    path = path or data.store.film(data.model_version, stem)
    data.store.write_bytes(path, png)
    return path


def film_title(r: pd.Series, findings, labelled: bool, model_version: str) -> str:
    """The sheet's title: id, view, site and the film's positive labels (its manifest row ``r``;
    labels are nullable booleans, so a True is numpy's or pandas', not Python's ``True``)."""
    labels = [n for n in findings if n in r.index and pd.notna(r[n]) and bool(r[n])] if labelled else None
    return (f"{r['image_id']} · {r.get('view_position') or '?'} · {r.get('site')} · "
            f"labels: {'unlabelled' if labels is None else ', '.join(labels) or 'none'} · run {model_version}")
