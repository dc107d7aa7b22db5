"""Is there anything to do? A rerun that changes nothing costs what it checks, not what a run costs.

A run records what it was computed from in run.json's ``inputs``: the checkpoint (its size, mtime
and SHA-256; or the ``random:SEED`` it names) and a stamp of the dataset's files (size and mtime of
the dataset folder's own entries, of the metadata file and of every folder that holds a listed
film). A rerun is a no-op when the latest complete run was made by the same settings and the same
checkpoint, the stamp is unchanged (or, where it changed, a re-read manifest is identical to the
stored one), every shard's record vouches for its outputs (one ``stat`` per file), the aggregates'
inputs digest is current and the report was drawn from those aggregates. Checking all of it imports
neither torch nor pandas and starts no cluster; the rerun is appended to run.json's ``reruns``,
leaving the scoring run's ``started``, ``finished`` and ``seconds`` as they were.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import time
from dataclasses import dataclass

from schemas.records import RunRecord
from pipeline.io.location import InputOptions
from pipeline.store.layout import OutputStore

from pipeline.store.run_index import read_run, write_run

log = logging.getLogger(__name__)

# settings that change no output: a rerun differing only in these can still be a no-op
NOT_IDENTITY = {"batch_size", "decode_workers", "decode_threads", "device", "cluster", "cluster_file", "worker_timeout",
                "read_timeout", "read_retries", "verify", "report", "storage_options", "input_options", "dataset_options",
                "max_failed_fraction"}
RERUNS_KEPT = 100  # run.json keeps the last reruns only
_HASH_BLOCK = 1 << 20


@dataclass
class UpToDate:
    """What a no-op found: the run it checked and how long each check took."""

    run: RunRecord
    model_version: str
    seconds: dict
    restamped: dict | None = None  # the dataset stamp, when a re-read manifest proved a changed one harmless


def now() -> str:
    """run.json's clock (pipeline.run.scoring._now, which imports what a no-op does without)."""
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


# ---- what a run records ------------------------------------------------------------------------

def checkpoint_identity(checkpoint: str, inputs: InputOptions | None = None) -> dict:
    """The checkpoint as a rerun can recognise it without loading it: 'random:SEED' as it is, a
    file by its size, mtime and content hash (28 MB of DenseNet-121 hashes in ~0.1 s). ``inputs``:
    the options it is opened with (an input's, never --out's)."""
    if checkpoint.startswith("random:"):
        return {"checkpoint": checkpoint}
    fs, path = (inputs or InputOptions()).at(checkpoint).resolve()
    info = fs.info(path)
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_BLOCK), b""):
            h.update(block)
    return {"checkpoint": checkpoint, "size": info.get("size"), "mtime": _mtime(info), "sha256": h.hexdigest()}


def _mtime(info: dict):
    for key in ("mtime", "LastModified", "last_modified", "updated", "ETag", "etag"):
        if info.get(key) is not None:
            return str(info[key])
    return None


def _local(url: str) -> str | None:
    if url.startswith("file://"):
        return url[len("file://"):]
    return None if "://" in url else os.path.abspath(url)


def stamp_paths(cfg, paths) -> list[str] | None:
    """What the manifest depends on, as local paths to stat: each dataset's location and its own
    entries (metadata files, image folders), --metadata, and every folder holding a listed film
    (adding or removing a film changes its folder's mtime). None when a dataset is not local."""
    from pipeline.sources.adapters import DatasetSpec

    out: set[str] = set()
    roots: list[str] = []
    for text in cfg.data.datasets:
        loc = _local(DatasetSpec.parse(text).location)
        if loc is None:
            return None
        loc = loc.rstrip("/") or "/"
        out.add(loc)
        if os.path.isdir(loc):
            roots.append(loc + "/")
            out.update(e.path for e in os.scandir(loc))
    if cfg.data.metadata:
        meta = _local(cfg.data.metadata)
        if meta is None:
            return None
        out.add(meta)
    for folder in {posixpath.dirname(p) for p in paths if p is not None}:
        local = _local(folder)
        if local is None:
            return None
        root = next((r for r in roots if local.startswith(r)), None)
        while local not in out:  # the film's folder, and those between it and its dataset's folder
            out.add(local)
            if root is None:
                break
            local = posixpath.dirname(local)
    return sorted(out)


def stat_paths(paths: list[str]) -> dict[str, tuple[int, int] | None]:
    out = {}
    for p in paths:
        try:
            st = os.stat(p)
            out[p] = (st.st_size if not os.path.isdir(p) else 0, st.st_mtime_ns)
        except OSError:
            out[p] = None
    return out


def stamp_digest(stats: dict) -> str:
    return hashlib.sha256(json.dumps(sorted(stats.items()), separators=(",", ":")).encode()).hexdigest()[:32]


def manifest_paths(store: OutputStore) -> list[str]:
    """The film paths the stored manifest and its issues name (issues too: a missing film that
    appears must change the stamp)."""
    import pyarrow.parquet as pq

    paths: list[str] = []
    for url in (store.manifest, store.manifest_issues):
        fs, p = store.fs(url)
        with fs.open(p, "rb") as f:
            paths += pq.read_table(f, columns=["path"]).column("path").to_pylist()
    return paths


def source_stamp(cfg, before: dict | None, paths: list[str], built_at_ns: int) -> str | None:
    """The stamp a run records for the manifest it just built from ``paths``. ``before``: stats
    taken before the build. A path first stat'd after the build counts only when it was last
    changed before the build began (else the next rerun re-reads the manifest: never a stale no-op)."""
    wanted = stamp_paths(cfg, paths)
    if wanted is None:
        return None
    before = before or {}
    stats = {}
    late = [p for p in wanted if p not in before]
    after = stat_paths(late)
    for p in wanted:
        if p in before:
            stats[p] = before[p]
        else:
            st = after[p]
            if st is not None and st[1] >= built_at_ns:
                return None
            stats[p] = st
    return stamp_digest(stats)


def stats_before_build(cfg, store: OutputStore) -> dict | None:
    """Stats of what the previous manifest depended on, taken before the new one is built."""
    try:
        paths = manifest_paths(store) if store.exists(store.manifest) else []
    except Exception:  # noqa: BLE001 - an unreadable manifest is rebuilt; the stamp then covers only the roots
        paths = []
    wanted = stamp_paths(cfg, paths)
    return None if wanted is None else stat_paths(wanted)


# ---- the check ------------------------------------------------------------------------------------

def identity_config(flat: dict) -> dict:
    return {k: v for k, v in flat.items() if k not in NOT_IDENTITY}


def check(cfg, store: OutputStore) -> tuple[UpToDate | None, str]:
    """(UpToDate, '') when the rerun has nothing to do, else (None, why not)."""
    from pipeline.core.redact import redact_obj
    from pipeline.store.shard_check import check_shard, chunk_layout

    seconds: dict[str, float] = {}
    t = time.perf_counter()
    if cfg.output.verify:
        return None, "--verify rehashes every shard"
    latest, _ = store.read_json_safe(store.latest)
    mv = latest.get("model_version") if isinstance(latest, dict) else None
    if not mv:
        return None, "no complete run yet"
    run, _ = read_run(store, mv)
    if run is None or run.status != "complete" or run.steps.get("publish") != "done":
        return None, f"run {mv} is not complete"
    if identity_config(json.loads(json.dumps(redact_obj(cfg.flat())))) != identity_config(run.config):
        return None, "the settings differ from the latest run's"
    inputs = run.inputs
    if not inputs.get("checkpoint") or checkpoint_identity(cfg.model.checkpoint, cfg.inputs()) != inputs["checkpoint"]:
        return None, "the checkpoint is not the latest run's"
    seconds["checkpoint"] = time.perf_counter() - t

    t = time.perf_counter()
    paths = manifest_paths(store)
    wanted = stamp_paths(cfg, paths)
    stats = stat_paths(wanted) if wanted is not None else None
    restamped = None
    if stats is None or stamp_digest(stats) != inputs.get("sources"):
        # the dataset's files changed (or cannot be stat'd): re-read the metadata; identical is still a no-op
        if not _manifest_unchanged(cfg, store):
            return None, "the dataset changed"
        restamped = stamp_digest(stats) if stats is not None else None
        seconds["manifest_reread"] = time.perf_counter() - t
    seconds["manifest"] = time.perf_counter() - t

    t = time.perf_counter()
    spec, shards = _shards(cfg, store, mv)
    layout = chunk_layout(spec.maps_url, dict(spec.storage_options))
    for s in shards:
        if check_shard(s, spec, layout=layout).state != "done":
            return None, f"shard {s.index} is not done"
    seconds["shards"] = time.perf_counter() - t

    t = time.perf_counter()
    digest = current_aggregates(store, mv, cfg.aggregate)
    if digest is None:
        return None, "the aggregates are stale"
    if cfg.output.report and not report_current(store, mv, run, digest):
        return None, "the report is older than its inputs"
    seconds["aggregates_report"] = time.perf_counter() - t
    return UpToDate(run, mv, seconds, restamped), ""


def _manifest_unchanged(cfg, store: OutputStore) -> bool:
    """Rebuild the manifest from the datasets (without writing it) and compare with the stored one."""
    from pipeline.core.redact import redact_columns
    from pipeline.sources.adapters import DatasetSpec
    from pipeline.sources.manifest import build_manifest
    from pipeline.store.bookkeeping import previous_manifest

    previous, why = previous_manifest(store)
    if why or previous is None:
        return False
    try:
        result = build_manifest([DatasetSpec.parse(d) for d in cfg.data.datasets], cfg.findings(), previous,
                                cfg.source_options(), inputs=cfg.inputs(), read_limits=cfg.read_limits())
        issues = store.read_parquet(store.manifest_issues)
    except Exception as e:  # noqa: BLE001 - the full run reports it properly
        log.debug(f"re-reading the manifest failed ({type(e).__name__}: {e})")
        return False
    return redact_columns(result.manifest).equals(previous) and redact_columns(result.issues).equals(issues)


def _shards(cfg, store: OutputStore, mv: str):
    from pipeline.inference.model_spec import model_spec_for
    from pipeline.worker.runspec import RunSpec
    from pipeline.worker.shards import plan_shards
    from pipeline.io.location import freeze_options

    manifest = store.read_parquet(store.manifest)
    rows = manifest.column("row")
    n_rows = int(max(rows.to_pylist(), default=-1)) + 1
    spec = RunSpec(out=cfg.output.out.rstrip("/"), model=model_spec_for(cfg.model.arch, cfg.model.checkpoint, tuple(cfg.model.findings)),
                   model_version=mv, baselines=(), shard_size=cfg.compute.shard_size, n_rows=n_rows,
                   storage_options=freeze_options(cfg.output.storage_options), inputs=cfg.inputs())
    return spec, plan_shards(manifest, cfg.compute.shard_size, n_rows, cfg.data.limit)


def current_aggregates(store: OutputStore, mv: str, agg) -> str | None:
    """The aggregates' inputs digest when they are current, else None."""
    from pipeline.analysis.aggregate_inputs import inputs_digest

    stored, _ = store.read_json_safe(store.aggregate_inputs(mv))
    if not isinstance(stored, dict) or not stored.get("tables"):
        return None
    if any(not store.exists(store.table(mv, t)) for t in stored["tables"]):
        return None
    digest = inputs_digest(store, mv, agg)
    return digest if stored.get("inputs") == digest else None


def report_current(store: OutputStore, mv: str, run: RunRecord, digest: str) -> bool:
    """The report exists, was drawn from these aggregates, and is newer than them."""
    if run.steps.get("report") != "done" or run.report_inputs != digest:
        return False
    fs, report = store.fs(store.report(mv))
    _, agg = store.fs(store.aggregate_inputs(mv))
    try:
        return float(fs.info(report).get("mtime") or 0) >= float(fs.info(agg).get("mtime") or 0)
    except (FileNotFoundError, TypeError, ValueError):
        return False


def record_rerun(store: OutputStore, mv: str, entry: dict, restamped: str | None = None) -> RunRecord:
    """Append one rerun to run.json's ``reruns`` (the scoring run's own fields are left alone)."""
    current, _ = read_run(store, mv)
    current = current or RunRecord(model_version=mv)
    current.reruns = current.reruns[-(RERUNS_KEPT - 1):] + [entry]
    if restamped:
        current.inputs["sources"] = restamped
    write_run(store, current)
    return current
