"""A filesystem that cannot be opened without its storage option: proves the options travel.

``guarded://`` is an in-memory filesystem (its own namespace, shared by every instance in this
process) whose constructor refuses to build without ``token=TOKEN``, as an object store refuses
a request without credentials. Any code path that drops the storage options fails loudly.
"""

from __future__ import annotations

import contextlib

import fsspec
from fsspec.implementations.memory import MemoryFileSystem

TOKEN = "s3cr3t-test-token"
OPTIONS = {"token": TOKEN}


class GuardedFileSystem(MemoryFileSystem):
    protocol = ("guarded",)
    store: dict = {}  # not memory://'s namespace
    pseudo_dirs = [""]

    def __init__(self, *args, token=None, **kwargs):
        if token != TOKEN:
            raise PermissionError("guarded:// needs storage_options={'token': ...}: the options were dropped on the way")
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        path = fsspec.utils.stringify_path(path).removeprefix("guarded://")
        path = path.lstrip("/").rstrip("/")
        return "/" + path if path else ""


def register() -> None:
    fsspec.register_implementation("guarded", GuardedFileSystem, clobber=True)


def clear() -> None:
    GuardedFileSystem.store.clear()
    GuardedFileSystem.pseudo_dirs[:] = [""]


@contextlib.contextmanager
def mounted(url: str = "guarded://bucket/out"):
    """An empty guarded:// output folder, as an OutputStore carrying its option; emptied after."""
    from pipeline.store.layout import OutputStore

    register()
    clear()
    try:
        yield OutputStore(url, OPTIONS)
    finally:
        clear()
