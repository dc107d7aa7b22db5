"""Bounded reads of one input file from a local path or any fsspec URL: size, time and retries.

Shared by the dataset adapters (metadata, stat of a film) and the decoders (a film's bytes), so
neither imports the other. Imports neither torch nor PIL.
"""

from __future__ import annotations

import errno
import os
import pickle
import stat
import threading
import time
from dataclasses import dataclass

import fsspec

from pipeline.core.errors import ImageError
from pipeline.core.redact import redact


@dataclass(frozen=True)
class ReadLimits:
    """Bounds on what one film may cost. Not part of a run's identity: they never change the pixels
    of a film that passes them. Real films are 0.3-0.5 MB (NIH), up to ~10 MB (16-bit PadChest)."""

    max_bytes: int = 64 * 2**20
    # 64 M pixels: far above any radiograph (PadChest ~ 4k x 4k) and below PIL's own 89 M warning.
    max_pixels: int = 64_000_000
    max_aspect: float = 6.0  # chest films are ~1:1.3; a 1 x 60,000 'film' would resize to 224 x 13 M
    # memory one decode may take (pixels x bytes per pixel of the decoded mode and the conversions it
    # needs, estimated from the header): a 16 MP 16-bit PadChest film needs ~112 MB, a 64 MP RGBA one 512 MB
    max_decode_bytes: int = 256 * 2**20
    timeout_s: float = 30.0  # per attempt, remote reads only (local reads of regular files do not hang)
    retries: int = 2  # further attempts after a transient error (timeout, connection, EIO)
    backoff_s: float = 0.5  # doubled after each attempt

    def __post_init__(self):
        if self.max_bytes < 1 or self.max_pixels < 1 or self.max_decode_bytes < 1 or self.max_aspect < 1 or self.timeout_s <= 0 or self.retries < 0 or self.backoff_s < 0:
            raise ValueError(f"invalid read limits {self}: sizes must be positive, aspect >= 1, retries >= 0")


class ImageTooLarge(Exception):
    """The file is larger than --max-image-bytes."""


class NotARegularFile(Exception):
    """A FIFO, device, socket or directory: reading it could block forever or never end."""


class EmptyFile(Exception):
    """The file has 0 bytes: no film, however often it is read (a rerun does not retry it)."""


class SymlinkLoop(Exception):
    """A symbolic link that leads back to itself (ELOOP): no rerun can read it."""


class ReadTimeout(TimeoutError):
    """One read took longer than --read-timeout."""


_TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.EPIPE}
_TRANSIENT_NAMES = {"ClientConnectionError", "ClientOSError", "ServerDisconnectedError", "ClientPayloadError", "ServerTimeoutError",
                    "FSTimeoutError", "ReadTimeoutError", "ConnectTimeoutError", "EndpointConnectionError"}


def is_transient(e: BaseException) -> bool:
    """Worth another try: timeouts, dropped connections, I/O errors of network file systems."""
    if isinstance(e, (TimeoutError, ConnectionError)):
        return True
    if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
        return True
    return any(c.__name__ in _TRANSIENT_NAMES for c in type(e).__mro__)


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _read_local(path: str, limits: ReadLimits) -> bytes:
    p = path[len("file://"):] if path.startswith("file://") else path
    st = os.stat(p)  # never blocks, even on a FIFO
    if not stat.S_ISREG(st.st_mode):
        raise NotARegularFile(f"{path} is not a regular file ({_kind(st.st_mode)}); only regular files are read")
    if st.st_size > limits.max_bytes:
        raise ImageTooLarge(f"{path} has {st.st_size} bytes, more than --max-image-bytes {limits.max_bytes}")
    # O_NONBLOCK: if the file was swapped for a FIFO since the stat, open does not wait for a writer.
    fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotARegularFile(f"{path} is not a regular file; only regular files are read")
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1
            # the size stat gave, plus one byte to notice a file that grew or lies about its size (/proc):
            # read(max_bytes + 1) allocated the whole limit for every film (0.3 ms of a decode process's CPU)
            data = f.read(min(st.st_size, limits.max_bytes) + 1)
            if len(data) > st.st_size:
                data += f.read(limits.max_bytes + 1 - len(data))
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"{path} has more than --max-image-bytes {limits.max_bytes} bytes")
    return data


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "not a regular file"


def _read_remote(path: str, limits: ReadLimits, storage_options: dict | None) -> bytes:
    fs, p = fsspec.core.url_to_fs(path, **(storage_options or {}))
    info = fs.info(p)  # HEAD / HeadObject on the object itself
    if info.get("type", "file") != "file":
        raise NotARegularFile(f"{path} is a {info.get('type')}, not an object")
    size = info.get("size")
    if size is not None and size > limits.max_bytes:
        raise ImageTooLarge(f"{path} has {size} bytes, more than --max-image-bytes {limits.max_bytes}")
    with fs.open(p, "rb") as f:
        data = _read_at_most(f, limits.max_bytes + 1)  # a server that sends more than it declared is cut off
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"{path} sends more than --max-image-bytes {limits.max_bytes} bytes")
    return data


def _read_at_most(f, n: int) -> bytes:
    """Up to n bytes: streams may return less than asked per call."""
    parts, got = [], 0
    while got < n:
        chunk = f.read(min(n - got, 2**22))
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _with_deadline(fn, timeout_s: float, what: str):
    """Run fn in a daemon thread; give up after timeout_s. A hung backend call cannot be cancelled
    from Python, so its thread is abandoned (it ends when the connection does); the film does not wait."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=target, name="cxr-read", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise ReadTimeout(f"{what}: no answer within --read-timeout {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _retrying(fn, limits: ReadLimits):
    delay = limits.backoff_s
    for attempt in range(limits.retries + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - retried only when transient; the caller converts
            if attempt < limits.retries and is_transient(e):
                time.sleep(delay)
                delay *= 2
                continue
            raise


def source_info(path: str, storage_options: dict | None = None, limits: ReadLimits = ReadLimits()) -> dict:
    """size and mtime/ETag of one film, as cheaply and as boundedly as its bytes are read."""
    if _is_local(path):
        st = os.stat(path[len("file://"):] if path.startswith("file://") else path)
        return {"size": st.st_size, "mtime": st.st_mtime, "type": "file" if stat.S_ISREG(st.st_mode) else "other"}

    def info():
        fs, p = fsspec.core.url_to_fs(path, **(storage_options or {}))
        return fs.info(p)

    return _retrying(lambda: _with_deadline(info, limits.timeout_s, redact(path)), limits)


def read_bytes(path: str, storage_options: dict | None = None, limits: ReadLimits = ReadLimits()) -> bytes:
    """Whole file as bytes from a local path or an fsspec URL, within ``limits``; transient errors
    are retried with backoff. Raises ImageError(stage='read') only."""
    def once() -> bytes:
        if _is_local(path):
            return _read_local(path, limits)
        return _with_deadline(lambda: _read_remote(path, limits, storage_options), limits.timeout_s, redact(path))

    try:
        data = _retrying(once, limits)
    except Exception as e:  # noqa: BLE001 - any backend failure is one image's failure
        raise _read_error(e) from None
    if not data:
        raise ImageError("read", EmptyFile(f"{redact(path)} is empty (0 bytes)"))
    return data


def image_error(stage: str, e: BaseException) -> ImageError:
    """Any exception of one film as its ImageError: the original class name, the message without credentials (URLs end up in messages); the
    cause is kept only when it can travel between processes as it is."""
    msg = str(e)
    clean = redact(msg)
    if clean == msg:
        try:
            pickle.loads(pickle.dumps(e))
            return ImageError(stage, e)
        except Exception:  # noqa: BLE001 - e.g. exceptions holding sockets or sessions
            pass
    return ImageError(stage, clean, error_class=type(e).__name__)


def _read_error(e: BaseException) -> ImageError:
    if isinstance(e, OSError) and e.errno == errno.ELOOP:
        return ImageError("read", SymlinkLoop(f"{e.strerror}: {redact(str(e.filename))}"))
    return image_error("read", e)
