"""What a shard's completion record vouches for, and checking it against the outputs on disk.

A record names the shard's work (digest, model version) and fingerprints what the shard wrote: its
Parquet part (bytes, rows, sha256) and each of its Zarr chunks (bytes and sha256, or absent when the
chunk holds only fill values). The cheap check, run on every resume, compares sizes (one stat per
file, no data read); ``verify=True`` also rehashes every byte and reads the part's rows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from schemas.records import RecordError, ShardRecord, StaleRecord

from pipeline.store.maps_store import open_maps
from pipeline.io.location import Location
from pipeline.store.storage import resolve, write_json_atomic

DONE_STATUSES = ("complete", "partial")  # partial: read errors a rerun retries
TRANSIENT_STAGES = ("read",)  # failures worth retrying on a rerun (I/O), unlike a bad PNG
# read errors a rerun cannot cure: the file itself is refused by the read limits
PERMANENT_READ_ERRORS = ("ImageTooLarge", "NotARegularFile", "IsADirectoryError", "EmptyFile", "SymlinkLoop")
# decode failures that are not the film's fault: its decode processes were killed from outside
RETRYABLE_DECODE_ERRORS = ("DecodeWorkerKilled",)


@dataclass(frozen=True)
class ShardState:
    state: str  # done | partial | missing | stale | damaged
    record: ShardRecord | None = None
    problems: tuple[str, ...] = field(default=())

    @property
    def usable(self) -> bool:
        """Outputs that count towards the run (complete, or partial with their read errors)."""
        return self.state in ("done", "partial")


def _sha256(fs, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _size(fs, path: str) -> int | None:
    try:
        return int(fs.info(path)["size"])
    except FileNotFoundError:
        return None


def chunk_layout(maps_url: str, storage_options: "dict | Location | None" = None) -> list[tuple[str, int, int, object, str]]:
    """What locating a row's chunks needs, read once from maps.zarr's metadata: per array its name,
    chunk length along rows, rank, chunk key encoder and the store's base path. Checking every
    shard of a run opens the group once with it, not once per shard."""
    g = open_maps(maps_url, "r", storage_options)
    _, base = resolve(maps_url, storage_options)
    return [(name, arr.chunks[0], arr.ndim, arr.metadata.encode_chunk_key, base.rstrip("/")) for name, arr in sorted(g.arrays())]


def chunk_paths(maps_url: str, start: int, storage_options: dict | None = None, layout=None) -> dict[str, str]:
    """Store path of the chunk holding row `start` in each array of maps.zarr (one per array: a
    shard is exactly one chunk along rows). ``layout``: chunk_layout's, when already read."""
    out = {}
    for name, chunk, ndim, encode, base in layout or chunk_layout(maps_url, storage_options):
        out[name] = f"{base}/{name}/{encode((start // chunk,) + (0,) * (ndim - 1))}"
    return out


def fingerprint_outputs(part_url: str, maps_url: str, start: int, storage_options: dict | None = None) -> dict:
    """Fingerprint a shard's part and chunks just after writing them (read back: bytes as stored)."""
    fs, part = resolve(part_url, storage_options)
    with fs.open(part, "rb") as f:
        rows = pq.ParquetFile(f).metadata.num_rows
    out = {"part": {"bytes": _size(fs, part), "rows": rows, "sha256": _sha256(fs, part)}, "chunks": {}}
    for name, path in chunk_paths(maps_url, start, storage_options).items():
        size = _size(fs, path)
        out["chunks"][name] = None if size is None else {"bytes": size, "sha256": _sha256(fs, path)}
    return out


def read_record(url: str, storage_options: dict | None = None) -> tuple[dict | None, str | None]:
    """The record's JSON: (value, None), (None, None) when absent, or (None, why) when unreadable.
    ``check_shard`` parses it (``ShardRecord.from_json``)."""
    fs, path = resolve(url, storage_options)
    try:
        with fs.open(path, "rb") as f:
            rec = json.loads(f.read())
    except FileNotFoundError:
        return None, None
    except (ValueError, UnicodeDecodeError, OSError) as e:
        return None, f"record unreadable ({type(e).__name__})"
    return rec, None


def write_record(record: ShardRecord, url: str, storage_options: dict | None = None) -> None:
    """The one writer of shard records (the shard task, once its outputs are written)."""
    write_json_atomic(record.to_json(), url, storage_options)


def check_shard(shard, spec, verify: bool = False, layout=None, sources_check=None) -> ShardState:
    """Is this shard's work done, with its outputs intact? Cheap by default (sizes only).
    ``layout``: maps.zarr's chunk_layout, read once by a caller that checks many shards. With
    ``verify``, ``sources_check(record, shard, spec)`` may add problems about the films themselves
    (``pipeline.worker.cache.changed_sources``: a film replaced since it was scored)."""
    so = spec.store.root  # the output root: its filesystem resolved once for every file of the shard
    value, why = read_record(spec.record_url(shard.index), so)
    if why:
        return ShardState("damaged", None, (why,))
    if value is None:
        return ShardState("missing")
    try:
        rec = ShardRecord.from_json(value)
    except StaleRecord as e:
        return ShardState("stale", None, (str(e),))
    except RecordError as e:
        return ShardState("damaged", None, (f"record unreadable ({e})",))
    if rec.digest != shard.digest or rec.model_version != spec.model_version:
        return ShardState("stale", rec, ("record is for other rows or another model",))
    if rec.status not in DONE_STATUSES:
        return ShardState("stale", rec, (f"record status {rec.status!r}",))
    problems = _check_outputs(rec, shard, spec, so, verify, layout)
    if verify and not problems and sources_check is not None:
        problems = sources_check(rec, shard, spec)
    if problems:
        return ShardState("damaged", rec, tuple(problems))
    return ShardState("partial" if rec.status == "partial" else "done", rec)


def _check_outputs(rec: ShardRecord, shard, spec, so, verify: bool, layout=None) -> list[str]:
    problems = []
    fp = rec.outputs
    fs, part = resolve(spec.part_url(shard.index), so)
    want = fp["part"]
    size = _size(fs, part)
    if size is None:
        problems.append("predictions part missing")
    elif size != want["bytes"]:
        problems.append(f"predictions part has {size} bytes, record says {want['bytes']}")
    elif want["rows"] != rec.n_scored:
        problems.append(f"record says {rec.n_scored} scored but its part holds {want['rows']} rows")
    elif verify:
        if _sha256(fs, part) != want["sha256"]:
            problems.append("predictions part content differs from its record (sha256)")
        else:
            try:
                with fs.open(part, "rb") as f:
                    rows = pq.read_table(f, columns=["row"]).column("row").to_pylist()
                if len(rows) != want["rows"] or not set(rows) <= set(shard.rows) or len(set(rows)) != len(rows):
                    problems.append("predictions part rows do not match the shard")
            except Exception as e:  # noqa: BLE001 - any unreadable part is damage
                problems.append(f"predictions part unreadable ({type(e).__name__})")
    try:
        paths = chunk_paths(spec.maps_url, shard.start, so, layout)
    except Exception as e:  # noqa: BLE001 - an unreadable group is damage to every shard
        return problems + [f"maps.zarr unreadable ({type(e).__name__})"]
    for name, want_c in fp["chunks"].items():
        path = paths.get(name)
        if path is None:
            problems.append(f"maps.zarr has no array {name}")
            continue
        size = _size(fs, path)
        if want_c is None:
            if size is not None:
                problems.append(f"maps.zarr/{name}: chunk present, record says it held only fill values")
        elif size is None:
            problems.append(f"maps.zarr/{name}: chunk missing")
        elif size != want_c["bytes"]:
            problems.append(f"maps.zarr/{name}: chunk has {size} bytes, record says {want_c['bytes']}")
        elif verify and _sha256(fs, path) != want_c["sha256"]:
            problems.append(f"maps.zarr/{name}: chunk content differs from its record (sha256)")
    return problems


def retry_rows(record: ShardRecord) -> list[int]:
    """Rows a rerun retries: those that failed at a transient stage (read errors), or whose decode
    processes were killed from outside."""
    return sorted(e["row"] for e in record.errors if _retryable(e))


def _retryable(error: dict) -> bool:
    if error.get("stage") == "decode":
        return error.get("error_class") in RETRYABLE_DECODE_ERRORS
    return error.get("stage") in TRANSIENT_STAGES and error.get("error_class") not in PERMANENT_READ_ERRORS


def shard_status(errors: list[dict]) -> str:
    return "partial" if any(_retryable(e) for e in errors) else "complete"


def nonfinite_rows(outputs) -> np.ndarray:
    """Per image of a batch (BatchOutputs): does any output hold NaN or Inf?"""
    n = len(outputs.prob)
    bad = np.zeros(n, bool)
    for a in (outputs.prob, outputs.cam, outputs.cell_logit, outputs.embedding):
        bad |= ~np.isfinite(np.asarray(a, np.float64)).reshape(n, -1).all(1)
    return bad


def retry_plan(shard, spec, region: dict[str, np.ndarray], prob: np.ndarray, ok: np.ndarray):
    """For a partial shard whose outputs match its record: fill the region arrays, prob and ok with
    what it already scored, and return (positions to score again, errors to keep, its source modes).
    None when the shard is to be scored whole."""
    st = check_shard(shard, spec)
    if st.state != "partial":
        return None
    so = spec.store.root  # the output root: its filesystem resolved once for every file of the shard
    g = open_maps(spec.maps_url, "r", so)
    for name, arr in region.items():
        arr[:] = g[name][shard.start:shard.stop]
    fs, part = resolve(spec.part_url(shard.index), so)
    with fs.open(part, "rb") as f:
        t = pq.read_table(f)
    pos_of = {r: p for p, r in enumerate(shard.rows)}
    pos = np.asarray([pos_of[r] for r in t.column("row").to_pylist()], dtype=np.int64)
    if len(pos):
        prob[pos] = np.stack([t.column(f).to_numpy() for f in spec.model.findings], axis=1)
        ok[pos] = True
    retry = set(retry_rows(st.record))
    kept = [e for e in st.record.errors if e["row"] not in retry]
    sources = {k: v for k, v in st.record.sources.items() if int(k) not in retry}
    return [pos_of[r] for r in sorted(retry)], kept, dict(st.record.source_modes), sources
