"""Recompute a run's aggregates from its stored outputs: region_stats, finding_summary, metrics,
localization (when expert boxes are found). The scoring job writes the same tables at its end."""

from __future__ import annotations

import argparse
import sys

from jobs._common import add_common, add_config, add_input_options, add_storage_options, fail, job_config, setup_logging
from pipeline.core.errors import CxrAuditError


def parser() -> argparse.ArgumentParser:
    """Configuration flags default to SUPPRESS: defaults from pipeline.config.run_config, --config's values kept."""
    from pipeline.config.run_config import ScoreConfig

    D = ScoreConfig().aggregate
    S = argparse.SUPPRESS
    p = argparse.ArgumentParser(prog="python -m jobs.aggregate", description=__doc__, argument_default=S)
    add_config(p)
    p.add_argument("--out", metavar="URL", help="the scoring job's --out (required, here or as output.out in --config)")
    add_storage_options(p)
    add_input_options(p)  # the bounding boxes and the films' sizes are read from the inputs
    p.add_argument("--run", default=None, metavar="MODEL_VERSION", help="which run (default: the newest complete one)")
    p.add_argument("--by", nargs="+", metavar="COLUMN",
                   help=f"manifest columns to stratify by, alone and crossed with the label (default: {' '.join(D.by)})")
    p.add_argument("--min-n", type=int, help=f"stratum values with fewer images get n but no statistics (default {D.min_n})")
    p.add_argument("--anatomy-mask", metavar="FILE", help="JSON 7x7 of 0/1 (row 0 at the top): reports the share inside it")
    p.add_argument("--bbox", metavar="URL", help="BBox_List_2017.csv (default: beside each nih: dataset)")
    p.add_argument("--identifiability", action="store_true",
                   help="also fit the confounder probes (identifiability*.parquet, prevalence_confounding.parquet)")
    p.add_argument("--confounder", dest="targets", nargs="+", metavar="COLUMN",
                   help=f"targets of the identifiability probes (default: {' '.join(D.targets)})")
    p.add_argument("--scheduler", default="threads", choices=["threads", "processes", "sync"], help="Dask scheduler (default threads)")
    return add_common(p)


def config_from_args(args):
    """(the output folder as an OutputStore, AggregateConfig): --config's file, then the flags given."""
    from pipeline.core.errors import ConfigError

    cfg = job_config(args)
    if not cfg.output.out:
        raise ConfigError("--out is required (or output.out in --config)")
    return cfg.output.store(), cfg.aggregate


def main(argv=None) -> int:
    from pipeline.analysis.aggregate import aggregate_run

    args = parser().parse_args(argv)
    setup_logging(args)
    try:
        out, config = config_from_args(args)
        tables = aggregate_run(out, args.run, config, scheduler=args.scheduler, inputs=job_config(args).inputs())
    except (CxrAuditError, PermissionError) as e:
        return fail(e)
    for name, t in tables.items():
        print(f"{name}.parquet: {t.num_rows} rows")
    if "identifiability_map" in tables and tables["identifiability_map"].num_rows:
        from pipeline.analysis.identifiability import format_map

        print(format_map(tables["identifiability_map"].to_pandas()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
