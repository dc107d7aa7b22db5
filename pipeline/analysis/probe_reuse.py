"""When a rerun keeps the identifiability probes it fitted earlier.

The probes are cross-validated fits over (a seeded subsample of) every film: unlike the region
statistics they do not merge, and they are most of the aggregates' time. A rerun keeps the tables of
the last fit while the rows that are new, gone or changed since that fit are at most
``REFIT_SHARE`` of the rows now, and refits them otherwise; the kept fit says so in its table's
``notes`` ("fitted on N films, M now") and in ``_aggregates.json`` (``probes``). A change counts
per chunk of maps.zarr (one per shard): its rows, their manifest values and their shard's stored
outputs (the part's and every chunk's SHA-256, from the shard record) as they were at the fit. The
same aggregate settings are required; any other setting refits.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict

import numpy as np
import pandas as pd
import pyarrow as pa

log = logging.getLogger(__name__)

REFIT_SHARE = 0.05  # the probes are refitted once more than this share of the rows is new or changed since the fit
PROBE_TABLES = ("identifiability", "identifiability_map", "identifiability_scores", "prevalence_confounding")


def outputs_fingerprint(record: dict | None) -> str | None:
    """A shard's stored outputs as its record hashes them (the part and every maps.zarr chunk)."""
    outputs = (record or {}).get("outputs") if isinstance(record, dict) else None
    if not outputs:
        return None
    part = (outputs.get("part") or {}).get("sha256")
    chunks = {k: (v or {}).get("sha256") for k, v in (outputs.get("chunks") or {}).items()}
    return hashlib.sha256(json.dumps([part, chunks], sort_keys=True).encode()).hexdigest()[:32]


def chunk_states(manifest: pd.DataFrame, rows: np.ndarray, chunk: int, outputs: dict[int, str]) -> dict[str, list]:
    """{chunk: [rows in it, digest of its rows, their manifest values and its shard's outputs]}."""
    values = manifest.set_index("row").loc[rows]
    per_row = pd.util.hash_pandas_object(values.astype(str), index=False).to_numpy()
    of = rows // chunk
    out = {}
    for k in np.unique(of):
        sel = of == k
        h = hashlib.sha256(str(outputs.get(int(k))).encode())
        h.update(np.ascontiguousarray(rows[sel], np.int64).tobytes())
        h.update(np.ascontiguousarray(per_row[sel]).tobytes())
        out[str(int(k))] = [int(sel.sum()), h.hexdigest()[:32]]
    return out


def settings_digest(config) -> str:
    return hashlib.sha256(json.dumps(asdict(config), sort_keys=True, default=str).encode()).hexdigest()[:32]


def changed_rows(before: dict[str, list], now: dict[str, list]) -> int:
    """Rows of chunks whose state differs (the larger of its counts then and now), gone chunks included."""
    n = 0
    for k in set(before) | set(now):
        b, a = before.get(k), now.get(k)
        if b != a:
            n += max(b[0] if b else 0, a[0] if a else 0)
    return n


def kept_fit(store, model_version: str, config, states: dict[str, list]) -> tuple[dict[str, pa.Table] | None, dict]:
    """(the kept probe tables, what the record says) when the last fit may stand; (None, {}) to refit."""
    stored, _ = store.read_json_safe(store.aggregate_inputs(model_version))
    fit = (stored or {}).get("probes") if isinstance(stored, dict) else None
    if not isinstance(fit, dict) or fit.get("settings") != settings_digest(config) or not isinstance(fit.get("chunks"), dict):
        return None, {}
    total = sum(v[0] for v in states.values())
    changed = changed_rows(fit["chunks"], states)
    if total == 0 or changed > REFIT_SHARE * total:
        if changed:
            log.info(f"probes: {changed:,} of {total:,} films new or changed since their fit (over {REFIT_SHARE:.0%}): refitting")
        return None, {}
    try:
        tables = {name: store.read_parquet(store.table(model_version, name)) for name in PROBE_TABLES}
    except Exception as e:  # noqa: BLE001 - a missing or unreadable table: refit
        log.debug(f"probes: kept tables unreadable ({type(e).__name__}): refitting")
        return None, {}
    fitted = sum(v[0] for v in fit["chunks"].values())
    record = {**fit, "kept": {"films_now": total, "changed_since_fit": changed}}
    if changed:
        note = (f"fitted on {fitted:,} films; {total:,} now, {changed:,} of them new or changed since the fit "
                f"(kept up to {REFIT_SHARE:.0%} changed, refitted beyond)")
        tables["identifiability"] = _with_note(tables["identifiability"], note)
        log.info(f"probes: kept their fit on {fitted:,} films ({changed:,} of {total:,} new or changed, refit above {REFIT_SHARE:.0%})")
    return tables, record


def fit_record(config, states: dict[str, list]) -> dict:
    return {"settings": settings_digest(config), "chunks": states, "refit_share": REFIT_SHARE}


def _with_note(table: pa.Table, note: str) -> pa.Table:
    """The notes column with the kept-fit note (replacing an earlier one), the table otherwise as read."""
    i = table.schema.get_field_index("notes")
    notes = []
    for n in table.column(i).to_pylist():
        parts = [x for x in (n or "").split(" | ") if x and not x.startswith("fitted on ")]
        notes.append(" | ".join(parts + [note]))
    return table.set_column(i, table.schema.field(i), pa.array(notes, table.schema.field(i).type))
