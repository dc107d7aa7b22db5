"""Prepare a scoring run (manifest, model version, stores, run.json) and finalize it.

The job in jobs/score_dataset.py only wires these steps and the shard tasks into a Dask graph.
"""

from __future__ import annotations

import logging
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

import pipeline
from schemas.meta import with_model_version
from schemas.outputs import errors_schema

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
from pipeline.io.location import reading_inputs

if TYPE_CHECKING:
    from pipeline.worker.runspec import RunSpec  # imported lazily at run time (it imports torch)

log = logging.getLogger("cxr_audit")

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
    timings: dict[str, float] = {}
    t = time.perf_counter()  # load_model's time includes importing torch (~1.5 s on 2 cores)
    import torch

    from pipeline.inference.model import load_model
    from pipeline.worker.cache import cache_group_url, changed_sources, create_cache
    from pipeline.worker.runspec import RunSpec

    store = cfg.output.store()  # --out with its storage options; every input is opened with cfg.inputs()
    store.check_writable()
    inputs = cfg.inputs()
    specs = [DatasetSpec.parse(d) for d in cfg.data.datasets]
    if len({s.name for s in specs}) != len(specs):
        raise ConfigError("two --dataset flags have the same name; name them apart with NAME=ADAPTER:LOCATION")
    mspec = cfg.model_spec()
    from pipeline.run.uptodate import checkpoint_identity, manifest_paths, source_stamp, stats_before_build

    log.info(f"model: loading {redact(cfg.model.checkpoint)} ({cfg.model.arch})")
    with reading_inputs(f"--checkpoint {redact(cfg.model.checkpoint)}"):
        ckpt_identity = checkpoint_identity(cfg.model.checkpoint, inputs)  # before loading: a later rewrite is seen
        model = load_model(mspec)  # validates the checkpoint before any image is touched
    with torch.inference_mode():
        from pipeline.inference.images import PREPROCESSING

        size = mspec.input_size  # the grid follows the model: 7x7 for 224-px DenseNets, 16x16 for the 512-px ResNet
        grid = tuple(model.features(torch.zeros(1, PREPROCESSING[mspec.preprocess].channels, size, size)).shape[-2:])
    timings["load_model"] = time.perf_counter() - t

    t = time.perf_counter()
    notes: list[str] = []
    previous, why = previous_manifest(store)
    log.info(f"manifest: reading {', '.join(redact(d) for d in cfg.data.datasets)}")
    before, built_at = stats_before_build(cfg, store), time.time_ns()
    with reading_inputs("the --dataset metadata"):
        result = build_manifest(specs, mspec.findings, previous, cfg.source_options(), inputs=inputs, read_limits=cfg.read_limits())
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
    inputs = {"checkpoint": ckpt_identity, "sources": source_stamp(cfg, before, manifest_paths(store), built_at)}
    timings["manifest"] = time.perf_counter() - t

    n_rows = int(max(result.manifest.column("row").to_pylist(), default=-1)) + 1
    with reading_inputs(f"--baselines {redact(cfg.model.baselines)}"):
        resolved = resolve(cfg, result.manifest)
    cache_url = cache_group_url(resolved.cache_root, cfg.preprocess()) if resolved.cache_root else None
    spec = RunSpec.derive(resolved, model=mspec, model_version=run_version(model.version, cfg.model.precision), n_rows=n_rows,
                          grid=grid, embedding_dim=model.embedding_dim, cache_url=cache_url)
    previous_run, why = store.read_json_safe(store.run_json(spec.model_version))
    if why or not isinstance(previous_run, (dict, type(None))):
        # rebuilt below from the shard records; maps.zarr's own attributes still guard the settings
        notes.append(f"{spec.run_url}/run.json was unreadable ({why}); rebuilt it from the shard records")
        previous_run = None
        _check_maps_identity(spec)
    if previous_run and {"precision": "fp32", **previous_run.get("identity", {})} != spec.output_identity():
        old, new = {"precision": "fp32", **previous_run.get("identity", {})}, spec.output_identity()  # runs before --precision were fp32
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise OutputError(
            f"{spec.run_url} was written with different settings ({', '.join(diff)}); its outputs would mix. "
            "Rerun with the original settings, or use another --out."
        )
    create_maps(spec.maps_url, n_rows, spec.shard_size, mspec.findings, grid, model.embedding_dim,
                {"baselines": dict(zip(mspec.findings, spec.baselines)), "model_version": spec.model_version,
                 # b_k, for the exact cell contributions (z_ij - b_k) / (H*W)
                 "classifier_bias": model.classifier.bias.detach().double().tolist(),
                 **({"op_threshs": dict(zip(mspec.findings, mspec.op_threshs)), "map": mspec.describe()["map"]} if mspec.calibrated else {})},
                store.options)
    if resolved.cache_root:
        create_cache(resolved.cache_root, spec.preprocess, n_rows, spec.shard_size, store.options)
    shards = plan_shards(result.manifest, spec.shard_size, n_rows, cfg.data.limit)
    pending = []
    layout = chunk_layout(spec.maps_url, store.options)  # maps.zarr's metadata read once, not per shard
    for s in shards:
        st = check_shard(s, spec, verify=cfg.output.verify, layout=layout, sources_check=changed_sources)
        if st.state == "damaged":
            # the record no longer vouches for its outputs: drop it, so the shard is rescored whole
            notes.append(f"shard {s.index} damaged ({'; '.join(st.problems)}): rescoring it")
            store.remove(spec.record_url(s.index))
        if st.state != "done":
            pending.append(s)  # partial shards too: their read errors are retried
    fp = dataset_fingerprint(result.manifest)
    history = []
    if previous_run:
        history = previous_run.get("history", []) + [{k: previous_run.get(k) for k in ("started", "finished", "status", "counts", "code_version")}]
    # The configuration as a file `--config` reads back (run.json has what it resolved to).
    store.write_bytes(store.resolved_config(spec.model_version), resolved_config_yaml(cfg))
    steps, undone = {"prepare": "done"}, {}
    if previous_run and previous_run.get("replaced_latest") and (previous_run.get("steps") or {}).get("drift") in ("pending", "failed"):
        # published, then killed before its drift: kept for this rerun to do (lifecycle.drift_from)
        steps["drift"], undone["replaced_latest"] = previous_run["steps"]["drift"], previous_run["replaced_latest"]
    store.write_json(store.run_json(spec.model_version), {**_run_json(resolved, spec, fp, "running", _now(), None, timings, history),
                                                          **undone, "steps": steps, "inputs": inputs,
                                                          **({"reruns": previous_run["reruns"]} if previous_run and previous_run.get("reruns") else {})})
    return PreparedRun(cfg, resolved, spec, shards, result, fp, timings, pending, notes, inputs)


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


def _run_json(resolved: Resolved, spec, fp, status, started, counts, timings, history, finished=None, failures=None) -> dict:
    import torch

    return redact_obj({  # URLs in flags may carry credentials
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
    })


def finalize_run(prep: PreparedRun, results: list[dict], failures: list[dict], started: str) -> dict:
    """Gather every shard record of this run (done now or earlier) into errors.parquet and run.json.
    The status is 'running' (scoring done, aggregates next: see finish_run), 'incomplete' (shards
    missing), 'failed' (nothing scored) or 'partial' (more failed images than --max-failed-fraction)."""
    spec, store = prep.spec, prep.spec.store
    layout = chunk_layout(spec.maps_url, store.options)
    states = [check_shard(s, spec, layout=layout) for s in prep.shards]
    records = [st.record for st in states if st.usable]
    errors = [e for r in records for e in r["errors"]]
    table = pa.Table.from_pylist(sorted(errors, key=lambda e: e["row"]), schema=errors_schema(spec.model_version))
    table = with_model_version(table, spec.model_version)
    store.write_parquet(store.errors(spec.model_version), table)
    n_images = sum(len(s.rows) for s in prep.shards)
    counts = {
        "images": n_images,
        "scored": sum(r["n_scored"] for r in records),
        "failed": sum(r["n_failed"] for r in records),
        "skipped_shards": len(prep.shards) - len(prep.pending) + sum(1 for r in results if r.get("skipped")),
        "scored_shards_now": sum(1 for r in results if not r.get("skipped")),
        "shards": len(prep.shards),
        "incomplete_shards": len(prep.shards) - len(records),
        "partial_shards": sum(1 for st in states if st.state == "partial"),
        "retryable": sum(len(retry_rows(r)) for r in records),
        "manifest_rows": prep.manifest.manifest.num_rows,
        "manifest_issues": prep.manifest.issue_counts(),
        "source_modes": _sum_dicts(r.get("source_modes", {}) for r in records),
        "cache_now": _sum_dicts((r.get("cache") or {}) for r in results if not r.get("skipped")),
    }
    timings = dict(prep.timings)
    for key in ("decode_wait", "forward", "write", "total"):
        timings[f"shards_{key}"] = sum(r["seconds"][key] for r in results if not r.get("skipped"))
    status = scoring_status(counts, prep.config.output.max_failed_fraction)
    current, _ = store.read_json_safe(store.run_json(spec.model_version))
    current = current if isinstance(current, dict) else {}
    run = _run_json(prep.resolved, spec, prep.dataset_fingerprint, status, started, counts, timings,
                    current.get("history", []), finished=_now() if status != "running" else None, failures=failures)
    run["steps"] = {**current.get("steps", {}), "scoring": "done" if status == "running" else status}
    run["inputs"] = prep.inputs
    if current.get("reruns"):
        run["reruns"] = current["reruns"]
    if current.get("replaced_latest"):  # a drift still to do (pipeline.run.lifecycle.drift_from)
        run["replaced_latest"] = current["replaced_latest"]
    store.write_json(store.run_json(spec.model_version), run)
    return run


def scoring_status(counts: dict, max_failed_fraction: float) -> str:
    if counts["incomplete_shards"]:
        return "incomplete"
    if counts["images"] and counts["scored"] == 0:
        return "failed"  # zero images scored always counts as a failure
    if counts["images"] and counts["failed"] / counts["images"] > max_failed_fraction:
        return "partial"
    return "running"


def finish_run(prep: PreparedRun, run: dict, status: str, steps: dict) -> dict:
    """Write the final status once every step has finished (or was interrupted)."""
    run = {**run, "status": status, "finished": _now(), "steps": {**run.get("steps", {}), **steps}}
    prep.spec.store.write_json(prep.spec.store.run_json(prep.spec.model_version), run)
    return run


def _sum_dicts(ds) -> dict:
    out: dict = {}
    for d in ds:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out
