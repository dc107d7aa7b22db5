"""Workers that share no disk with the driver: a `dask scheduler` and two `dask worker` processes,
each started in an empty folder of its own with its own HOME and TMPDIR and no credential in its
environment, reached through an `address` profile of cluster.yaml; films, metadata and checkpoint in
one bucket (--input-option), outputs in another (--storage-option), each with its own identity. The run
equals the same run on local disk, and every process (driver included, traced with strace) wrote
nothing on disk outside its own folder."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.score_dataset import main
from tests.conftest import TINY_ARCH
from tests.s3.compare import assert_same_outputs
from tests.s3.server import INPUT_BUCKET, OUTPUT_BUCKET
from tests.s3.syscalls import outside, strace_prefix, written_paths

ROOT = Path(__file__).resolve().parents[2]


def _need_strace() -> None:
    if shutil.which("strace"):
        return
    if os.environ.get("CI"):
        pytest.fail("CI is set but strace is missing (.ci/run installs it): the test proves where processes wrote with it")
    pytest.skip("strace is not installed: it shows where each process wrote")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _own_folder(root: Path, name: str) -> tuple[Path, dict]:
    """An empty working folder with its own HOME and TMPDIR, and an environment that names only those."""
    d = root / name
    for sub in ("cwd", "home", "tmp"):
        (d / sub).mkdir(parents=True)
    env = {"PATH": os.environ["PATH"], "LANG": os.environ.get("LANG", "C.UTF-8"), "PYTHONPATH": str(ROOT),
           "HOME": str(d / "home"), "TMPDIR": str(d / "tmp"), "PYTHONDONTWRITEBYTECODE": "1",
           "OMP_NUM_THREADS": "1"}  # no credential: the run hands each side its own options
    return d, env


def _stop(proc: subprocess.Popen) -> None:
    """Stop the process and everything it started: each runs in a session of its own (strace, its
    tracee, a worker's nanny and spawned processes). A SIGTERM to strace alone detaches it and leaves
    the traced worker running (seen: schedulers and workers outliving the test)."""
    def group_alive() -> bool:
        try:
            os.killpg(proc.pid, 0)
            return True
        except ProcessLookupError:
            return False

    if group_alive():
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        pass
    for _ in range(100):  # what strace traced may still be shutting down: up to 10 s more
        if not group_alive():
            break
        time.sleep(0.1)
    if group_alive():
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


@pytest.mark.timeout(600)  # five processes under strace on a 2-core machine
def test_a_cluster_of_separate_processes_writes_only_to_s3(s3_server, prefix, tiny_nih, tiny_ckpt, tmp_path):
    _need_strace()
    admin = s3_server.fs()
    data = f"{INPUT_BUCKET}/{prefix}"
    admin.put(str(tiny_nih), f"{data}/ChestX-ray14", recursive=True)
    admin.put(tiny_ckpt, f"{data}/tiny.safetensors")
    port = _free_port()
    root = tmp_path / "procs"
    procs, folders = [], []
    try:
        d, env = _own_folder(root, "scheduler")
        folders.append(d)
        procs.append(subprocess.Popen([*strace_prefix(d / "trace"), sys.executable, "-m", "distributed.cli.dask_scheduler",
                                       "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                                      cwd=d / "cwd", env=env, stdout=subprocess.DEVNULL, stderr=(d / "log").open("wb"), start_new_session=True))
        for i in range(2):
            d, env = _own_folder(root, f"worker-{i}")
            folders.append(d)
            procs.append(subprocess.Popen([*strace_prefix(d / "trace"), sys.executable, "-m", "distributed.cli.dask_worker",
                                           f"tcp://127.0.0.1:{port}", "--nthreads", "1", "--name", f"w{i}",
                                           "--local-directory", str(d / "tmp"), "--no-dashboard", "--host", "127.0.0.1"],
                                          cwd=d / "cwd", env=env, stdout=subprocess.DEVNULL, stderr=(d / "log").open("wb"), start_new_session=True))
        d, env = _own_folder(root, "driver")
        folders.append(d)
        (d / "cwd" / "cluster.yaml").write_text(f"profiles:\n  remote:\n    type: address\n    address: tcp://127.0.0.1:{port}\n")
        out = f"s3://{OUTPUT_BUCKET}/{prefix}/out"
        args = ["--dataset", f"nih:s3://{data}/ChestX-ray14", "--checkpoint", f"s3://{data}/tiny.safetensors", "--arch", TINY_ARCH,
                *s3_server.flags("inputs", "--input-option"), "--out", out, *s3_server.flags("outputs"), "--cluster", "remote", "--cluster-file", "cluster.yaml",
                "--shard-size", "4", "--batch-size", "4", "--decode-workers", "0", "--cache", "none", "--limit", "16"]
        driver = subprocess.run([*strace_prefix(d / "trace"), sys.executable, "-m", "jobs.score_dataset", *args],
                                cwd=d / "cwd", env=env, capture_output=True, text=True, timeout=500)
        assert driver.returncode == 0, driver.stdout[-2000:] + driver.stderr[-4000:]
    finally:
        for p in reversed(procs):
            _stop(p)
    worker_logs = "".join((f / "log").read_text(errors="replace") for f in folders[1:3])
    # Both workers joined (the scheduler logs each one).
    joined = (folders[0] / "log").read_text(errors="replace")
    assert joined.count("Register worker") >= 2, joined[-3000:]

    # Nothing written on disk outside the processes' own folders (the report, logs and every output
    # went to S3), and the outputs equal the same run on local disk.
    for f in folders:
        wrote = written_paths(f / "trace")
        assert wrote, f"no write traced for {f.name}: is strace tracing?"
        assert outside(wrote, [f]) == [], f.name
    assert_same_outputs(out, s3_server.options("outputs"), _local_run(tiny_nih, tiny_ckpt, tmp_path / "local"))
    for secret in s3_server.secrets():
        assert secret not in driver.stdout + driver.stderr + worker_logs + joined


def _local_run(data: Path, ckpt: str, out: Path) -> str:
    assert main(["--dataset", f"nih:{data}", "--checkpoint", ckpt, "--arch", TINY_ARCH, "--out", str(out),
                 "--cluster", "inprocess", "--shard-size", "4", "--batch-size", "4", "--decode-workers", "0",
                 "--cache", "none", "--no-report", "--limit", "16"]) == 0
    return str(out)
