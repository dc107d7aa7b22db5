"""What a run's aggregates were computed from, so a rerun recomputes stale ones.

``_aggregates.json`` beside the tables holds a digest of their inputs: the manifest, every shard
record's outputs fingerprint (part and chunk hashes) and the aggregate configuration. It is written
after the tables, so a kill in between leaves the tables stale, never wrongly current.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import asdict

from pipeline.store.layout import AGGREGATE_INPUTS as INPUTS_NAME
from pipeline.store.layout import OutputStore


def inputs_digest(out, model_version: str, config, storage_options: dict | None = None) -> str:
    store = OutputStore.of(out, storage_options)
    h = hashlib.sha256(json.dumps(asdict(config), sort_keys=True, default=str).encode())
    fs, mpath = store.fs(store.manifest)
    with fs.open(mpath, "rb") as f:  # its content, not its mtime: every run rewrites it
        h.update(hashlib.sha256(f.read()).digest())
    fs, pattern = store.fs(store.records_glob(model_version))
    for p in sorted(fs.glob(pattern)):
        try:
            with fs.open(p, "rb") as f:
                rec = json.loads(f.read())
            part = (rec.get("outputs") or {}).get("part", {})
            chunks = {k: (v or {}).get("sha256") for k, v in (rec.get("outputs") or {}).get("chunks", {}).items()}
            key = [rec.get("shard"), rec.get("digest"), rec.get("status"), part.get("sha256"), chunks]
        except (ValueError, OSError):
            key = [posixpath.basename(p), "unreadable"]
        h.update(json.dumps(key, sort_keys=True).encode())
    return h.hexdigest()[:32]


def record_inputs(out, model_version: str, config, tables: list[str], storage_options: dict | None = None, **facts) -> None:
    """facts: what else the aggregation reports (``region_partials``: chunks, those read and what was recomputed)."""
    store = OutputStore.of(out, storage_options)
    store.write_json(store.aggregate_inputs(model_version), {"inputs": inputs_digest(store, model_version, config), "tables": sorted(tables),
                                                             "config": asdict(config), **facts})


def stale_aggregates(out, model_version: str, config, storage_options: dict | None = None) -> str | None:
    """Why the aggregates must be recomputed, or None when they are current."""
    store = OutputStore.of(out, storage_options)
    stored, why = store.read_json_safe(store.aggregate_inputs(model_version))
    if not isinstance(stored, dict):
        return f"{INPUTS_NAME} unreadable" if why else "none computed yet"
    missing = [t for t in stored.get("tables", []) if not store.exists(store.table(model_version, t))]
    if missing or not stored.get("tables"):
        return f"missing {', '.join(missing) or 'tables'}"
    if stored.get("inputs") != inputs_digest(store, model_version, config):
        return "their inputs changed since they were computed"
    return None
