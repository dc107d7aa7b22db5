"""One writer per --out: a lock file naming its holder (host, pid, process start time).

* The lock is created exclusively and whole: a hard link of a fully written temp file on local
  disks, ``open(..., "xb")`` (one conditional PUT) on object stores. Two starters cannot both win,
  and nobody ever reads a half-written lock.
* A holder is alive only if it is on this host, its pid exists and that process started when the
  lock says (a reused pid is not the holder).
* Taking over a dead holder's lock is atomic: the taker first creates a breaker file named after
  that holder, exclusively; only one taker can, and it re-reads the lock before removing it.
* Where one holder is guaranteed: local disks (a hard link), ``memory://`` (one process), and S3
  servers that honour ``If-None-Match: *`` (AWS S3 does since 2024; SeaweedFS, tested in tests/s3):
  each run checks that its server refuses a second conditional create and warns if it does not. Any other backend gets a
  warning too: fsspec leaves it to each backend whether ``"xb"`` is atomic, so two runs started
  at the same moment there could both hold the lock.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone

from pipeline.core.errors import OutputError
from pipeline.store.layout import LOCK as LOCK_NAME  # noqa: F401 - the name tests and callers know
from pipeline.store.layout import OutputStore
UNREADABLE_GRACE_S = 60  # an unreadable lock older than this is debris from a kill, not a starter
log = logging.getLogger(__name__)


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


def _s3_honours_conditional_create(store: OutputStore) -> bool:
    """Create a probe twice, exclusively: a server that honours If-None-Match refuses the second."""
    probe = store.join(f".write-probe-{uuid.uuid4().hex}")  # a name clean-up knows (storage.is_own_temp)
    try:
        return store.create_exclusive(probe, b"1") and not store.create_exclusive(probe, b"2")
    finally:
        store.remove(probe)


# Per fsspec implementation (its subclasses too): None where one holder is guaranteed, else a
# check of this store that says whether it is (an S3-compatible server may ignore If-None-Match).
EXCLUSIVE_CREATE = {"fsspec.implementations.local.LocalFileSystem": None,
                    "fsspec.implementations.memory.MemoryFileSystem": None,  # one process's namespace
                    "s3fs.core.S3FileSystem": _s3_honours_conditional_create}


def one_holder_caveat(store: OutputStore) -> str | None:
    """Why this store cannot guarantee one lock holder, or None where it can."""
    fs, _ = store.fs()
    names = [f"{c.__module__}.{c.__qualname__}" for c in type(fs).__mro__]
    known = next((n for n in names if n in EXCLUSIVE_CREATE), None)
    if known is not None and (EXCLUSIVE_CREATE[known] is None or EXCLUSIVE_CREATE[known](store)):
        return None
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    how = ("this S3 server overwrote an object despite If-None-Match: *" if known
           else f"{protocol}:// has no conditional create known to be atomic")
    return (f"the lock on {store.url} cannot guarantee one holder ({how}): two runs started on it at the "
            "same moment could both write. Start one run at a time on this --out.")


def _unlock_command(store: OutputStore) -> str:
    return f"python -m jobs.runs --out {store.url} --unlock"


def acquire(out, storage_options: dict | None = None) -> tuple[dict, str | None]:
    """Take the lock or raise LockError. Returns (my identity, note about a recovered lock)."""
    store = OutputStore.of(out, storage_options)
    fs, path = store.fs(store.lock)
    me = my_identity()
    data = json.dumps(me).encode()
    note = None
    caveat = one_holder_caveat(store)
    if caveat:
        log.warning(caveat)
    for _ in range(3):
        if store.create_exclusive(store.lock, data):
            return me, note
        raw, holder = _read(fs, path)
        if raw is None:
            continue  # released meanwhile: try again
        if holder is not None and holder.get("token") == me["token"]:
            return me, note  # our conditional PUT landed, but its reply was lost and the retry refused
        if holder is None:
            if _age_s(fs, path) < UNREADABLE_GRACE_S:
                raise LockError(f"{store.lock} is unreadable and new: another run may be starting. "
                                f"Wait a minute and rerun; if no run is starting, {_unlock_command(store)}")
            why = "an unreadable lock (a run killed while taking it)"
        else:
            alive = holder_alive(holder)
            if alive is None:
                raise LockError(f"another run is writing to {store.url} (pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}). "
                                f"Wait for it to finish; if it is dead, {_unlock_command(store)} on any machine, then rerun.")
            if alive:
                raise LockError(f"another run is writing to {store.url} (pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}). "
                                "Wait for it to finish, then rerun.")
            why = f"the lock of a run that died (pid {holder.get('pid')}, since {holder.get('since')})"
        # Break exactly this stale lock: one breaker per stale content, created exclusively.
        breaker = store.lock_breaker(hashlib.sha256(raw).hexdigest()[:16])
        if not store.create_exclusive(breaker, data):
            if _age_s(fs, store.fs(breaker)[1]) < UNREADABLE_GRACE_S:
                raise LockError(f"another run is taking over {store.lock} right now; rerun when it has finished")
            store.remove(breaker)  # a taker that died mid-takeover
            continue
        try:
            raw2, _ = _read(fs, path)
            if raw2 == raw:  # still the stale lock (nobody took over between our reads)
                fs.rm(path)
                note = f"recovered {why}; its finished shards are kept"
        finally:
            store.remove(breaker)
    raise LockError(f"could not take {store.lock} (it changed hands while we tried); rerun")


def release(out, me: dict, storage_options: dict | None = None) -> None:
    store = OutputStore.of(out, storage_options)
    fs, path = store.fs(store.lock)
    _, holder = _read(fs, path)
    if holder is not None and holder.get("token") == me["token"]:  # never remove another run's lock
        fs.rm(path)


def force_unlock(out, storage_options: dict | None = None) -> str:
    """Remove the lock unless its holder is alive on this host (jobs.runs --unlock)."""
    store = OutputStore.of(out, storage_options)
    fs, path = store.fs(store.lock)
    raw, holder = _read(fs, path)
    if raw is None:
        return f"no lock under {store.url}"
    if holder is not None and holder_alive(holder):
        raise LockError(f"the lock's holder (pid {holder.get('pid')}) is alive on this host; stop it first")
    fs.rm(path)
    return f"removed {store.lock} (held by {holder or 'an unreadable lock'})"


@contextmanager
def run_lock(out, storage_options: dict | None = None):
    """Hold OUT/_lock.json for the duration. Yields a note when a crashed run's lock was recovered."""
    store = OutputStore.of(out, storage_options)
    me, note = acquire(store)
    try:
        yield note
    finally:
        release(store, me)
