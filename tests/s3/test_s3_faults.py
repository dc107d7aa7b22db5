"""Faults on real object storage: a run SIGKILLed mid-run resumes; the resumed run meets the S3
server killed mid-run and started again on the same data folder; reruns complete it, and the final
outputs equal an undisturbed run of the same command: every row once, predictions and maps
bit-identical, nothing left behind (no lock, no temporary object)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.score_dataset import main
from tests.helpers import SLOW_ENV
from tests.s3.compare import assert_same_outputs
from tests.s3.server import OUTPUT_BUCKET

ROOT = Path(__file__).resolve().parents[2]


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"never reached (job exit {proc.poll()})")


@pytest.mark.timeout(900)  # three runs of a slowed net and a server restart (~20 s) on a 2-core machine
def test_a_killed_run_and_a_restarted_server_lose_and_duplicate_nothing(own_s3_server, prefix, tiny_nih, tmp_path):
    s3 = own_s3_server
    admin = s3.fs()
    out = f"s3://{OUTPUT_BUCKET}/{prefix}"
    common = ["--dataset", f"nih:{tiny_nih}", "--checkpoint", "random:3", "--arch", "tests.helpers:slow_tiny_net",
              "--shard-size", "4", "--batch-size", "2", "--cluster", "inprocess", "--cache", "none", "--no-report",
              "--decode-workers", "0"]
    cmd = [sys.executable, "-m", "jobs.score_dataset", *common, "--out", out, *s3.flags("outputs")]
    env = {**os.environ, **SLOW_ENV, "PYTHONPATH": str(ROOT)}

    def records() -> int:
        admin.invalidate_cache()
        return len(admin.glob(f"{OUTPUT_BUCKET}/{prefix}/runs/*/_shards/*.json"))

    def status() -> str | None:
        admin.invalidate_cache()
        found = admin.glob(f"{OUTPUT_BUCKET}/{prefix}/runs/*/run.json")
        return json.loads(admin.cat(found[0])).get("status") if found else None

    def start() -> subprocess.Popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # 1. the driver SIGKILLed mid-run (its lock and temporaries stay behind)
    job = start()
    try:
        _wait_for(lambda: records() >= 2, job)
    finally:
        job.kill()
        said = job.communicate(timeout=60)[0]
    killed_at = records()
    assert 2 <= killed_at < 10, said[-3000:]

    # 2. its rerun resumes; mid-run the S3 server is SIGKILLed and started again on the same data
    job = start()
    try:
        _wait_for(lambda: records() >= killed_at + 1, job)
        s3.kill()
        down = time.time()
        time.sleep(2)
        s3.start()
        outage = time.time() - down
        said = job.communicate(timeout=400)[0]
    finally:
        if job.poll() is None:
            job.kill()
    logs = [said]

    # 3. reruns complete it (each scores only what is missing or failed)
    for _ in range(2):
        if status() == "complete":
            break
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        logs.append(r.stdout + r.stderr)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert status() == "complete", "\n".join(logs)[-4000:]
    assert outage > 2

    # The same command undisturbed, on local disk in this process at full speed: the same outputs.
    ref = tmp_path / "ref"
    assert main([*common, "--out", str(ref)]) == 0
    assert_same_outputs(out, s3.options("outputs"), str(ref))
    admin.invalidate_cache()
    left = [p for p in admin.find(f"{OUTPUT_BUCKET}/{prefix}") if ".tmp-cxr-" in p or p.endswith("_lock.json")]
    assert left == []
    assert records() == 10
    # Records vouch for what is stored: no resume found a recorded shard damaged, and --check agrees.
    assert not [line for text in logs for line in text.splitlines() if "damaged" in line]
    check = subprocess.run([sys.executable, "-m", "jobs.runs", "--out", out, "--check", *s3.flags("outputs")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and "every shard matches its record" in check.stdout, check.stdout + check.stderr[-2000:]
