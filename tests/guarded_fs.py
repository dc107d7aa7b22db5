"""Filesystems that cannot be opened without their own storage option: prove the options travel,
and that the options of one never reach the other.

``guarded://`` (outputs) and ``guardedin://`` (inputs) are in-memory filesystems (each its own
namespace, shared by every instance in this process) whose constructors refuse to build without
their own ``token``, as an object store refuses a request without credentials: each refuses the
other's token. Any code path that drops the options, or hands the outputs' options to an input
(or the reverse), fails loudly.
"""

from __future__ import annotations

import contextlib

import fsspec
from fsspec.implementations.memory import MemoryFileSystem

TOKEN = "s3cr3t-test-token"
OPTIONS = {"token": TOKEN}
INPUT_TOKEN = "1nput-s3cr3t-token"  # guardedin://'s: another account
INPUT_OPTIONS = {"token": INPUT_TOKEN}


class GuardedFileSystem(MemoryFileSystem):
    protocol = ("guarded",)
    store: dict = {}  # not memory://'s namespace
    pseudo_dirs = [""]
    token = TOKEN

    def __init__(self, *args, token=None, **kwargs):
        if token != type(self).token:
            raise PermissionError(f"{self.protocol[0]}:// needs storage_options={{'token': ...}} of its own account: "
                                  "the options were dropped on the way, or another store's were given")
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        path = fsspec.utils.stringify_path(path).removeprefix(f"{cls.protocol[0]}://")
        path = path.lstrip("/").rstrip("/")
        return "/" + path if path else ""


class GuardedInputFileSystem(GuardedFileSystem):
    protocol = ("guardedin",)
    store: dict = {}
    pseudo_dirs = [""]
    token = INPUT_TOKEN


def register() -> None:
    fsspec.register_implementation("guarded", GuardedFileSystem, clobber=True)
    fsspec.register_implementation("guardedin", GuardedInputFileSystem, clobber=True)


def clear() -> None:
    for cls in (GuardedFileSystem, GuardedInputFileSystem):
        cls.store.clear()
        cls.pseudo_dirs[:] = [""]


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


def input_fs() -> GuardedInputFileSystem:
    """guardedin:// opened with its own token (to put the inputs there)."""
    register()
    return GuardedInputFileSystem(token=INPUT_TOKEN)
