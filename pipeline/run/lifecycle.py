"""One scoring run from start to end, each step recorded in run.json's ``steps``.

    lock -> clean temporaries -> prepare -> execute (shard tasks on the cluster) -> finalize
         -> aggregate (region statistics and probes on the same cluster) -> publish latest.json
         -> drift against the previous latest -> report

``run(cfg)`` is what ``python -m jobs.score_dataset`` calls; each step is also a function of its
own, so tests and other entry points (the benchmark) call them without parsing printed text. The
cluster is started once, lazily (a run with nothing to score or aggregate starts none), and closed
only after the aggregates: scoring, the region statistics' tree reduction and the probes' fits all
run on its workers, never on the submit node's threads.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from datetime import datetime

from schemas.records import RunRecord

from pipeline.core.errors import OutputError
from pipeline.core.redact import redact
from pipeline.run.interrupt import check as check_interrupt
from pipeline.store.layout import SCRATCH, OutputStore

log = logging.getLogger(__name__)


def quiet_dask_logs() -> None:
    """Dask's own INFO/WARNING chatter (worker start/stop, 'Worker process still alive after 4 s,
    killing' when a normal run closes its cluster) is for --verbose only. Call after importing
    distributed: its import sets these loggers' levels from its config."""
    import distributed  # noqa: F401 - configures its loggers on import

    verbose = log.isEnabledFor(logging.DEBUG)
    for name in ("distributed", "dask_jobqueue", "dask_kubernetes", "dask_cuda"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)


def warm_args(cfg, profile) -> tuple:
    """What the cluster's workers prepare as soon as they are up (``decode_pool.warm_up``): decode
    processes, the scoring code's imports and, on a local cluster (its own workers, started for this
    run), the run's model as the shard tasks name it. Workers of a shared scheduler or a batch
    system load the model in their first shard, as before: they may never get one."""
    from pipeline.run.cluster import CLUSTER_TYPES

    model = (cfg.model_spec(), cfg.compute.device) if CLUSTER_TYPES[profile.type].early else None
    return (cfg.compute.decode_workers, ("pipeline.worker.score_shard", "pipeline.inference.cam"), model)


class RunCluster:
    """The run's Dask cluster, from the start of the run until its aggregates are written.

    A local cluster comes up in the background, and its worker starts its decode processes, imports
    the scoring code and loads the run's model, while the driver prepares the run (issue 8: fixed
    cost); batch schedulers are asked for workers only when the run first needs them (``client``). A run with
    nothing to score or aggregate never waits for it. Given a client (tests, notebooks), it uses
    that one and leaves it open. ``profile``: the cluster profile the driver resolved (else the one
    cfg names, read here)."""

    def __init__(self, cfg, client=None, profile=None):
        self._client = client
        self._cluster = None
        self._starter = None
        self.wait_seconds: float | None = None  # how long the run waited for it (after prepare)
        self.up_seconds: float | None = None  # how long it took to come up (overlapping prepare)
        self._worker_logs = None
        self._store = cfg.output.store()
        if client is None:
            from pipeline.run.cluster import CLUSTER_TYPES, ClusterStarter, profile_for

            quiet_dask_logs()
            self.profile = profile or profile_for(cfg.cluster)
            self._starter = ClusterStarter(self.profile, cfg.cluster.worker_timeout, warm=warm_args(cfg, self.profile))
            early = CLUSTER_TYPES[self.profile.type].early
            log.info(f"cluster {self.profile.name}: " + ("starting in the background (workers load the model while the run is prepared)"
                                                         if early else "asked for workers when the first shard is ready"))

    @property
    def client(self):
        if self._client is None:
            t = time.perf_counter()
            self._cluster, self._client = self._starter.result()
            self.wait_seconds = time.perf_counter() - t
            self.up_seconds = self._starter.seconds or 0.0
            log.info(f"cluster {self.profile.name}: dashboard {self._client.dashboard_link}")
            from pipeline.worker.logs import install_worker_logs

            # OUT/logs/worker-<name>.log
            self._worker_logs = install_worker_logs(self._client, self._store.logs, self._store.options)
        return self._client

    def map(self, fn, items) -> list:
        """fn over items as independent tasks on the cluster, results in order (the probes' map_fn)."""
        items = list(items)
        if not items:
            return []
        client = self.client
        return client.gather(client.map(fn, client.scatter(items), pure=False))  # each item sent once, not in the graph

    def close(self) -> None:
        """Close what this run started (whatever it was used for); a client handed in stays open."""
        if self._worker_logs is not None:
            self._worker_logs.close()  # before the client closes
            self._worker_logs = None
        if self._starter is not None:
            self._starter.close()
            self._starter = None

    def close_in_background(self) -> threading.Thread:
        """close() in a thread: the workers and their decode processes take about a second to exit,
        mostly waiting, while the run is published and its report drawn (issue 8: fixed cost).
        Join the thread before the run returns."""

        def close_quietly():
            try:
                self.close()
            except Exception as e:  # noqa: BLE001 - the run is written; a failed close only leaks until exit
                log.warning(f"closing the cluster failed: {type(e).__name__}: {e}")

        t = threading.Thread(target=close_quietly, name="cluster-close", daemon=True)
        t.start()
        return t

    def __enter__(self) -> "RunCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- the whole run -------------------------------------------------------------------------------

def run(cfg, validated: bool = False, client=None, profile=None) -> dict:
    """Validate, hold the --out lock, score, aggregate, then point latest.json at the run, compare it
    with the previous latest and write its report. Returns run.json's content (plus ``report`` and
    ``drift_text`` when written). ``profile``: the cluster profile, when the caller resolved it
    (``cluster.profile_for``); else validation reads it, once."""
    from pipeline.store.storage import remove_if_empty

    if not validated:
        from pipeline.run.validate import validate

        profile = validate(cfg, profile)
    store = cfg.output.store()
    created = first_missing(store.url) if not store.exists() else None
    try:
        return run_locked(cfg, store, client, profile)
    except BaseException:
        if created:  # a run that failed before writing anything leaves no empty --out (or parents) behind
            import shutil

            shutil.rmtree(os.path.join(store.fs()[1], SCRATCH), ignore_errors=True)  # only scratch of this run
            remove_if_empty(created, store.options)
        raise


def first_missing(out: str) -> str:
    """The outermost folder of a local --out that does not exist yet (what a run would create)."""
    if "://" in out:
        return out
    path = os.path.abspath(out)
    while not os.path.exists(os.path.dirname(path)):
        path = os.path.dirname(path)
    return path


def run_locked(cfg, store: OutputStore, client=None, profile=None) -> dict:
    from pipeline.run.run_lock import run_lock

    store.check_writable()
    with run_lock(store) as note:
        if note:
            log.warning(note)
        else:
            done = nothing_changed(cfg, store)
            if done is not None:
                return done
        contain_scratch(store)
        clean_temporaries(store)
        previous = previous_latest(store)
        rerun = RerunClock(store, previous)
        cluster = RunCluster(cfg, client, profile)
        try:
            prep, record = score(cfg, store, cluster)
            if record.status == "running":  # every shard done: aggregates next, on the same cluster
                record = aggregate(cfg, prep, record, cluster, map_fn=cluster.map)
        except BaseException:
            cluster.close()
            raise
        closing = cluster.close_in_background()  # no step below uses the cluster
        written: dict = {}  # what the steps after scoring return
        try:
            if record.status == "complete":
                rerun.keep_scoring_run(prep, record)
                check_interrupt()  # a complete run; interrupted before it becomes latest
                publish(store, record, previous)
                written["drift_text"] = drift_step(store, drift_from(record, previous), record)
                if cfg.output.report:
                    written["report"] = report_step(store, record, cfg.aggregate, cfg.inputs())
                else:
                    record_step(store, record, "report", "skipped")
                rerun.record(record, written)
        finally:
            closing.join()
    return {**record.to_json(), **written}


# ---- the steps -------------------------------------------------------------------------------------

def nothing_changed(cfg, store: OutputStore) -> dict | None:
    """The no-op: when nothing changed since the latest complete run (pipeline.run.uptodate), record
    this rerun in run.json's ``reruns`` and return the run (``nothing_changed`` set); else None.
    Starts no cluster, loads no model, imports neither torch nor pandas."""
    from pipeline.run.uptodate import check, now, record_rerun

    t, started = time.perf_counter(), now()
    try:
        found, why = check(cfg, store)
    except Exception as e:  # noqa: BLE001 - the full run finds (and reports) whatever this tripped on
        found, why = None, f"{type(e).__name__}: {redact(str(e))[:200]}"
    if found is None:
        if why != "no complete run yet":
            log.info(f"rerun: {why} ({time.perf_counter() - t:.1f} s to find out)")
        return None
    seconds = {**found.seconds, "total": time.perf_counter() - t}
    run = record_rerun(store, found.model_version, {"started": started, "finished": now(), "outcome": "nothing changed",
                                                    "seconds": seconds}, found.restamped)
    return {**run.to_json(), "nothing_changed": True, "check_seconds": seconds["total"]}


class RerunClock:
    """A rerun that the early check could not prove a no-op (--verify, a re-read manifest, a deleted
    report, stale aggregates) and that then finds nothing to score: like a no-op, it is appended to
    run.json's ``reruns`` (what it redid and how long it took) and the scoring run's ``started``,
    ``finished``, ``seconds`` and ``history`` are put back, so jobs.runs keeps showing the run's own
    times. The latest run's record is read before prepare_run rewrites it."""

    def __init__(self, store: OutputStore, latest: str | None):
        from pipeline.run.uptodate import now
        from pipeline.store.run_index import read_run

        self.store, self.t, self.started = store, time.perf_counter(), now()
        run, _ = read_run(store, latest) if latest else (None, None)
        self.scored = run if run is not None and run.status == "complete" else None
        self.entry: dict | None = None

    def keep_scoring_run(self, prep, record) -> None:
        """On a rerun with nothing scored, the record (and run.json) get the scoring run's times back."""
        from pipeline.store.run_index import write_run

        if prep.pending or self.scored is None or self.scored.model_version != record.model_version:
            return
        redid = [k for k in ("aggregates",) if k in record.seconds]
        self.entry = {"started": self.started, "outcome": "nothing to score", "redid": redid, "seconds": dict(record.seconds)}
        s = self.scored
        record.started, record.finished, record.seconds, record.history = s.started, s.finished, s.seconds, s.history
        write_run(self.store, record)

    def record(self, record, written: dict) -> None:
        """After the report: append the rerun's entry (nothing for a scoring run)."""
        if self.entry is None:
            return
        from pipeline.run.uptodate import now, record_rerun

        if written.get("report"):
            self.entry["redid"].append("report")
        self.entry["seconds"]["total"] = time.perf_counter() - self.t
        record.reruns = record_rerun(self.store, record.model_version, {**self.entry, "finished": now()}).reruns


_SCRATCH_SET: dict[str, str] = {}  # what contain_scratch set (a later run in this process replaces only that)


def contain_scratch(store: OutputStore) -> str:
    """The job writes nowhere but --out: matplotlib's config and font cache (else ~/.config,
    ~/.cache) and Dask's scratch space (else the system temp folder) go to OUT/_scratch, or, for an
    --out that is not a local folder, to a temporary folder of this run. A value the user set
    (MPLCONFIGDIR, Dask's temporary-directory) is kept."""
    import tempfile

    import dask

    if "://" not in store.url or store.url.startswith("file://"):
        base = os.path.join(store.fs()[1], SCRATCH)
    else:
        import atexit
        import shutil

        base = tempfile.mkdtemp(prefix="cxr-audit-scratch-")
        atexit.register(shutil.rmtree, base, True)  # the run's own: one per run was left behind
    mpl, scratch = os.path.join(base, "matplotlib"), os.path.join(base, "dask")
    if os.environ.get("MPLCONFIGDIR") in (None, _SCRATCH_SET.get("mpl")):
        os.makedirs(mpl, exist_ok=True)
        os.environ["MPLCONFIGDIR"] = _SCRATCH_SET["mpl"] = mpl
    if dask.config.get("temporary-directory", None) in (None, _SCRATCH_SET.get("dask")):
        dask.config.set({"temporary-directory": scratch})
        _SCRATCH_SET["dask"] = scratch
    return base


def clean_temporaries(store: OutputStore) -> int:
    """Delete the temporaries (``*.tmp-cxr-<hex>``) an interrupted writer of this job left (only
    while holding the lock); a user's own ``*.tmp-*`` files are left alone."""
    removed = store.remove_temp_files()
    if removed:
        log.info(f"removed {removed} half-written temporary files left by an interrupted run")
    return removed


def previous_latest(store: OutputStore) -> str | None:
    """The model version latest.json names now (rebuilt from the runs when it is unreadable)."""
    from pipeline.store.bookkeeping import rebuild_latest

    latest, why = store.read_json_safe(store.latest)
    if why or (latest is not None and not isinstance(latest, dict)):
        latest = {"model_version": rebuild_latest(store)}
        log.warning(f"latest.json was unreadable ({why}); rebuilt it from the runs: {latest['model_version']}")
    return (latest or {}).get("model_version")


def score(cfg, store: OutputStore, cluster: RunCluster):
    """prepare -> execute -> finalize. Returns the prepared run and its RunRecord ('running' when every
    shard is done; 'incomplete', 'failed' or 'partial' otherwise: no aggregates, never latest)."""
    from pipeline.run.scoring import _now, finalize_run, finish_run, prepare_run

    started = _now()
    prep = prepare_run(cfg)
    for line in manifest_summary(prep.manifest, cfg, store):
        log.info(redact(line))
    for note in prep.notes:
        log.warning(redact(note))
    log.info(f"model {prep.spec.model_version} ({cfg.model.arch}); {len(prep.shards)} shards, {len(prep.pending)} to score")
    results: list[dict] = []
    failures: list[dict] = []
    try:
        execute(prep, cluster, results, failures, since=datetime.fromisoformat(started).timestamp())
    except KeyboardInterrupt:
        try:  # record what is done, mark the run interrupted (never latest)
            finish_run(prep, finalize_run(prep, results, failures, started), "interrupted", {"scoring": "interrupted"})
        except Exception as e:  # noqa: BLE001 - the interrupt matters more than this bookkeeping
            log.error(f"(could not record the interruption in run.json: {e})")
        raise
    try:
        return prep, finalize_run(prep, results, failures, started)
    except OutputError as e:
        mark_stopped(store, prep.spec.model_version, "incomplete", str(e))
        raise


def mark_stopped(store: OutputStore, model_version: str, status: str, why: str) -> None:
    """Best effort: a run.json still 'running' when the job stops on an output error (a full disk)
    says it stopped. When even that cannot be written whole (no space for the temporary copy), a
    local run.json is rewritten in place, compact: shorter than the indented file it replaces."""
    from dataclasses import replace

    from pipeline.run.scoring import _now
    from pipeline.store.run_index import read_run, rewrite_run_in_place, write_run

    current, _ = read_run(store, model_version)
    if current is None or current.status != "running":
        return
    current = replace(current, status=status, finished=_now(), error=redact(why)[:500])
    try:
        write_run(store, current)
        return
    except OutputError:
        pass
    if "://" in store.url and not store.url.startswith("file://"):
        return
    try:
        rewrite_run_in_place(store, current)
    except OSError as e:
        log.error(f"(could not mark run.json {status}: {e})")


def execute(prep, cluster: RunCluster, results: list, failures: list, since: float | None = None) -> None:
    """One task per pending shard on the cluster, gathered as they finish. A failed shard is recorded
    and does not stop the others; results and failures are filled in place (kept on Ctrl-C).
    Records the scoring phase's length (``score_wall``) and, given the run's start as a Unix time
    (``since``), when the phase began (``score_start``, seconds after run.json's ``started``)."""
    if not prep.pending:
        return
    from distributed import as_completed
    from tqdm import tqdm

    from pipeline.run.progress import ProgressBar, WorkerProgress, progress_topic
    from pipeline.worker.score_shard import score_shard

    client = cluster.client
    if cluster.wait_seconds is not None:
        prep.timings["cluster_start"] = cluster.wait_seconds  # the wait for it, after prepare_run
        prep.timings["cluster_up"] = cluster.up_seconds  # how long it took to come up
    spec = prep.spec
    topic = progress_topic(spec.model_version)
    bar = tqdm(total=sum(len(s.rows) for s in prep.pending), unit="img", desc="scoring", file=sys.stderr,
               disable=not log.isEnabledFor(logging.INFO))  # --quiet: no progress bar either
    progress = ProgressBar(client, bar, topic)  # advances per batch, from the workers' events
    futures = {client.submit(score_shard, s, spec, WorkerProgress(topic), key=f"score-shard-{spec.model_version}-{s.index}-{s.digest}",
                             pure=False): s for s in prep.pending}
    t = time.perf_counter()
    if since is not None:
        prep.timings["score_start"] = time.time() - since
    with bar:
        for fut in as_completed(futures):
            shard = futures[fut]
            try:
                results.append(fut.result())
                if results[-1].get("decode_processes_replaced"):
                    log.warning(f"shard {shard.index}: {results[-1]['decode_processes_replaced']} decode process(es) were stopped or "
                                "hung and have been replaced; their films were decoded again (details in the worker's log under "
                                f"{redact(cluster._store.logs)})")
            except Exception as e:  # noqa: BLE001 - one failed shard does not stop the others
                failures.append({"shard": shard.index, "error_class": type(e).__name__, "message": redact(str(e))[:500]})
                log.error(f"shard {shard.index} failed: {type(e).__name__}: {redact(str(e))}")
            progress.shard_finished(shard.index, len(shard.rows))
            check_interrupt()  # a Ctrl-C whose KeyboardInterrupt something swallowed
    progress.close()
    prep.timings["score_wall"] = time.perf_counter() - t


def aggregate(cfg, prep, info: RunRecord, cluster: RunCluster, map_fn=None) -> RunRecord:
    """Recompute stale aggregates on the run's cluster (the region statistics' reduction as its tasks;
    the probes' fits through map_fn, e.g. ``cluster.map``); the run (``info``, its RunRecord) becomes
    'complete'."""
    from dataclasses import replace

    from pipeline.analysis.aggregate import aggregate_run
    from pipeline.analysis.aggregate_inputs import stale_aggregates
    from pipeline.run.scoring import finish_run

    spec = prep.spec
    try:
        check_interrupt()  # one swallowed during the last shard
        agg = cfg.aggregate
        stale = stale_aggregates(spec.store, spec.model_version, agg)
        if stale:
            t = time.perf_counter()
            log.info(f"aggregates: computing ({stale})")
            client = cluster.client
            threads = sum(client.nthreads().values()) or None  # the reduction's partitions: one per worker thread
            tables = aggregate_run(spec.store, spec.model_version, agg, scheduler=client.get, n_parts=threads, map_fn=map_fn,
                                   inputs=spec.inputs)
            seconds = time.perf_counter() - t
            info = replace(info, seconds={**info.seconds, "aggregates": seconds})
            log.info(f"aggregates: {', '.join(f'{k} ({v.num_rows} rows)' for k, v in tables.items())} in {seconds:.1f} s")
        steps = {"aggregates": "done"}
        if agg.identifiability:
            steps["probes"] = "done"
    except KeyboardInterrupt:
        finish_run(prep, info, "interrupted", {"aggregates": "interrupted"})
        raise
    except OutputError as e:
        mark_stopped(spec.store, spec.model_version, "incomplete", str(e))
        raise
    return finish_run(prep, info, "complete", steps)



def publish(store: OutputStore, info: RunRecord, previous: str | None = None) -> None:
    """Point latest.json at the run (replaced atomically) and rewrite the DuckDB views. The latest
    run it replaces is recorded in run.json first (``replaced_latest``, drift 'pending'): a kill
    after publishing leaves a rerun that still knows what to compare with (``drift_from``)."""
    from pipeline.store.query_views import write_views

    if previous and previous != info.model_version:
        info.replaced_latest = previous
        record_step(store, info, "drift", "pending")
    store.write_json(store.latest, store.latest_entry(info.model_version, info.finished))
    write_views(store)  # DuckDB views of the latest run: OUT/cxr_audit.sql
    record_step(store, info, "publish", "done")


def drift_from(info: RunRecord, previous: str | None) -> str | None:
    """The run to compare with: the latest one this run replaces now, or, on a rerun of a run
    already published (latest.json names it), the one it replaced when its drift was left undone."""
    if previous and previous != info.model_version:
        return previous
    if info.steps.get("drift") in ("pending", "failed"):
        return info.replaced_latest
    return None


def drift_step(store: OutputStore, previous: str | None, info: RunRecord) -> str | None:
    """Compare the run with the previous latest (when it is another model); returns the summary text.
    A failed comparison is recorded and logged with the command that redoes it; the run stays complete."""
    mv = info.model_version
    if not previous or previous == mv:
        return None
    from pipeline.analysis.drift import drift, summary_text

    try:
        text = summary_text(drift(store, previous, mv))
    except Exception as e:  # noqa: BLE001 - the run and latest.json are already written
        log.error(f"drift {previous} -> {mv} not written ({type(e).__name__}: {redact(str(e))}); "
                  f"redo it with python -m jobs.drift --out {redact(store.url)} --from {previous} --to {mv}")
        record_step(store, info, "drift", "failed")
        return None
    record_step(store, info, "drift", "done")
    return text


def report_step(store: OutputStore, info: RunRecord, agg=None, inputs=None) -> str | None:
    """The run's HTML report (a report that fails to build never fails the run); its films are read
    with ``inputs``, the run's input options."""
    from pipeline.reporting.hook import report_after_run

    from pipeline.run.uptodate import current_aggregates

    log.info("report: drawing")
    path = report_after_run(store, info.model_version, inputs=inputs)
    # what it was drawn from: a rerun with the same aggregates keeps it (pipeline.run.uptodate)
    info.report_inputs = current_aggregates(store, info.model_version, agg) if path and agg is not None else None
    record_step(store, info, "report", "done" if path else "failed")
    return path


def record_step(store: OutputStore, info: RunRecord, step: str, status: str) -> None:
    """Add one step's status to the run's RunRecord (``info``) and rewrite run.json from it, atomically."""
    from pipeline.store.run_index import write_run

    info.steps = {**info.steps, step: status}
    write_run(store, info)


def manifest_summary(result, cfg, store: OutputStore | None = None) -> list[str]:
    """Films found per dataset ('120 of 112,120 listed films found under ROOT') and the other
    metadata issues by reason: a partial download is one line, not thousands of issues."""
    from pipeline.sources.adapters import DatasetSpec

    store = store or cfg.output.store()
    issues = result.issues.select(["dataset", "reason"]).to_pandas()
    kept = result.manifest.column("dataset").to_pandas().value_counts()
    lines = []
    for spec in (DatasetSpec.parse(d) for d in cfg.data.datasets):
        mine = issues[issues.dataset == spec.name].reason
        missing, excluded = int((mine == "missing_file").sum()), int((mine == "excluded_view").sum())
        found = int(kept.get(spec.name, 0)) + excluded
        if missing:
            lines.append(f"{spec.name}: {found:,} of {found + missing:,} listed films found under {spec.location} "
                         f"(the {missing:,} others are missing_file rows in manifest_issues.parquet)")
    other = issues[issues.reason != "missing_file"].reason.value_counts().sort_index().to_dict()
    lines.append(f"manifest: {result.manifest.num_rows:,} images; "
                 + (f"metadata issues {other} -> {store.manifest_issues}" if other else "no other metadata issues"))
    return lines
