"""The runs under an --out, as their run.json files describe them: run.json's one reader and writer."""

from __future__ import annotations

import json

from schemas.records import RecordError, RunRecord

from pipeline.store.layout import OutputStore


def read_run(out, model_version: str, storage_options: dict | None = None) -> tuple[RunRecord | None, str | None]:
    """A run's run.json: (record, None); (None, None) when absent; (None, why) when unreadable."""
    store = OutputStore.of(out, storage_options)
    value, why = store.read_json_safe(store.run_json(model_version))
    if why or value is None:
        return None, why
    try:
        return RunRecord.from_json(value), None
    except RecordError as e:
        return None, str(e)


def write_run(out, record: RunRecord, storage_options: dict | None = None) -> None:
    """Write run.json atomically (a reader sees the old file or the new one, never part of one)."""
    store = OutputStore.of(out, storage_options)
    store.write_json(store.run_json(record.model_version), record.to_json())


def rewrite_run_in_place(out, record: RunRecord, storage_options: dict | None = None) -> None:
    """A local run.json rewritten in place, compact: when even write_run has no room for its
    temporary copy (a full disk), shorter than the indented file it replaces. Raises OSError."""
    store = OutputStore.of(out, storage_options)
    _, path = store.fs(store.run_json(record.model_version))
    with open(path, "r+b") as f:
        f.write(json.dumps(record.to_json(), separators=(",", ":"), sort_keys=True, default=str).encode() + b"\n")
        f.truncate()


def run_records(out, storage_options: dict | None = None) -> list[RunRecord]:
    store = OutputStore.of(out, storage_options)
    records = []
    for mv in store.model_versions():
        record, _ = read_run(store, mv)  # unreadable: jobs.runs --check reports it, the next run into it rebuilds it
        if record is not None:
            records.append(record)
    return records


def complete_runs(out, storage_options: dict | None = None) -> list[str]:
    """Model versions of complete runs, oldest finished first."""
    done = [(r.finished or "", r.model_version) for r in run_records(out, storage_options) if r.status == "complete"]
    return [mv for _, mv in sorted(done)]


def latest(out, storage_options: dict | None = None) -> dict:
    """latest.json's content ({} when absent or unreadable: jobs.runs --check reports that)."""
    store = OutputStore.of(out, storage_options)
    value, _ = store.read_json_safe(store.latest)
    return value if isinstance(value, dict) else {}
