"""Self-healing bookkeeping: run.json, latest.json and manifest.parquet that cannot be read are
rebuilt from what is on disk, or reported (exit 2) with the exact command that fixes them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.core.errors import OutputError
from pipeline.store.layout import OutputStore
from pipeline.store.storage import read_json_safe  # noqa: F401 - callers import it from here


class BookkeepingError(OutputError):
    """A bookkeeping file is unreadable and cannot be rebuilt; the message gives the fix."""


def previous_manifest(out, storage_options: dict | None = None) -> tuple[pa.Table | None, str | None]:
    """The stored manifest, or (None, why) when it is unreadable (rebuilt then checked by the caller)."""
    store = OutputStore.of(out, storage_options)
    if not store.exists(store.manifest):
        return None, None
    try:
        t = store.read_parquet(store.manifest)
        if not {"row", "image_id", "dataset"} <= set(t.column_names):
            raise ValueError("columns row, image_id, dataset missing")
        return t, None
    except Exception as e:  # noqa: BLE001 - any unreadable manifest is rebuilt the same way
        return None, f"{type(e).__name__}: {str(e)[:120]}"


def check_rebuilt_manifest(out, manifest: pa.Table, why: str, storage_options: dict | None = None) -> str:
    """A manifest rebuilt from the datasets must give every already scored row the image it had
    (rows index maps.zarr). Returns a note, or raises BookkeepingError with the fix."""
    store = OutputStore.of(out, storage_options)
    by_row = dict(zip(manifest.column("row").to_pylist(), manifest.column("image_id").to_pylist()))
    for mv in store.model_versions():
        try:
            ids = np.asarray(store.open_maps(store.maps(mv))["image_id"][:], dtype=object)
        except Exception:  # noqa: BLE001 - a run without maps has no rows to keep
            continue
        scored = np.flatnonzero(ids != "")
        bad = [int(r) for r in scored if by_row.get(int(r)) != ids[r]]
        if bad:
            raise BookkeepingError(
                f"{store.manifest} is unreadable ({why}), and rebuilding it from the datasets would move "
                f"{len(bad)} rows already scored in runs/{mv} (e.g. row {bad[0]}). Restore it from a backup, or set the "
                f"old runs aside and rescore: mv {store.runs_root} {store.runs_root}.unmatched && "
                f"mv {store.manifest} {store.manifest}.damaged, then rerun the same command."
            )
    return f"{store.manifest} was unreadable ({why}); rebuilt it from the datasets (every scored row still holds its image)"


def rebuild_latest(out, storage_options: dict | None = None) -> str | None:
    """latest.json from the run index: the newest complete run (or removed when there is none)."""
    from pipeline.store.run_index import run_records

    store = OutputStore.of(out, storage_options)
    done = sorted((r.finished or "", r.model_version) for r in run_records(store) if r.status == "complete")
    if done:
        finished, mv = done[-1]
        store.write_json(store.latest, store.latest_entry(mv, finished))
        return mv
    store.remove(store.latest)
    return None
