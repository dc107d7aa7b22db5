"""Score a chest X-ray dataset on a Dask cluster: predictions to Parquet, 7x7 maps to Zarr.

With no arguments: builds (once) a small synthetic ChestX-ray14-layout dataset and a seeded demo
model under ./cxr-audit-demo/, scores it on a LocalCluster and prints a summary.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from jobs._common import add_common, add_config, fail, job_config, log, setup_logging, skip_final_gc
from pipeline.core.errors import CxrAuditError

DEMO_DIR = "cxr-audit-demo"


def parser() -> argparse.ArgumentParser:
    """The job's flags. Configuration flags default to SUPPRESS: the defaults live in
    pipeline.run.config (quoted in the help from there), and a flag not given leaves --config's value."""
    from pipeline.inference.architectures import ARCHITECTURES
    from pipeline.inference.precision import PRECISIONS
    from pipeline.inference.read_limits import HIGH_BIT_DEPTH_MODES
    from pipeline.run.config import ScoreConfig
    from pipeline.sources.source_base import ADAPTERS, UNCERTAIN_MODES

    D = ScoreConfig()  # the defaults, for the help text
    S = argparse.SUPPRESS
    p = argparse.ArgumentParser(
        prog="python -m jobs.score_dataset",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=S,
    )
    add_config(p)
    p.add_argument("--print-config", action="store_true",
                   help="print the configuration (defaults, --config, flags) as a --config YAML file and exit")
    p.add_argument("--dataset", dest="datasets", action="append", metavar="[NAME=]ADAPTER:LOCATION",
                   help=f"repeatable. Adapters: {', '.join(f'{n} ({ADAPTERS.help(n)})' for n in ADAPTERS)}. "
                        "Locations are fsspec URLs (local path, file://, s3://, memory://).")
    p.add_argument("--views", type=_comma_list, metavar="frontal|all|AP,PA,...",
                   help=f"which views to score: 'frontal' (default {','.join(D.data.views)}: lateral views are left out and counted), "
                        "'all', or a list of codes")
    p.add_argument("--site-column", metavar="COLUMN", help="take 'site' from this manifest column (default: the dataset's name)")
    p.add_argument("--uncertain", choices=UNCERTAIN_MODES,
                   help=f"CheXpert/MIMIC uncertain labels (-1): negative, positive, or not labelled (default {D.data.uncertain})")
    p.add_argument("--identifiability", action="store_true",
                   help="after scoring, also fit the confounder probes (site, view, sex, age band; see jobs.aggregate)")
    p.add_argument("--metadata", metavar="URL", help="NIH metadata CSV, if not ROOT/Data_Entry_2017[_v2020].csv")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="state_dict (.pt/.pth, loaded with weights_only=True) or .safetensors; 'random:SEED' for seeded random weights. "
                        "Pickled whole models are refused: convert them with python -m jobs.convert_checkpoint --trust-pickle IN OUT")
    p.add_argument("--arch", metavar="NAME|module:callable",
                   help=f"a registered architecture ({', '.join(ARCHITECTURES)}; default {D.model.arch}) or any callable "
                        "returning a module with 'features' and a Linear 'classifier'")
    p.add_argument("--findings", type=_findings, metavar="A,B,...|FILE",
                   help="finding names in the model's output order (default: the 14 CheXNet findings)")
    p.add_argument("--baselines", metavar="reference|from-labels|FILE",
                   help=f"p_baseline per finding for the ln(p_cell/p_baseline) map (default {D.model.baselines}: the reference prevalences)")
    p.add_argument("--out", metavar="URL", help="output root (fsspec URL)")
    p.add_argument("--cluster", metavar="NAME", help="profile in --cluster-file (default: the file's default, 'local')")
    p.add_argument("--cluster-file", metavar="PATH",
                   help="profiles file (default: ./cluster.yaml if present, else the built-in local profiles); a missing file is an error")
    p.add_argument("--worker-timeout", type=float, metavar="SECONDS",
                   help="give up when the cluster brings up no worker in this time (default: the profile's worker_timeout, "
                        "120 s for local clusters, 1800 s for SLURM)")
    p.add_argument("--shard-size", type=int, metavar="N", help=f"images per shard and Zarr chunk length (default {D.compute.shard_size})")
    p.add_argument("--batch-size", type=int, metavar="N", help=f"images per forward pass (default {D.compute.batch_size})")
    p.add_argument("--limit", type=int, metavar="N", help="score only the first N manifest rows")
    p.add_argument("--device", metavar="auto|cpu|cuda", help=f"where the model runs on each worker (default {D.compute.device})")
    p.add_argument("--high-bit-depth", choices=HIGH_BIT_DEPTH_MODES,
                   help=f"16-bit PNGs: 'clip' as the reference's convert('RGB') does, or 'rescale' the full range to 8 bits "
                        f"(default {D.images.high_bit_depth})")
    p.add_argument("--cache", metavar="auto|none|URL",
                   help="preprocessed-image cache (uint8 224x224 in Zarr): 'auto' = OUT/cache (default), 'none', or a URL")
    p.add_argument("--decode-workers", type=int, metavar="N",
                   help="decode processes per worker, kept alive across shards (default: one per core of the worker; 0: decode in the scoring process)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help=f"forward precision: {D.model.precision} (default, strict: TF32 off on CUDA, parity <= 1e-4), tf32, or bf16 (autocast features); "
                        "part of the run's identity (non-default precisions get their own run folder runs/VERSION-PRECISION)")
    p.add_argument("--decode-threads", type=int, metavar="N", help="deprecated alias of --decode-workers")
    p.add_argument("--verify", action="store_true",
                   help="on resume, rehash every finished shard's outputs against its record (default: sizes only)")
    p.add_argument("--max-failed-fraction", type=float, metavar="F",
                   help=f"more failed images than this share ends the run 'partial' with exit 3 (default {D.output.max_failed_fraction}); "
                        "no image scored is always a failure")
    p.add_argument("--max-image-bytes", type=int, metavar="N",
                   help=f"larger image files are not read; recorded as ImageTooLarge (default {D.images.max_image_bytes // 2**20} MiB; "
                        "real films are 0.3-10 MB)")
    p.add_argument("--max-image-pixels", type=int, metavar="N",
                   help=f"films whose header declares more pixels are not decoded (TooManyPixels; default {D.images.max_image_pixels:,})")
    p.add_argument("--max-aspect-ratio", type=float, metavar="R",
                   help=f"films longer than R times their width (or the reverse) are not decoded (ExtremeAspectRatio; default {D.images.max_aspect_ratio:g})")
    p.add_argument("--read-timeout", type=float, metavar="S", help=f"seconds per remote read attempt (ReadTimeout; default {D.images.read_timeout:g})")
    p.add_argument("--read-retries", type=int, metavar="N",
                   help=f"further attempts after a transient read error (timeout, connection, EIO), with backoff (default {D.images.read_retries})")
    p.add_argument("--allow-root", dest="allow_roots", action="append", metavar="URL",
                   help="repeatable: a folder or URL prefix that manifest paths may point into besides the manifest's own folder")
    return add_common(p)


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _findings(text: str) -> tuple[str, ...]:
    """--findings: names separated by commas, or a file of them (one per line or comma-separated)."""
    if os.path.exists(text):
        with open(text) as f:
            text = f.read().replace("\n", ",")
    return _comma_list(text)


def demo_config():
    """The demo (no dataset, checkpoint or output given anywhere): builds (once) its data and model."""
    from pipeline.demo import DEMO_VERSION, make_demo_model, make_demo_sites
    from pipeline.run.config import ScoreConfig

    sites = make_demo_sites(os.path.join(DEMO_DIR, "data"))
    ckpt = make_demo_model(os.path.join(DEMO_DIR, "data", f"demo_model-v{DEMO_VERSION}.safetensors"), data_root=[s.split(":", 1)[1] for s in sites])
    log.info(f"demo: synthetic ChestX-ray14-layout datasets {', '.join(sites)}, demo model {ckpt}")
    return ScoreConfig.of(datasets=sites, out=os.path.join(DEMO_DIR, "out"), checkpoint=ckpt, arch="pipeline.inference.tiny_net:tiny_cam_net",
                          shard_size=64, batch_size=32, identifiability=True)


def is_demo(cfg) -> bool:
    return not (cfg.data.datasets or cfg.output.out or cfg.model.checkpoint)


def config_from_args(args, cfg=None):
    """Defaults, then the demo's settings (when nothing says what to score), then --config, then the
    flags. ``cfg``: the configuration without the demo, if already built."""
    from pipeline.core.errors import ConfigError

    cfg = cfg or job_config(args)
    if is_demo(cfg):
        return job_config(args, base=demo_config())
    if not cfg.data.datasets or not cfg.output.out or not cfg.model.checkpoint:
        raise ConfigError("--dataset, --checkpoint and --out are required (run with no arguments for the demo)")
    return cfg


def run(cfg, validated: bool = False) -> dict:
    """Validate, hold the --out lock, score, aggregate, then point latest.json at the run."""
    from pipeline.store.storage import exists, remove_if_empty

    if not validated:
        from pipeline.run.validate import validate

        validate(cfg)
    out, so = cfg.output.out, cfg.output.storage_options
    created = _first_missing(out) if not exists(out, so) else None
    try:
        return _run_locked(cfg)
    except BaseException:
        if created:  # a run that failed before writing anything leaves no empty --out (or parents) behind
            remove_if_empty(created, so)
        raise


def _first_missing(out: str) -> str:
    """The outermost folder of a local --out that does not exist yet (what a run would create)."""
    if "://" in out:
        return out
    path = os.path.abspath(out)
    while not os.path.exists(os.path.dirname(path)):
        path = os.path.dirname(path)
    return path


def _run_locked(cfg) -> dict:
    from pipeline.store.bookkeeping import read_json_safe, rebuild_latest
    from pipeline.run.run_lock import run_lock
    from pipeline.store.storage import check_writable, join, remove_temp_files, write_json_atomic

    out, so = cfg.output.out, cfg.output.storage_options
    check_writable(out, so)
    with run_lock(out, so) as note:
        if note:
            log.warning(note)
        removed = remove_temp_files(out, so)
        if removed:
            log.info(f"removed {removed} half-written temporary files left by an interrupted run")
        latest, why = read_json_safe(join(out, "latest.json"), so)
        if why or (latest is not None and not isinstance(latest, dict)):
            latest = {"model_version": rebuild_latest(out, so)}
            log.warning(f"latest.json was unreadable ({why}); rebuilt it from the runs: {latest['model_version']}")
        previous = (latest or {}).get("model_version")
        info = _score(cfg)
        if info["status"] == "complete":
            # only a complete, aggregated run becomes 'latest'; replaced atomically
            write_json_atomic({"model_version": info["model_version"], "run": f"runs/{info['model_version']}", "finished": info["finished"]},
                              join(out, "latest.json"), so)
            from pipeline.store.query_views import write_views

            write_views(out, so)  # DuckDB views of the latest run: OUT/cxr_audit.sql
            if previous and previous != info["model_version"]:
                from pipeline.analysis.drift import drift, summary_text

                print(summary_text(drift(out, previous, info["model_version"])))
            from pipeline.reporting.hook import report_after_run

            info["report"] = report_after_run(out, info["model_version"])
    return info


def _score(cfg) -> dict:
    """The graph: one task per pending shard, gathered as they finish; then finalize and aggregate."""
    from jobs._common import quiet_dask_logs
    from pipeline.run.cluster import ClusterStarter, load_profile

    quiet_dask_logs()
    # a local cluster comes up, and its worker starts its decode processes and imports the scoring
    # code, while this process imports torch and prepares the run (issue 8: fixed cost)
    profile = load_profile(cfg.cluster.profile or None, cfg.cluster.path)
    starter = ClusterStarter(profile, cfg.cluster.worker_timeout,
                             warm=(cfg.compute.decode_workers, cfg.compute.decode_threads, ("pipeline.run.score_shard",)))
    from distributed import as_completed
    from tqdm import tqdm

    from pipeline.run.progress import ProgressBar, WorkerProgress, progress_topic
    from pipeline.core.redact import redact
    from pipeline.run.score_shard import score_shard
    from pipeline.run.scoring import _now, finalize_run, prepare_run
    from pipeline.run.worker_logs import install_worker_logs
    from pipeline.store.storage import join

    started = _now()
    try:
        prep = prepare_run(cfg)
    except BaseException:
        starter.close()
        raise
    spec = prep.spec
    for line in manifest_summary(prep.manifest, cfg):
        log.info(redact(line))
    for note in prep.notes:
        log.warning(redact(note))
    log.info(f"model {spec.model_version} ({cfg.model.arch}); {len(prep.shards)} shards, {len(prep.pending)} to score")
    results, failures = [], []
    if not prep.pending:
        starter.close()
    else:
        t_cluster = time.perf_counter()
        cluster, client = starter.result()
        prep.timings["cluster_start"] = time.perf_counter() - t_cluster  # the wait for it, after prepare_run
        prep.timings["cluster_up"] = starter.seconds or 0.0  # how long it took to come up
        worker_logs = install_worker_logs(client, join(cfg.output.out, "logs"), cfg.output.storage_options)  # OUT/logs/worker-<name>.log
        try:
            log.info(f"cluster {profile.name}: dashboard {client.dashboard_link}")
            topic = progress_topic(spec.model_version)
            bar = tqdm(total=sum(len(s.rows) for s in prep.pending), unit="img", desc="scoring", file=sys.stderr, disable=args_quiet())
            progress = ProgressBar(client, bar, topic)  # advances per batch, from the workers' events
            futures = {client.submit(score_shard, s, spec, WorkerProgress(topic), key=f"score-shard-{spec.model_version}-{s.index}-{s.digest}",
                                     pure=False): s for s in prep.pending}
            t_score = time.perf_counter()
            with bar:
                for fut in as_completed(futures):
                    shard = futures[fut]
                    try:
                        results.append(fut.result())
                    except Exception as e:  # noqa: BLE001 - one failed shard does not stop the others
                        failures.append({"shard": shard.index, "error_class": type(e).__name__, "message": redact(str(e))[:500]})
                        log.error(f"shard {shard.index} failed: {type(e).__name__}: {redact(str(e))}")
                    progress.shard_finished(shard.index, len(shard.rows))
            progress.close()
            prep.timings["score_wall"] = time.perf_counter() - t_score
        except KeyboardInterrupt:
            _interrupted(prep, results, failures, started)
            raise
        finally:
            worker_logs.close()
            client.close()
            if cluster is not None:
                cluster.close()
    run_info = finalize_run(prep, results, failures, started)
    if run_info["status"] != "running":
        return run_info  # incomplete, failed or partial: no aggregates, never latest
    from pipeline.analysis.aggregate import aggregate_run
    from pipeline.analysis.aggregate_inputs import stale_aggregates
    from pipeline.run.scoring import finish_run

    try:
        agg = cfg.aggregate
        stale = stale_aggregates(cfg.output.out, spec.model_version, agg, cfg.output.storage_options)
        if stale:
            t = time.perf_counter()
            log.info(f"aggregates: computing ({stale})")
            tables = aggregate_run(cfg.output.out, spec.model_version, agg)
            log.info(f"aggregates: {', '.join(f'{k} ({v.num_rows} rows)' for k, v in tables.items())} in {time.perf_counter() - t:.1f} s")
        steps = {"aggregates": "done"}
        if agg.identifiability:
            steps["probes"] = "done"
    except KeyboardInterrupt:
        finish_run(prep, run_info, "interrupted", {"aggregates": "interrupted"})
        raise
    return finish_run(prep, run_info, "complete", steps)


def _interrupted(prep, results, failures, started) -> None:
    """Ctrl-C while scoring: record what is done, mark the run interrupted (never latest)."""
    from pipeline.run.scoring import finalize_run, finish_run

    try:
        run_info = finalize_run(prep, results, failures, started)
        finish_run(prep, run_info, "interrupted", {"scoring": "interrupted"})
    except Exception as e:  # noqa: BLE001 - the interrupt matters more than this bookkeeping
        log.error(f"(could not record the interruption in run.json: {e})")


def manifest_summary(result, cfg) -> list[str]:
    """Films found per dataset ('120 of 112,120 listed films found under ROOT') and the other
    metadata issues by reason: a partial download is one line, not thousands of issues."""
    from pipeline.sources.adapters import DatasetSpec

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
                 + (f"metadata issues {other} -> {cfg.output.out}/manifest_issues.parquet" if other else "no other metadata issues"))
    return lines


def args_quiet() -> bool:
    """--quiet: no progress bar either."""
    import logging

    return not log.isEnabledFor(logging.INFO)


def summary(run: dict) -> str:
    c = run["counts"]
    lines = [
        f"run {run['model_version']}: {run['status']}",
        f"  images {c['images']}: scored {c['scored']}, failed {c['failed']} (see errors.parquet); "
        f"shards {c['shards']} ({c['skipped_shards']} already done, {c['incomplete_shards']} incomplete)",
        f"  outputs: {run['config']['out']}/runs/{run['model_version']}/ (predictions/*.parquet, maps.zarr, errors.parquet, run.json)",
    ]
    if run.get("failed_shards"):
        lines.append(f"  {len(run['failed_shards'])} shards failed; rerun the same command to retry them")
    if run["status"] in ("failed", "partial"):
        lines.append(f"  too many images failed ({c['failed']} of {c['images']}, limit {run['config']['max_failed_fraction']:.0%} "
                     "by --max-failed-fraction): not made latest, no aggregates. Check the paths and mounts in errors.parquet")
    if c.get("retryable"):
        lines.append(f"  {c['retryable']} films had read errors; rerunning the same command retries only those shards")
    return "\n".join(lines)


# Exit status (README "Exit status"): one per outcome, so a cron job can tell them apart.
EXIT_CODES = {"complete": 0, "incomplete": 1, "failed": 3, "partial": 3}
EXIT_CONFIG = 2  # configuration error or unusable bookkeeping: the message says the command to run
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM: rerunning the same command resumes


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: outputs kept, lock released."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    setup_logging(args)
    skip_final_gc()  # issue 8: part of every run's fixed cost
    from pipeline.core.redact import install_log_redaction

    install_log_redaction()
    import signal
    import threading

    old_term = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() else None
    try:
        from pipeline.run.cluster import load_profile
        from pipeline.run.validate import check_cluster, validate

        user = job_config(args)  # --config and the flags: no side effects yet
        if getattr(args, "print_config", False):
            import yaml

            print(yaml.safe_dump(user.to_dict(), sort_keys=False), end="")
            return 0
        # the cluster profile first: even the demo reports a wrong --cluster before building its data
        check_cluster(load_profile(user.cluster.profile, user.cluster.path, required=user.cluster.file is not None))
        cfg = config_from_args(args, user)
        validate(cfg)
        result = run(cfg, validated=True)
    except CxrAuditError as e:
        return fail(e)  # redacted: URLs in flags may carry credentials (exit 2)
    except KeyboardInterrupt as e:
        from pipeline.core.redact import redact

        what = "terminated (SIGTERM)" if isinstance(e, _Terminated) else "interrupted (Ctrl-C)"
        print(f"\n{what}: finished shards are kept and the lock is released; "
              f"rerun the same command to resume: python -m jobs.score_dataset {redact(' '.join(argv))}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    print(summary(result))
    if result.get("report"):
        print(f"  report: {result['report']}")
    if result["status"] == "complete" and not argv:
        from pipeline.demo import marker_cells
        from pipeline.reporting.story import story

        print("\n".join(["what the demo shows (read off the report's scorecard):", *story(result["config"]["out"], marker_cells())]))
    return EXIT_CODES.get(result["status"], 1)


if __name__ == "__main__":
    sys.exit(main())
