"""Nightly rescoring: a grown dataset scores only its new images; an up-to-date one scores nothing."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import zarr

from jobs.score_dataset import main

from tests.conftest import TINY_ARCH, png_bytes


def _args(data, out, ckpt):
    return ["--dataset", f"nih:{data}", "--checkpoint", ckpt, "--arch", TINY_ARCH, "--out", str(out), "--shard-size", "16", "--cluster", "inprocess"]


def test_grown_dataset_scores_only_new_images_and_updates_aggregates(tmp_path, tiny_nih, tiny_ckpt, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_nih, data)
    out = tmp_path / "out"
    assert main(_args(data, out, tiny_ckpt)) == 0
    run_dir = next((out / "runs").iterdir())
    before = pq.read_table(sorted(run_dir.glob("predictions/*.parquet"))).sort_by("row").to_pandas()
    cam_before = zarr.open_group(str(run_dir / "maps.zarr"), mode="r")["cam"][:]
    parts_before = {p.name: p.stat().st_mtime_ns for p in run_dir.glob("predictions/*.parquet")}
    n_before = pq.read_table(run_dir / "region_stats.parquet").to_pandas().query("stratum == 'all'").n.iloc[0]

    # 10 new films arrive, one of which sorts before every existing id
    rng = np.random.default_rng(0)
    folder = data / "images_002" / "images"
    with open(data / "Data_Entry_2017_v2020.csv", "a") as f:
        for i in range(10):
            name = f"{(0 if i == 0 else 900 + i):08d}_000.png"
            (folder / name).write_bytes(png_bytes(rng.integers(0, 256, (128, 128), dtype=np.uint8)))
            f.write(f"{name},Effusion,0,{900 + i},50,F,AP,128,128,0.143,0.143\n")
    capsys.readouterr()
    assert main(_args(data, out, tiny_ckpt)) == 0
    text = capsys.readouterr().err  # diagnostics: logging, stderr
    assert "4 shards, 2 to score" in text  # the partly filled last shard (rows 32-39) and the new one
    after = pq.read_table(sorted(run_dir.glob("predictions/*.parquet"))).sort_by("row").to_pandas()
    assert len(after) == 50 and after.row.is_unique
    old = after[after.row < 40].reset_index(drop=True)
    assert old.equals(before)  # existing rows keep their numbers and values
    g = zarr.open_group(str(run_dir / "maps.zarr"), mode="r")
    assert g["cam"].shape[0] == 50
    np.testing.assert_array_equal(g["cam"][:40], cam_before)
    untouched = {p.name: p.stat().st_mtime_ns for p in run_dir.glob("predictions/*.parquet")}
    assert untouched["part-000000.parquet"] == parts_before["part-000000.parquet"]
    assert untouched["part-000001.parquet"] == parts_before["part-000001.parquet"]
    assert pq.read_table(run_dir / "region_stats.parquet").to_pandas().query("stratum == 'all'").n.iloc[0] == n_before + 10
    assert json.loads((out / "latest.json").read_text())["model_version"] == run_dir.name


def test_up_to_date_run_starts_no_cluster_and_keeps_aggregates(tmp_path, tiny_nih, tiny_ckpt, capsys):
    out = tmp_path / "out"
    assert main(_args(tiny_nih, out, tiny_ckpt)) == 0
    stats = next((out / "runs").iterdir()) / "region_stats.parquet"
    mtime = stats.stat().st_mtime_ns
    capsys.readouterr()
    assert main(_args(tiny_nih, out, tiny_ckpt)) == 0
    text = capsys.readouterr().err  # diagnostics: logging, stderr
    assert "0 to score" in text
    assert "dashboard" not in text  # no cluster is started when there is nothing to do
    assert stats.stat().st_mtime_ns == mtime  # aggregates kept, not recomputed


def _forbid_cluster_and_model(monkeypatch):
    """A no-op must never get this far: both raise if reached."""
    import pipeline.inference.model
    import pipeline.run.lifecycle

    def no_cluster(*a, **k):
        raise AssertionError("a no-op started a cluster")

    def no_model(*a, **k):
        raise AssertionError("a no-op loaded the model")

    monkeypatch.setattr(pipeline.run.lifecycle, "RunCluster", no_cluster)
    monkeypatch.setattr(pipeline.inference.model, "load_model", no_model)


def _mtimes(out):
    return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name not in ("run.json", "_lock.json")}


def test_a_noop_starts_no_cluster_loads_no_model_and_keeps_the_runs_timings(tmp_path, tiny_nih, tiny_ckpt, capsys, monkeypatch):
    import os

    data = tmp_path / "data"
    shutil.copytree(tiny_nih, data)
    out = tmp_path / "out"
    args = _args(data, out, tiny_ckpt) + ["--no-report"]
    assert main(args) == 0
    run_json = next((out / "runs").iterdir()) / "run.json"
    first = json.loads(run_json.read_text())
    files = _mtimes(out)
    capsys.readouterr()
    with monkeypatch.context() as m:
        _forbid_cluster_and_model(m)
        assert main(args) == 0
        printed = capsys.readouterr().out
        assert printed.count("\n") == 1 and printed.startswith("nothing changed: run ") and "40 of 40 images" in printed
        again = json.loads(run_json.read_text())
        for key in ("started", "finished", "seconds", "counts", "history", "steps"):
            assert again[key] == first[key], key  # the scoring run's own record, not the no-op's
        assert [r["outcome"] for r in again["reruns"]] == ["nothing changed"] and "manifest_reread" not in again["reruns"][0]["seconds"]
        assert _mtimes(out) == files  # nothing else written

        # the metadata touched but identical: re-read once, still a no-op, and the new stamp is kept
        meta = data / "Data_Entry_2017_v2020.csv"
        os.utime(meta, ns=(meta.stat().st_atime_ns, meta.stat().st_mtime_ns + 10**9))
        assert main(args) == 0 and capsys.readouterr().out.startswith("nothing changed")
        assert main(args) == 0 and capsys.readouterr().out.startswith("nothing changed")
        reruns = json.loads(run_json.read_text())["reruns"]
        assert ["manifest_reread" in r["seconds"] for r in reruns] == [False, True, False]

    # from the shell, the no-op imports no torch at all (what a cron line pays)
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    child = "import sys, json; from jobs.score_dataset import main; rc = main(json.loads(sys.argv[1])); print(rc, 'torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", child, json.dumps(args)], capture_output=True, text=True, cwd=root, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.stdout.splitlines()[-1] == "0 False", proc.stdout + proc.stderr
    assert len(json.loads(run_json.read_text())["reruns"]) == 4
    # a new film: not a no-op; only its shard is scored and the reruns survive the run
    rng = np.random.default_rng(1)
    (data / "images_002" / "images" / "00000950_000.png").write_bytes(png_bytes(rng.integers(0, 256, (128, 128), dtype=np.uint8)))
    with open(meta, "a") as f:
        f.write("00000950_000.png,Effusion,0,950,50,F,AP,128,128,0.143,0.143\n")
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "nothing changed" not in captured.out and "3 shards, 1 to score" in captured.err
    after = json.loads(run_json.read_text())
    assert after["counts"]["scored"] == 41 and len(after["reruns"]) == 4


def test_the_report_is_kept_on_a_noop_and_redrawn_after_a_change(tmp_path, tiny_nih, tiny_ckpt, capsys, monkeypatch, report_after_run):
    data = tmp_path / "data"
    shutil.copytree(tiny_nih, data)
    out = tmp_path / "out"
    args = _args(data, out, tiny_ckpt)
    assert main(args) == 0
    report = next((out / "runs").iterdir()) / "report.html"
    drawn = report.stat().st_mtime_ns
    capsys.readouterr()
    with monkeypatch.context() as m:
        _forbid_cluster_and_model(m)
        assert main(args) == 0
    assert "and report up to date" in capsys.readouterr().out
    assert report.stat().st_mtime_ns == drawn  # not redrawn
    (data / "images_002" / "images" / "00000960_000.png").write_bytes(png_bytes(np.full((128, 128), 90, np.uint8)))
    with open(data / "Data_Entry_2017_v2020.csv", "a") as f:
        f.write("00000960_000.png,No Finding,0,960,40,M,PA,128,128,0.143,0.143\n")
    assert main(args) == 0
    assert "nothing changed" not in capsys.readouterr().out
    assert report.stat().st_mtime_ns > drawn  # redrawn from the new aggregates


def test_a_deleted_film_or_rewritten_weights_are_never_a_noop(tmp_path, tiny_nih, tiny_ckpt, capsys):
    """What the no-op compares must see these: a film gone (its folder's mtime), new weights at the
    same checkpoint path (its hash), another output setting."""
    import torch

    from pipeline.inference.checkpoint import save_safetensors
    from pipeline.inference.tiny_net import TinyCAMNet

    data = tmp_path / "data"
    shutil.copytree(tiny_nih, data)
    ckpt = tmp_path / "model.safetensors"
    shutil.copyfile(tiny_ckpt, ckpt)
    out = tmp_path / "out"
    args = _args(data, out, str(ckpt)) + ["--no-report"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 0 and capsys.readouterr().out.startswith("nothing changed")

    next((data / "images_001" / "images").glob("*.png")).unlink()
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "nothing changed" not in captured.out and "rerun: the dataset changed" in captured.err
    assert json.loads(next((out / "runs").iterdir()).joinpath("run.json").read_text())["counts"]["images"] == 39

    torch.manual_seed(99)
    save_safetensors(TinyCAMNet(14).state_dict(), str(ckpt))  # same path, other weights
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "rerun: the checkpoint is not the latest run's" in captured.err and len(list((out / "runs").iterdir())) == 2

    assert main(args + ["--limit", "20"]) == 0
    assert "rerun: the settings differ from the latest run's" in capsys.readouterr().err


def test_a_rerun_past_the_early_check_with_nothing_to_score_keeps_the_runs_timings(tmp_path, tiny_nih, tiny_ckpt, capsys, report_after_run):
    """--verify, a deleted report, deleted aggregates: each rerun goes the whole way (the early check
    cannot vouch for it) and scores nothing; run.json keeps the scoring run's times, the rerun is
    appended to ``reruns`` with what it redid, and jobs.runs shows the scoring run."""
    from jobs.runs import list_runs

    out = tmp_path / "out"
    args = _args(tiny_nih, out, tiny_ckpt)
    assert main(args) == 0
    run_dir = next((out / "runs").iterdir())
    first = json.loads((run_dir / "run.json").read_text())
    assert first["seconds"]["shards_total"] > 0 and "reruns" not in first
    shown = list_runs(str(out))
    capsys.readouterr()

    (run_dir / "report.html").unlink()
    assert main(args) == 0
    assert main(args + ["--verify"]) == 0
    (run_dir / "region_stats.parquet").unlink()
    assert main(args) == 0
    assert "0 to score" in capsys.readouterr().err
    again = json.loads((run_dir / "run.json").read_text())
    for key in ("started", "finished", "seconds", "history"):
        assert again[key] == first[key], key
    assert again["steps"] == first["steps"] and again["status"] == "complete" and again["counts"]["scored"] == 40
    reruns = again["reruns"]
    assert [r["outcome"] for r in reruns] == ["nothing to score"] * 3
    assert [r["redid"] for r in reruns] == [["report"], ["report"], ["aggregates", "report"]]
    assert all(r["started"] > first["finished"] and r["finished"] >= r["started"] and r["seconds"]["total"] > 0 for r in reruns)
    assert (run_dir / "region_stats.parquet").exists() and (run_dir / "report.html").exists()
    assert list_runs(str(out)) == shown  # jobs.runs: the scoring run's start and duration
    assert json.loads((out / "latest.json").read_text())["finished"] == first["finished"]


def test_grown_aggregates_merge_kept_chunk_statistics_and_equal_a_full_recompute(tmp_path, tiny_nih, tiny_ckpt):
    """+3 films: only the chunks holding them are read whole; an unchanged chunk is merged from its
    kept statistics (at most its top-10% entry is recomputed, as that threshold is the dataset's),
    and the merge is bit-identical to a recompute from the maps alone (the same float64 additions in
    the same order)."""
    from pipeline.analysis.aggregate import aggregate_run

    data = tmp_path / "data"
    shutil.copytree(tiny_nih, data)
    out = tmp_path / "out"
    assert main(_args(data, out, tiny_ckpt) + ["--no-report"]) == 0
    run_dir = next((out / "runs").iterdir())
    first = json.loads((run_dir / "_aggregates.json").read_text())["region_partials"]
    assert first["chunks"] == 3 and sorted(first["recomputed"]) == ["0", "1", "2"]  # nothing kept yet
    assert sorted(p.name for p in (run_dir / "_partials").iterdir()) == [f"region-{k:06d}.npz" for k in range(3)]

    rng = np.random.default_rng(5)
    with open(data / "Data_Entry_2017_v2020.csv", "a") as f:
        for i in range(3):
            name = f"{970 + i:08d}_000.png"
            (data / "images_002" / "images" / name).write_bytes(png_bytes(rng.integers(0, 256, (128, 128), dtype=np.uint8)))
            f.write(f"{name},Effusion,0,{970 + i},50,F,AP,128,128,0.143,0.143\n")
    assert main(_args(data, out, tiny_ckpt) + ["--no-report"]) == 0
    grown = json.loads((run_dir / "_aggregates.json").read_text())
    redone = grown["region_partials"]["recomputed"]
    assert "2" in redone and "all=all" in redone["2"]  # rows 32-42: the chunk with the new films, read whole
    for k in ("0", "1"):
        assert set(redone.get(k, [])) <= {"confidence=top10%"}, redone[k]
    assert set(grown["seconds"]) == {"region_statistics", "tables", "verdicts"}

    tables = {p.name: pq.read_table(p) for p in run_dir.glob("*.parquet") if p.name != "errors.parquet"}
    assert "region_stats.parquet" in tables and "finding_summary.parquet" in tables
    shutil.rmtree(run_dir / "_partials")
    aggregate_run(str(out), run_dir.name)  # everything from the maps
    assert json.loads((run_dir / "_aggregates.json").read_text())["region_partials"]["recomputed"].keys() == {"0", "1", "2"}
    for name, merged in tables.items():
        again = pq.read_table(run_dir / name)
        assert again.schema.equals(merged.schema), name
        assert again.to_pandas().equals(merged.to_pandas()), name  # bit for bit, NaN in the same places


def _add_films(data, first: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with open(data / "Data_Entry_2017_v2020.csv", "a") as f:
        for i in range(first, first + n):
            name = f"{i:08d}_000.png"
            (data / "images_002" / "images" / name).write_bytes(png_bytes(rng.integers(0, 256, (128, 128), dtype=np.uint8)))
            f.write(f"{name},Effusion,0,{i},50,F,AP,128,128,0.143,0.143\n")


def test_probes_keep_their_fit_while_few_films_changed_and_say_so(tmp_path, tiny_nih, tiny_ckpt, monkeypatch):
    """The probes do not merge: a rerun keeps their tables while at most REFIT_SHARE of the films are
    new or changed since the fit (noted in the identifiability table and _aggregates.json), and
    refits beyond. 40 films in shards of 16: one new film changes the 9 rows of the last chunk."""
    import pipeline.analysis.probe_reuse as probe_reuse

    data = tmp_path / "data"
    shutil.copytree(tiny_nih, data)
    out = tmp_path / "out"
    args = _args(data, out, tiny_ckpt) + ["--no-report", "--identifiability"]
    assert main(args) == 0
    run_dir = next((out / "runs").iterdir())
    fit = json.loads((run_dir / "_aggregates.json").read_text())["probes"]
    assert sum(n for n, _ in fit["chunks"].values()) == 40 and "kept" not in fit
    before = {t: pq.read_table(run_dir / f"{t}.parquet") for t in probe_reuse.PROBE_TABLES}

    monkeypatch.setattr(probe_reuse, "REFIT_SHARE", 0.25)  # 9 of 41 changed: kept
    _add_films(data, 980, 1, seed=7)
    assert main(args) == 0
    rec = json.loads((run_dir / "_aggregates.json").read_text())
    assert rec["probes"]["kept"] == {"films_now": 41, "changed_since_fit": 9} and rec["probes"]["chunks"] == fit["chunks"]
    ident = pq.read_table(run_dir / "identifiability.parquet")
    assert all(n.endswith("fitted on 40 films; 41 now, 9 of them new or changed since the fit (kept up to 25% changed, refitted beyond)")
               for n in ident.column("notes").to_pylist())
    assert ident.drop_columns(["notes"]).equals(before["identifiability"].drop_columns(["notes"]))
    for t in probe_reuse.PROBE_TABLES[1:]:
        assert pq.read_table(run_dir / f"{t}.parquet").equals(before[t]), t

    _add_films(data, 990, 6, seed=8)  # the changes since the fit pass 25%: refitted, on every film
    assert main(args) == 0
    refit = json.loads((run_dir / "_aggregates.json").read_text())["probes"]
    assert "kept" not in refit and sum(n for n, _ in refit["chunks"].values()) == 47
    assert not any("fitted on" in (n or "") for n in pq.read_table(run_dir / "identifiability.parquet").column("notes").to_pylist())
    assert pq.read_table(run_dir / "identifiability_scores.parquet").num_rows != before["identifiability_scores"].num_rows


def test_changed_rows_counts_chunks_that_differ_gone_or_new():
    from pipeline.analysis.probe_reuse import changed_rows

    before = {"0": [16, "a"], "1": [16, "b"], "2": [8, "c"]}
    assert changed_rows(before, dict(before)) == 0
    assert changed_rows(before, {"0": [16, "a"], "1": [16, "b"], "2": [16, "d"], "3": [1, "e"]}) == 16 + 1
    assert changed_rows(before, {"0": [16, "a"], "2": [8, "c"]}) == 16  # a shard's films gone
