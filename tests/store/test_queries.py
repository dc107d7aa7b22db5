"""Queries that stay right with several runs under one --out: the README's SQL and Python, run as
written (from the folder that holds `out/`), against two complete runs of two models."""

import json
import re
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from jobs.runs import main as runs_main
from jobs.score_dataset import main
from pipeline.core.findings import CHEXNET_FINDINGS

from tests.conftest import TINY_ARCH

README = Path(__file__).resolve().parents[2] / "README.md"
N_FILMS = 40


def _blocks(lang: str) -> list[str]:
    """The README's code blocks of a language in the sections this test covers."""
    text = README.read_text()
    section = text.split("## Outputs: the public contract", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_nih, tiny_ckpt):
    home = tmp_path_factory.mktemp("queries")
    out = home / "out"
    common = ["--dataset", f"nih:{tiny_nih}", "--arch", TINY_ARCH, "--out", str(out), "--shard-size", "16",
              "--batch-size", "8", "--cluster", "inprocess", "--quiet"]
    assert main(common + ["--checkpoint", tiny_ckpt]) == 0
    assert main(common + ["--checkpoint", "random:5"]) == 0
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(runs) == 2
    latest = json.loads((out / "latest.json").read_text())["model_version"]
    return home, out, latest


def test_every_table_a_run_writes_has_its_model_version_column(two_runs):
    _, out, _ = two_runs
    tables = sorted((out / "runs").glob("*/**/*.parquet"))
    assert {p.name for p in tables} >= {"region_stats.parquet", "finding_summary.parquet", "metrics.parquet", "errors.parquet"}
    for path in tables:
        t = pq.read_table(path)
        run = path.relative_to(out / "runs").parts[0]
        assert "model_version" in t.column_names, path
        assert set(t.column("model_version").to_pylist()) <= {run}, path
    for path in (out / "drift").glob("*/*.parquet"):
        names = pq.read_schema(path).names
        assert "from_version" in names and "to_version" in names, path


def test_readme_sql_returns_one_row_per_film_of_the_latest_run(two_runs, monkeypatch):
    home, out, latest = two_runs
    monkeypatch.chdir(home)  # the README's paths are relative: out/...
    blocks = _blocks("sql")
    assert len(blocks) >= 3
    con = duckdb.connect()
    con.execute((out / "cxr_audit.sql").read_text())
    results = [con.execute(sql).df() for sql in blocks]
    manifest = pd.read_parquet(out / "manifest.parquet")
    # 1: the AP/PA query over the files, restricted to the latest run: every film counted once
    first = results[0]
    assert first["n"].sum() == N_FILMS
    assert dict(zip(first.view_position, first.n)) == manifest.view_position.value_counts().to_dict()
    preds = pd.read_parquet(out / "runs" / latest / "predictions").merge(manifest[["row", "view_position"]], on="row")
    for r in first.itertuples():
        assert abs(r.mean_p_pneumonia - preds[preds.view_position == r.view_position].Pneumonia.mean()) < 1e-6
    # every README query that lists films lists each film once
    for sql, df in zip(blocks, results):
        if "row" in df.columns:
            assert len(df) == df["row"].nunique(), sql
    scored = con.execute("SELECT * FROM scored").df()
    assert len(scored) == N_FILMS and scored.row.is_unique and set(scored.model_version) == {latest}
    assert {"label_Pneumonia", "p_Pneumonia", "view_position", "image_id"} <= set(scored.columns)
    per_run = con.execute("SELECT model_version, count(*) AS n FROM all_predictions GROUP BY ALL").df()
    assert sorted(per_run.n) == [N_FILMS, N_FILMS]


def test_latest_run_is_printed_for_scripts(two_runs, capsys):
    _, out, latest = two_runs
    assert runs_main(["--out", str(out), "--latest"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "runs" / latest)


def test_labels_read_back_as_nullable_types_in_pandas(two_runs):
    _, out, _ = two_runs
    manifest = pd.read_parquet(out / "manifest.parquet")
    for f in CHEXNET_FINDINGS:
        assert manifest[f].dtype == "boolean", f
    assert manifest["age"].dtype == "Int16" and manifest["row"].dtype == np.int64


def test_readme_python_snippets_run_as_written(two_runs, monkeypatch):
    xr = pytest.importorskip("xarray", reason="xarray (test extra) is not installed")
    home, out, latest = two_runs
    monkeypatch.chdir(home)
    blocks = _blocks("python")
    assert any("xr.open_zarr" in b for b in blocks) and any("zarr.open_group" in b for b in blocks)
    for code in blocks:
        scope: dict = {}
        exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own snippet
        if "xr.open_zarr" in code:
            ds, mean_ap = scope["ds"], scope["pneumonia_ap"]
            assert ds.cam.dims == ("image", "finding", "cell_row", "cell_col")
            assert list(ds.finding.values) == list(CHEXNET_FINDINGS)
            assert ds.cell_features.dims[0] == "image" and ds.embedding.dims[0] == "image"
            assert list(ds.image_id.values) == pd.read_parquet(out / "manifest.parquet").sort_values("row").image_id.tolist()
            manifest = pd.read_parquet(out / "manifest.parquet")
            ap = manifest[manifest.view_position == "AP"].row.to_numpy()
            import zarr

            cam = zarr.open_group(str(out / "runs" / latest / "maps.zarr"), mode="r")["cam"][:]
            np.testing.assert_allclose(mean_ap.values, cam[ap, CHEXNET_FINDINGS.index("Pneumonia")].mean(0), rtol=1e-5)
            assert isinstance(ds, xr.Dataset)
        if "zarr.open_group" in code:
            assert scope["cam"].shape == (N_FILMS, 7, 7)


def test_maps_have_consolidated_metadata(two_runs):
    _, out, latest = two_runs
    meta = json.loads((out / "runs" / latest / "maps.zarr" / "zarr.json").read_text())
    consolidated = meta["consolidated_metadata"]["metadata"]
    assert {"cam", "cell_logit", "embedding", "cell_features", "image_id", "image", "finding", "cell_row", "cell_col"} <= set(consolidated)
    assert consolidated["cam"]["dimension_names"] == ["image", "finding", "cell_row", "cell_col"]
