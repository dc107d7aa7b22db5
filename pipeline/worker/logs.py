"""Worker logs in ``OUT/logs/``: every Dask worker writes its ``pipeline`` log records (and Dask's
own warnings, and the tasks that failed on it) to ``worker-<name>.log``.

Without this, what a shard task logs on a worker goes to that worker's stderr: a SLURM job's
output file, a pod's log, or nowhere at all for a LocalCluster. With it, the logs sit beside the
outputs they explain.

Local paths (and anything fsspec mounts as a file system, e.g. a shared NFS ``--out`` on SLURM)
are appended to as records arrive, one header line per worker start, so successive runs add to
the same file. Object stores (``s3://``, ``gs://``, ``memory://``...) cannot append: each worker
keeps its log in memory (the newest ``MAX_BUFFER`` bytes) and rewrites one object per worker start,
``worker-<name>-<UTC time>.log``, at most every ``FLUSH_SECONDS`` and when the worker closes, so a
killed worker loses at most the last ``FLUSH_SECONDS``; its stderr still has everything.

A worker that cannot write its log (an ``--out`` that the driver can reach and it cannot) logs one
warning and carries on: logs never fail a run.

Why not ``Client.forward_logging``: it sends each record through the scheduler to the driver, so
the log would be written only while the driver is up and connected (the records that explain a
lost worker are the ones that never arrive), and on an in-process cluster the worker's forwarding
handler sits on the driver's own loggers: each forwarded record is handled there and forwarded
again (measured: one warning became 444 records in 2 s). Nor dask-jobqueue's ``log_directory``:
a batch job's raw stderr, for jobqueue clusters only, set per profile (cluster.yaml), not under ``--out``.
The driver learns what it must say from the shard results (e.g. decode processes replaced).
"""

from __future__ import annotations

import io
import logging
import os
import re
import socket
import time
from datetime import datetime, timezone

from distributed.diagnostics.plugin import WorkerPlugin

from pipeline.core.redact import install_log_redaction, redact

PLUGIN_NAME = "cxr-audit-worker-logs"
# logger -> lowest level written. Only `pipeline`'s level is lowered (to INFO) where it is higher:
# `distributed`'s level is left as its configuration (or the job's --verbose) set it.
LOGGERS = {"pipeline": logging.INFO, "distributed": logging.WARNING}
FORMAT = "%(asctime)s %(levelname)s %(name)s [%(threadName)s]: %(message)s"
FLUSH_SECONDS = 30.0
MAX_BUFFER = 4 << 20

log = logging.getLogger(__name__)


def log_name(worker_name) -> str:
    """worker-<name>.log, with anything that is not safe in a file name replaced."""
    return f"worker-{re.sub(r'[^A-Za-z0-9._-]', '_', str(worker_name))}.log"


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith(("file://", "local://"))


class _ObjectHandler(logging.Handler):
    """Keeps the newest MAX_BUFFER bytes and rewrites one object with them, at most every
    FLUSH_SECONDS and on close (object stores have no append)."""

    def __init__(self, url: str, storage_options: dict):
        super().__init__()
        self.url, self.storage_options = url, storage_options
        self.buffer = io.StringIO()
        self.last_flush = time.monotonic()
        self.dirty = False

    def emit(self, record):
        try:
            text = self.format(record) + "\n"
            with self.lock:
                self.buffer.write(text)
                if self.buffer.tell() > MAX_BUFFER:
                    keep = self.buffer.getvalue()[-MAX_BUFFER // 2:]
                    self.buffer = io.StringIO()
                    self.buffer.write("... (older lines dropped: the log outgrew its in-memory buffer)\n" + keep)
                self.dirty = True
            if time.monotonic() - self.last_flush > FLUSH_SECONDS:
                self.flush()
        except Exception:  # noqa: BLE001 - logging must never break a task
            self.handleError(record)

    def flush(self):
        from pipeline.store.storage import write_bytes_atomic

        with self.lock:
            if not self.dirty:
                return
            data, self.dirty, self.last_flush = self.buffer.getvalue().encode(), False, time.monotonic()
        write_bytes_atomic(self.url, data, self.storage_options)

    def close(self):
        try:
            self.flush()
        finally:
            super().close()


class _ThisWorker(logging.Filter):
    """Records of this worker only: with in-process workers (threads) every worker and the driver
    share the loggers, so a record belongs to the worker whose task logged it; records from no task
    belong to the worker only in a process of its own."""

    def __init__(self, worker, own_process: bool):
        super().__init__()
        self.worker, self.own_process = worker, own_process

    def filter(self, record):
        from distributed.worker import get_worker

        if record.levelno < LOGGERS.get(record.name.split(".")[0], logging.INFO):
            return False
        try:
            return get_worker() is self.worker
        except ValueError:
            return self.own_process


class WorkerLogs(WorkerPlugin):
    """Adds a handler for the ``pipeline`` and ``distributed`` loggers on every worker (present
    and future) that writes to ``LOGS_URL/worker-<name>.log``."""

    name = PLUGIN_NAME
    idempotent = False  # a second run replaces the first run's plugin (and its folder)

    def __init__(self, logs_url: str, storage_options: dict | None = None):
        self.logs_url = logs_url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.client_pid = (socket.gethostname(), os.getpid())
        self.handler: logging.Handler | None = None
        self.levels: dict[str, int] = {}

    def setup(self, worker):
        install_log_redaction()  # the log may quote a film's URL: no credentials in it
        self.worker = worker
        try:
            self.handler = self._open(worker)
        except Exception as e:  # noqa: BLE001 - logs never fail a run
            log.warning("worker %s: cannot write its log under %s (%s: %s); its logs stay on its stderr",
                        worker.name, redact(self.logs_url), type(e).__name__, redact(str(e)))
            return
        self.handler.setFormatter(logging.Formatter(FORMAT))
        self.handler.addFilter(_ThisWorker(worker, own_process=(socket.gethostname(), os.getpid()) != self.client_pid))
        for name, level in LOGGERS.items():
            logger = logging.getLogger(name)
            if name == "pipeline" and logger.getEffectiveLevel() > level:
                self.levels[name] = logger.level
                logger.setLevel(level)
            logger.addHandler(self.handler)
        self._write(logging.INFO, "worker %s (%s, pid %d on %s) logs to %s", worker.name, worker.address, os.getpid(),
                    socket.gethostname(), redact(self.path))

    def _write(self, level: int, msg: str, *args) -> None:
        """A record of the worker itself, written past the filter (setup and transitions run in no task)."""
        self.handler.emit(log.makeRecord(log.name, level, __file__, 0, msg, args, None))

    def _open(self, worker) -> logging.Handler:
        from pipeline.io.fs import join, url_to_fs

        if _is_local(self.logs_url):
            fs, folder = url_to_fs(self.logs_url, self.storage_options)
            fs.makedirs(folder, exist_ok=True)
            self.path = join(folder, log_name(worker.name))
            return logging.FileHandler(self.path, mode="a", encoding="utf-8")
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        self.path = join(self.logs_url, log_name(f"{worker.name}-{stamp}"))
        return _ObjectHandler(self.path, self.storage_options)

    def transition(self, key, start, finish, *args, **kwargs):
        if finish != "error" or self.handler is None:
            return
        ts = self.worker.state.tasks.get(key)
        exc = getattr(ts, "exception", None) if ts is not None else None
        text = getattr(ts, "exception_text", "") or (repr(getattr(exc, "data", exc)) if exc is not None else "")
        self._write(logging.ERROR, "task %s failed: %s", key, redact(str(text)))

    def teardown(self, worker):
        if self.handler is None:
            return
        for name in LOGGERS:
            logging.getLogger(name).removeHandler(self.handler)
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)
        try:
            self.handler.close()  # an object store's log is written here
        except Exception as e:  # noqa: BLE001 - logs never fail a run
            log.warning("worker %s: its log could not be written to %s (%s)", worker.name, redact(self.path), redact(str(e)))
        self.handler = None


class WorkerLogsHandle:
    """What install_worker_logs returns: ``close()`` (or leaving a ``with`` block) takes the plugin
    off the workers, which closes their log files, so a long-lived cluster that outlives this run
    does not keep writing into its ``OUT/logs``."""

    def __init__(self, client):
        self.client = client

    def close(self) -> None:
        client, self.client = self.client, None  # a second close() finds None (a racing one: caught below)
        if client is None:
            return
        try:
            if client.status == "running":
                client.unregister_worker_plugin(PLUGIN_NAME)
        except Exception as e:  # noqa: BLE001 - e.g. the cluster is already gone: its workers closed their logs
            log.debug("worker logs: %s", e)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def install_worker_logs(client, logs_url: str, storage_options: dict | None = None) -> WorkerLogsHandle:
    """Every worker of ``client`` (and every worker that joins later) writes its ``pipeline`` log
    records to ``logs_url/worker-<name>.log`` (see the module docstring for object stores).
    Call it where the run's client is created; ``close()`` the result before closing the client."""
    client.register_plugin(WorkerLogs(logs_url, storage_options))
    return WorkerLogsHandle(client)
