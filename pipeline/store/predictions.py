"""Reading a run's predictions back (the HTML report itself lives in pipeline/reporting/)."""

from __future__ import annotations

import pandas as pd

from pipeline.store.storage import join, read_parquet, url_to_fs


def load_predictions(out: str, model_version: str) -> pd.DataFrame:
    fs, base = url_to_fs(join(out, "runs", model_version, "predictions"))
    parts = sorted(p for p in fs.glob(base + "/part-*.parquet"))
    frames = [read_parquet(fs.unstrip_protocol(p)).to_pandas() for p in parts]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

