"""The output folder as one object: every path of the public contract, and how files get there.

``OutputStore`` is built once from ``--out`` and its storage options (in the spirit of
pangeo-forge-recipes' ``FSSpecTarget`` and datatrove's ``DataFolder``) and handed to everything that
reads or writes outputs, so the options travel with the location: an ``s3://`` run is aggregated,
compared and reported with the options it was scored with. Nothing else joins output paths.

Every visible file is written whole (a temporary name, then a rename), and the lock is created
exclusively: a hard link of a fully written temporary file on local disks, ``open(path, "xb")`` (one
conditional PUT) on every other fsspec backend.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
from dataclasses import dataclass

from pipeline.io.fs import join
from pipeline.io.location import Location, freeze_options
from pipeline.store import storage

# Public names under OUT (README, "Outputs: the public contract").
MANIFEST = "manifest.parquet"
MANIFEST_ISSUES = "manifest_issues.parquet"
LATEST = "latest.json"
VIEWS = "cxr_audit.sql"
LOCK = "_lock.json"
RUNS = "runs"
DRIFT = "drift"
CACHE = "cache"
SCRATCH = "_scratch"  # matplotlib's and Dask's scratch for a local --out (pipeline.run.lifecycle.contain_scratch)
LOGS = "logs"
# ... and under OUT/runs/<model_version>/
RUN_JSON = "run.json"
MAPS = "maps.zarr"
PREDICTIONS = "predictions"
RECORDS = "_shards"
ERRORS = "errors.parquet"
AGGREGATE_INPUTS = "_aggregates.json"
REPORT = "report.html"
FILMS = "films"
RESOLVED_CONFIG = "config.yaml"


@dataclass(frozen=True)
class OutputStore:
    """An output root (fsspec URL or local path) and the storage options that open it. Its ``root``
    is the rooted filesystem (``pipeline.io.location.Location``) every path below is opened through."""

    url: str
    storage_options: tuple[tuple[str, object], ...] = ()

    def __post_init__(self):
        url = os.fspath(self.url)
        object.__setattr__(self, "url", url.rstrip("/") if url.rstrip("/") else url)
        object.__setattr__(self, "storage_options", freeze_options(self.storage_options))
        object.__setattr__(self, "root", Location(self.url, self.storage_options))  # not a field: equality is url and options

    @classmethod
    def of(cls, out: "OutputStore | str | os.PathLike", storage_options=None) -> "OutputStore":
        """The store for out; an OutputStore passes through (it already carries its options)."""
        if isinstance(out, OutputStore):
            if storage_options and freeze_options(storage_options) != out.storage_options:
                raise ValueError("an OutputStore already carries its storage options; do not pass others")
            return out
        return cls(os.fspath(out), freeze_options(storage_options))

    def __str__(self) -> str:
        return self.url

    @property
    def options(self) -> dict:
        """The storage options as the keyword arguments fsspec takes (repr: the keys only)."""
        return self.root.options

    @property
    def is_remote(self) -> bool:
        return self.root.is_remote

    def absolute(self) -> "OutputStore":
        """The same store with a local root made absolute (for files read from another folder)."""
        return self if "://" in self.url else OutputStore(os.path.abspath(self.url), self.storage_options)

    # ---- paths of the public contract -------------------------------------------------------

    def join(self, *parts: str) -> str:
        return join(self.url, *parts)

    @property
    def manifest(self) -> str:
        return self.join(MANIFEST)

    @property
    def manifest_issues(self) -> str:
        return self.join(MANIFEST_ISSUES)

    @property
    def latest(self) -> str:
        return self.join(LATEST)

    @property
    def views(self) -> str:
        return self.join(VIEWS)

    @property
    def lock(self) -> str:
        return self.join(LOCK)

    def lock_breaker(self, stale_digest: str) -> str:
        """The file a taker creates exclusively before removing the stale lock of that content."""
        return f"{self.lock}.break-{stale_digest}"

    @property
    def runs_root(self) -> str:
        return self.join(RUNS)

    @property
    def cache_root(self) -> str:
        """Where ``--cache auto`` keeps preprocessed films."""
        return self.join(CACHE)

    @property
    def logs(self) -> str:
        return self.join(LOGS)

    @staticmethod
    def run_rel(model_version: str) -> str:
        """A run's folder relative to OUT, as latest.json names it."""
        return posixpath.join(RUNS, model_version)

    def run_dir(self, model_version: str) -> str:
        return self.join(RUNS, model_version)

    def run_json(self, model_version: str) -> str:
        return self.join(RUNS, model_version, RUN_JSON)

    def resolved_config(self, model_version: str) -> str:
        return self.join(RUNS, model_version, RESOLVED_CONFIG)

    def maps(self, model_version: str) -> str:
        return self.join(RUNS, model_version, MAPS)

    def predictions(self, model_version: str) -> str:
        return self.join(RUNS, model_version, PREDICTIONS)

    def part(self, model_version: str, shard_index: int) -> str:
        return self.join(RUNS, model_version, PREDICTIONS, f"part-{shard_index:06d}.parquet")

    def parts_glob(self, model_version: str = "*") -> str:
        """Every predictions part of one run (or of every run: ``model_version='*'``), for queries."""
        return self.join(RUNS, model_version, PREDICTIONS, "*.parquet")

    def records(self, model_version: str) -> str:
        return self.join(RUNS, model_version, RECORDS)

    def record(self, model_version: str, shard_index: int) -> str:
        return self.join(RUNS, model_version, RECORDS, f"shard-{shard_index:06d}.json")

    def records_glob(self, model_version: str) -> str:
        return self.join(RUNS, model_version, RECORDS, "shard-*.json")

    def errors(self, model_version: str) -> str:
        return self.join(RUNS, model_version, ERRORS)

    def table(self, model_version: str, name: str) -> str:
        """An aggregate table of a run: ``region_stats``, ``metrics``, ``identifiability``, ..."""
        return self.join(RUNS, model_version, f"{name}.parquet")

    def aggregate_inputs(self, model_version: str) -> str:
        return self.join(RUNS, model_version, AGGREGATE_INPUTS)

    def report(self, model_version: str) -> str:
        return self.join(RUNS, model_version, REPORT)

    def film(self, model_version: str, stem: str) -> str:
        return self.join(RUNS, model_version, FILMS, f"{stem}.png")

    def drift_dir(self, from_mv: str, to_mv: str) -> str:
        return self.join(DRIFT, f"{from_mv}__{to_mv}")

    def drift_table(self, from_mv: str, to_mv: str, name: str) -> str:
        return posixpath.join(self.drift_dir(from_mv, to_mv), f"{name}.parquet")

    def drift_summary(self, from_mv: str, to_mv: str) -> str:
        return posixpath.join(self.drift_dir(from_mv, to_mv), "summary.json")

    @staticmethod
    def latest_entry(model_version: str, finished: str | None) -> dict:
        """What latest.json holds."""
        return {"model_version": model_version, "run": OutputStore.run_rel(model_version), "finished": finished}

    # ---- access ------------------------------------------------------------------------------

    def fs(self, url: str | None = None):
        """(filesystem, path) for url (default: the root), opened with this store's options (the
        root's filesystem, resolved once, for every path below it)."""
        return self.root.resolve(url)

    def exists(self, url: str | None = None) -> bool:
        return self.root.exists(url)

    def model_versions(self) -> list[str]:
        """The run folders under runs/, sorted by name."""
        fs, base = self.fs(self.runs_root)
        if not fs.exists(base):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(base, detail=False))

    def read_json(self, url: str):
        return storage.read_json(url, self.root)

    def read_json_safe(self, url: str):
        """(value, None); (None, None) when absent; (None, why) when present but unreadable."""
        return storage.read_json_safe(url, self.root)

    def read_parquet(self, url: str):
        return storage.read_parquet(url, self.root)

    def write_bytes(self, url: str, data: bytes) -> None:
        storage.write_bytes_atomic(url, data, self.root)

    def write_json(self, url: str, obj) -> None:
        storage.write_json_atomic(obj, url, self.root)

    def write_parquet(self, url: str, table) -> None:
        storage.write_parquet_atomic(table, url, self.root)

    def remove(self, url: str) -> bool:
        """Remove one file; False when it was not there."""
        fs, path = self.fs(url)
        try:
            fs.rm(path)
            return True
        except FileNotFoundError:
            return False

    def open_maps(self, url: str, mode: str = "r"):
        from pipeline.store.maps_store import open_maps

        return open_maps(url, mode, self.options)

    def create_exclusive(self, url: str, data: bytes) -> bool:
        """Create url holding data, whole, only if it does not exist yet. False if it exists.

        Local disks: a hard link of a fully written temp file (atomic, and never half-written for a
        reader). Every other backend: ``open(path, "xb")``, which fsspec maps to a conditional
        create (one PUT with If-None-Match on object stores)."""
        fs, path = self.fs(url)
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        from fsspec.implementations.local import LocalFileSystem

        if isinstance(fs, LocalFileSystem):
            tmp = storage.temp_name(path)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # atomic, fails if path exists
                return True
            except FileExistsError:
                return False
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        if not data:
            raise ValueError("create_exclusive needs content: s3fs writes an empty file unconditionally")
        try:
            with fs.open(path, "xb") as f:
                f.write(data)
            return True
        except FileExistsError:
            return False
        except OSError:
            # S3 servers that refuse If-None-Match without naming the condition (SeaweedFS) reach s3fs
            # as OSError(EINVAL), and so does a retried PUT whose first try landed: if the object now
            # exists, report it as taken (a caller that wrote a unique token can recognise its own).
            fs.invalidate_cache(path)
            if fs.exists(path):
                return False
            raise

    def check_writable(self) -> None:
        storage.check_writable(self.url, self.root)

    def remove_temp_files(self) -> int:
        # Zarr stores (maps.zarr, the cache) are written by zarr alone; _scratch is Dask's and matplotlib's
        return storage.remove_temp_files(self.url, self.root, skip=lambda name: name.endswith(".zarr") or name in (CACHE, SCRATCH))
