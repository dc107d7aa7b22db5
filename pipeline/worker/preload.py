"""A local cluster's Dask workers preload this module (``distributed.worker.preload``): as a worker
process starts, it imports the scoring code, torch included (about 1.1 s of CPU and 1.5 s of wall
time on two cores), before it registers with the scheduler. The cluster starts in the background
while the driver prepares the run (issue 8), so the import still overlaps that preparation.

It used to run on a thread of its own while the worker went on: a task unpickled meanwhile imported
the same modules on another thread, and Python's import-deadlock avoidance handed one of them a
partially initialised ``fsspec`` (``AttributeError: partially initialized module 'fsspec' has no
attribute 'utils'``); the worker died and the run waited for it. Imports finish before any task."""

from __future__ import annotations

import importlib
import logging

SCORING_IMPORTS = ("pipeline.worker.score_shard", "pipeline.inference.cam")

log = logging.getLogger(__name__)


def _import_scoring_code() -> None:
    for name in SCORING_IMPORTS:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - only a head start: the first shard imports it again and says what is wrong
            log.debug(f"preload: importing {name} failed ({type(e).__name__}: {e}); the first shard will say why")
            return


def dask_setup(worker=None) -> None:
    """Called by distributed as the worker starts, before it takes any task."""
    _import_scoring_code()
