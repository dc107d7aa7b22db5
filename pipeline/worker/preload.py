"""A local cluster's Dask workers preload this module (``distributed.worker.preload``): as a worker
process starts, a thread begins importing the scoring code, torch included (about 1.1 s of CPU and
1.5 s of wall time on two cores), so that the import overlaps the driver's own preparation rather
than the first shards' decoding (issue 8). The worker does not wait for it; the warm-up and the
first shard import the same modules and wait there only for what is not done yet."""

from __future__ import annotations

import importlib
import threading

SCORING_IMPORTS = ("pipeline.worker.score_shard", "pipeline.inference.cam")


def _import_scoring_code() -> None:
    for name in SCORING_IMPORTS:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - only a head start: the first shard imports it again and says what is wrong
            return


def dask_setup(worker=None) -> None:
    """Called by distributed as the worker starts; returns at once."""
    threading.Thread(target=_import_scoring_code, name="cxr-preload-imports", daemon=True).start()
