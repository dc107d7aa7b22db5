"""The benchmark's CPU accounting by process class (the guide to the CPU proxies on a shared machine)."""

import sys

from jobs.benchmark import CpuSampler


def test_the_scoring_window_is_the_phase_run_json_records():
    """run.json's started + seconds.score_start (the submit) for seconds.score_wall: exact whether the
    run is decode bound (tiny network) or not (DenseNet-121, whose decoding ends long before its phase)."""
    from datetime import datetime, timezone

    s = CpuSampler()
    s.t0_wall = 1_000.0
    for t, dec, wrk, drv in [(0.0, 0, 0, 1), (1.0, 0, 1, 2), (2.0, 2, 2, 2), (3.0, 4, 2.5, 2.2), (4.0, 6, 3, 2.3), (5.0, 6, 3.5, 4)]:
        s.samples.append((t, {"decode": dec, "worker": wrk, "driver": drv, "other": 0.0}))
    run = {"started": datetime.fromtimestamp(1_000.5, timezone.utc).isoformat(), "seconds": {"score_start": 1.5, "score_wall": 3.0}}
    w = s.scoring_window(run)  # the phase is [2, 5] in the samples' time
    assert w["decode"] == 4.0 and w["worker"] == 1.5 and w["other"] == 0.0
    assert abs(w["driver"] - 2.0) < 1e-9


def test_the_sampler_counts_a_real_process_tree():
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\nprint('ok')"
    done, s = CpuSampler.run([sys.executable, "-c", busy], cwd=None)
    assert done.returncode == 0 and done.stdout.strip() == "ok"
    assert s.samples and s.samples[-1][1]["driver"] >= 0.5
    assert s.samples[-1][1]["decode"] == 0.0 and s.samples[-1][1]["worker"] == 0.0
