"""The report written at the end of a complete run. A report that fails to build never fails the run."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def report_after_run(out, model_version: str, storage_options: dict | None = None, inputs=None) -> str | None:
    try:
        from pipeline.reporting.html import write_report

        return write_report(out, model_version, storage_options=storage_options, inputs=inputs)
    except Exception as e:  # noqa: BLE001 - the run's outputs are complete; the report can be rebuilt
        log.warning("report not written (%s: %s); rebuild it with python -m jobs.report --out %s --run %s", type(e).__name__, e, out, model_version)
        return None
