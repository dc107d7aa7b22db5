"""Prepare a scoring run (manifest, model version, stores, run.json) and finalize it.

The job in jobs/score_dataset.py only wires these steps and the shard tasks into a Dask graph.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

import pipeline
from schemas.meta import with_model_version
from schemas.outputs import errors_schema

from pipeline.sources.adapters import DatasetSpec
from pipeline.core.errors import ConfigError, DatasetError, OutputError
from pipeline.core.findings import REFERENCE_BASELINES, parse_baselines_text, validate_baselines
from pipeline.sources.manifest import ManifestResult, build_manifest, dataset_fingerprint
from pipeline.store.bookkeeping import check_rebuilt_manifest, previous_manifest, read_json_safe
from pipeline.store.maps_store import create_maps, open_maps
from pipeline.inference.precision import check_precision, run_version
from pipeline.inference.read_limits import ReadLimits
from pipeline.store.shard_check import check_shard, retry_rows
from pipeline.core.redact import redact_columns, redact_obj
from pipeline.run.shards import Shard, plan_shards
from pipeline.store.storage import check_writable, join, url_to_fs, write_json_atomic, write_parquet_atomic

if TYPE_CHECKING:
    from pipeline.run.runspec import RunSpec  # imported lazily at run time (it imports torch)

# torch and the model code are imported inside the functions that need them, so that building and
# validating a ScoreConfig (jobs/score_dataset.py) stays fast: a config error in well under 2 s.


@dataclass(frozen=True)
class ScoreConfig:
    """The resolved configuration of one invocation; saved in run.json."""

    datasets: tuple[str, ...]
    out: str
    checkpoint: str
    arch: str = "densenet121"
    findings: tuple[str, ...] = tuple(REFERENCE_BASELINES)
    baselines: str = "reference"  # 'reference', 'from-labels', or a file URL
    metadata: str | None = None
    cluster: str = "local"
    cluster_file: str = "cluster.yaml"
    shard_size: int = 1024
    batch_size: int = 32
    limit: int | None = None
    device: str = "auto"
    high_bit_depth: str = "clip"
    decode_threads: int | None = None  # deprecated: decoding runs in processes, see decode_workers
    decode_workers: int | None = None  # decode processes per worker (None: one per core of the worker)
    precision: str = "fp32"  # fp32 | tf32 | bf16 (pipeline.inference.precision)
    cache: str = "auto"  # 'auto': OUT/cache; 'none': off; or a URL
    views: tuple[str, ...] = ("frontal",)
    site_column: str | None = None
    uncertain: str = "zeros"
    identifiability: bool = False  # also fit the confounder probes after scoring
    verify: bool = False  # resume: rehash every skipped shard's outputs, not just their sizes
    max_failed_fraction: float = 0.05  # more failed images than this: status failed/partial, exit 3
    worker_timeout: float | None = None  # seconds to wait for a first worker (None: the profile's)
    max_image_bytes: int = ReadLimits.max_bytes
    max_image_pixels: int = ReadLimits.max_pixels
    max_aspect_ratio: float = ReadLimits.max_aspect
    read_timeout: float = ReadLimits.timeout_s
    read_retries: int = ReadLimits.retries
    allow_roots: tuple[str, ...] = ()  # further places manifests may point into (--allow-root)
    storage_options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.shard_size < 1 or self.batch_size < 1:
            raise ConfigError("--shard-size and --batch-size must be positive")
        if not 0 <= self.max_failed_fraction <= 1:
            raise ConfigError("--max-failed-fraction must be between 0 and 1")
        if self.limit is not None and self.limit < 0:
            raise ConfigError("--limit must be >= 0")
        check_precision(self.precision)
        if self.decode_workers is not None and self.decode_workers < 0:
            raise ConfigError("--decode-workers must be >= 0 (0 decodes in the scoring process itself)")
        try:
            self.read_limits()
        except ValueError as e:
            raise ConfigError(f"--max-image-bytes/--max-image-pixels/--max-aspect-ratio/--read-timeout/--read-retries: {e}") from None

    def read_limits(self) -> ReadLimits:
        return ReadLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels, max_aspect=self.max_aspect_ratio,
                          timeout_s=self.read_timeout, retries=self.read_retries)


@dataclass
class PreparedRun:
    config: ScoreConfig
    spec: RunSpec
    shards: list[Shard]
    manifest: ManifestResult
    dataset_fingerprint: str
    timings: dict
    pending: list[Shard]
    notes: list[str] = field(default_factory=list)  # bookkeeping repaired while preparing


def code_version() -> str:
    here = Path(pipeline.__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5).stdout.strip()
        return f"{pipeline.__version__}+g{sha}{'.dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return pipeline.__version__


def resolve_baselines(cfg: ScoreConfig, manifest: pa.Table) -> tuple[float, ...]:
    if cfg.baselines == "reference":
        return validate_baselines(cfg.findings, REFERENCE_BASELINES)
    if cfg.baselines == "from-labels":
        prev = {}
        for f in cfg.findings:
            vals = [v for v in manifest.column(f).to_pylist() if v is not None]
            if not vals or not 0 < float(np.mean(vals)) < 1:
                raise ConfigError(f"--baselines from-labels: {f} has {len(vals)} labels with prevalence {np.mean(vals) if vals else 'n/a'}; give a baselines file instead")
            prev[f] = float(np.mean(vals))
        return validate_baselines(cfg.findings, prev)
    import fsspec

    try:
        with fsspec.open(cfg.baselines, "rt") as fh:
            return validate_baselines(cfg.findings, parse_baselines_text(fh.read()))
    except FileNotFoundError:
        raise ConfigError(f"--baselines file {cfg.baselines} does not exist; use 'reference', 'from-labels' or a file") from None


def prepare_run(cfg: ScoreConfig, device: str) -> PreparedRun:
    import torch

    from pipeline.inference.images import PreprocessConfig
    from pipeline.inference.model import ModelSpec, load_model
    from pipeline.run.runspec import RunSpec

    timings: dict[str, float] = {}
    so = cfg.storage_options
    t = time.perf_counter()
    check_writable(cfg.out, so)
    specs = [DatasetSpec.parse(d) for d in cfg.datasets]
    if len({s.name for s in specs}) != len(specs):
        raise ConfigError("two --dataset flags have the same name; name them apart with NAME=ADAPTER:LOCATION")
    mspec = ModelSpec(cfg.arch, cfg.checkpoint, tuple(cfg.findings))
    model = load_model(mspec)  # validates the checkpoint before any image is touched
    with torch.inference_mode():
        grid = tuple(model.features(torch.zeros(1, 3, 224, 224)).shape[-2:])
    timings["load_model"] = time.perf_counter() - t

    t = time.perf_counter()
    manifest_url = join(cfg.out, "manifest.parquet")
    notes: list[str] = []
    previous, why = previous_manifest(cfg.out, so)
    result = build_manifest(specs, mspec.findings, previous, cfg.metadata, cfg.views, cfg.site_column, cfg.uncertain,
                            allow_roots=cfg.allow_roots, storage_options=so, read_limits=cfg.read_limits())
    if result.manifest.num_rows == 0:
        # nothing written yet: an earlier manifest (and its row numbers) stays as it was
        shown = "; ".join(f"{i['reason']}: {i['detail']}" for i in result.issues.slice(0, 3).to_pylist())
        raise DatasetError(f"no image to score in {', '.join(cfg.datasets)}: {result.issues.num_rows} metadata issues "
                           f"{result.issue_counts() or ''}{' (' + shown + ')' if shown else ''}. Check the --dataset locations and their metadata.")
    if why:
        notes.append(check_rebuilt_manifest(cfg.out, result.manifest, why, so))
    # Written without URL credentials; the in-memory manifest keeps them, so shards can still read.
    write_parquet_atomic(redact_columns(result.manifest), manifest_url, so)
    write_parquet_atomic(redact_columns(result.issues), join(cfg.out, "manifest_issues.parquet"), so)
    timings["manifest"] = time.perf_counter() - t

    n_rows = int(max(result.manifest.column("row").to_pylist(), default=-1)) + 1
    spec = RunSpec(
        out=cfg.out.rstrip("/"),
        model=mspec,
        model_version=run_version(model.version, cfg.precision),
        baselines=resolve_baselines(cfg, result.manifest),
        preprocess=PreprocessConfig(high_bit_depth=cfg.high_bit_depth),
        batch_size=cfg.batch_size,
        device=device,
        shard_size=cfg.shard_size,
        n_rows=n_rows,
        grid=grid,
        embedding_dim=model.embedding_dim,
        decode_threads=cfg.decode_threads,
        decode_workers=cfg.decode_workers,
        precision=cfg.precision,
        storage_options=tuple(sorted(so.items())),
        read_limits=cfg.read_limits(),
    )
    previous_run, why = read_json_safe(join(spec.run_url, "run.json"), so)
    if why or not isinstance(previous_run, (dict, type(None))):
        # rebuilt below from the shard records; maps.zarr's own attributes still guard the settings
        notes.append(f"{spec.run_url}/run.json was unreadable ({why}); rebuilt it from the shard records")
        previous_run = None
        _check_maps_identity(spec, so)
    if previous_run and {"precision": "fp32", **previous_run.get("identity", {})} != spec.output_identity():
        old, new = {"precision": "fp32", **previous_run.get("identity", {})}, spec.output_identity()  # runs before --precision were fp32
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise OutputError(
            f"{spec.run_url} was written with different settings ({', '.join(diff)}); its outputs would mix. "
            "Rerun with the original settings, or use another --out."
        )
    create_maps(spec.maps_url, n_rows, cfg.shard_size, mspec.findings, grid, model.embedding_dim,
                {"baselines": dict(zip(mspec.findings, spec.baselines)), "model_version": spec.model_version,
                 # b_k, for the exact cell contributions (z_ij - b_k) / (H*W)
                 "classifier_bias": model.classifier.bias.detach().double().tolist()}, so)
    if cfg.cache != "none":
        from dataclasses import replace

        from pipeline.run.cache import create_cache

        cache_root = join(cfg.out, "cache") if cfg.cache == "auto" else cfg.cache
        spec = replace(spec, cache_url=create_cache(cache_root, spec.preprocess, n_rows, cfg.shard_size, so))
    shards = plan_shards(result.manifest, cfg.shard_size, n_rows, cfg.limit)
    pending = []
    for s in shards:
        st = check_shard(s, spec, verify=cfg.verify)
        if st.state == "damaged":
            # the record no longer vouches for its outputs: drop it, so the shard is rescored whole
            notes.append(f"shard {s.index} damaged ({'; '.join(st.problems)}): rescoring it")
            fs, path = url_to_fs(spec.record_url(s.index), so)
            if fs.exists(path):
                fs.rm(path)
        if st.state != "done":
            pending.append(s)  # partial shards too: their read errors are retried
    fp = dataset_fingerprint(result.manifest)
    history = []
    if previous_run:
        history = previous_run.get("history", []) + [{k: previous_run.get(k) for k in ("started", "finished", "status", "counts", "code_version")}]
    write_json_atomic(_run_json(cfg, spec, fp, "running", _now(), None, timings, history), join(spec.run_url, "run.json"), so)
    return PreparedRun(cfg, spec, shards, result, fp, timings, pending, notes)


def _check_maps_identity(spec: RunSpec, so: dict) -> None:
    """Without run.json, maps.zarr's attributes say whether this run's settings match the stored outputs."""
    try:
        attrs = dict(open_maps(spec.maps_url, "r", so).attrs)
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


def _run_json(cfg, spec, fp, status, started, counts, timings, history, finished=None, failures=None) -> dict:
    import torch

    return redact_obj({  # URLs in flags may carry credentials
        "status": status,
        "model_version": spec.model_version,
        "precision": spec.precision,
        "identity": spec.output_identity(),
        "config": {**asdict(cfg), "storage_options": sorted(cfg.storage_options)},  # keys only: may hold secrets
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
    spec, so = prep.spec, dict(prep.spec.storage_options)
    states = [check_shard(s, spec) for s in prep.shards]
    records = [st.record for st in states if st.usable]
    errors = [e for r in records for e in r["errors"]]
    table = pa.Table.from_pylist(sorted(errors, key=lambda e: e["row"]), schema=errors_schema(spec.model_version))
    table = with_model_version(table, spec.model_version)
    write_parquet_atomic(table, join(spec.run_url, "errors.parquet"), so)
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
    status = scoring_status(counts, prep.config.max_failed_fraction)
    current, _ = read_json_safe(join(spec.run_url, "run.json"), so)
    current = current if isinstance(current, dict) else {}
    run = _run_json(prep.config, spec, prep.dataset_fingerprint, status, started, counts, timings,
                    current.get("history", []), finished=_now() if status != "running" else None, failures=failures)
    run["steps"] = {"scoring": "done" if status == "running" else status}
    write_json_atomic(run, join(spec.run_url, "run.json"), so)
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
    write_json_atomic(run, join(prep.spec.run_url, "run.json"), dict(prep.spec.storage_options))
    return run


def _sum_dicts(ds) -> dict:
    out: dict = {}
    for d in ds:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out
