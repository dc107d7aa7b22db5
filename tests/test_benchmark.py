"""The benchmark's CPU accounting by process class (the guide to the CPU proxies on a shared machine)."""

import sys

from jobs.benchmark import CpuSampler


def test_the_scoring_window_ends_where_decoding_stopped_and_spans_the_phase():
    s = CpuSampler()
    for t, dec, wrk, drv in [(0.0, 0, 0, 1), (1.0, 0, 1, 2), (2.0, 2, 2, 2), (3.0, 4, 2.5, 2.2), (4.0, 6, 3, 2.3), (5.0, 6, 3.5, 4)]:
        s.samples.append((t, {"decode": dec, "worker": wrk, "driver": drv, "other": 0.0}))
    w = s.scoring_window(2.0)  # decoding last rose at t=4: the window is [2, 4]
    assert w["decode"] == 4.0 and w["worker"] == 1.0 and w["other"] == 0.0
    assert abs(w["driver"] - 0.3) < 1e-9


def test_the_sampler_counts_a_real_process_tree():
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\nprint('ok')"
    done, s = CpuSampler.run([sys.executable, "-c", busy], cwd=None)
    assert done.returncode == 0 and done.stdout.strip() == "ok"
    assert s.samples and s.samples[-1][1]["driver"] >= 0.5
    assert s.samples[-1][1]["decode"] == 0.0 and s.samples[-1][1]["worker"] == 0.0
