"""Everything the report reads from a run's stored outputs (nothing is recomputed from the maps
except for the handful of films it draws)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipeline.core.errors import ImageError, OutputError
from pipeline.inference.images import load_image
from pipeline.store.predictions import load_predictions
from pipeline.store.run_index import complete_runs
from pipeline.store.layout import OutputStore
from pipeline.io.location import InputOptions

TABLES = ("region_stats", "finding_summary", "metrics", "localization", "identifiability", "identifiability_map",
          "prevalence_confounding", "scorecard", "cell_separation")


@dataclass
class RunData:
    store: OutputStore
    model_version: str
    run: dict
    manifest: pd.DataFrame
    findings: tuple[str, ...]
    tables: dict[str, pd.DataFrame]
    previous: str | None = None  # previous complete run, if any
    drift: dict[str, pd.DataFrame] = field(default_factory=dict)
    drift_dir: str | None = None
    _maps = None
    _preds: pd.DataFrame | None = None
    _films: dict = field(default_factory=dict)
    inputs: InputOptions = InputOptions()  # the options the films are read with (never --out's)

    @property
    def out(self) -> str:
        return self.store.url

    @property
    def run_url(self) -> str:
        return self.store.run_dir(self.model_version)

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of the run's maps: the model's grid (7x7, or 16x16 for a 512-px ResNet)."""
        return tuple(int(n) for n in self.maps["cam"].shape[2:])

    def table(self, name: str) -> pd.DataFrame | None:
        return self.tables.get(name)

    @property
    def maps(self):
        if self._maps is None:
            self._maps = self.store.open_maps(self.store.maps(self.model_version))
        return self._maps

    @property
    def predictions(self) -> pd.DataFrame:
        if self._preds is None:
            self._preds = load_predictions(self.store, self.model_version)
        return self._preds

    def has_labels(self, finding: str) -> bool:
        return finding in self.manifest and self.manifest[finding].notna().any()

    def film(self, row: int) -> np.ndarray | None:
        """The uint8 224x224 grey crop the model saw, or None when the file cannot be read."""
        if row not in self._films:
            path = self.manifest.set_index("row").at[row, "path"] if "path" in self.manifest else None
            try:
                self._films[row] = load_image(path, storage_options=self.inputs.options_for(path)).pixels[:, :, 0] if path else None
            except ImageError:
                self._films[row] = None
        return self._films[row]

    def cams(self, rows: np.ndarray, k: int | None = None) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        order = np.argsort(rows)
        sel = (rows[order],) if k is None else (rows[order], k)
        got = self.maps["cam"].get_orthogonal_selection(sel)
        out = np.empty_like(got)
        out[order] = got
        return out


def load_run(out, model_version: str | None = None, storage_options: dict | None = None, inputs: InputOptions | None = None) -> RunData:
    """A run's stored outputs; out is an OutputStore, or a URL opened with storage_options. ``inputs``:
    the options its films are read with (the input options; default none)."""
    store = OutputStore.of(out, storage_options)
    runs = complete_runs(store)
    if model_version is None:
        if not runs:
            raise OutputError(f"no complete run under {store.runs_root}; run python -m jobs.score_dataset first")
        model_version = runs[-1]
    run = store.read_json(store.run_json(model_version))
    if run is None:
        raise OutputError(f"no run {model_version} under {store.runs_root} (python -m jobs.runs --out {store.url} lists them)")
    manifest = store.read_parquet(store.manifest).to_pandas()
    tables = {}
    for name in TABLES:
        url = store.table(model_version, name)
        if store.exists(url):
            tables[name] = store.read_parquet(url).to_pandas()
    findings = tuple(store.open_maps(store.maps(model_version)).attrs["findings"])
    data = RunData(store, model_version, run, manifest, findings, tables, inputs=inputs or InputOptions())
    earlier = runs[: runs.index(model_version)] if model_version in runs else runs
    if earlier:
        data.previous = earlier[-1]
        for name in ("finding_drift", "region_drift", "identifiability_drift"):
            url = store.drift_table(data.previous, model_version, name)
            if store.exists(url):
                data.drift[name] = store.read_parquet(url).to_pandas()
        data.drift_dir = store.drift_dir(data.previous, model_version) if data.drift else None
    return data
