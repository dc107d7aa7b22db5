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

from pipeline.store.storage import join, url_to_fs, write_json_atomic

INPUTS_NAME = "_aggregates.json"


def inputs_digest(out: str, model_version: str, config, storage_options: dict | None = None) -> str:
    run_url = join(out, "runs", model_version)
    h = hashlib.sha256(json.dumps(asdict(config), sort_keys=True, default=str).encode())
    fs, mpath = url_to_fs(join(out, "manifest.parquet"), storage_options)
    with fs.open(mpath, "rb") as f:  # its content, not its mtime: every run rewrites it
        h.update(hashlib.sha256(f.read()).digest())
    fs, sdir = url_to_fs(join(run_url, "_shards"), storage_options)
    for p in sorted(fs.glob(posixpath.join(sdir, "shard-*.json"))):
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


def record_inputs(out: str, model_version: str, config, tables: list[str], storage_options: dict | None = None) -> None:
    write_json_atomic({"inputs": inputs_digest(out, model_version, config, storage_options), "tables": sorted(tables),
                       "config": asdict(config)}, join(out, "runs", model_version, INPUTS_NAME), storage_options)


def stale_aggregates(out: str, model_version: str, config, storage_options: dict | None = None) -> str | None:
    """Why the aggregates must be recomputed, or None when they are current."""
    from pipeline.store.bookkeeping import read_json_safe

    run_url = join(out, "runs", model_version)
    stored, why = read_json_safe(join(run_url, INPUTS_NAME), storage_options)
    if not isinstance(stored, dict):
        return f"{INPUTS_NAME} unreadable" if why else "none computed yet"
    fs, _ = url_to_fs(run_url, storage_options)
    missing = [t for t in stored.get("tables", []) if not fs.exists(url_to_fs(join(run_url, f"{t}.parquet"), storage_options)[1])]
    if missing or not stored.get("tables"):
        return f"missing {', '.join(missing) or 'tables'}"
    if stored.get("inputs") != inputs_digest(out, model_version, config, storage_options):
        return "their inputs changed since they were computed"
    return None
