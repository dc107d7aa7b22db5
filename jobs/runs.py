"""List the runs under an --out: model version, when, images, status, time taken.

--out (or output.out of --config) is opened with the storage options of --config and --storage-option."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime

from jobs._common import add_common, add_config, add_input_options, add_storage_options, fail, job_config, out_from_args, setup_logging
from pipeline.core.errors import CxrAuditError
from pipeline.store.layout import OutputStore
from pipeline.store.run_index import latest as _latest
from pipeline.store.run_index import run_records


def list_runs(out, storage_options: dict | None = None) -> list[dict]:
    store = OutputStore.of(out, storage_options)
    latest = _latest(store).get("model_version")  # unreadable: none (--check reports it)
    rows = []
    for run in run_records(store):
        took = None
        if run.started and run.finished:
            took = (datetime.fromisoformat(run.finished) - datetime.fromisoformat(run.started)).total_seconds()
        c = run.counts or {}
        rows.append({"model_version": run.model_version, "started": run.started, "finished": run.finished,
                     "status": run.status, "images": c.get("images"), "scored": c.get("scored"), "failed": c.get("failed"),
                     "seconds": took, "latest": run.model_version == latest})
    return sorted(rows, key=lambda r: r["started"] or "")


def latest_run(out, storage_options: dict | None = None) -> str | None:
    """The latest complete run's folder, as latest.json names it."""
    store = OutputStore.of(out, storage_options)
    latest = _latest(store)
    return store.join(latest["run"]) if latest.get("run") else None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.runs", description=__doc__)
    add_config(p)
    p.add_argument("--out", default=argparse.SUPPRESS, metavar="URL", help="the scoring job's --out (or output.out in --config)")
    add_storage_options(p)
    add_input_options(p)  # --check --verify reads the films again
    p.add_argument("--latest", action="store_true",
                   help="print only the latest complete run's folder (OUT/runs/<model_version>), for scripts and queries; exit 1 if none")
    p.add_argument("--check", action="store_true",
                   help="check every run's shards against their records and the bookkeeping files; writes nothing. "
                        "Exit 0: intact; 1: damage found (rerunning the scoring command repairs it)")
    p.add_argument("--verify", action="store_true", help="with --check: rehash every output (default: sizes only)")
    p.add_argument("--unlock", action="store_true", help="remove OUT/_lock.json left by a run that died (refused if its holder is alive here)")
    return add_common(p)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    setup_logging(args)
    try:
        return _act(args, out_from_args(args))  # --out, else output.out of --config; its storage options
    except (CxrAuditError, PermissionError) as e:
        return fail(e)


def _act(args, store) -> int:
    if args.unlock:
        from pipeline.run.run_lock import force_unlock

        print(force_unlock(store))
        return 0
    if args.check:
        from pipeline.run.run_check import check_out

        problems = check_out(store, verify=args.verify, inputs=job_config(args).inputs())
        for line in problems:
            print(line)
        print(f"{len(problems)} problems under {store.url}" if problems else f"{store.url}: every shard matches its record")
        return 1 if problems else 0
    if args.latest:
        latest = latest_run(store)
        if latest is None:
            print(f"error: no complete run under {store.url} (latest.json is written when a run completes)", file=sys.stderr)
            return 1
        print(latest)
        return 0
    rows = list_runs(store)
    if not rows:
        print(f"no runs under {store.url}")
        return 0
    print(f"{'model_version':18} {'started':26} {'status':11} {'images':>8} {'scored':>8} {'failed':>7} {'took_s':>8}")
    for r in rows:
        took = f"{r['seconds']:.0f}" if r["seconds"] is not None else "-"
        print(f"{r['model_version']:18} {r['started'] or '-':26} {r['status'] or '-':11} {r['images'] or 0:>8} {r['scored'] or 0:>8} "
              f"{r['failed'] or 0:>7} {took:>8}{'  <- latest' if r['latest'] else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
