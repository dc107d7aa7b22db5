"""Where a dataset's files may be: path confinement for manifests written by someone else.

A manifest's paths must stay under the dataset's own roots (the manifest's folder, or the
adapter's ROOT) or under a root the user allowed with ``--allow-root``. The check is lexical
(``..`` and percent-encoding resolved, credentials and query ignored), so it costs nothing per
path; then local paths are checked again where they resolve (``links_outside``): a symbolic link
inside a root that points elsewhere (a film outside the dataset, /etc/passwd) is refused too, with
one lstat per file and one realpath per folder.
"""

from __future__ import annotations

import os
import posixpath
from functools import lru_cache
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


def links_outside(urls, roots) -> list[str | None]:
    """For each path: None when it is not local or resolves (symbolic links followed) under one of
    the roots, else where it resolves. Roots are resolved too (a root may itself be a link)."""
    root_paths = [posixpath.normpath(os.path.realpath(local_path(r))) for r in roots if is_local(r)]

    @lru_cache(maxsize=None)
    def real_dir(d: str) -> str:
        return os.path.realpath(d)

    def under(p: str) -> bool:
        return any(p == r or p.startswith(r.rstrip("/") + "/") for r in root_paths)

    out: list[str | None] = []
    for u in urls:
        if not u or not is_local(u):
            out.append(None)
            continue
        p = posixpath.normpath(os.path.abspath(local_path(u)))
        d, name = posixpath.split(p)
        real = posixpath.join(real_dir(d), name)
        if os.path.islink(real):
            real = os.path.realpath(real)
        out.append(None if under(real) else real)
    return out
