"""The audit report: one self-contained HTML file per run, and single-film overlay sheets.

``data`` loads a run's stored aggregates, ``scorecard`` turns them into the per-finding table and
its shortcut marks, ``figures`` draws with matplotlib (Agg), ``html`` assembles the page, ``story``
reads the demo's five lines off the scorecard. May import: ``pipeline.core``, ``pipeline.store``,
``pipeline.analysis`` and ``pipeline.inference`` (to decode a film for its overlay); never ``pipeline.run``.
"""

from pipeline.reporting.html import build_report, write_report
from pipeline.reporting.figures import film_sheet

__all__ = ["build_report", "write_report", "film_sheet"]
