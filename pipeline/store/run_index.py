"""The runs under an --out, as their run.json files describe them."""

from __future__ import annotations

from pipeline.store.layout import OutputStore


def run_records(out, storage_options: dict | None = None) -> list[dict]:
    store = OutputStore.of(out, storage_options)
    records = []
    for mv in store.model_versions():
        try:
            rj = store.read_json(store.run_json(mv))
        except (ValueError, UnicodeDecodeError):
            continue  # unreadable: jobs.runs --check reports it, the next run into it rebuilds it
        if isinstance(rj, dict) and "model_version" in rj:
            records.append(rj)
    return records


def complete_runs(out, storage_options: dict | None = None) -> list[str]:
    """Model versions of complete runs, oldest finished first."""
    done = [(r.get("finished") or "", r["model_version"]) for r in run_records(out, storage_options) if r.get("status") == "complete"]
    return [mv for _, mv in sorted(done)]


def latest(out, storage_options: dict | None = None) -> dict:
    """latest.json's content ({} when absent or unreadable: jobs.runs --check reports that)."""
    store = OutputStore.of(out, storage_options)
    value, _ = store.read_json_safe(store.latest)
    return value if isinstance(value, dict) else {}
