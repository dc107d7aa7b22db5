"""Killing the job at any moment and rerunning it completes it: no missing, no duplicated rows."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import zarr

from jobs.score_dataset import main

from tests.helpers import SLOW_ENV

ROOT = Path(__file__).resolve().parents[2]
SLOW = "tests.helpers:slow_tiny_net"  # slow only in the killed subprocess (SLOW_ENV)


def _args(data, out, *extra):
    return ["--dataset", f"nih:{data}", "--checkpoint", "random:3", "--arch", SLOW, "--out", str(out),
            "--shard-size", "4", "--batch-size", "2", *extra]


def _outputs(out: Path, model_version: str | None = None):
    run_dir = out / "runs" / model_version if model_version else next((out / "runs").iterdir())
    preds = pq.read_table(sorted(run_dir.glob("predictions/*.parquet"))).sort_by("row")
    g = zarr.open_group(str(run_dir / "maps.zarr"), mode="r")
    return run_dir, preds, g["cam"][:], g["embedding"][:]


def test_kill_mid_run_then_rerun_completes_identically(tmp_path, tiny_nih, tiny_ckpt):
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    assert main(_args(tiny_nih, ref_out, "--cluster", "inprocess")) == 0
    _, ref_preds, ref_cam, ref_emb = _outputs(ref_out)
    # last night's complete run, with another model, in the same --out
    assert main(["--dataset", f"nih:{tiny_nih}", "--checkpoint", tiny_ckpt, "--arch", "pipeline.inference.tiny_net:tiny_cam_net",
                 "--out", str(out), "--shard-size", "4", "--cluster", "inprocess"]) == 0
    previous = json.loads((out / "latest.json").read_text())["model_version"]

    proc = subprocess.Popen([sys.executable, "-m", "jobs.score_dataset", *_args(tiny_nih, out)], cwd=ROOT, env={**os.environ, **SLOW_ENV},
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    records: list = []
    while time.time() < deadline and len(records) < 3:
        records = [p for p in out.glob("runs/*/_shards/shard-*.json") if previous not in str(p)]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the client, the scheduler and the worker processes
    proc.wait()
    assert 3 <= len(records) < 10, "the kill should land mid-run"
    run_json = next(p for p in out.glob("runs/*/run.json") if previous not in str(p)).read_text()
    assert '"status": "running"' in run_json  # never claimed complete
    assert json.loads((out / "latest.json").read_text())["model_version"] == previous  # still last night's
    stray = next(out.glob("runs/*/predictions")) / "part-000009.parquet.tmp-cxr-0123456789abcdef0123456789abcdef"
    stray.write_bytes(b"half a parquet file")  # as if killed mid-write
    assert (out / "_lock.json").exists()  # the dead run's lock: the rerun must recover it

    assert main(_args(tiny_nih, out, "--cluster", "inprocess")) == 0
    run_dir, preds, cam, emb = _outputs(out, json.loads((out / "latest.json").read_text())["model_version"])
    assert run_dir.name != previous
    rows = preds.column("row").to_pylist()
    assert rows == sorted(set(rows)) == list(range(40))  # none missing, none duplicated
    assert preds.equals(ref_preds)
    np.testing.assert_array_equal(cam, ref_cam)
    np.testing.assert_array_equal(emb, ref_emb)
    assert not list(out.rglob("*.tmp-*"))
    assert json.loads((out / "latest.json").read_text())["model_version"] == run_dir.name
    assert not (out / "_lock.json").exists()


def test_crash_between_outputs_and_record_rescores_only_that_shard(tmp_path, tiny_nih, tiny_ckpt, capsys):
    args = ["--dataset", f"nih:{tiny_nih}", "--checkpoint", tiny_ckpt, "--arch", "pipeline.inference.tiny_net:tiny_cam_net",
            "--out", str(tmp_path), "--shard-size", "8", "--cluster", "inprocess"]
    assert main(args) == 0
    run_dir, preds, cam, _ = _outputs(tmp_path)
    # as if the worker died after writing maps and predictions but before its completion record
    (run_dir / "_shards" / "shard-000002.json").unlink()
    g = zarr.open_group(str(run_dir / "maps.zarr"), mode="r+")
    g["cam"][16:24] = 0.0  # half-written region
    capsys.readouterr()
    assert main(args) == 0
    assert "5 shards, 1 to score" in capsys.readouterr().err  # diagnostics: logging, stderr
    _, preds2, cam2, _ = _outputs(tmp_path)
    assert preds2.equals(preds)
    np.testing.assert_array_equal(cam2, cam)
