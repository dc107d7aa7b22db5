"""The runs under an --out, as their run.json files describe them."""

from __future__ import annotations

import posixpath

from pipeline.store.storage import join, read_json, url_to_fs


def run_records(out: str) -> list[dict]:
    fs, base = url_to_fs(join(out, "runs"))
    records = []
    for d in sorted(fs.ls(base, detail=False)) if fs.exists(base) else []:
        try:
            rj = read_json(join(out, "runs", posixpath.basename(d), "run.json"))
        except (ValueError, UnicodeDecodeError):
            continue  # unreadable: jobs.runs --check reports it, the next run into it rebuilds it
        if isinstance(rj, dict) and "model_version" in rj:
            records.append(rj)
    return records


def complete_runs(out: str) -> list[str]:
    """Model versions of complete runs, oldest finished first."""
    done = [(r.get("finished") or "", r["model_version"]) for r in run_records(out) if r.get("status") == "complete"]
    return [mv for _, mv in sorted(done)]
