"""Score a chest X-ray dataset on a Dask cluster: predictions to Parquet, 7x7 maps to Zarr.

With no arguments: builds (once) a small synthetic ChestX-ray14-layout dataset and a seeded demo
model under ./cxr-audit-demo/, scores it on a LocalCluster and prints a summary.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from jobs._common import add_common, add_config, add_flags, fail, job_config, setup_logging, skip_final_gc
from pipeline.core.errors import CxrAuditError, out_of_memory
from pipeline.core.redact import redact

DEMO_DIR = "cxr-audit-demo"
log = logging.getLogger("jobs.score_dataset")  # its module name: __name__ is "__main__" under python -m


def parser() -> argparse.ArgumentParser:
    """The job's flags: one per configuration key of ``score_flags`` (its help; name, type and choices
    from the key's field: jobs._common.add_flags). They default to SUPPRESS: the defaults live in
    pipeline.config.run_config (quoted in the help from there), and a flag not given leaves --config's value."""
    from pipeline.config.run_config import score_flags

    p = argparse.ArgumentParser(
        prog="python -m jobs.score_dataset",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    add_config(p)
    p.add_argument("--print-config", action="store_true",
                   help="print the configuration (defaults, --config, flags) as a --config YAML file and exit")
    return add_common(add_flags(p, score_flags()))


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
        from pipeline.run.cluster import profile_for
        from pipeline.run.validate import check_address_space, check_cluster, validate

        check_address_space()  # before the demo or the run imports torch (a raw traceback under a low ulimit -v)

        user = job_config(args)  # --config and the flags: no side effects yet
        if getattr(args, "print_config", False):
            from pipeline.config.run_config import yaml_text

            print(yaml_text(user), end="")
            return 0
        # the cluster profile first, read once for the run: even the demo reports a wrong --cluster
        # before building its data (the demo's configuration keeps the flags' cluster section)
        profile = profile_for(user.cluster)
        check_cluster(profile)
        cfg = config_from_args(args, user)
        validate(cfg, profile)
        from pipeline.run.lifecycle import run

        with interrupts_handled():
            result = run(cfg, validated=True, profile=profile)
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
