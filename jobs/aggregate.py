"""Recompute a run's aggregates from its stored outputs: region_stats, finding_summary, metrics,
localization (when expert boxes are found). The scoring job writes the same tables at its end."""

from __future__ import annotations

import argparse
import json
import sys

from jobs._common import add_common, fail, setup_logging
from pipeline.core.errors import CxrAuditError


def parser() -> argparse.ArgumentParser:
    from pipeline.analysis.strata import DEFAULT_BY

    p = argparse.ArgumentParser(prog="python -m jobs.aggregate", description=__doc__)
    p.add_argument("--out", required=True, metavar="URL", help="the scoring job's --out")
    p.add_argument("--run", metavar="MODEL_VERSION", help="which run (default: the newest complete one)")
    p.add_argument("--by", nargs="+", default=list(DEFAULT_BY), metavar="COLUMN",
                   help=f"manifest columns to stratify by, alone and crossed with the label (default: {' '.join(DEFAULT_BY)})")
    p.add_argument("--min-n", type=int, default=20, help="stratum values with fewer images get n but no statistics (default 20)")
    p.add_argument("--anatomy-mask", metavar="FILE", help="JSON 7x7 of 0/1 (row 0 at the top): reports the share inside it")
    p.add_argument("--bbox", metavar="URL", help="BBox_List_2017.csv (default: beside each nih: dataset)")
    p.add_argument("--identifiability", action="store_true",
                   help="also fit the confounder probes (identifiability*.parquet, prevalence_confounding.parquet)")
    p.add_argument("--confounder", nargs="+", default=["site", "view_position", "sex", "age_band"], metavar="COLUMN",
                   help="targets of the identifiability probes (default: site view_position sex age_band)")
    p.add_argument("--scheduler", default="threads", choices=["threads", "processes", "sync"], help="Dask scheduler (default threads)")
    return add_common(p)


def config_from_args(args):
    from pipeline.analysis.aggregate import AggregateConfig
    from pipeline.core.errors import ConfigError

    mask = None
    if args.anatomy_mask:
        with open(args.anatomy_mask) as f:
            mask = json.load(f)
        if len(mask) != 7 or any(len(r) != 7 for r in mask):
            raise ConfigError("--anatomy-mask must be a JSON list of 7 rows of 7 zeros and ones")
        mask = tuple(tuple(int(v) for v in r) for r in mask)
    return AggregateConfig(by=tuple(args.by), min_n=args.min_n, anatomy_mask=mask, bbox=args.bbox,
                           identifiability=args.identifiability, targets=tuple(args.confounder))


def main(argv=None) -> int:
    from pipeline.analysis.aggregate import aggregate_run

    args = parser().parse_args(argv)
    setup_logging(args)
    try:
        tables = aggregate_run(args.out, args.run, config_from_args(args), scheduler=args.scheduler)
    except CxrAuditError as e:
        return fail(e)
    for name, t in tables.items():
        print(f"{name}.parquet: {t.num_rows} rows")
    if "identifiability_map" in tables and tables["identifiability_map"].num_rows:
        from pipeline.analysis.identifiability import format_map

        print(format_map(tables["identifiability_map"].to_pandas()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
