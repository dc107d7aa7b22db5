"""Score one shard: decode in the worker's decode processes while the model computes, then write
the shard's own Parquet part and Zarr region, then its completion record (in that order, so a record
only exists for outputs that are complete).

Importing this module (and unpickling a RunSpec) does not import torch: on a worker's first shard
the films start decoding while torch loads and the model is built (about 1 s of CPU, issue 8)."""

from __future__ import annotations

import logging
import time
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field, fields, replace
from typing import Callable

import numpy as np
import pyarrow as pa

from schemas.outputs import predictions_schema
from schemas.records import ShardRecord

from pipeline.core.errors import CheckpointError, ImageError
from pipeline.worker.cache import ShardCache, source_digest
from pipeline.worker.decode_pool import DecodeTask, Failure, FilmJob, decode_process_count, shared_pool, worker_cores
from pipeline.inference.images import Decoded
from pipeline.store.maps_store import open_maps, write_region
from pipeline.core.redact import install_log_redaction, redact
from pipeline.worker.runspec import RunSpec
from pipeline.store.shard_check import check_shard, fingerprint_outputs, nonfinite_rows, retry_plan, shard_status, write_record
from pipeline.worker.shards import Shard
from pipeline.store.storage import write_parquet_atomic

log = logging.getLogger(__name__)  # on a worker: OUT/logs/worker-<name>.log (pipeline.worker.logs)


def decode_workers(spec: RunSpec) -> int:
    """Decode processes for this worker: --decode-workers, else one per core of the worker (its CPU
    affinity: dask-cuda pins a GPU worker to the cores near its GPU)."""
    return decode_process_count(spec.decode_workers)


# Films per decode task: one task, pipe message, future and hand-over per 4 films instead of per film
# (the driving process's CPU for them: 0.2 -> 0.04 ms per film, measured), while a chunk (~45 ms of
# decoding) stays far shorter than a batch.
DECODE_CHUNK = 4

# One forward at a time per process: a worker runs two shard tasks (one writes while the other
# scores), and they share the device and torch's intra-op threads.
_DEVICE_LOCK = threading.Lock()


def _load_model_in_thread(spec: RunSpec) -> Future:
    """(torch, infer_batch, the worker's model) once imported and loaded, in a thread of its own; the
    model is the one the run was started with, or the future holds a CheckpointError (check_weights)."""
    fut: Future = Future()

    def load() -> None:
        try:
            import torch

            from pipeline.inference.cam import infer_batch
            from pipeline.inference.model import get_model

            model = get_model(spec.model, spec.device, is_current=lambda m: _is_run_model(m, spec))  # a stale cached model: reloaded
            check_weights(model, spec)  # still not the run's weights: the file changed
            fut.set_result((torch, infer_batch, model))
        except BaseException as e:  # noqa: BLE001 - raised in the shard's thread by result()
            fut.set_exception(e)

    threading.Thread(target=load, name="model-load", daemon=True).start()
    return fut


def _is_run_model(model, spec: RunSpec) -> bool:
    from pipeline.inference.precision import run_version

    return run_version(model.version, spec.precision) == spec.model_version


def check_weights(model, spec: RunSpec) -> None:
    """The weights this worker loaded are the ones the driver checked: a checkpoint replaced during
    a run (a nightly model update landing mid-run) would otherwise be scored under the old version's
    name. Workers may load the model before the driver has checked it (``decode_pool.warm``), and a
    model cached by an earlier run of this worker is loaded again when its weights are not the run's."""
    if not _is_run_model(model, spec):
        from pipeline.inference.precision import run_version

        raise CheckpointError(
            f"the weights this worker loaded from {redact(str(spec.model.checkpoint))} are version "
            f"{run_version(model.version, spec.precision)}, not {spec.model_version}, the version the run was started with: "
            "the checkpoint changed during the run, or this worker reads another file at that path (a path local to "
            "the driver's machine) or builds random weights with another torch. Score the new checkpoint as a new run "
            "(its outputs go to their own runs/<version>/), or make the path the same file everywhere; this run's "
            "completed shards are kept.")


def shard_done(shard: Shard, spec: RunSpec) -> ShardRecord | None:
    """The record of a shard whose outputs are all present and match it (cheap check), else None."""
    st = check_shard(shard, spec)
    return st.record if st.state == "done" else None


def score_shard(shard: Shard, spec: RunSpec, progress: Callable[[int, int], None] | None = None) -> dict:
    """Score a shard unless its completion record says it is done. Returns the record as JSON, with
    ``skipped`` (True when it was done already). ``progress(shard index, films done)`` after each batch."""
    install_log_redaction()  # on the worker: its logs may quote a film's URL
    done = shard_done(shard, spec)
    if done is not None:
        return {**done.to_json(), "skipped": True}
    return {**ShardTask(shard, spec, progress).run().to_json(), "skipped": False}


@dataclass
class ShardOutputs:
    """What a shard task fills in: its region of each map array (rows start..stop; NaN where no film
    was scored), each film's probabilities, which films were scored, and what failed."""

    region: dict[str, np.ndarray]  # cam, cell_logit, embedding, cell_features (maps.zarr's arrays)
    prob: np.ndarray
    ok: np.ndarray
    errors: list[dict] = field(default_factory=list)
    modes: dict[str, int] = field(default_factory=dict)  # source image mode -> films
    sources: dict[str, str] = field(default_factory=dict)  # row -> the scored film's size and digest: --verify finds a film replaced since

    @classmethod
    def empty(cls, shard: Shard, spec: RunSpec) -> "ShardOutputs":
        F, (H, W), D = len(spec.model.findings), spec.grid, spec.embedding_dim
        n = shard.stop - shard.start
        region = {"cam": np.full((n, F, H, W), np.nan, np.float32), "cell_logit": np.full((n, F, H, W), np.nan, np.float32),
                  "embedding": np.full((n, D), np.nan, np.float16), "cell_features": np.full((n, H * W, D), np.nan, np.float16)}
        return cls(region, np.full((len(shard.rows), F), np.nan, np.float32), np.zeros(len(shard.rows), dtype=bool))

    def keep(self, shard: Shard, positions: list[int], o) -> None:
        """A batch's outputs (BatchOutputs) for the films at ``positions``; a film with a NaN or Inf
        output (non-finite weights or inputs) is a failure, never a 'scored' image."""
        bad = nonfinite_rows(o)
        for b in np.flatnonzero(bad):
            self.errors.append(_error(shard, positions[b], ImageError("nonfinite", FloatingPointError("non-finite probability, map or embedding"))))
        positions = [p for p, b in zip(positions, bad) if not b]
        if not positions:
            return
        if bad.any():
            o = replace(o, **{f.name: getattr(o, f.name)[~bad] for f in fields(o)})
        r = np.asarray([shard.rows[p] - shard.start for p in positions])
        for name, value in (("cam", o.cam), ("cell_logit", o.cell_logit), ("embedding", o.embedding), ("cell_features", o.cell_features)):
            self.region[name][r] = value
        self.prob[positions] = o.prob
        self.ok[positions] = True


class _Model:
    """The run's model, loading in a thread of its own (torch's import, ~1 s of CPU, and the build)
    while the shard task keeps taking decoded films: were it to wait for the model, the decode
    processes would stop once `window` films were decoded and idle for the rest of the load
    (measured: ~2 s of a 14 s tiny-network phase)."""

    def __init__(self, spec: RunSpec):
        self.spec = spec
        self.loading = _load_model_in_thread(spec)
        self.torch = self.infer_batch = self.model = None

    def ready(self, block: bool) -> bool:
        """Loaded (waiting for it when ``block``)? Raises what the load raised (a CheckpointError)."""
        if self.model is None:
            if not block and not self.loading.done():
                return False
            self.torch, self.infer_batch, self.model = self.loading.result()
            self.torch.set_num_threads(self.spec.torch_threads or worker_cores())  # in this thread: forwards are serialised (_DEVICE_LOCK)
        return True


class _Batches:
    """Decoded films gathered into batches that are fixed runs of positions (films arrive in
    completion order): the same films share a forward pass in every run, so outputs are bit-for-bit
    reproducible."""

    def __init__(self, jobs: list[FilmJob], n_films: int, batch_size: int):
        self.bs = batch_size
        n = (n_films + batch_size - 1) // batch_size
        self.size, self.received = [0] * n, [0] * n
        self.ready: list[dict[int, np.ndarray]] = [{} for _ in range(n)]
        for job in jobs:
            self.size[job.pos // batch_size] += 1

    def add(self, pos: int, pixels: np.ndarray | None) -> tuple[list[int], list[np.ndarray], int] | None:
        """One film taken (``pixels`` None: it failed). Returns its batch once complete: (positions,
        pixels, films taken), grayscale planes and colour films as they came (infer_batch normalises each)."""
        k = pos // self.bs
        self.received[k] += 1
        if pixels is not None:
            self.ready[k][pos] = pixels
        if self.received[k] != self.size[k]:
            return None
        batch, self.ready[k] = sorted(self.ready[k].items()), {}
        return [p for p, _ in batch], [px for _, px in batch], self.received[k]


class ShardTask:
    """One shard scored, a step per method, in the order ``run`` calls them: open the outputs, plan
    the films (a partial shard keeps what it scored), decode and score them batch by batch, write the
    predictions and maps, then the record. The inputs (shard, spec, progress) are never changed; the
    rest is what the steps fill in."""

    def __init__(self, shard: Shard, spec: RunSpec, progress: Callable[[int, int], None] | None = None):
        self.shard, self.spec, self.progress = shard, spec, progress
        self.so = spec.store.root  # the output root: its filesystem resolved once for the shard's writes
        self.workers = decode_workers(spec)
        self.pool = shared_pool(self.workers)
        self.out: ShardOutputs | None = None
        self.cache: ShardCache | None = None
        self.model: _Model | None = None
        self.waiting: list[tuple[list[int], list[np.ndarray], int]] = []  # complete batches before the model
        self.n_done = self.hits = self.misses = 0
        self.seconds = {"decode_wait": 0.0, "forward": 0.0, "write": 0.0}
        self.outputs: dict | None = None  # fingerprints of what write_outputs wrote

    def run(self) -> ShardRecord:
        t0 = time.perf_counter()
        self.pool.start_in_background()  # the first shard of a worker: decode processes start while the model loads
        replaced_before = self.pool.replaced
        self.open_outputs()
        jobs = self.plan_films()
        decode = DecodeTask(self.spec.preprocess, self.spec.inputs, self.cache is not None, self.spec.read_limits, gray_plane=True)
        self.model = _Model(self.spec)
        self.score_films(jobs, decode)
        self.write_outputs()
        record = self.record(time.perf_counter() - t0, self.pool.replaced - replaced_before)
        write_record(record, self.spec.record_url(self.shard.index), self.so)
        s = record.seconds
        log.info("shard %d: %d of %d images scored, %d failed in %.1f s (decode wait %.1f, forward %.1f, write %.1f)", self.shard.index,
                 record.n_scored, record.n_images, record.n_failed, s["total"], s["decode_wait"], s["forward"], s["write"])
        return record

    def open_outputs(self) -> None:
        self.out = ShardOutputs.empty(self.shard, self.spec)
        if self.spec.cache_url:
            self.cache = ShardCache(self.spec.cache_url, self.shard.start, self.shard.stop, self.so)

    def plan_films(self) -> list[FilmJob]:
        """The films to decode: all of them, or for a partial shard only those with read errors (the
        outputs keep what it scored)."""
        shard, out = self.shard, self.out
        todo = list(range(len(shard.paths)))
        plan = retry_plan(shard, self.spec, out.region, out.prob, out.ok)
        if plan is not None:
            todo, out.errors, out.modes, out.sources = plan
        cache = self.cache
        return [FilmJob(p, shard.paths[p], cache.key(shard.rows[p]) if cache is not None else None) for p in todo]

    def score_films(self, jobs: list[FilmJob], decode: DecodeTask) -> None:
        """Decode in the worker's decode processes while complete batches go through the model."""
        bs, workers = self.spec.batch_size, max(1, self.workers)
        batches = _Batches(jobs, len(self.shard.paths), bs)
        # Enough films in flight that no decode process waits at a batch boundary; the next shard task of
        # this worker keeps `lookahead` films decoding while this one finishes and writes.
        with self.pool.stream(decode, jobs, window=max(4 * bs, 8 * workers), lookahead=max(bs, 2 * workers), chunk=DECODE_CHUNK) as stream:
            for job, (item, key) in self._decoded(stream):
                batch = batches.add(job.pos, self.take_film(job, item, key, decode))
                if batch is not None:
                    self.waiting.append(batch)
                    self.run_waiting(block=False)
        self.run_waiting(block=True)

    def _decoded(self, stream):
        """The stream's films, the time spent waiting for them counted as ``decode_wait``."""
        it = iter(stream)
        while True:
            t = time.perf_counter()
            nxt = next(it, None)
            self.seconds["decode_wait"] += time.perf_counter() - t
            if nxt is None:
                return
            yield nxt

    def take_film(self, job: FilmJob, item, key, decode: DecodeTask) -> np.ndarray | None:
        """A decoded film's pixels (cached when new), or None when it failed (recorded)."""
        shard, out, cache = self.shard, self.out, self.cache
        row, from_cache = shard.rows[job.pos], False
        if item is None:  # a cache hit: the pixels are in this shard's cache region
            hit = cache.get(row, key)
            if hit is not None:
                item, from_cache = Decoded(*hit), True
                self.hits += 1
            else:  # its pixels fail their digest (logged): decoded again here (rare), the entry rewritten
                item, key = decode(FilmJob(job.pos, job.path))
        if isinstance(item, Failure):
            out.errors.append(_failure(shard, job.pos, item))
            return None
        if key is not None:
            out.sources[str(row)] = source_digest(key)
        if not from_cache and cache is not None and key is not None:
            self.misses += 1
            cache.put(row, key, item.rgb(), item.source_mode)
        out.modes[item.source_mode] = out.modes.get(item.source_mode, 0) + 1
        return item.pixels

    def run_waiting(self, block: bool) -> None:
        """The complete batches through the model, once it is loaded (``block``: wait for it)."""
        if not self.model.ready(block):
            return
        while self.waiting:
            positions, pixels, n = self.waiting.pop(0)
            if positions:
                self.run_batch(positions, pixels)
            self.n_done += n
            if self.progress is not None:
                self.progress(self.shard.index, self.n_done)

    def run_batch(self, positions: list[int], pixels: list[np.ndarray]) -> None:
        t = time.perf_counter()
        m, spec = self.model, self.spec
        with _DEVICE_LOCK:
            try:
                outs = [(positions, m.infer_batch(m.model, pixels, spec.baselines, precision=spec.precision))]
            except Exception:  # noqa: BLE001 - isolate the image that breaks the batch
                outs = []
                for p, px in zip(positions, pixels):
                    try:
                        outs.append(([p], m.infer_batch(m.model, px[None], spec.baselines, precision=spec.precision)))
                    except Exception as e:  # noqa: BLE001
                        self.out.errors.append(_error(self.shard, p, ImageError("infer", e)))
        for pos, o in outs:
            self.out.keep(self.shard, pos, o)
        self.seconds["forward"] += time.perf_counter() - t

    def write_outputs(self) -> None:
        """The shard's Zarr region and Parquet part (then the cache), fingerprinted as written."""
        t = time.perf_counter()
        shard, spec, so = self.shard, self.spec, self.so
        ids = np.full(shard.stop - shard.start, "", dtype=object)
        for row, image_id in zip(shard.rows, shard.image_ids):
            ids[row - shard.start] = image_id
        write_region(open_maps(spec.maps_url, "r+", so), shard.start, shard.stop, {**self.out.region, "image_id": ids.astype(str)})
        write_parquet_atomic(_predictions_table(shard, spec, self.out.prob, self.out.ok), spec.part_url(shard.index), so)
        if self.cache is not None:
            self.cache.flush()
        self.outputs = fingerprint_outputs(spec.part_url(shard.index), spec.maps_url, shard.start, so)
        self.seconds["write"] = time.perf_counter() - t

    def record(self, total_seconds: float, replaced: int) -> ShardRecord:
        """What the shard's record vouches for (``replaced``: decode processes stopped or hung during
        this shard, killed and their films decoded again)."""
        shard, spec, out, cache = self.shard, self.spec, self.out, self.cache
        return ShardRecord(
            status=shard_status(out.errors),  # 'partial' when it holds read errors: a rerun retries them
            shard=shard.index, start=shard.start, stop=shard.stop, digest=shard.digest, model_version=spec.model_version,
            n_images=len(shard.rows), n_scored=int(out.ok.sum()), n_failed=len(out.errors), source_modes=out.modes,
            cache=({"hits": self.hits, "misses": self.misses, **({"corrupted": cache.corrupted} if cache.corrupted else {})}
                   if cache is not None else None),  # corrupted: entries that failed their digest, decoded again
            errors=out.errors, sources=out.sources, seconds={**self.seconds, "total": total_seconds},
            device=str(self.model.model.classifier.weight.device),  # the policy (spec.device) as this worker resolved it
            torch_threads=self.model.torch.get_num_threads(), decode_workers=self.workers,
            decode_pool_restarts=self.pool.restarts, decode_processes_replaced=replaced, precision=spec.precision,
            outputs=self.outputs)


def _failure(shard: Shard, pos: int, f: Failure) -> dict:
    return {
        "row": shard.rows[pos],
        "image_id": shard.image_ids[pos],
        "path": redact(shard.paths[pos]),
        "stage": f.stage,
        "error_class": f.error_class,
        "message": redact(f.message)[:500],
    }


def _error(shard: Shard, pos: int, err: ImageError) -> dict:
    return _failure(shard, pos, Failure(err.stage, err.error_class, str(err.cause)))


def _predictions_table(shard: Shard, spec: RunSpec, prob: np.ndarray, ok: np.ndarray) -> pa.Table:
    schema = predictions_schema(spec.model.findings, spec.model_version)
    idx = np.flatnonzero(ok)
    cols = {
        "row": pa.array(np.asarray(shard.rows, dtype=np.int64)[idx], pa.int64()),
        "image_id": pa.array([shard.image_ids[i] for i in idx], pa.string()),
        "model_version": pa.array([spec.model_version] * len(idx), pa.string()),
    }
    for k, f in enumerate(spec.model.findings):
        cols[f] = pa.array(prob[idx, k], pa.float32())
    return pa.Table.from_pydict(cols, schema=schema)
