"""fsspec URL helpers: resolve a URL with its options, join, and hand a path back as a URL."""

from __future__ import annotations

import posixpath

import fsspec


def url_to_fs(url: str, storage_options: dict | None = None):
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path


def join(url: str, *parts: str) -> str:
    return posixpath.join(url.rstrip("/"), *parts)


def to_url(fs, path: str) -> str:
    """A path as the user can hand it back to fsspec: plain for local files, 'proto://' otherwise."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return posixpath.normpath(path) if protocol in ("file", "local") else fs.unstrip_protocol(path)
