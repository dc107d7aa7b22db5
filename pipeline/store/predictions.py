"""Reading a run's predictions back (the HTML report itself lives in pipeline/reporting/)."""

from __future__ import annotations

import posixpath

import pandas as pd

from pipeline.store.layout import OutputStore


def load_predictions(out, model_version: str, storage_options: dict | None = None) -> pd.DataFrame:
    store = OutputStore.of(out, storage_options)
    fs, pattern = store.fs(store.parts_glob(model_version))
    parts = sorted(p for p in fs.glob(pattern) if posixpath.basename(p).startswith("part-"))
    frames = [store.read_parquet(fs.unstrip_protocol(p)).to_pandas() for p in parts]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
