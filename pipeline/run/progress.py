"""Per-batch progress from shard tasks to the terminal, through distributed's event topics.

A shard task calls ``WorkerProgress(topic)(shard, n_done)`` after each batch; it logs a tiny event on
its worker (one message per batch, sent on the worker's existing batched stream to the scheduler).
The driver subscribes to the topic and moves its bar. Counts are absolute per shard, so lost, late
or reordered events never over-count; when a shard's task returns, its count is topped up to its size.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass


def progress_topic(run_key: str) -> str:
    return f"cxr-audit-progress-{run_key}-{uuid.uuid4().hex[:8]}"  # unique: schedulers may be shared


@dataclass(frozen=True)
class WorkerProgress:
    """Picklable per-batch callback for score_shard; does nothing outside a Dask worker."""

    topic: str

    def __call__(self, shard_index: int, n_done: int) -> None:
        try:
            from distributed import get_worker

            worker = get_worker()
        except (ImportError, ValueError):
            return
        worker.log_event(self.topic, {"shard": shard_index, "done": n_done})


class ProgressBar:
    """Moves a tqdm bar from the topic's events and from finished shards."""

    def __init__(self, client, bar, topic: str):
        self.client, self.bar, self.topic = client, bar, topic
        self._seen: dict[int, int] = {}
        self._finished: set[int] = set()
        self._lock = threading.Lock()
        client.subscribe_topic(topic, self._on_event)

    def _advance(self, shard: int, n: int) -> None:
        inc = n - self._seen.get(shard, 0)
        if inc > 0:
            self._seen[shard] = n
            self.bar.update(inc)

    def _on_event(self, event) -> None:
        _, msg = event
        with self._lock:
            if msg["shard"] not in self._finished:
                self._advance(msg["shard"], msg["done"])

    def shard_finished(self, shard: int, n_images: int) -> None:
        with self._lock:
            self._finished.add(shard)
            self._advance(shard, n_images)

    def close(self) -> None:
        try:
            self.client.unsubscribe_topic(self.topic)
        except Exception:  # noqa: BLE001 - the client may already be closing
            pass
