"""The audit report: one self-contained HTML file per run, and single-film overlay sheets.

``data`` loads a run's stored aggregates, ``scorecard`` turns them into the per-finding table and
its shortcut marks, ``figures`` draws with matplotlib (Agg), ``html`` assembles the page, ``story``
reads the demo's five lines off the scorecard.
"""

from .html import build_report, write_report
from .figures import film_sheet

__all__ = ["build_report", "write_report", "film_sheet"]
