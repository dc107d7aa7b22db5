"""One writer per --out: a lock file naming its holder; a dead holder's lock is recovered."""

from __future__ import annotations

import json
import os
import posixpath
import socket
from contextlib import contextmanager
from datetime import datetime, timezone

from fsspec.implementations.local import LocalFileSystem

from .errors import OutputError
from .storage import join, read_json, url_to_fs

LOCK_NAME = "_lock.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def run_lock(out: str, storage_options: dict | None = None):
    """Hold OUT/_lock.json for the duration. Yields a note when a crashed run's lock was recovered."""
    url = join(out, LOCK_NAME)
    fs, path = url_to_fs(url, storage_options)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    note = None
    holder = read_json(url, storage_options)
    if holder is not None:
        if holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1))):
            note = f"recovered the lock of a run that died (pid {holder.get('pid')}, since {holder.get('since')}); its finished shards are kept"
            fs.rm(path)
        else:
            raise OutputError(
                f"another run is writing to {out} (pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}). "
                f"Wait for it to finish; if it is dead on another machine, delete {url} and rerun."
            )
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    try:
        if isinstance(fs, LocalFileSystem):
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # atomic: two starters cannot both win
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
        else:
            with fs.open(path, "w") as f:
                json.dump(me, f)
    except FileExistsError:
        raise OutputError(f"another run started writing to {out} at the same moment; rerun when it has finished") from None
    try:
        yield note
    finally:
        try:
            fs.rm(path)
        except FileNotFoundError:
            pass
