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
from dataclasses import fields, replace
from typing import Callable

import numpy as np
import pyarrow as pa

from schemas.outputs import predictions_schema

from pipeline.core.errors import CheckpointError, ImageError
from pipeline.worker.cache import ShardCache, source_digest
from pipeline.worker.decode_pool import DecodeTask, Failure, FilmJob, decode_process_count, shared_pool, worker_cores
from pipeline.inference.images import Decoded
from pipeline.store.maps_store import open_maps, write_region
from pipeline.core.redact import install_log_redaction, redact
from pipeline.worker.runspec import RunSpec
from pipeline.store.shard_check import RECORD_VERSION, check_shard, fingerprint_outputs, nonfinite_rows, retry_plan, shard_status
from pipeline.worker.shards import Shard
from pipeline.store.storage import write_json_atomic, write_parquet_atomic

log = logging.getLogger(__name__)  # on a worker: OUT/logs/worker-<name>.log (pipeline.worker.logs)


def decode_workers(spec: RunSpec) -> int:
    """Decode processes for this worker: --decode-workers, else the deprecated --decode-threads, else
    one per core of the worker (its CPU affinity: dask-cuda pins a GPU worker to the cores near its GPU)."""
    return decode_process_count(spec.decode_workers, spec.decode_threads)


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


def shard_done(shard: Shard, spec: RunSpec) -> dict | None:
    """The record of a shard whose outputs are all present and match it (cheap check), else None."""
    st = check_shard(shard, spec)
    return st.record if st.state == "done" else None


def score_shard(shard: Shard, spec: RunSpec, progress: Callable[[int, int], None] | None = None) -> dict:
    """Score a shard unless its completion record says it is done. Returns the record."""
    install_log_redaction()  # on the worker: its logs may quote a film's URL
    done = shard_done(shard, spec)
    if done is not None:
        return {**done, "skipped": True}
    t0 = time.perf_counter()
    workers = decode_workers(spec)
    pool = shared_pool(workers)
    pool.start_in_background()  # the first shard of a worker: decode processes start while the model loads
    replaced_before = pool.replaced
    F, (H, W), D = len(spec.model.findings), spec.grid, spec.embedding_dim
    n_region = shard.stop - shard.start
    cam = np.full((n_region, F, H, W), np.nan, np.float32)
    cell = np.full((n_region, F, H, W), np.nan, np.float32)
    emb = np.full((n_region, D), np.nan, np.float16)
    cellf = np.full((n_region, H * W, D), np.nan, np.float16)
    prob = np.full((len(shard.rows), F), np.nan, np.float32)
    ids = np.full(n_region, "", dtype=object)
    ok = np.zeros(len(shard.rows), dtype=bool)
    errors: list[dict] = []
    modes: dict[str, int] = {}
    sources: dict[str, str] = {}  # row -> the scored film's size and digest: --verify finds a film replaced since
    t_decode_wait = t_forward = 0.0

    def run_batch(positions, pixels):
        nonlocal t_forward
        t = time.perf_counter()
        with _DEVICE_LOCK:
            try:
                outs = [(positions, infer_batch(model, pixels, spec.baselines, precision=spec.precision))]
            except Exception:  # noqa: BLE001 - isolate the image that breaks the batch
                outs = []
                for p, px in zip(positions, pixels):
                    try:
                        outs.append(([p], infer_batch(model, px[None], spec.baselines, precision=spec.precision)))
                    except Exception as e:  # noqa: BLE001
                        errors.append(_error(shard, p, ImageError("infer", e)))
        for pos, o in outs:
            bad = nonfinite_rows(o)  # NaN/Inf weights or inputs: a failure, never a 'scored' image
            for b in np.flatnonzero(bad):
                errors.append(_error(shard, pos[b], ImageError("nonfinite", FloatingPointError("non-finite probability, map or embedding"))))
            pos = [p for p, b in zip(pos, bad) if not b]
            if not pos:
                continue
            if bad.any():
                o = replace(o, **{f.name: getattr(o, f.name)[~bad] for f in fields(o)})
            r = np.asarray([shard.rows[p] - shard.start for p in pos])
            cam[r], cell[r], emb[r], cellf[r] = o.cam, o.cell_logit, o.embedding, o.cell_features
            prob[pos] = o.prob
            ok[pos] = True
        t_forward += time.perf_counter() - t

    cache = ShardCache(spec.cache_url, shard.start, shard.stop, dict(spec.storage_options)) if spec.cache_url else None
    hits = misses = 0
    bs = spec.batch_size
    todo = list(range(len(shard.paths)))
    plan = retry_plan(shard, spec, {"cam": cam, "cell_logit": cell, "embedding": emb, "cell_features": cellf}, prob, ok)
    if plan is not None:  # a partial shard: keep what it scored, retry only its films with read errors
        todo, errors, modes, sources = plan
    jobs = [FilmJob(p, shard.paths[p], cache.key(shard.rows[p]) if cache is not None else None) for p in todo]
    task = DecodeTask(spec.preprocess, spec.inputs, cache is not None, spec.read_limits, gray_plane=True)
    # Enough films in flight that no decode process waits at a batch boundary; the next shard task of
    # this worker keeps `lookahead` films decoding while this one finishes and writes.
    window = max(4 * bs, 8 * max(1, workers))
    # Batches are fixed runs of positions (films arrive in completion order): the same films share a
    # forward pass in every run, so outputs are bit-for-bit reproducible.
    n_chunks = (len(shard.paths) + bs - 1) // bs
    chunk_size = [0] * n_chunks
    for job in jobs:
        chunk_size[job.pos // bs] += 1
    received = [0] * n_chunks
    ready: list[dict[int, np.ndarray]] = [{} for _ in range(n_chunks)]
    n_done = 0
    # The model loads in a thread (torch's import, ~1 s of CPU, and the build) while this thread keeps
    # taking decoded films: were it to wait for the model here, the decode processes would stop once
    # `window` films were decoded and idle for the rest of the load (measured: ~2 s of a 14 s tiny-
    # network phase). Complete batches wait for the model; they are a shard's films at most.
    loading = _load_model_in_thread(spec)
    waiting: list[tuple[list[int], list[np.ndarray], int]] = []  # complete batches (positions, pixels, films) before the model

    def run_waiting(block: bool) -> None:
        nonlocal model, torch, infer_batch, n_done
        if model is None:
            if not block and not loading.done():
                return
            torch, infer_batch, model = loading.result()
            torch.set_num_threads(spec.torch_threads or worker_cores())  # in this thread: forwards are serialised (_DEVICE_LOCK)
        while waiting:
            positions, pixels, n = waiting.pop(0)
            if positions:
                run_batch(positions, pixels)
            n_done += n
            if progress is not None:
                progress(shard.index, n_done)

    model = torch = infer_batch = None
    with pool.stream(task, jobs, window=window, lookahead=max(bs, 2 * max(1, workers)), chunk=DECODE_CHUNK) as stream:
        it = iter(stream)
        while True:
            t = time.perf_counter()
            nxt = next(it, None)
            t_decode_wait += time.perf_counter() - t
            if nxt is None:
                break
            job, (item, key) = nxt
            pos, k = job.pos, job.pos // bs
            received[k] += 1
            from_cache = False
            if item is None:  # a cache hit: the pixels are in this shard's cache region
                hit = cache.get(shard.rows[pos], key)
                if hit is not None:
                    item, from_cache = Decoded(*hit), True
                    hits += 1
                else:  # its pixels fail their digest (logged): decoded again here (rare), the entry rewritten
                    item, key = task(FilmJob(pos, job.path))
            if isinstance(item, Failure):
                errors.append(_failure(shard, pos, item))
            else:
                if key is not None:
                    sources[str(shard.rows[pos])] = source_digest(key)
                if not from_cache and cache is not None and key is not None:
                    misses += 1
                    cache.put(shard.rows[pos], key, item.rgb(), item.source_mode)
                modes[item.source_mode] = modes.get(item.source_mode, 0) + 1
                ready[k][pos] = item.pixels
            if received[k] == chunk_size[k]:
                batch, ready[k] = sorted(ready[k].items()), {}
                # grayscale planes and colour films as they came: infer_batch normalises each as it is
                waiting.append(([p for p, _ in batch], [px for _, px in batch], received[k]))
                run_waiting(block=False)
    run_waiting(block=True)

    t = time.perf_counter()
    for row, image_id in zip(shard.rows, shard.image_ids):
        ids[row - shard.start] = image_id
    so = spec.store.root  # the output root: its filesystem resolved once for the shard's writes
    group = open_maps(spec.maps_url, "r+", so)
    write_region(group, shard.start, shard.stop, {"cam": cam, "cell_logit": cell, "embedding": emb, "cell_features": cellf, "image_id": ids.astype(str)})
    write_parquet_atomic(_predictions_table(shard, spec, prob, ok), spec.part_url(shard.index), so)
    if cache is not None:
        cache.flush()
    outputs = fingerprint_outputs(spec.part_url(shard.index), spec.maps_url, shard.start, so)
    t_write = time.perf_counter() - t
    record = {
        "record_version": RECORD_VERSION,
        "status": shard_status(errors),  # 'partial' when it holds read errors: a rerun retries them
        "shard": shard.index,
        "start": shard.start,
        "stop": shard.stop,
        "digest": shard.digest,
        "model_version": spec.model_version,
        "n_images": len(shard.rows),
        "n_scored": int(ok.sum()),
        "n_failed": len(errors),
        "source_modes": modes,
        "cache": ({"hits": hits, "misses": misses, **({"corrupted": cache.corrupted} if cache.corrupted else {})}
                  if cache is not None else None),  # corrupted: entries that failed their digest, decoded again
        "errors": errors,
        "sources": sources,
        "seconds": {"decode_wait": t_decode_wait, "forward": t_forward, "write": t_write, "total": time.perf_counter() - t0},
        "device": str(model.classifier.weight.device),  # the policy (spec.device) as this worker resolved it
        "torch_threads": torch.get_num_threads(),
        "decode_workers": workers,
        "decode_pool_restarts": pool.restarts,
        "decode_processes_replaced": pool.replaced - replaced_before,  # stopped or hung during this shard: killed, films redone
        "precision": spec.precision,
        "outputs": outputs,
    }
    write_json_atomic(record, spec.record_url(shard.index), so)
    log.info("shard %d: %d of %d images scored, %d failed in %.1f s (decode wait %.1f, forward %.1f, write %.1f)", shard.index,
             record["n_scored"], len(shard.rows), len(errors), record["seconds"]["total"], t_decode_wait, t_forward, t_write)
    return {**record, "skipped": False}


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
