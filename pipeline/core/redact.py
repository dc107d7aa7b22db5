"""Credentials never reach a file the job writes or a line it prints.

Two places a URL carries secrets: user-info (``https://user:pass@host/...``) and query parameters
of signed URLs (``?X-Amz-Signature=...``, ``?sig=...`` of an Azure SAS, ``?token=...``). Both are
replaced by ``REDACTED`` wherever a URL appears in text; the rest of the URL stays, so a reader can
still tell which object was meant. Credentials belong in ``storage_options`` (never written, only
their keys) or the environment, not in URLs.
"""

from __future__ import annotations

import re

MASK = "REDACTED"
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<info>[^/@\s?#'\"]+)@")
# Any parameter whose name smells of a secret; X-Amz-*/X-Goog-* covers every part of a presigned URL.
_SECRET_KEY = r"[^=&?#\s'\"]*(?:token|sig|secret|pass|pwd|key|cred|auth|session|x-amz-|x-goog-)[^=&?#\s'\"]*"
_QUERY = re.compile(rf"(?P<lead>[?&;](?i:{_SECRET_KEY})=)(?P<value>[^&#\s'\"]*)")


def redact(text: str) -> str:
    """``text`` with URL credentials masked. Idempotent; text without URLs comes back unchanged."""
    if not isinstance(text, str) or ("://" not in text and "=" not in text):
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _QUERY.sub(lambda m: f"{m['lead']}{MASK}", text)


class MaskedOptions(tuple):
    """Storage options frozen as sorted ``(key, value)`` pairs whose repr shows the keys only, so a
    spec printed in a traceback, a worker's "Compute Failed" log line (Dask quotes task arguments)
    or a debugger never shows a credential. Equal to, hashed and pickled like the plain tuple."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "(" + ", ".join(f"({k!r}, {MASK!r})" for k, _ in self) + ("," if len(self) == 1 else "") + ")"

    def __dask_tokenize__(self):  # as the plain tuple (dask's fallback for unknown types may be random)
        return tuple(self)


class MaskedDict(dict):
    """Storage options as a dict (fsspec's keyword arguments) whose repr shows the keys only."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "{" + ", ".join(f"{k!r}: {MASK!r}" for k in self) + "}"


# Flags whose values may be credentials: never echoed back (e.g. in "rerun the same command").
SECRET_FLAGS = ("--storage-option", "--input-option")


def redact_argv(argv) -> list[str]:
    """A command line for messages: URL credentials masked, and the values of SECRET_FLAGS
    (``--storage-option KEY=VALUE`` -> ``KEY=REDACTED``), abbreviated or joined with ``=`` too."""

    def secret_flag(arg: str) -> bool:
        head = arg.split("=", 1)[0]
        return len(head) > 3 and any(f.startswith(head) for f in SECRET_FLAGS)

    def masked(value: str) -> str:
        key, sep, _ = value.partition("=")
        return f"{key}={MASK}" if sep else MASK

    out, mask_next = [], False
    for arg in map(str, argv):
        if mask_next:
            out.append(masked(arg))
            mask_next = False
        elif arg.startswith("--") and secret_flag(arg):
            flag, sep, value = arg.partition("=")
            out.append(f"{flag}={masked(value)}" if sep else arg)
            mask_next = not sep
        else:
            out.append(redact(arg))
    return out


def redact_obj(obj):
    """Every string inside dicts, lists and tuples redacted (keys included)."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {redact_obj(k): redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_obj(v) for v in obj)
    return obj


def has_secret(text: str) -> bool:
    return isinstance(text, str) and redact(text) != text


def redact_columns(table, names=("path", "detail", "message")):
    """A pyarrow table with its URL-bearing string columns redacted (schema and metadata kept)."""
    import pyarrow as pa

    for name in names:
        if name in table.column_names:
            i = table.column_names.index(name)
            values = [None if v is None else redact(v) for v in table.column(name).to_pylist()]
            table = table.set_column(i, table.schema.field(i), pa.array(values, type=table.schema.field(i).type))
    return table


_log_redaction = False


def install_log_redaction() -> None:
    """Redact every log record's message in this process (Dask logs task errors, which may quote a
    URL). Idempotent; called by the job's entry point and by each shard task on its worker."""
    global _log_redaction
    if _log_redaction:
        return
    import logging

    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logging's own business
            return record
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return record

    logging.setLogRecordFactory(factory)
    _log_redaction = True
