"""Compare two complete runs: what moved between model versions.

Writes OUT/drift/<from>__<to>/finding_drift.parquet, region_drift.parquet and summary.json, and
prints a short summary. Default: the two newest complete runs.
"""

from __future__ import annotations

import argparse
import sys

from jobs._common import add_common, add_config, add_storage_options, fail, out_from_args, setup_logging
from pipeline.core.errors import CxrAuditError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.drift", description=__doc__)
    add_config(p)
    p.add_argument("--out", default=argparse.SUPPRESS, metavar="URL", help="the scoring job's --out (or output.out in --config)")
    add_storage_options(p)
    p.add_argument("--from", dest="from_mv", metavar="VERSION")
    p.add_argument("--to", dest="to_mv", metavar="VERSION")
    return add_common(p)


def main(argv=None) -> int:
    from pipeline.analysis.drift import drift, summary_text

    args = parser().parse_args(argv)
    setup_logging(args)
    try:
        print(summary_text(drift(out_from_args(args), args.from_mv, args.to_mv)))
    except (CxrAuditError, PermissionError) as e:
        return fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
