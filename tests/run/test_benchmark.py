"""The benchmark's CPU accounting by process class (the guide to the CPU proxies on a shared machine)."""

import sys

import pytest

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


def test_the_rehearsal_lays_out_an_nih_root_of_hard_links_and_grows_it(tmp_path):
    import os

    from pipeline.run.rehearsal import grow, layout

    from tests.conftest import NIH_SHARED, shared_or_skip

    shared_or_skip()
    plan = layout(tmp_path / "root", 30, NIH_SHARED, grow_to=36)
    root = tmp_path / "root"
    films = sorted(root.glob("images_*/images/*.png"))
    assert len(films) == 30 and {p.parent.parent.name for p in films} == {f"images_{i:03d}" for i in range(1, 11)}
    lines = (root / "Data_Entry_2017_v2020.csv").read_text().splitlines()
    assert lines[0].startswith("Image Index,") and len(lines) == 31
    assert {p.name for p in films} == {x.split(",", 1)[0] for x in lines[1:]}
    first = sorted((NIH_SHARED / "images").glob("*.png"))[0]
    linked = root / "images_001" / "images" / lines[1].split(",", 1)[0]
    assert os.path.samefile(linked, first)  # a hard link to the real film, not a copy
    assert grow(plan, 36) == 6
    assert len((root / "Data_Entry_2017_v2020.csv").read_text().splitlines()) == 37 and len(list(root.glob("images_*/images/*.png"))) == 36


@pytest.mark.slow
@pytest.mark.timeout(1200)  # ~26 process trees (first run, reruns, medians of 3, six mistakes): ~4-5 min quiet
def test_the_full_size_rehearsal_at_a_few_thousand_rows(tmp_path):
    """python -m jobs.benchmark --full-size, scaled down: every step exits 0 and the no-op is one."""
    from pathlib import Path

    from pipeline.run.rehearsal import goals, rehearse, table

    from tests.conftest import NIH_SHARED, shared_or_skip

    shared_or_skip()
    steps, sizes = rehearse(2_000, NIH_SHARED, tmp_path, Path(__file__).resolve().parents[2], identifiability=False, log=lambda m: None)
    by = {s.name: s for s in steps}
    wrong = [s for s in steps if s.name.startswith("mistake: ")]
    assert len(wrong) == 6 and all(s.rc == 2 and "nothing written" in s.note for s in wrong)
    assert all(s.rc == 0 for s in steps if s not in wrong)
    assert by["no-op rerun"].stdout.startswith("nothing changed") and by["no-op after the update"].stdout.startswith("nothing changed")
    assert by["no-op rerun"].note.startswith("median of 3 (")
    assert "1 to score" in by["+1% films"].stderr and "nothing changed" not in by["+1% films"].stdout
    assert "20 images" in by["the added films alone"].stderr  # the 1% alone, in a fresh --out
    assert by["DuckDB query"].stdout.startswith("2020 ")
    assert sizes["predictions"] > 0 and sizes["maps.zarr/cam"] > 0
    print(table(steps, sizes))
    print("\n".join(goals(steps)))


def test_the_rehearsal_notes_what_a_steps_aggregation_cost(tmp_path):
    import json
    import time

    from pipeline.run.rehearsal import aggregates_note

    run = tmp_path / "out" / "runs" / "v1"
    run.mkdir(parents=True)
    since = time.time() - 1
    assert aggregates_note(tmp_path / "out", since) == ""  # a step that aggregated nothing
    (run / "_aggregates.json").write_text(json.dumps({
        "seconds": {"region_statistics": 2.0, "tables": 1.5, "probes": 0.25, "verdicts": 3.0},
        "region_partials": {"chunks": 20, "recomputed": {"19": ["all=all"], "3": ["confidence=top10%"]}},
        "probes": {"kept": {"films_now": 20200, "changed_since_fit": 744}}}))
    assert aggregates_note(tmp_path / "out", since) == (
        "aggregates + probes 6.8 s: region statistics 2.0 s (1 of 20 chunks computed from the maps, 1 read again for 1 strata "
        "whose rows changed, the rest merged from kept statistics), probes 0.2 s (kept, 744 films changed "
        "since the fit), tables 1.5 s, verdicts 3.0 s")
    assert aggregates_note(tmp_path / "out", time.time() + 60) == ""  # written before the step: not its own
    from pipeline.run.rehearsal import scoring_seconds

    assert scoring_seconds(tmp_path / "out", since) is None  # no run.json written by the step
    (run / "run.json").write_text(json.dumps({"status": "complete", "seconds": {"score_wall": 12.5}}))
    assert scoring_seconds(tmp_path / "out", since) == 12.5 and scoring_seconds(tmp_path / "out", time.time() + 60) is None


def test_the_goals_read_the_rehearsals_own_figures():
    """Each goal of issue 23 is judged on the rehearsal's figures: met and not met both reachable."""
    from pipeline.run.rehearsal import Step, _median_step, goals

    noop = _median_step([Step("no-op rerun", w, 0, driver_rss=r) for w, r in ((0.9, 180), (7.0, 190), (1.1, 170))])
    assert noop.wall == 1.1 and noop.driver_rss == 190 and noop.note == "median of 3 (0.90, 7.00, 1.10 s)"
    steps = [Step("first run", 900.0, 0, driver_rss=1900, aggregates_s=250.0), noop,
             Step("+1% films", 70.0, 0, driver_rss=1500, aggregates_s=20.0, score_s=12.0), Step("the added films alone", 20.0, 0, driver_rss=800),
             Step("jobs.report", 31.0, 0), Step("mistake: pickled whole model", 0.8, 2, note="error: ...; nothing written"),
             Step("mistake: nih: at ROOT/images_001/images", 1.2, 2, note="error: ...; nothing written")]
    lines = goals(steps)
    assert lines == [
        "met: no-op rerun 1.10 s (goal <= 5 s)",
        "met: +1% films 70.0 s (goal <= 3 x (the added films alone 20.0 s + 5 s) = 75.0 s)",
        "NOT met: +1% films 70.0 s against its own scoring phase (stricter: 3 x (12.0 s + 5 s) = 51.0 s)",
        "met: driver peak RSS 1900 MB in 'first run' (goal <= 2 GB)",
        "NOT met: report 31.0 s (goal <= 30 s)",
        "met: aggregates + probes at most 250.0 s, in 'first run' (goal <= 5 min)",
        "met: 2 configuration mistakes refused with exit 2, nothing written, slowest 1.20 s ('nih: at ROOT/images_001/images'; goal <= 2 s)"]
    steps[2].wall, steps[0].driver_rss, steps[-1].note = 76.0, 2100, "error: ...; WROTE ['mistake-out']"
    lines = goals(steps)
    assert lines[1].startswith("NOT met: +1% films 76.0 s") and lines[3].startswith("NOT met: driver peak RSS 2100 MB")
    assert lines[-1].startswith("NOT met: 2 configuration mistakes")
