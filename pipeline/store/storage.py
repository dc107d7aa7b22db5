"""fsspec helpers: every visible output appears whole (temp name, then rename) or not at all."""

from __future__ import annotations

import io
import json
import posixpath
import re
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.errors import OutputError
from pipeline.io.fs import join, url_to_fs
from pipeline.io.location import Location


# The job's own temporary names: '<file>.tmp-cxr-<32 hex>' (and the writability probe). Only these
# are ever deleted as leftovers: a user's 'notes.tmp-1' under --out is not the job's to remove.
TEMP_MARK = ".tmp-cxr-"
_OWN_TEMP = re.compile(r"(\.tmp-cxr-|^\.write-probe-)[0-9a-f]{32}$")


def temp_name(path: str) -> str:
    """A temporary name beside ``path`` that only this job makes (see remove_temp_files)."""
    return f"{path}{TEMP_MARK}{uuid.uuid4().hex}"


def is_own_temp(path: str) -> bool:
    return _OWN_TEMP.search(posixpath.basename(path)) is not None


def kwargs_of(storage_options: "dict | Location | None") -> dict | None:
    """The options as fsspec's keyword arguments, from a dict or a Location."""
    return storage_options.options if isinstance(storage_options, Location) else storage_options


def resolve(url: str, storage_options: "dict | Location | None" = None):
    """(filesystem, path) of url. ``storage_options``: the options that open it, or the Location
    (an output root) it lies in, whose filesystem is then reused rather than resolved again."""
    if isinstance(storage_options, Location):
        return storage_options.resolve(url)
    return url_to_fs(url, storage_options)


def write_bytes_atomic(url: str, data: bytes, storage_options: "dict | Location | None" = None) -> None:
    # The temp name never matches '*.parquet' / '*.json', so globs and readers never see it.
    fs, path = resolve(url, storage_options)
    tmp = temp_name(path)
    try:
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    except (OSError, PermissionError) as e:
        try:
            if fs.exists(tmp):
                fs.rm(tmp)
        except OSError:
            pass
        raise OutputError(f"cannot write {url}: {e}. Check that --out is writable and has free space.") from e


def write_parquet_atomic(table: pa.Table, url: str, storage_options: "dict | Location | None" = None) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes_atomic(url, buf.getvalue(), storage_options)


def write_json_atomic(obj, url: str, storage_options: "dict | Location | None" = None) -> None:
    write_bytes_atomic(url, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode(), storage_options)


def read_json(url: str, storage_options: "dict | Location | None" = None):
    fs, path = resolve(url, storage_options)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def read_json_safe(url: str, storage_options: "dict | Location | None" = None) -> tuple[object | None, str | None]:
    """(value, None); (None, None) when absent; (None, why) when present but unreadable."""
    fs, path = resolve(url, storage_options)
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read()), None
    except FileNotFoundError:
        return None, None
    except (ValueError, UnicodeDecodeError, OSError) as e:
        return None, f"{type(e).__name__}: {str(e)[:120]}"


def exists(url: str, storage_options: "dict | Location | None" = None) -> bool:
    fs, path = resolve(url, storage_options)
    return fs.exists(path)


def read_parquet(url: str, storage_options: "dict | Location | None" = None) -> pa.Table:
    fs, path = resolve(url, storage_options)
    with fs.open(path, "rb") as f:
        return pq.read_table(f)


def check_writable(url: str, storage_options: "dict | Location | None" = None) -> None:
    """Fail before any work if OUT cannot take a file."""
    probe = join(url, f".write-probe-{uuid.uuid4().hex}")
    try:
        fs, path = resolve(url, storage_options)
        fs.makedirs(path, exist_ok=True)
        probe_path = posixpath.join(path, posixpath.basename(probe))
        with fs.open(probe_path, "wb") as f:
            f.write(b"ok")
        fs.rm(probe_path)
    except Exception as e:  # noqa: BLE001 - any backend's failure means the same to the user
        raise OutputError(f"--out {url} is not writable ({type(e).__name__}: {e}). Choose another --out or fix its permissions.") from e


def remove_temp_files(url: str, storage_options: "dict | Location | None" = None, skip=lambda name: False) -> int:
    """Delete the temporaries a killed writer of this job left under url (only while holding the
    --out lock): names the job makes itself (``temp_name``, the writability probe), nothing else.
    ``skip(folder name)``: folders not walked, where the job's own writes never go (Zarr stores:
    the cache of 112k films is 224k files, 21 s to list before every run that did anything)."""
    fs, path = resolve(url, storage_options)
    if not fs.exists(path):
        return 0
    leftovers = []
    for folder, dirs, files in fs.walk(path, topdown=True):
        dirs[:] = [d for d in dirs if not skip(d)]  # pruned in place, as os.walk
        leftovers += [posixpath.join(folder, f) for f in files if is_own_temp(f)]
    for p in leftovers:
        fs.rm(p)
    return len(leftovers)


def remove_if_empty(url: str, storage_options: "dict | Location | None" = None) -> bool:
    """Remove the folder url when no file lies anywhere under it (a run that failed before writing)."""
    try:
        fs, path = resolve(url, storage_options)
        if not fs.exists(path) or fs.find(path):
            return False
        fs.rm(path, recursive=True)
        return True
    except OSError:
        return False
