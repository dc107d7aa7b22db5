"""End to end: the job on a real LocalCluster (worker processes), its outputs and the public contract."""

import json
import re
from datetime import datetime
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from jobs.score_dataset import main
from pipeline.core.findings import CHEXNET_FINDINGS
from schemas.meta import read_metadata
from schemas.outputs import predictions_schema

from tests.conftest import TINY_ARCH

README = Path(__file__).resolve().parents[2] / "README.md"


def _args(data, out, ckpt, *extra):
    return ["--dataset", f"nih:{data}", "--checkpoint", ckpt, "--arch", TINY_ARCH, "--out", str(out),
            "--shard-size", "16", "--batch-size", "8", *extra]


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_nih, tiny_ckpt):
    out = tmp_path_factory.mktemp("job") / "out"
    assert main(_args(tiny_nih, out, tiny_ckpt)) == 0
    run_dir = next((out / "runs").iterdir())
    return out, run_dir


def _snapshot(out: Path) -> dict:
    run_dir = next((out / "runs").iterdir())
    g = zarr.open_group(str(run_dir / "maps.zarr"), mode="r")
    preds = pq.read_table(sorted(run_dir.glob("predictions/*.parquet"))).sort_by("row")
    return {"preds": preds, "cam": g["cam"][:], "emb": g["embedding"][:], "cell": g["cell_logit"][:], "ids": g["image_id"][:]}


def test_outputs_follow_the_contract(scored, tiny_nih):
    out, run_dir = scored
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "complete" and run["counts"]["scored"] == 40 and run["counts"]["failed"] == 0
    assert run["counts"]["shards"] == 3 and run["config"]["shard_size"] == 16
    assert run["model_version"] == run_dir.name and run["dataset_fingerprint"]
    assert set(run["seconds"]) >= {"load_model", "manifest", "shards_forward", "shards_decode_wait", "shards_write", "score_wall"}
    assert 0 < run["seconds"]["score_start"] < (datetime.fromisoformat(run["finished"]) - datetime.fromisoformat(run["started"])).total_seconds()

    parts = sorted(run_dir.glob("predictions/part-*.parquet"))
    assert [p.name for p in parts] == ["part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]
    table = pq.read_table(parts)
    assert table.schema.equals(predictions_schema(CHEXNET_FINDINGS, run_dir.name), check_metadata=False)
    meta = read_metadata(pq.read_schema(parts[0]))
    assert meta["findings"] == list(CHEXNET_FINDINGS) and meta["model_version"] == run_dir.name and meta["schema_version"]
    assert sorted(table.column("row").to_pylist()) == list(range(40))

    g = zarr.open_group(str(run_dir / "maps.zarr"), mode="r")
    assert g["cam"].shape == (40, 14, 7, 7) and g["cam"].chunks == (16, 14, 7, 7) and g["cam"].dtype == np.float32
    assert g["cell_logit"].shape == (40, 14, 7, 7)
    assert g["embedding"].shape == (40, 32) and g["embedding"].dtype == np.float16
    assert g.attrs["findings"] == list(CHEXNET_FINDINGS) and g.attrs["model_version"] == run_dir.name
    assert g.attrs["baselines"]["Pneumonia"] == 0.012
    manifest = pq.read_table(out / "manifest.parquet").to_pandas().sort_values("row")
    assert list(g["image_id"][:]) == manifest.image_id.tolist()
    assert np.isfinite(g["cam"][:]).all()
    # the stored probability is the mean cell logit through a sigmoid
    preds = table.to_pandas().sort_values("row")
    logit = g["cell_logit"][:].mean(axis=(2, 3))
    np.testing.assert_allclose(preds[list(CHEXNET_FINDINGS)].to_numpy(), 1 / (1 + np.exp(-logit)), atol=1e-5)
    assert pq.read_table(run_dir / "errors.parquet").num_rows == 0
    assert not list(out.rglob("*.tmp-*"))
    # the worker processes' logs (pipeline.worker.logs): a header per worker, a line per shard
    logs = "".join(p.read_text() for p in sorted((out / "logs").glob("worker-*.log")))
    assert "logs to" in logs and logs.count(" of 16 images scored") == 2 and logs.count("8 of 8 images scored") == 1, logs


def test_rerun_skips_completed_shards_and_leaves_identical_outputs(scored, tiny_nih, tiny_ckpt, capsys):
    out, run_dir = scored
    before = _snapshot(out)
    before_run = json.loads((run_dir / "run.json").read_text())
    mtimes = {p: p.stat().st_mtime_ns for p in run_dir.glob("predictions/*.parquet")}
    capsys.readouterr()
    assert main(_args(tiny_nih, out, tiny_ckpt)) == 0
    text = capsys.readouterr().err  # diagnostics go through logging to stderr
    assert "3 shards, 0 to score" in text
    after = _snapshot(out)
    assert after["preds"].equals(before["preds"])
    for k in ("cam", "emb", "cell"):
        np.testing.assert_array_equal(after[k], before[k])
    assert {p: p.stat().st_mtime_ns for p in run_dir.glob("predictions/*.parquet")} == mtimes
    run = json.loads((run_dir / "run.json").read_text())
    # the rerun is recorded as a rerun; the scoring run's own times and history stay (issue 23)
    assert run["counts"]["skipped_shards"] == 3 and run["history"] == before_run["history"]
    assert (run["started"], run["seconds"]) == (before_run["started"], before_run["seconds"])
    assert run["reruns"][-1]["outcome"] == "nothing to score"


def test_readme_duckdb_query_runs_as_written(scored):
    out, run_dir = scored
    text = README.read_text()
    sql = re.search(r"```sql\n(.*?)```", text, re.S).group(1)
    result = duckdb.sql(sql.replace("'out/", f"'{out}/")).df()
    manifest = pq.read_table(out / "manifest.parquet").to_pandas()
    preds = pq.read_table(sorted(run_dir.glob("predictions/*.parquet"))).to_pandas().merge(manifest[["row", "view_position"]], on="row")
    expected = preds.groupby("view_position")["Pneumonia"].agg(["size", "mean"])
    assert sorted(result.view_position) == sorted(expected.index)
    for r in result.itertuples():
        assert r.n == expected.loc[r.view_position, "size"]
        assert abs(r.mean_p_pneumonia - expected.loc[r.view_position, "mean"]) < 1e-6


def test_a_changed_setting_is_refused_not_mixed_into_the_run(scored, tiny_nih, tiny_ckpt, capsys, tmp_path):
    out, _ = scored
    assert main(_args(tiny_nih, out, tiny_ckpt, "--baselines", "from-labels")) == 2
    assert "Cardiomegaly has 40 labels with prevalence 0.0" in capsys.readouterr().err
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({f: 0.1 for f in CHEXNET_FINDINGS}))
    assert main(_args(tiny_nih, out, tiny_ckpt, "--baselines", str(flat))) == 2
    assert "different settings (baselines)" in capsys.readouterr().err


def test_new_model_gets_its_own_run_and_limit(scored, tiny_nih, tmp_path):
    out, run_dir = scored
    assert main(_args(tiny_nih, out, "random:5", "--limit", "10", "--cluster", "inprocess")) == 0
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(runs) == 2 and run_dir.name in runs
    other = next(p for p in (out / "runs").iterdir() if p.name != run_dir.name)
    assert pq.read_table(sorted(other.glob("predictions/*.parquet"))).num_rows == 10


def test_memory_filesystem_output(tiny_nih, tiny_ckpt):
    import fsspec

    out = "memory://cxr-test/out"
    assert main(_args(tiny_nih, out, tiny_ckpt, "--cluster", "inprocess", "--limit", "20")) == 0
    fs = fsspec.filesystem("memory")
    runs = fs.ls("/cxr-test/out/runs", detail=False)
    assert len(runs) == 1
    g = zarr.open_group(f"memory:/{runs[0]}/maps.zarr", mode="r")
    assert np.isfinite(g["cam"][:20]).all() and np.isnan(g["cam"][20:]).all()
    fs.rm("/cxr-test", recursive=True)


def test_cli_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--dataset", "--checkpoint", "--arch", "--out", "--cluster", "--cluster-file", "--shard-size",
                 "--batch-size", "--limit", "--device", "--metadata", "--baselines", "--findings"):
        assert flag in text


def test_unwritable_out_is_a_clear_error(tmp_path, tiny_nih, tiny_ckpt, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(_args(tiny_nih, blocker / "out", tiny_ckpt)) == 2
    err = capsys.readouterr().err
    assert "is not writable" in err and "--out" in err
