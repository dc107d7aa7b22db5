"""Fault suite (issue 9): each fault, then a rerun; nothing lost, nothing duplicated, nothing wrong served.

Every test compares the final outputs with an undisturbed reference run of the same command."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from jobs.runs import main as runs_main
from jobs.score_dataset import main
from pipeline.run import run_lock as rl
from pipeline.inference.tiny_net import TinyCAMNet

from tests.conftest import TINY_ARCH
from tests.helpers import SLOW_ENV

ROOT = Path(__file__).resolve().parents[2]


def _args(data, out, ckpt, *extra):
    return ["--dataset", f"nih:{data}", "--checkpoint", ckpt, "--arch", TINY_ARCH, "--out", str(out),
            "--shard-size", "8", "--cluster", "inprocess", *extra]


def _said(capsys) -> str:
    """What a job printed: results on stdout, notes and warnings on stderr."""
    c = capsys.readouterr()
    return c.out + c.err


def _run_dir(out: Path) -> Path:
    return out / "runs" / json.loads((out / "latest.json").read_text())["model_version"]


def _outputs(run_dir: Path):
    preds = pq.read_table(sorted(run_dir.glob("predictions/*.parquet"))).sort_by("row")
    g = zarr.open_group(str(run_dir / "maps.zarr"), mode="r")
    return preds, g["cam"][:], g["embedding"][:]


def _same(run_a: Path, run_b: Path, n: int = 40):
    pa_, cam_a, emb_a = _outputs(run_a)
    pb, cam_b, emb_b = _outputs(run_b)
    rows = pb.column("row").to_pylist()
    assert rows == sorted(set(rows)) == list(range(n))  # none lost, none duplicated
    assert pb.equals(pa_)
    np.testing.assert_array_equal(cam_b, cam_a)
    np.testing.assert_array_equal(emb_b, emb_a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_nih, tiny_ckpt):
    out = tmp_path_factory.mktemp("ref") / "out"
    assert main(_args(tiny_nih, out, tiny_ckpt)) == 0
    return _run_dir(out)


def test_damaged_outputs_are_found_and_rescored(tmp_path, tiny_nih, tiny_ckpt, reference, capsys):
    out = tmp_path / "out"
    assert main(_args(tiny_nih, out, tiny_ckpt)) == 0
    run = _run_dir(out)
    chunk = run / "maps.zarr" / "cam" / "c" / "1" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-7])  # truncated chunk
    part = run / "predictions" / "part-000002.parquet"
    b = bytearray(part.read_bytes())
    b[len(b) // 2] ^= 0xFF  # same size, corrupted: only --verify sees it
    part.write_bytes(bytes(b))
    (run / "predictions" / "part-000003.parquet").unlink()  # deleted part
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert runs_main(["--out", str(out), "--check"]) == 1
    cheap = capsys.readouterr().out
    assert "shard 1" in cheap and "shard 3" in cheap and "shard 2" not in cheap
    assert runs_main(["--out", str(out), "--check", "--verify"]) == 1
    assert "shard 2" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before  # --check writes nothing

    assert main(_args(tiny_nih, out, tiny_ckpt, "--verify")) == 0
    assert "5 shards, 3 to score" in _said(capsys)
    _same(reference, run)
    assert runs_main(["--out", str(out), "--check", "--verify"]) == 0
    from jobs.aggregate import main as agg_main

    assert agg_main(["--out", str(out)]) == 0


def _stored_png(pixels: np.ndarray) -> bytes:
    from PIL import Image
    import io

    b = io.BytesIO()
    Image.fromarray(pixels).save(b, "PNG", compress_level=0)  # stored deflate: size depends on shape only
    return b.getvalue()


def _same_size_negative(png: bytes) -> bytes:
    from PIL import Image
    import io

    return _stored_png(255 - np.asarray(Image.open(io.BytesIO(png))))


def test_cache_two_workers_mismatched_shard_sizes_and_replaced_file(tmp_path, tiny_nih, tiny_ckpt):
    from PIL import Image
    import io

    data = tmp_path / "data"
    shutil.copytree(tiny_nih, data)
    victim = sorted(data.glob("images_*/images/*.png"))[5]
    victim.write_bytes(_stored_png(np.asarray(Image.open(io.BytesIO(victim.read_bytes())))))  # same pixels, stored
    cache = tmp_path / "cache"
    two = tmp_path / "two.yaml"
    two.write_text("profiles:\n  two: {type: local, n_workers: 2, threads_per_worker: 1, processes: false}\n")
    common = ["--dataset", f"nih:{data}", "--arch", TINY_ARCH, "--cache", str(cache), "--cluster", "two", "--cluster-file", str(two)]
    # the cache is created at --shard-size 64 (8 films in it), then two workers fill it concurrently
    # at --shard-size 16: three tasks whose rows would share a 64-row chunk
    assert main([*common, "--checkpoint", tiny_ckpt, "--out", str(tmp_path / "a"), "--shard-size", "64", "--limit", "8"]) == 0
    assert main([*common, "--checkpoint", "random:4", "--out", str(tmp_path / "b"), "--shard-size", "16"]) == 0
    # a film replaced by one of the same size, with its old mtime kept (cp -p, rsync -a, tar)
    victim = sorted(data.glob("images_*/images/*.png"))[5]
    st = victim.stat()
    victim.write_bytes(_same_size_negative(victim.read_bytes()))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert victim.stat().st_size == st.st_size and victim.stat().st_mtime_ns == st.st_mtime_ns
    assert main([*common, "--checkpoint", "random:5", "--out", str(tmp_path / "c"), "--shard-size", "16"]) == 0
    assert main(["--dataset", f"nih:{data}", "--arch", TINY_ARCH, "--cache", "none", "--cluster", "inprocess",
                 "--checkpoint", "random:5", "--out", str(tmp_path / "fresh"), "--shard-size", "16"]) == 0
    run_c = _run_dir(tmp_path / "c")
    cached, fresh = _outputs(run_c)[0], _outputs(_run_dir(tmp_path / "fresh"))[0]
    assert cached.equals(fresh)  # every pixel served from the cache was right, the replaced film included
    counts = json.loads((run_c / "run.json").read_text())["counts"]["cache_now"]
    assert counts == {"hits": 39, "misses": 1}
    b_counts = json.loads((_run_dir(tmp_path / "b") / "run.json").read_text())["counts"]["cache_now"]
    assert b_counts == {"hits": 8, "misses": 32}


def _delete_after_manifest(monkeypatch, paths):
    from pipeline.run import scoring

    real = scoring.build_manifest

    def build_then_delete(*a, **k):
        result = real(*a, **k)
        for p in paths:
            p.unlink()
        return result

    monkeypatch.setattr(scoring, "build_manifest", build_then_delete)


def test_nothing_scored_is_failed_and_never_latest(tmp_path, tiny_nih, tiny_ckpt, monkeypatch, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_nih, data)
    out = tmp_path / "out"
    assert main(_args(data, out, tiny_ckpt, "--limit", "8")) == 0
    latest = (out / "latest.json").read_text()
    _delete_after_manifest(monkeypatch, list(data.glob("images_*/images/*.png")))  # an unmounted share
    assert main(_args(data, out, "random:2")) == 3
    assert "too many images failed" in _said(capsys)
    assert (out / "latest.json").read_text() == latest
    failed = next(p for p in (out / "runs").iterdir() if p.name not in latest)
    run = json.loads((failed / "run.json").read_text())
    assert run["status"] == "failed" and run["counts"]["scored"] == 0 and not (failed / "region_stats.parquet").exists()


class _Overflow(torch.nn.Module):
    def forward(self, x):
        return x * 1e38 * 1e38  # inf, and inf - inf = NaN downstream: what broken weights or fp16 overflow give


def overflow_net(num_classes: int = 14) -> TinyCAMNet:
    """Finite weights (checkpoints with NaN/Inf are refused at load), non-finite outputs."""
    net = TinyCAMNet(num_classes)
    net.features = torch.nn.Sequential(*net.features, _Overflow())
    return net


def test_nonfinite_outputs_are_failures(tmp_path, tiny_nih):
    out = tmp_path / "out"
    assert main([*_args(tiny_nih, out, "random:1"), "--arch", "tests.faults.test_faults:overflow_net"]) == 3  # the last --arch wins
    run_dir = next((out / "runs").iterdir())
    errors = pq.read_table(run_dir / "errors.parquet").to_pandas()
    assert len(errors) == 40 and set(errors.stage) == {"nonfinite"}
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"
    assert pq.read_table(sorted(run_dir.glob("predictions/*.parquet"))).num_rows == 0
    assert not (out / "latest.json").exists()


def test_kill_between_scoring_and_aggregates_recomputes_them(tmp_path, tiny_nih, tiny_ckpt, monkeypatch):
    data = tmp_path / "data"
    out = tmp_path / "out"
    shutil.copytree(tiny_nih, data)
    assert main(_args(data, out, tiny_ckpt, "--limit", "24")) == 0
    run = _run_dir(out)
    from pipeline.analysis import aggregate

    def killed(*a, **k):
        raise KeyboardInterrupt  # as if killed after scoring, before the aggregates

    monkeypatch.setattr(aggregate, "aggregate_run", killed)
    assert main(_args(data, out, tiny_ckpt)) == 130
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    monkeypatch.undo()
    assert main(_args(data, out, tiny_ckpt)) == 0  # nothing new to score, stale aggregates recomputed
    stats = pq.read_table(run / "region_stats.parquet").to_pandas()
    assert stats.query("stratum == 'all'").n.iloc[0] == 40
    rj = json.loads((run / "run.json").read_text())
    assert rj["status"] == "complete" and rj["steps"] == {  # same model: no drift; the tests skip the report (conftest)
        "prepare": "done", "scoring": "done", "aggregates": "done", "publish": "done", "report": "skipped"}


def test_unreadable_bookkeeping_is_rebuilt(tmp_path, tiny_nih, tiny_ckpt, reference, capsys):
    out = tmp_path / "out"
    assert main(_args(tiny_nih, out, tiny_ckpt)) == 0
    run = _run_dir(out)
    (run / "_shards" / "shard-000001.json").write_text('{"status": "comp')
    (run / "run.json").write_text("{")
    (out / "latest.json").write_text("")
    (out / "manifest.parquet").write_bytes(b"PAR1 truncated")
    lock = out / "_lock.json"
    lock.write_text("")  # a kill between create and write, long ago
    os.utime(lock, (time.time() - 3600,) * 2)
    capsys.readouterr()
    assert main(_args(tiny_nih, out, tiny_ckpt)) == 0
    text = _said(capsys)
    for what in ("unreadable lock", "latest.json was unreadable", "manifest.parquet was unreadable", "run.json was unreadable",
                 "shard 1 damaged", "5 shards, 1 to score"):
        assert what in text, what
    _same(reference, run)
    assert json.loads((run / "run.json").read_text())["status"] == "complete"


def test_unrebuildable_manifest_exits_2_with_the_fix(tmp_path, tiny_nih, tiny_ckpt, capsys):
    out = tmp_path / "out"
    assert main(_args(tiny_nih, out, tiny_ckpt)) == 0
    run = _run_dir(out)
    g = zarr.open_group(str(run / "maps.zarr"), mode="r+")
    g["image_id"][3] = "someone-else.png"  # rows that a rebuilt manifest would not give back
    (out / "manifest.parquet").write_bytes(b"")
    capsys.readouterr()
    assert main(_args(tiny_nih, out, tiny_ckpt)) == 2
    err = capsys.readouterr().err
    assert "manifest.parquet is unreadable" in err and "mv " in err and "rerun the same command" in err


def test_read_errors_make_a_partial_shard_that_a_rerun_retries(tmp_path, tiny_nih, tiny_ckpt, reference, monkeypatch, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_nih, data)
    out = tmp_path / "out"
    victim = sorted(data.glob("images_*/images/*.png"))[0]
    keep = victim.read_bytes()
    _delete_after_manifest(monkeypatch, [victim])  # a transient read failure (share hiccup)
    assert main(_args(data, out, tiny_ckpt)) == 0  # 1 of 40 failed: within --max-failed-fraction
    monkeypatch.undo()
    run = _run_dir(out)
    rec = json.loads((run / "_shards" / "shard-000000.json").read_text())
    assert rec["status"] == "partial" and [e["stage"] for e in rec["errors"]] == ["read"]
    assert "1 films had read errors" in _said(capsys)
    victim.write_bytes(keep)
    assert main(_args(data, out, tiny_ckpt)) == 0
    assert "5 shards, 1 to score" in _said(capsys)
    rj = json.loads((run / "run.json").read_text())
    assert rj["counts"]["cache_now"] == {"hits": 0, "misses": 1}  # only the failed film was read again
    assert rj["counts"]["source_modes"] == {"L": 40}
    assert pq.read_table(run / "errors.parquet").num_rows == 0
    # the retried film went through the model in a batch of its own: equal up to float rounding of
    # the batch composition; every other row is bit-identical (it was kept, not recomputed)
    ref_p, ref_cam, _ = _outputs(reference)
    p, cam, _ = _outputs(run)
    assert p.column("row").to_pylist() == list(range(40))
    retried = rec["errors"][0]["row"]
    others = [r for r in range(40) if r != retried]
    assert p.take(others).equals(ref_p.take(others))
    np.testing.assert_array_equal(cam[others], ref_cam[others])
    np.testing.assert_allclose(p.take([retried]).drop_columns(["image_id", "model_version"]).to_pandas().to_numpy(float),
                               ref_p.take([retried]).drop_columns(["image_id", "model_version"]).to_pandas().to_numpy(float), rtol=1e-5)
    np.testing.assert_allclose(cam[retried], ref_cam[retried], rtol=1e-5, atol=1e-5)


def test_lock_has_one_holder_under_racing_takeovers(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = json.dumps({"host": socket.gethostname(), "pid": dead.pid, "start": "1", "since": "then", "token": "x"})
    doubles = 0
    for trial in range(20):
        out = tmp_path / f"o{trial}"
        out.mkdir()
        (out / rl.LOCK_NAME).write_text(stale)
        won, errors = [], []
        barrier = threading.Barrier(4)

        def start(barrier=barrier, won=won, out=out, errors=errors):  # this trial's objects (threads joined below)
            barrier.wait()
            try:
                won.append(rl.acquire(str(out)))
            except rl.LockError as e:
                errors.append(e)

        threads = [threading.Thread(target=start) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        doubles += len(won) != 1
        assert len(won) + len(errors) == 4
        holder = json.loads((out / rl.LOCK_NAME).read_text())
        assert holder["token"] in {w[0]["token"] for w in won}
    assert doubles == 0


def test_lock_of_a_reused_pid_is_recovered(tmp_path, tiny_nih, tiny_ckpt, capsys):
    out = tmp_path / "out"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a live, unrelated process with the dead run's pid, but another start time
        (out / rl.LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid, "start": "12",
                                                    "since": "then", "token": "x"}))
        assert main(_args(tiny_nih, out, tiny_ckpt, "--limit", "8")) == 0
        assert "recovered the lock of a run that died" in _said(capsys)
        assert not (out / rl.LOCK_NAME).exists()
    finally:
        other.kill()
        other.wait()


@pytest.fixture(scope="module")
def slow_net_reference(tmp_path_factory, tiny_nih):
    """The kill and interrupt tests' command (tests.helpers:slow_tiny_net, random:3), undisturbed and
    at full speed in this process (SLOW_ENV slows only the subprocess a test interrupts)."""
    out = tmp_path_factory.mktemp("slowref") / "out"
    assert main(["--dataset", f"nih:{tiny_nih}", "--checkpoint", "random:3", "--arch", "tests.helpers:slow_tiny_net",
                 "--out", str(out), "--shard-size", "4", "--batch-size", "2", "--cluster", "inprocess"]) == 0
    return _run_dir(out)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_releases_the_lock_and_a_rerun_completes(tmp_path, tiny_nih, sig, slow_net_reference):
    args = ["--dataset", f"nih:{tiny_nih}", "--checkpoint", "random:3", "--arch", "tests.helpers:slow_tiny_net",
            "--out", str(tmp_path / "out"), "--shard-size", "4", "--batch-size", "2", "--cluster", "inprocess"]
    # SIGINT as a terminal delivers it: a suite started as a background job of a script inherits SIGINT
    # ignored, and the job rightly keeps an ignored SIGINT ignored (pipeline.run.interrupt)
    proc = subprocess.Popen([sys.executable, "-m", "jobs.score_dataset", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **SLOW_ENV},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "out").glob("runs/*/_shards/*.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "rerun the same command to resume" in err
    assert not (tmp_path / "out" / "_lock.json").exists()
    run_dir = next((tmp_path / "out" / "runs").iterdir())
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    assert main(args) == 0
    _same(slow_net_reference, run_dir)


def test_worker_killed_mid_run_then_the_run_completes(tmp_path, tiny_nih, slow_net_reference):
    """A worker process dies (OOM killer, node failure): its shard is retried on the restarted worker."""
    prof = tmp_path / "c.yaml"
    prof.write_text("profiles:\n  two: {type: local, n_workers: 2, threads_per_worker: 1, processes: true}\n")
    args = ["--dataset", f"nih:{tiny_nih}", "--checkpoint", "random:3", "--arch", "tests.helpers:slow_tiny_net",
            "--out", str(tmp_path / "out"), "--shard-size", "4", "--batch-size", "2", "--cluster", "two",
            "--cluster-file", str(prof), "--cache", "none", "--no-report"]  # the report is not what this test reads
    proc = subprocess.Popen([sys.executable, "-m", "jobs.score_dataset", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **SLOW_ENV, "PYTHONPATH": str(ROOT)})
    deadline, killed = time.time() + 240, None  # the kill window stays open until the run ends (a loaded machine starts workers slowly)
    while time.time() < deadline and killed is None and proc.poll() is None:
        if len(list((tmp_path / "out").glob("runs/*/_shards/*.json"))) >= 2:
            kids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            workers = [k for k in kids if "multiprocessing" in Path(f"/proc/{k}/cmdline").read_text(errors="replace")]
            if workers:
                killed = workers[0]
                os.kill(int(killed), signal.SIGKILL)
        time.sleep(0.05)
    log, _ = proc.communicate(timeout=240)
    assert killed, log[-2000:]
    assert proc.returncode == 0, log[-3000:]
    run_dir = next((tmp_path / "out" / "runs").iterdir())
    _same(slow_net_reference, run_dir)  # on two worker processes, one killed, as in one undisturbed process
    run = json.loads((run_dir / "run.json").read_text())
    assert run["steps"]["report"] == "skipped" and not (run_dir / "report.html").exists()  # --no-report


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0


def test_disk_full_then_rerun_with_space_completes(tmp_path, tiny_nih, tiny_ckpt, reference):
    disk = tmp_path / "disk"
    if os.geteuid() != 0 or not _mount_tmpfs(disk, "400k"):
        pytest.skip("needs root and tmpfs mounts to fill a disk")
    try:
        out = disk / "out"
        code = main(_args(tiny_nih, out, tiny_ckpt, "--cache", "none"))
        assert code in (1, 2)  # shards that could not write are incomplete, or the manifest could not be written
        assert not (out / "latest.json").exists()
        # the job has ended: its run.json says so (issue 27: it stayed 'running' for good)
        assert all(json.loads(rj.read_text())["status"] != "running" for rj in out.glob("runs/*/run.json"))
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        assert main(_args(tiny_nih, out, tiny_ckpt, "--cache", "none")) == 0
        _same(reference, _run_dir(out))
        assert not list(out.rglob("*.tmp-*"))
    finally:
        subprocess.run(["umount", "-l", str(disk)])
