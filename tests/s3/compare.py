"""Read a run's outputs wherever they are (local folder or S3 prefix) to compare two runs."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pyarrow.parquet as pq
import zarr


def run_folder(out: str, options: dict | None = None) -> str:
    with fsspec.open(f"{out}/latest.json", "rb", **(options or {})) as f:
        return f"{out}/{json.loads(f.read())['run']}"


def predictions(out: str, options: dict | None = None):
    fs, path = fsspec.core.url_to_fs(f"{run_folder(out, options)}/predictions", **(options or {}))
    parts = sorted(fs.glob(f"{path}/*.parquet"))
    return pq.read_table(parts, filesystem=fs).sort_by("row")


def maps(out: str, options: dict | None = None) -> dict[str, np.ndarray]:
    g = zarr.open_group(f"{run_folder(out, options)}/maps.zarr", mode="r", storage_options=options or None)
    return {name: arr[:] for name, arr in g.arrays()}


def assert_same_outputs(out: str, options: dict | None, ref: str, ref_options: dict | None = None) -> None:
    """Predictions and every map array bit-identical (rows in order, each once)."""
    got, want = predictions(out, options), predictions(ref, ref_options)
    assert got.column("row").to_pylist() == list(range(want.num_rows))
    assert got.equals(want)
    got_maps, want_maps = maps(out, options), maps(ref, ref_options)
    assert sorted(got_maps) == sorted(want_maps) and "cam" in got_maps
    for name, arr in want_maps.items():
        np.testing.assert_array_equal(got_maps[name], arr, err_msg=name)


def objects(fs, prefix: str) -> dict[str, str]:
    """Every object under prefix with its ETag (what changed, what was added)."""
    fs.invalidate_cache()
    return {p: str(info.get("ETag")) for p, info in fs.find(prefix, detail=True).items()}
