"""Where a dataset's files may be: path confinement for manifests written by someone else.

A manifest's paths must stay under the dataset's own roots (the manifest's folder, or the
adapter's ROOT) or under a root the user allowed with ``--allow-root``. The check is lexical
(``..`` and percent-encoding resolved, credentials and query ignored), so it costs nothing per
path; a symlink placed inside a root by whoever owns that folder is followed like any file.
"""

from __future__ import annotations

import os
import posixpath
from urllib.parse import unquote, urlsplit


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    """'file:///a/b' -> '/a/b'; plain paths unchanged."""
    if url.startswith("file://"):
        return unquote(urlsplit(url).path) or "/"
    return url


def _key(url: str) -> tuple[str, str]:
    """(origin, normalised path): 'file' for local paths, scheme://host[:port] otherwise."""
    if is_local(url):
        return "file", posixpath.normpath(os.path.abspath(local_path(url)))
    parts = urlsplit(url)
    origin = f"{parts.scheme.lower()}://{(parts.hostname or '').lower()}{f':{parts.port}' if parts.port else ''}"
    return origin, posixpath.normpath("/" + unquote(parts.path).lstrip("/"))


def _within(key: tuple[str, str], root_key: tuple[str, str]) -> bool:
    (o, p), (ro, rp) = key, root_key
    return o == ro and (p == rp or p.startswith(rp.rstrip("/") + "/"))


def is_under(url: str, root: str) -> bool:
    return _within(_key(url), _key(root))


def confined(url: str, roots) -> bool:
    try:
        return any(is_under(url, r) for r in roots)
    except ValueError:  # an unparsable URL (bad port, ...) is under nothing
        return False


def confined_all(urls, roots) -> list[bool]:
    """``confined`` for many paths, each root's key made once (a manifest has 10^5 paths)."""
    root_keys = []
    for r in roots:
        try:
            root_keys.append(_key(r))
        except ValueError:
            pass
    out = []
    for u in urls:
        try:
            k = _key(u)
        except ValueError:
            out.append(False)
            continue
        out.append(any(_within(k, rk) for rk in root_keys))
    return out
