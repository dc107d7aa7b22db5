"""One writer per --out, latest.json, and the run listing."""

import json
import os
import socket
import subprocess
import sys

from jobs.runs import main as runs_main
from jobs.score_dataset import main

from tests.conftest import TINY_ARCH


def _args(data, out, ckpt):
    return ["--dataset", f"nih:{data}", "--checkpoint", ckpt, "--arch", TINY_ARCH, "--out", str(out), "--shard-size", "16", "--cluster", "inprocess"]


def test_second_writer_is_refused_and_a_dead_writer_is_recovered(tmp_path, tiny_nih, tiny_ckpt, capsys):
    out = tmp_path / "out"
    out.mkdir()
    lock = out / "_lock.json"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": "2026-01-01T00:00:00+00:00"}))
    assert main(_args(tiny_nih, out, tiny_ckpt)) == 2
    err = capsys.readouterr().err
    assert "another run is writing to" in err and f"pid {os.getpid()}" in err
    assert not (out / "runs").exists() and lock.exists()  # nothing written, the holder's lock untouched

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": "2026-01-01T00:00:00+00:00"}))
    assert main(_args(tiny_nih, out, tiny_ckpt)) == 0
    assert "recovered the lock of a run that died" in capsys.readouterr().err  # diagnostics: logging, stderr
    assert not lock.exists()


def test_latest_points_to_the_newest_complete_run_and_runs_lists_them(tmp_path, tiny_nih, tiny_ckpt, capsys):
    out = tmp_path / "out"
    assert main(_args(tiny_nih, out, tiny_ckpt)) == 0
    first = json.loads((out / "latest.json").read_text())["model_version"]
    assert main(_args(tiny_nih, out, "random:9")) == 0
    second = json.loads((out / "latest.json").read_text())["model_version"]
    assert second != first and (out / "runs" / first / "run.json").exists()
    capsys.readouterr()
    assert runs_main(["--out", str(out)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert len(listing) == 3 and first in listing[1] and second in listing[2]
    assert listing[2].endswith("<- latest") and "complete" in listing[1]
