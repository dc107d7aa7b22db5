"""One writer per --out: a lock file naming its holder (host, pid, process start time).

* The lock is created exclusively and whole: a hard link of a fully written temp file on local
  disks, ``open(..., "xb")`` (one conditional PUT) on object stores. Two starters cannot both win,
  and nobody ever reads a half-written lock.
* A holder is alive only if it is on this host, its pid exists and that process started when the
  lock says (a reused pid is not the holder).
* Taking over a dead holder's lock is atomic: the taker first creates a breaker file named after
  that holder, exclusively; only one taker can, and it re-reads the lock before removing it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import socket
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone

from fsspec.implementations.local import LocalFileSystem

from pipeline.core.errors import OutputError
from pipeline.store.storage import join, url_to_fs

LOCK_NAME = "_lock.json"
UNREADABLE_GRACE_S = 60  # an unreadable lock older than this is debris from a kill, not a starter


class LockError(OutputError):
    """--out is held by another run, or its lock cannot be judged; the message says what to do."""


def process_start(pid: int) -> str | None:
    """Start time of a process in clock ticks since boot (Linux), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def my_identity() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": process_start(os.getpid()), "boot": _boot_id(),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"), "token": uuid.uuid4().hex}


def holder_alive(holder: dict) -> bool | None:
    """True/False on this host; None when the holder is on another host (cannot be judged here)."""
    if holder.get("host") != socket.gethostname():
        return None
    if holder.get("boot") and _boot_id() and holder["boot"] != _boot_id():
        return False  # the machine rebooted since
    try:
        pid = int(holder.get("pid", -1))
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except (ValueError, OverflowError):
        return False
    if holder.get("start") is None:
        return True  # an old-style lock: the pid alone says alive
    return process_start(pid) == holder["start"]


def _create_exclusive(fs, path: str, data: bytes) -> bool:
    """Create path holding data, whole, only if it does not exist. False if it exists."""
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
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
    try:
        with fs.open(path, "xb") as f:
            f.write(data)
        return True
    except FileExistsError:
        return False


def _read(fs, path: str) -> tuple[bytes | None, dict | None]:
    try:
        with fs.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None, None
    try:
        obj = json.loads(raw)
        return raw, obj if isinstance(obj, dict) else None
    except (ValueError, UnicodeDecodeError):
        return raw, None


def _age_s(fs, path: str) -> float:
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return 0.0
    m = info.get("mtime") or info.get("LastModified") or info.get("created")
    if isinstance(m, datetime):
        m = m.timestamp()
    return time.time() - float(m) if m else float("inf")


def _unlock_command(out: str) -> str:
    return f"python -m jobs.runs --out {out} --unlock"


def acquire(out: str, storage_options: dict | None = None) -> tuple[dict, str | None]:
    """Take the lock or raise LockError. Returns (my identity, note about a recovered lock)."""
    fs, path = url_to_fs(join(out, LOCK_NAME), storage_options)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    me = my_identity()
    data = json.dumps(me).encode()
    note = None
    for _ in range(3):
        if _create_exclusive(fs, path, data):
            return me, note
        raw, holder = _read(fs, path)
        if raw is None:
            continue  # released meanwhile: try again
        if holder is None:
            if _age_s(fs, path) < UNREADABLE_GRACE_S:
                raise LockError(f"{join(out, LOCK_NAME)} is unreadable and new: another run may be starting. "
                                f"Wait a minute and rerun; if no run is starting, {_unlock_command(out)}")
            why = "an unreadable lock (a run killed while taking it)"
        else:
            alive = holder_alive(holder)
            if alive is None:
                raise LockError(f"another run is writing to {out} (pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}). "
                                f"Wait for it to finish; if it is dead, {_unlock_command(out)} on any machine, then rerun.")
            if alive:
                raise LockError(f"another run is writing to {out} (pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}). "
                                "Wait for it to finish, then rerun.")
            why = f"the lock of a run that died (pid {holder.get('pid')}, since {holder.get('since')})"
        # Break exactly this stale lock: one breaker per stale content, created exclusively.
        breaker = f"{path}.break-{hashlib.sha256(raw).hexdigest()[:16]}"
        if not _create_exclusive(fs, breaker, data):
            if _age_s(fs, breaker) < UNREADABLE_GRACE_S:
                raise LockError(f"another run is taking over {join(out, LOCK_NAME)} right now; rerun when it has finished")
            fs.rm(breaker)  # a taker that died mid-takeover
            continue
        try:
            raw2, _ = _read(fs, path)
            if raw2 == raw:  # still the stale lock (nobody took over between our reads)
                fs.rm(path)
                note = f"recovered {why}; its finished shards are kept"
        finally:
            fs.rm(breaker)
    raise LockError(f"could not take {join(out, LOCK_NAME)} (it changed hands while we tried); rerun")


def release(out: str, me: dict, storage_options: dict | None = None) -> None:
    fs, path = url_to_fs(join(out, LOCK_NAME), storage_options)
    _, holder = _read(fs, path)
    if holder is not None and holder.get("token") == me["token"]:  # never remove another run's lock
        fs.rm(path)


def force_unlock(out: str, storage_options: dict | None = None) -> str:
    """Remove the lock unless its holder is alive on this host (jobs.runs --unlock)."""
    fs, path = url_to_fs(join(out, LOCK_NAME), storage_options)
    raw, holder = _read(fs, path)
    if raw is None:
        return f"no lock under {out}"
    if holder is not None and holder_alive(holder):
        raise LockError(f"the lock's holder (pid {holder.get('pid')}) is alive on this host; stop it first")
    fs.rm(path)
    return f"removed {join(out, LOCK_NAME)} (held by {holder or 'an unreadable lock'})"


@contextmanager
def run_lock(out: str, storage_options: dict | None = None):
    """Hold OUT/_lock.json for the duration. Yields a note when a crashed run's lock was recovered."""
    me, note = acquire(out, storage_options)
    try:
        yield note
    finally:
        release(out, me, storage_options)
