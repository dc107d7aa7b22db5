"""A real SLURM cluster (.ci/slurm-up.sh): the job runs through dask-jobqueue, one SLURM job is
cancelled mid-run, and the run still completes with every row exactly once.

Skipped where no SLURM controller answers, unless CI is set: there a missing SLURM is a failure."""

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from jobs.score_dataset import main

from tests.helpers import SLOW_ENV

ROOT = Path(__file__).resolve().parents[2]


def _slurm_up() -> str | None:
    if not shutil.which("sbatch"):
        return "sbatch not installed"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
        nodes = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scontrol/sinfo failed: {e}"
    if "is UP" not in ping.stdout or not any(s.startswith(("idle", "mixed", "alloc")) for s in nodes.stdout.split()):
        return f"no SLURM controller with an idle node ({ping.stdout.strip() or ping.stderr.strip()})"
    return None


@pytest.fixture
def slurm():
    why = _slurm_up()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI=true but SLURM is not running: {why} (.ci/run starts it with .ci/slurm-up.sh)")
        pytest.skip(f"no SLURM here: {why}; start one with: sudo bash .ci/slurm-up.sh")


def _jobs(name: str) -> list[str]:
    r = subprocess.run(["squeue", "-h", "-n", name, "-t", "RUNNING", "-o", "%i"], capture_output=True, text=True, timeout=10)
    return r.stdout.split()


def test_slurm_run_survives_a_cancelled_job(slurm, tmp_path, tiny_nih):
    name = f"cxr-ci-{uuid.uuid4().hex[:8]}"
    profile = tmp_path / "cluster.yaml"
    profile.write_text(
        "profiles:\n"
        "  slurm:\n"
        "    type: slurm\n"
        "    jobs: 2\n"
        "    queue: debug\n"
        "    cores: 1\n"
        "    processes: 1\n"
        "    memory: 2GB\n"
        "    walltime: '00:10:00'\n"
        f"    job_name: {name}\n"
        f"    local_directory: {tmp_path / 'scratch'}\n"
        f"    log_directory: {tmp_path / 'logs'}\n"
    )
    out = tmp_path / "out"
    args = ["--dataset", f"nih:{tiny_nih}", "--checkpoint", "random:3", "--arch", "tests.helpers:slow_tiny_net",
            "--out", str(out), "--shard-size", "4", "--batch-size", "2", "--cluster", "slurm", "--cluster-file", str(profile),
            "--cache", "none", "--no-report", "--decode-workers", "0"]
    env = {**os.environ, **SLOW_ENV, "PYTHONPATH": str(ROOT)}  # the workers import tests.helpers
    proc = subprocess.Popen([sys.executable, "-m", "jobs.score_dataset", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            running = _jobs(name)
            done = len(list(out.glob("runs/*/_shards/*.json")))
            if len(running) == 2 and done >= 2:
                killed = running[0]
                subprocess.run(["scancel", "--signal=KILL", killed], check=True, timeout=10)
                break
            time.sleep(0.2)
        n_done_at_kill = len(list(out.glob("runs/*/_shards/*.json")))
        log, _ = proc.communicate(timeout=280)
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["scancel", "-n", name], timeout=10)
    assert killed is not None, f"never saw two running SLURM jobs with shards done:\n{log[-3000:]}"
    assert n_done_at_kill < 10, "the cancel should land mid-run"
    assert proc.returncode == 0, log[-3000:]
    run_dir = next((out / "runs").iterdir())
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"
    preds = pq.read_table(sorted(run_dir.glob("predictions/*.parquet"))).sort_by("row")
    assert preds.column("row").to_pylist() == list(range(40))  # none lost, none duplicated
    # the same command undisturbed, in this process at full speed: the same predictions and maps
    ref = tmp_path / "ref"
    assert main([*args[:args.index("--out")], "--out", str(ref), "--shard-size", "4", "--batch-size", "2",
                 "--cluster", "inprocess", "--no-report"]) == 0
    ref_dir = next((ref / "runs").iterdir())
    assert preds.equals(pq.read_table(sorted(ref_dir.glob("predictions/*.parquet"))).sort_by("row"))
    for name in ("cam", "embedding"):
        np.testing.assert_array_equal(zarr.open_group(str(run_dir / "maps.zarr"), mode="r")[name][:],
                                      zarr.open_group(str(ref_dir / "maps.zarr"), mode="r")[name][:])
