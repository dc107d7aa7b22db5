"""The audit report of a run: one self-contained HTML file (default OUT/runs/<version>/report.html),
or with --film one PNG of a single film and its maps.

    python -m jobs.report --out OUT [--run VERSION] [--html PATH]
    python -m jobs.report --out OUT --film IMAGE_ID [--finding NAME] [--png PATH]
"""

from __future__ import annotations

import argparse
import sys
import time

from jobs._common import add_common, add_config, add_input_options, add_storage_options, fail, job_config, out_from_args, setup_logging
from pipeline.core.errors import CxrAuditError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config(p)
    p.add_argument("--out", default=argparse.SUPPRESS, metavar="URL", help="output root of the job (or output.out in --config)")
    add_storage_options(p)
    add_input_options(p)  # the films it shows are read from the inputs
    p.add_argument("--run", metavar="VERSION", help="model version of the run (default: the latest complete run)")
    p.add_argument("--html", metavar="PATH", help="where to write the report (default OUT/runs/<version>/report.html)")
    p.add_argument("--film", metavar="IMAGE_ID", help="instead of the report, write one PNG: this film and its maps")
    p.add_argument("--finding", metavar="NAME", help="with --film: only this finding's map (default: all)")
    p.add_argument("--png", metavar="PATH", help="with --film: where to write (default OUT/runs/<version>/films/<id>[-<finding>].png)")
    return add_common(p)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging(args)
    try:
        inputs = job_config(args).inputs()
        args.out = out_from_args(args)
        if args.film:
            from pipeline.reporting.film import write_film_png

            print(write_film_png(args.out, args.film, args.finding, args.run, args.png, inputs=inputs))
            return 0
        if args.finding or args.png:
            raise CxrAuditError("--finding and --png go with --film")
        from pipeline.reporting import write_report

        t = time.perf_counter()
        path = write_report(args.out, args.run, args.html, inputs=inputs)
    except (CxrAuditError, PermissionError) as e:
        return fail(e)
    print(f"report: {path} ({time.perf_counter() - t:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
