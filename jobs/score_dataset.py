"""Score a chest X-ray dataset on a Dask cluster: predictions to Parquet, 7x7 maps to Zarr.

With no arguments: builds (once) a small synthetic ChestX-ray14-layout dataset and a seeded demo
model under ./cxr-audit-demo/, scores it on a LocalCluster and prints a summary.
"""

from __future__ import annotations

import argparse
import os
import sys

from jobs._common import add_common, add_config, add_storage_options, fail, job_config, log, setup_logging, skip_final_gc
from pipeline.core.errors import CxrAuditError, out_of_memory
from pipeline.core.redact import redact

DEMO_DIR = "cxr-audit-demo"


def parser() -> argparse.ArgumentParser:
    """The job's flags. Configuration flags default to SUPPRESS: the defaults live in
    pipeline.config.run_config (quoted in the help from there), and a flag not given leaves --config's value."""
    from pipeline.inference.architectures import ARCHITECTURES
    from pipeline.inference.precision import PRECISIONS
    from pipeline.inference.preprocess_config import HIGH_BIT_DEPTH_MODES
    from pipeline.config.run_config import ScoreConfig
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
    add_storage_options(p)
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
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="write no HTML report at the end of the run (nightly jobs that only query the tables); "
                        "python -m jobs.report --out OUT builds it later")
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
    """The demo (no dataset, checkpoint or output given anywhere): builds (once) its data; its model
    ships with the package (trained on that data, nothing is trained here)."""
    from pipeline.demo import DEMO_ARCH, make_demo_sites, shipped_model_path
    from pipeline.config.run_config import ScoreConfig

    sites = make_demo_sites(os.path.join(DEMO_DIR, "data"))
    ckpt = shipped_model_path()
    log.info(f"demo: synthetic ChestX-ray14-layout datasets {', '.join(sites)}, demo model {ckpt}")
    return ScoreConfig.of(datasets=sites, out=os.path.join(DEMO_DIR, "out"), checkpoint=ckpt, arch=DEMO_ARCH,
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


def nothing_changed_line(run: dict) -> str:
    c = run["counts"]
    return (f"nothing changed: run {run['model_version']} is complete and current ({c['scored']:,} of {c['images']:,} images scored, "
            f"{c['shards']} shards, aggregates{' and report' if run['steps'].get('report') == 'done' else ''} up to date; "
            f"checked in {run['check_seconds']:.1f} s, no cluster started)")


# Exit status (README "Exit status"): one per outcome, so a cron job can tell them apart.
EXIT_CODES = {"complete": 0, "incomplete": 1, "failed": 3, "partial": 3}
EXIT_CONFIG = 2  # configuration error or unusable bookkeeping: the message says the command to run
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM: rerunning the same command resumes


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    setup_logging(args)
    skip_final_gc()  # issue 8: part of every run's fixed cost
    from pipeline.core.redact import install_log_redaction

    install_log_redaction()
    from pipeline.run.interrupt import Terminated, interrupts_handled

    try:
        from pipeline.run.cluster import load_profile
        from pipeline.run.validate import check_address_space, check_cluster, validate

        check_address_space()  # before the demo or the run imports torch (a raw traceback under a low ulimit -v)

        user = job_config(args)  # --config and the flags: no side effects yet
        if getattr(args, "print_config", False):
            from pipeline.config.run_config import yaml_text

            print(yaml_text(user), end="")
            return 0
        # the cluster profile first: even the demo reports a wrong --cluster before building its data
        check_cluster(load_profile(user.cluster.profile, user.cluster.path, required=user.cluster.file is not None))
        cfg = config_from_args(args, user)
        validate(cfg)
        from pipeline.run.lifecycle import run

        with interrupts_handled():
            result = run(cfg, validated=True)
    except (CxrAuditError, PermissionError) as e:
        return fail(e)  # redacted: URLs in flags may carry credentials (exit 2)
    except (MemoryError, ImportError, OSError, RuntimeError) as e:
        why = out_of_memory(e)
        if why is None:
            raise
        print(f"error: {redact(why)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        from pipeline.core.redact import redact_argv

        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted (Ctrl-C)"
        print(f"\n{what}: finished shards are kept and the lock is released; "
              f"rerun the same command to resume: python -m jobs.score_dataset {' '.join(redact_argv(argv))}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result.get("nothing_changed"):
        print(nothing_changed_line(result))
        return 0
    if result.get("drift_text"):
        print(result["drift_text"])
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
