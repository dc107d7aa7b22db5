"""A rooted filesystem: one URL and the fsspec options that open it, as one picklable object.

In the spirit of pangeo-forge-recipes' ``FSSpecTarget`` and datatrove's ``DataFolder``: whoever
holds a ``Location`` joins, opens and tests paths under its root without knowing the options, so
options cannot be dropped or mixed on the way (``--out`` has one; every input has its own, see
``InputOptions``). The filesystem is resolved once per object and never pickled (each process
resolves its own); the options are masked in every repr and message (they may be credentials).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

from fsspec.core import split_protocol

from pipeline.core.redact import MaskedDict, MaskedOptions, redact
from pipeline.io.fs import join as join_url
from pipeline.io.fs import to_url, url_to_fs


def freeze_options(options) -> MaskedOptions:
    """Storage options as a sorted tuple (hashable where the values are, picklable always), whose
    repr names the keys only: the values may be credentials."""
    if not options:
        return MaskedOptions()
    items = options.items() if hasattr(options, "items") else options
    return MaskedOptions(sorted((str(k), v) for k, v in items))


@dataclass(frozen=True)
class Location:
    """A folder or file (local path or fsspec URL) and the storage options that open it."""

    url: str
    storage_options: MaskedOptions = MaskedOptions()

    def __post_init__(self):
        url = os.fspath(self.url)
        object.__setattr__(self, "url", url.rstrip("/") or url)
        object.__setattr__(self, "storage_options", freeze_options(self.storage_options))

    def __repr__(self) -> str:
        return f"Location({redact(self.url)!r}, options={self.storage_options!r})"

    def __str__(self) -> str:
        return self.url

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_resolved", None)  # a filesystem holds sessions and threads: each process opens its own
        return state

    @property
    def options(self) -> MaskedDict:
        """The options as the keyword arguments fsspec takes (a dict whose repr shows the keys only)."""
        return MaskedDict(self.storage_options)

    @property
    def is_remote(self) -> bool:
        return "://" in self.url and not self.url.startswith("file://")

    @cached_property
    def _resolved(self):
        return url_to_fs(self.url, self.options)

    @property
    def fs(self):
        """The fsspec filesystem of the root, opened with the options (once per object and process)."""
        return self._resolved[0]

    @property
    def path(self) -> str:
        """The root as a path of ``fs``."""
        return self._resolved[1]

    # ---- paths -------------------------------------------------------------------------------
    def join(self, *parts: str) -> str:
        """The URL of a path below the root."""
        return join_url(self.url, *parts)

    def child(self, *parts: str) -> "Location":
        """A Location below this one, with the same options."""
        return Location(self.join(*parts), self.storage_options)

    def at(self, url: str) -> "Location":
        """Another URL opened with these options (a file named on its own, e.g. --metadata)."""
        return Location(url, self.storage_options)

    def contains(self, url: str) -> bool:
        """Is ``url`` the root or below it (the same filesystem, host and bucket)? Compared as
        written, then as paths of the root's filesystem (``memory:///b/x`` lies in ``memory://b``,
        a relative local path in its absolute folder)."""
        url = os.fspath(url)
        if url == self.url or url.startswith(self.url + "/"):
            return True
        if (split_protocol(url)[0] or "file") != (split_protocol(self.url)[0] or "file") or "::" in url:
            return False
        path, root = self.fs._strip_protocol(url), self.path.rstrip("/")
        return path == self.path or path.startswith(root + "/")

    def url_of(self, path: str) -> str:
        """A path of ``fs`` as a URL the user can hand back (plain for local files)."""
        return to_url(self.fs, path)

    def resolve(self, url: str | None = None):
        """(filesystem, path) of ``url`` (default: the root) with these options: the cached
        filesystem below the root, a fresh resolution elsewhere (another bucket, host or protocol)."""
        if url is None or url == self.url:
            return self.fs, self.path
        if self.contains(url):
            return self.fs, self.fs._strip_protocol(url)
        return url_to_fs(url, self.options)

    # ---- access ------------------------------------------------------------------------------
    def exists(self, url: str | None = None) -> bool:
        fs, path = self.resolve(url)
        return fs.exists(path)

    def open(self, url: str | None = None, mode: str = "rb", **kwargs):
        fs, path = self.resolve(url)
        return fs.open(path, mode, **kwargs)


@dataclass(frozen=True)
class InputOptions:
    """The options every input is opened with: ``default`` (``--input-option``, ``data.input_options``),
    and, for the files under a dataset's folder that has its own (``data.dataset_options``), that
    dataset's options instead. Picklable: it travels to the workers in the run spec, where the films
    are read. ``repr`` shows keys only."""

    default: MaskedOptions = MaskedOptions()
    roots: tuple[Location, ...] = ()  # datasets' folders with their own options

    def __post_init__(self):
        object.__setattr__(self, "default", freeze_options(self.default))
        # the most specific folder first: a dataset inside another's folder keeps its own options
        object.__setattr__(self, "roots", tuple(sorted(self.roots, key=lambda r: -len(r.url))))

    def options_of(self, url: str) -> MaskedOptions:
        for root in self.roots:
            if root.contains(url):
                return root.storage_options
        return self.default

    def options_for(self, url: str) -> MaskedDict:
        """The keyword arguments that open ``url``."""
        return MaskedDict(self.options_of(url))

    def at(self, url: str) -> Location:
        """``url`` (a film, a metadata file, the checkpoint) as a Location with its options."""
        return Location(url, self.options_of(url))

    def keys(self) -> list[str]:
        """Every option name given (for messages; never the values)."""
        return sorted({k for k, _ in self.default} | {k for r in self.roots for k, _ in r.storage_options})


class InputRefused(PermissionError):
    """An input (a dataset's files, the checkpoint, a baselines file) refused the options it was
    opened with: its credentials go in the input options, not in --out's storage options."""


@contextmanager
def reading_inputs(what: str):
    """Inside: reads of inputs only. A refusal (PermissionError) comes out as InputRefused naming ``what``."""
    try:
        yield
    except InputRefused:
        raise
    except PermissionError as e:
        raise InputRefused(f"reading {what}: {redact(str(e))}") from None
