"""Prepare a scoring run (manifest, model version, stores, run.json) and finalize it.

The job in jobs/score_dataset.py only wires these steps and the shard tasks into a Dask graph.
"""

from __future__ import annotations

import logging
import subprocess
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

import pipeline
from schemas.meta import with_model_version
from schemas.outputs import errors_schema
from schemas.records import RunRecord

from pipeline.sources.adapters import DatasetSpec
from pipeline.core.errors import ConfigError, DatasetError, OutputError
from pipeline.sources.manifest import ManifestResult, build_manifest, dataset_fingerprint
from pipeline.store.bookkeeping import check_rebuilt_manifest, previous_manifest
from pipeline.store.maps_store import create_maps
from pipeline.inference.precision import run_version
from pipeline.store.shard_check import check_shard, chunk_layout, retry_rows
from pipeline.core.redact import redact, redact_columns, redact_obj
from pipeline.config.run_config import Resolved, ScoreConfig, resolve, yaml_text
from pipeline.worker.shards import Shard, plan_shards
from pipeline.store.layout import OutputStore
from pipeline.store.run_index import read_run, write_run
from pipeline.io.location import reading_inputs

if TYPE_CHECKING:
    from pipeline.worker.runspec import RunSpec  # imported lazily at run time (it imports torch)

log = logging.getLogger(__name__)

# torch and the model code are imported inside the functions that need them, so that building and
# validating a ScoreConfig (pipeline.config.run_config) stays fast: a config error in well under 2 s.


@dataclass
class PreparedRun:
    config: ScoreConfig
    resolved: Resolved
    spec: RunSpec
    shards: list[Shard]
    manifest: ManifestResult
    dataset_fingerprint: str
    timings: dict
    pending: list[Shard]
    notes: list[str] = field(default_factory=list)  # bookkeeping repaired while preparing
    inputs: dict = field(default_factory=dict)  # what a rerun compares to know nothing changed (pipeline.run.uptodate)


def code_version() -> str:
    here = Path(pipeline.__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "--no-optional-locks", "-C", str(here), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5).stdout.strip()
        return f"{pipeline.__version__}+g{sha}{'.dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return pipeline.__version__


def resolved_config_yaml(cfg: ScoreConfig) -> bytes:
    return yaml_text(cfg, "# The resolved configuration of this run (storage options left out); --config reads it.\n").encode()


def prepare_run(cfg: ScoreConfig) -> PreparedRun:
    """Load the model, build the manifest, resolve the configuration, derive the shard spec from
    it (once), create the stores and find the shards still to score."""
    t = time.perf_counter()  # load_model's time includes importing torch (~1.5 s on 2 cores)
    from pipeline.worker.cache import cache_group_url
    from pipeline.worker.runspec import RunSpec

    timings: dict[str, float] = {}
    notes: list[str] = []  # bookkeeping repaired on the way
    store = cfg.output.store()  # --out with its storage options; every input is opened with cfg.inputs()
    store.check_writable()
    specs = [DatasetSpec.parse(d) for d in cfg.data.datasets]
    if len({s.name for s in specs}) != len(specs):
        raise ConfigError("two --dataset flags have the same name; name them apart with NAME=ADAPTER:LOCATION")
    mspec = cfg.model_spec()
    model, grid, ckpt_identity = _load_model(cfg, mspec)
    timings["load_model"] = time.perf_counter() - t

    t = time.perf_counter()
    result, sources = _write_manifest(cfg, specs, mspec, store, notes)
    inputs = {"checkpoint": ckpt_identity, "sources": sources}
    timings["manifest"] = time.perf_counter() - t

    n_rows = int(max(result.manifest.column("row").to_pylist(), default=-1)) + 1
    with reading_inputs(f"--baselines {redact(cfg.model.baselines)}"):
        resolved = resolve(cfg, result.manifest)
    cache_url = cache_group_url(resolved.cache_root, cfg.preprocess()) if resolved.cache_root else None
    spec = RunSpec.derive(resolved, model=mspec, model_version=run_version(model.version, cfg.model.precision), n_rows=n_rows,
                          grid=grid, embedding_dim=model.embedding_dim, cache_url=cache_url)
    previous = _previous_run(spec, store, notes)
    _create_stores(spec, resolved, model, store)
    shards = plan_shards(result.manifest, spec.shard_size, n_rows, cfg.data.limit)
    pending = _pending_shards(spec, shards, cfg.output.verify, store, notes)
    fp = dataset_fingerprint(result.manifest)
    # The configuration as a file `--config` reads back (run.json has what it resolved to).
    store.write_bytes(store.resolved_config(spec.model_version), resolved_config_yaml(cfg))
    write_run(store, _started_record(resolved, spec, fp, timings, inputs, previous))
    return PreparedRun(cfg, resolved, spec, shards, result, fp, timings, pending, notes, inputs)


def _load_model(cfg: ScoreConfig, mspec) -> tuple:
    """(the model, its map grid, the checkpoint's identity): validates the checkpoint before any
    image is touched."""
    import torch

    from pipeline.inference.images import PREPROCESSING
    from pipeline.inference.model import load_model
    from pipeline.run.uptodate import checkpoint_identity

    log.info(f"model: loading {redact(cfg.model.checkpoint)} ({cfg.model.arch})")
    with reading_inputs(f"--checkpoint {redact(cfg.model.checkpoint)}"):
        ckpt_identity = checkpoint_identity(cfg.model.checkpoint, cfg.inputs())  # before loading: a later rewrite is seen
        model = load_model(mspec)  # validates the checkpoint before any image is touched
    with torch.inference_mode():
        size = mspec.input_size  # the grid follows the model: 7x7 for 224-px DenseNets, 16x16 for the 512-px ResNet
        grid = tuple(model.features(torch.zeros(1, PREPROCESSING[mspec.preprocess].channels, size, size)).shape[-2:])
    return model, grid, ckpt_identity


def _write_manifest(cfg: ScoreConfig, specs, mspec, store: OutputStore, notes: list[str]) -> tuple[ManifestResult, str | None]:
    """Build the manifest (an unreadable one is rebuilt, its scored rows checked) and write it with
    its issues. Returns it and the stamp of the files it was built from (pipeline.run.uptodate)."""
    from pipeline.run.uptodate import manifest_paths, source_stamp, stats_before_build

    previous, why = previous_manifest(store)
    log.info(f"manifest: reading {', '.join(redact(d) for d in cfg.data.datasets)}")
    before, built_at = stats_before_build(cfg, store), time.time_ns()
    with reading_inputs("the --dataset metadata"):
        result = build_manifest(specs, mspec.findings, previous, cfg.source_options(), inputs=cfg.inputs(), read_limits=cfg.read_limits())
    if result.manifest.num_rows == 0:
        # nothing written yet: an earlier manifest (and its row numbers) stays as it was
        shown = "; ".join(f"{i['reason']}: {i['detail']}" for i in result.issues.slice(0, 3).to_pylist())
        raise DatasetError(f"no image to score in {', '.join(cfg.data.datasets)}: {result.issues.num_rows} metadata issues "
                           f"{result.issue_counts() or ''}{' (' + shown + ')' if shown else ''}. Check the --dataset locations and their metadata.")
    if why:
        notes.append(check_rebuilt_manifest(store, result.manifest, why))
    # Written without URL credentials; the in-memory manifest keeps them, so shards can still read.
    store.write_parquet(store.manifest, redact_columns(result.manifest))
    store.write_parquet(store.manifest_issues, redact_columns(result.issues))
    return result, source_stamp(cfg, before, manifest_paths(store), built_at)


def _previous_run(spec: "RunSpec", store: OutputStore, notes: list[str]) -> RunRecord | None:
    """The run.json of an earlier invocation into this run dir, when its settings match this one's."""
    previous, why = read_run(store, spec.model_version)
    if why:
        # rebuilt from the shard records; maps.zarr's own attributes still guard the settings
        notes.append(f"{spec.run_url}/run.json was unreadable ({why}); rebuilt it from the shard records")
        _check_maps_identity(spec)
        return None
    if previous is not None and {"precision": "fp32", **previous.identity} != spec.output_identity():
        old, new = {"precision": "fp32", **previous.identity}, spec.output_identity()  # runs before --precision were fp32
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise OutputError(
            f"{spec.run_url} was written with different settings ({', '.join(diff)}); its outputs would mix. "
            "Rerun with the original settings, or use another --out."
        )
    return previous


def _create_stores(spec: "RunSpec", resolved: Resolved, model, store: OutputStore) -> None:
    """maps.zarr (and the cache group) for every row, unless they exist already."""
    from pipeline.worker.cache import create_cache

    mspec = spec.model
    create_maps(spec.maps_url, spec.n_rows, spec.shard_size, mspec.findings, spec.grid, model.embedding_dim,
                {"baselines": dict(zip(mspec.findings, spec.baselines)), "model_version": spec.model_version,
                 # b_k, for the exact cell contributions (z_ij - b_k) / (H*W)
                 "classifier_bias": model.classifier.bias.detach().double().tolist(),
                 **({"op_threshs": dict(zip(mspec.findings, mspec.op_threshs)), "map": mspec.describe()["map"]} if mspec.calibrated else {})},
                store.options)
    if resolved.cache_root:
        create_cache(resolved.cache_root, spec.preprocess, spec.n_rows, spec.shard_size, store.options)


def _pending_shards(spec: "RunSpec", shards: list[Shard], verify: bool, store: OutputStore, notes: list[str]) -> list[Shard]:
    """The shards still to score: not done, or partial (their read errors are retried)."""
    from pipeline.worker.cache import changed_sources

    pending = []
    layout = chunk_layout(spec.maps_url, store.options)  # maps.zarr's metadata read once, not per shard
    for s in shards:
        st = check_shard(s, spec, verify=verify, layout=layout, sources_check=changed_sources)
        if st.state == "damaged":
            # the record no longer vouches for its outputs: drop it, so the shard is rescored whole
            notes.append(f"shard {s.index} damaged ({'; '.join(st.problems)}): rescoring it")
            store.remove(spec.record_url(s.index))
        if st.state != "done":
            pending.append(s)
    return pending


def _started_record(resolved: Resolved, spec: "RunSpec", fp: str, timings: dict, inputs: dict, previous: RunRecord | None) -> RunRecord:
    """run.json while the run is scored: this invocation, with what an earlier one left to keep."""
    history = previous.history + [{k: getattr(previous, k) for k in ("started", "finished", "status", "counts", "code_version")}] if previous else []
    record = _run_record(resolved, spec, fp, "running", _now(), None, timings, history)
    record.steps, record.inputs = {"prepare": "done"}, inputs
    if previous:
        record.reruns = previous.reruns
        if previous.replaced_latest and previous.steps.get("drift") in ("pending", "failed"):
            # published, then killed before its drift: kept for this rerun to do (lifecycle.drift_from)
            record.steps["drift"], record.replaced_latest = previous.steps["drift"], previous.replaced_latest
    return record


def _check_maps_identity(spec: "RunSpec") -> None:  # noqa: F821 - imported lazily (torch)
    """Without run.json, maps.zarr's attributes say whether this run's settings match the stored outputs."""
    try:
        attrs = dict(spec.store.open_maps(spec.maps_url).attrs)
    except Exception:  # noqa: BLE001 - no maps yet: nothing to mix with
        return
    stored = {"findings": attrs.get("findings"), "baselines": [attrs.get("baselines", {}).get(f) for f in spec.model.findings],
              "shard_size": attrs.get("shard_size")}
    want = {"findings": list(spec.model.findings), "baselines": list(spec.baselines), "shard_size": spec.shard_size}
    diff = sorted(k for k in want if stored[k] != want[k])
    if diff:
        raise OutputError(f"{spec.run_url} was written with different settings ({', '.join(diff)}); its outputs would mix. "
                          "Rerun with the original settings, or use another --out.")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")  # orders runs finished in the same second


def _run_record(resolved: Resolved, spec, fp, status, started, counts, timings, history, finished=None, failures=None) -> RunRecord:
    import torch

    return RunRecord(**redact_obj({  # URLs in flags may carry credentials
        "status": status,
        "model_version": spec.model_version,
        "precision": spec.precision,
        "identity": spec.output_identity(),
        "config": resolved.config.flat(),  # storage options: keys only (may hold secrets); ScoreConfig.from_flat reads it back
        "resolved": resolved.saved(),  # what baselines, cache and device came to
        "model": spec.model.describe(),  # its outputs -> findings, calibration, preprocessing, what the map is
        "dataset_fingerprint": fp,
        "code_version": code_version(),
        "torch_version": torch.__version__,
        "started": started,
        "finished": finished,
        "counts": counts,
        "seconds": timings,
        "failed_shards": failures or [],
        "history": history,  # earlier invocations into this run dir
    }))


def finalize_run(prep: PreparedRun, results: list[dict], failures: list[dict], started: str) -> RunRecord:
    """Gather every shard record of this run (done now or earlier) into errors.parquet and run.json.
    The status is 'running' (scoring done, aggregates next: see finish_run), 'incomplete' (shards
    missing), 'failed' (nothing scored) or 'partial' (more failed images than --max-failed-fraction).
    ``results``: the shard tasks' (score_shard) of this invocation."""
    spec, store = prep.spec, prep.spec.store
    layout = chunk_layout(spec.maps_url, store.options)
    states = [check_shard(s, spec, layout=layout) for s in prep.shards]
    records = [st.record for st in states if st.usable]
    errors = [e for r in records for e in r.errors]
    table = pa.Table.from_pylist(sorted(errors, key=lambda e: e["row"]), schema=errors_schema(spec.model_version))
    table = with_model_version(table, spec.model_version)
    store.write_parquet(store.errors(spec.model_version), table)
    counts = _counts(prep, states, results)
    timings = dict(prep.timings)
    for key in ("decode_wait", "forward", "write", "total"):
        timings[f"shards_{key}"] = sum(r["seconds"][key] for r in results if not r.get("skipped"))
    status = scoring_status(counts, prep.config.output.max_failed_fraction)
    current, _ = read_run(store, spec.model_version)
    run = _run_record(prep.resolved, spec, prep.dataset_fingerprint, status, started, counts, timings,
                      current.history if current else [], finished=_now() if status != "running" else None, failures=failures)
    run.steps = {**(current.steps if current else {}), "scoring": "done" if status == "running" else status}
    run.inputs = prep.inputs
    if current:
        run.reruns = current.reruns
        run.replaced_latest = current.replaced_latest  # a drift still to do (pipeline.run.lifecycle.drift_from)
    write_run(store, run)
    return run


def _counts(prep: PreparedRun, states: list, results: list[dict]) -> dict:
    """run.json's counts: images, shards and failures of the whole run (``states``: every shard's
    check), and what this invocation scored and read from the cache (``results``)."""
    records = [st.record for st in states if st.usable]
    return {
        "images": sum(len(s.rows) for s in prep.shards),
        "scored": sum(r.n_scored for r in records),
        "failed": sum(r.n_failed for r in records),
        "skipped_shards": len(prep.shards) - len(prep.pending) + sum(1 for r in results if r.get("skipped")),
        "scored_shards_now": sum(1 for r in results if not r.get("skipped")),
        "shards": len(prep.shards),
        "incomplete_shards": len(prep.shards) - len(records),
        "partial_shards": sum(1 for st in states if st.state == "partial"),
        "retryable": sum(len(retry_rows(r)) for r in records),
        "manifest_rows": prep.manifest.manifest.num_rows,
        "manifest_issues": prep.manifest.issue_counts(),
        "source_modes": _sum_dicts(r.source_modes for r in records),
        "cache_now": _sum_dicts((r.get("cache") or {}) for r in results if not r.get("skipped")),
    }


def scoring_status(counts: dict, max_failed_fraction: float) -> str:
    if counts["incomplete_shards"]:
        return "incomplete"
    if counts["images"] and counts["scored"] == 0:
        return "failed"  # zero images scored always counts as a failure
    if counts["images"] and counts["failed"] / counts["images"] > max_failed_fraction:
        return "partial"
    return "running"


def finish_run(prep: PreparedRun, run: RunRecord, status: str, steps: dict) -> RunRecord:
    """Write the final status once every step has finished (or was interrupted)."""
    run = replace(run, status=status, finished=_now(), steps={**run.steps, **steps})
    write_run(prep.spec.store, run)
    return run


def _sum_dicts(ds) -> dict:
    out: dict = {}
    for d in ds:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out
