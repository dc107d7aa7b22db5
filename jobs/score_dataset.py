"""Score a chest X-ray dataset on a Dask cluster: predictions to Parquet, 7x7 maps to Zarr.

With no arguments: builds (once) a small synthetic ChestX-ray14-layout dataset and a seeded demo
model under ./cxr-audit-demo/, scores it on a LocalCluster and prints a summary.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from jobs._common import add_common, fail, log, setup_logging
from pipeline.core.errors import CxrAuditError

DEMO_DIR = "cxr-audit-demo"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.score_dataset",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", action="append", metavar="[NAME=]ADAPTER:LOCATION",
                   help="repeatable. Adapters: nih:ROOT (ChestX-ray14 layout), chexpert:ROOT, mimic:ROOT (MIMIC-CXR-JPG), padchest:ROOT, "
                        "manifest:URL (CSV/Parquet with image_id, path, ...). "
                        "Locations are fsspec URLs (local path, file://, s3://, memory://).")
    p.add_argument("--views", default="frontal", metavar="frontal|all|AP,PA,...",
                   help="which views to score: 'frontal' (default: lateral views are left out and counted), 'all', or a list of codes")
    p.add_argument("--site-column", metavar="COLUMN", help="take 'site' from this manifest column (default: the dataset's name)")
    p.add_argument("--uncertain", default="zeros", choices=["zeros", "ones", "ignore"],
                   help="CheXpert/MIMIC uncertain labels (-1): negative, positive, or not labelled (default zeros)")
    p.add_argument("--identifiability", action="store_true",
                   help="after scoring, also fit the confounder probes (site, view, sex, age band; see jobs.aggregate)")
    p.add_argument("--metadata", metavar="URL", help="NIH metadata CSV, if not ROOT/Data_Entry_2017[_v2020].csv")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="state_dict (.pt/.pth, loaded with weights_only=True) or .safetensors; 'random:SEED' for seeded random weights. "
                        "Pickled whole models are refused: convert them with python -m jobs.convert_checkpoint --trust-pickle IN OUT")
    p.add_argument("--arch", default="densenet121", metavar="NAME|module:callable",
                   help="densenet121 (default) or any callable returning a module with 'features' and a Linear 'classifier'")
    p.add_argument("--findings", metavar="A,B,...|FILE", help="finding names in the model's output order (default: the 14 CheXNet findings)")
    p.add_argument("--baselines", default="reference", metavar="reference|from-labels|FILE",
                   help="p_baseline per finding for the ln(p_cell/p_baseline) map (default: the reference prevalences)")
    p.add_argument("--out", metavar="URL", help="output root (fsspec URL)")
    p.add_argument("--cluster", default=None, metavar="NAME", help="profile in --cluster-file (default: the file's default, 'local')")
    p.add_argument("--cluster-file", default=None, metavar="PATH",
                   help="profiles file (default: ./cluster.yaml if present, else the built-in local profiles); a missing file is an error")
    p.add_argument("--worker-timeout", type=float, default=None, metavar="SECONDS",
                   help="give up when the cluster brings up no worker in this time (default: the profile's worker_timeout, "
                        "120 s for local clusters, 1800 s for SLURM)")
    p.add_argument("--shard-size", type=int, default=1024, metavar="N", help="images per shard and Zarr chunk length (default 1024)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per forward pass (default 32)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="score only the first N manifest rows")
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda", help="where the model runs on each worker (default auto)")
    p.add_argument("--high-bit-depth", default="clip", choices=["clip", "rescale"],
                   help="16-bit PNGs: 'clip' as the reference's convert('RGB') does, or 'rescale' the full range to 8 bits")
    p.add_argument("--cache", default="auto", metavar="auto|none|URL",
                   help="preprocessed-image cache (uint8 224x224 in Zarr): 'auto' = OUT/cache (default), 'none', or a URL")
    p.add_argument("--decode-workers", type=int, default=None, metavar="N",
                   help="decode processes per worker, kept alive across shards (default: one per core of the worker; 0: decode in the scoring process)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"],
                   help="forward precision: fp32 (default, strict: TF32 off on CUDA, parity <= 1e-4), tf32, or bf16 (autocast features); "
                        "part of the run's identity (non-default precisions get their own run folder runs/VERSION-PRECISION)")
    p.add_argument("--decode-threads", type=int, default=None, metavar="N", help="deprecated alias of --decode-workers")
    p.add_argument("--verify", action="store_true",
                   help="on resume, rehash every finished shard's outputs against its record (default: sizes only)")
    p.add_argument("--max-failed-fraction", type=float, default=0.05, metavar="F",
                   help="more failed images than this share ends the run 'partial' with exit 3 (default 0.05); "
                        "no image scored is always a failure")
    p.add_argument("--max-image-bytes", type=int, default=64 * 2**20, metavar="N",
                   help="larger image files are not read; recorded as ImageTooLarge (default 64 MiB; real films are 0.3-10 MB)")
    p.add_argument("--max-image-pixels", type=int, default=64_000_000, metavar="N",
                   help="films whose header declares more pixels are not decoded (TooManyPixels; default 64,000,000)")
    p.add_argument("--max-aspect-ratio", type=float, default=6.0, metavar="R",
                   help="films longer than R times their width (or the reverse) are not decoded (ExtremeAspectRatio; default 6)")
    p.add_argument("--read-timeout", type=float, default=30.0, metavar="S", help="seconds per remote read attempt (ReadTimeout; default 30)")
    p.add_argument("--read-retries", type=int, default=2, metavar="N",
                   help="further attempts after a transient read error (timeout, connection, EIO), with backoff (default 2)")
    p.add_argument("--allow-root", action="append", default=[], metavar="URL",
                   help="repeatable: a folder or URL prefix that manifest paths may point into besides the manifest's own folder")
    return add_common(p)


def _findings(text: str | None):
    from pipeline.core.findings import CHEXNET_FINDINGS

    if not text:
        return CHEXNET_FINDINGS
    if os.path.exists(text):
        with open(text) as f:
            text = f.read().replace("\n", ",")
    return tuple(s.strip() for s in text.split(",") if s.strip())


def config_from_args(args, argv_empty: bool):
    from pipeline.core.errors import ConfigError
    from pipeline.run.scoring import ScoreConfig

    if argv_empty:
        from pipeline.demo import DEMO_VERSION, make_demo_model, make_demo_sites

        sites = make_demo_sites(os.path.join(DEMO_DIR, "data"))
        ckpt = make_demo_model(os.path.join(DEMO_DIR, "data", f"demo_model-v{DEMO_VERSION}.safetensors"), data_root=[s.split(":", 1)[1] for s in sites])
        log.info(f"demo: synthetic ChestX-ray14-layout datasets {', '.join(sites)}, demo model {ckpt}")
        return ScoreConfig(datasets=sites, out=os.path.join(DEMO_DIR, "out"), checkpoint=ckpt,
                           arch="pipeline.inference.tiny_net:tiny_cam_net", shard_size=64, batch_size=32, identifiability=True,
                           cluster=args.cluster or "local", cluster_file=args.cluster_file or "cluster.yaml",
                           worker_timeout=args.worker_timeout)
    if not args.dataset or not args.out or not args.checkpoint:
        raise ConfigError("--dataset, --checkpoint and --out are required (run with no arguments for the demo)")
    return ScoreConfig(datasets=tuple(args.dataset), out=args.out, checkpoint=args.checkpoint, arch=args.arch,
                       findings=_findings(args.findings), baselines=args.baselines, metadata=args.metadata,
                       cluster=args.cluster or "", cluster_file=args.cluster_file or "cluster.yaml", shard_size=args.shard_size,
                       batch_size=args.batch_size, limit=args.limit, device=args.device,
                       high_bit_depth=args.high_bit_depth, decode_threads=args.decode_threads, cache=args.cache,
                       decode_workers=args.decode_workers, precision=args.precision,
                       views=tuple(v.strip() for v in args.views.split(",") if v.strip()), site_column=args.site_column,
                       uncertain=args.uncertain, identifiability=args.identifiability, worker_timeout=args.worker_timeout,
                       verify=args.verify, max_failed_fraction=args.max_failed_fraction,
                       max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels, max_aspect_ratio=args.max_aspect_ratio,
                       read_timeout=args.read_timeout, read_retries=args.read_retries, allow_roots=tuple(args.allow_root))


def run(cfg, validated: bool = False) -> dict:
    """Validate, hold the --out lock, score, aggregate, then point latest.json at the run."""
    from pipeline.store.storage import exists, remove_if_empty

    if not validated:
        from pipeline.run.validate import validate

        validate(cfg)
    created = _first_missing(cfg.out) if not exists(cfg.out, cfg.storage_options) else None
    try:
        return _run_locked(cfg)
    except BaseException:
        if created:  # a run that failed before writing anything leaves no empty --out (or parents) behind
            remove_if_empty(created, cfg.storage_options)
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

    check_writable(cfg.out, cfg.storage_options)
    with run_lock(cfg.out, cfg.storage_options) as note:
        if note:
            log.warning(note)
        removed = remove_temp_files(cfg.out, cfg.storage_options)
        if removed:
            log.info(f"removed {removed} half-written temporary files left by an interrupted run")
        latest, why = read_json_safe(join(cfg.out, "latest.json"), cfg.storage_options)
        if why or (latest is not None and not isinstance(latest, dict)):
            latest = {"model_version": rebuild_latest(cfg.out, cfg.storage_options)}
            log.warning(f"latest.json was unreadable ({why}); rebuilt it from the runs: {latest['model_version']}")
        previous = (latest or {}).get("model_version")
        info = _score(cfg)
        if info["status"] == "complete":
            # only a complete, aggregated run becomes 'latest'; replaced atomically
            write_json_atomic({"model_version": info["model_version"], "run": f"runs/{info['model_version']}", "finished": info["finished"]},
                              join(cfg.out, "latest.json"), cfg.storage_options)
            from pipeline.store.query_views import write_views

            write_views(cfg.out, cfg.storage_options)  # DuckDB views of the latest run: OUT/cxr_audit.sql
            if previous and previous != info["model_version"]:
                from pipeline.analysis.drift import drift, summary_text

                print(summary_text(drift(cfg.out, previous, info["model_version"])))
            from pipeline.reporting.hook import report_after_run

            info["report"] = report_after_run(cfg.out, info["model_version"])
    return info


def _score(cfg) -> dict:
    """The graph: one task per pending shard, gathered as they finish; then finalize and aggregate."""
    from distributed import as_completed
    from tqdm import tqdm

    from jobs._common import quiet_dask_logs

    from pipeline.run.cluster import load_profile, start_cluster
    from pipeline.inference.model import resolve_device
    from pipeline.run.progress import ProgressBar, WorkerProgress, progress_topic
    from pipeline.core.redact import redact
    from pipeline.run.score_shard import score_shard
    from pipeline.run.scoring import _now, finalize_run, prepare_run
    from pipeline.run.worker_logs import install_worker_logs
    from pipeline.store.storage import join

    started = _now()
    prep = prepare_run(cfg, resolve_device(cfg.device) if cfg.device != "auto" else "auto")
    spec = prep.spec
    for line in manifest_summary(prep.manifest, cfg):
        log.info(redact(line))
    for note in prep.notes:
        log.warning(redact(note))
    log.info(f"model {spec.model_version} ({cfg.arch}); {len(prep.shards)} shards, {len(prep.pending)} to score")
    results, failures = [], []
    if prep.pending:
        profile = load_profile(cfg.cluster or None, cfg.cluster_file)
        quiet_dask_logs()
        t_cluster = time.perf_counter()
        cluster, client = start_cluster(profile, cfg.worker_timeout)
        prep.timings["cluster_start"] = time.perf_counter() - t_cluster
        worker_logs = install_worker_logs(client, join(cfg.out, "logs"), cfg.storage_options)  # OUT/logs/worker-<name>.log
        try:
            log.info(f"cluster {profile.name}: dashboard {client.dashboard_link}")
            if spec.device == "auto":
                spec = _with_worker_device(client, spec)
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
    from pipeline.analysis.aggregate import AggregateConfig, aggregate_run
    from pipeline.analysis.aggregate_inputs import stale_aggregates
    from pipeline.run.scoring import finish_run

    try:
        agg = AggregateConfig(identifiability=cfg.identifiability)
        stale = stale_aggregates(cfg.out, spec.model_version, agg, cfg.storage_options)
        if stale:
            t = time.perf_counter()
            log.info(f"aggregates: computing ({stale})")
            tables = aggregate_run(cfg.out, spec.model_version, agg)
            log.info(f"aggregates: {', '.join(f'{k} ({v.num_rows} rows)' for k, v in tables.items())} in {time.perf_counter() - t:.1f} s")
        steps = {"aggregates": "done"}
        if cfg.identifiability:
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
    for spec in (DatasetSpec.parse(d) for d in cfg.datasets):
        mine = issues[issues.dataset == spec.name].reason
        missing, excluded = int((mine == "missing_file").sum()), int((mine == "excluded_view").sum())
        found = int(kept.get(spec.name, 0)) + excluded
        if missing:
            lines.append(f"{spec.name}: {found:,} of {found + missing:,} listed films found under {spec.location} "
                         f"(the {missing:,} others are missing_file rows in manifest_issues.parquet)")
    other = issues[issues.reason != "missing_file"].reason.value_counts().sort_index().to_dict()
    lines.append(f"manifest: {result.manifest.num_rows:,} images; "
                 + (f"metadata issues {other} -> {cfg.out}/manifest_issues.parquet" if other else "no other metadata issues"))
    return lines


def _with_worker_device(client, spec):
    from dataclasses import replace

    def probe():
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    devices = set(client.run(probe).values())
    return replace(spec, device="cuda" if devices == {"cuda"} else "cpu")


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
    from pipeline.core.redact import install_log_redaction

    install_log_redaction()
    import signal
    import threading

    old_term = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() else None
    try:
        from pipeline.run.cluster import load_profile
        from pipeline.run.validate import check_cluster, validate

        # the cluster profile first: even the demo reports a wrong --cluster before building its data
        check_cluster(load_profile(args.cluster, args.cluster_file or "cluster.yaml", required=args.cluster_file is not None))
        cfg = config_from_args(args, argv_empty=not any(a.startswith("--dataset") or a.startswith("--out") or a.startswith("--checkpoint") for a in argv))
        validate(cfg, cluster_file_given=args.cluster_file is not None)
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
