"""Bad images are recorded and explained in errors.parquet; the job goes on; good rows are scored."""

import json

import numpy as np
import pyarrow.parquet as pq
import zarr

from jobs.score_dataset import main

from tests.conftest import TINY_ARCH, png_bytes


def test_bad_images_are_recorded_not_fatal(tmp_path, tiny_ckpt, rng):
    d = tmp_path / "imgs"
    d.mkdir()
    good = png_bytes(rng.integers(0, 256, (96, 96), dtype=np.uint8))
    files = {
        "good1": good,
        "good2": good,
        "trunc": good[: len(good) // 3],
        "empty": b"",
        "text": b"PNG? no, a text file\n",
        "rgba": png_bytes(rng.integers(0, 256, (96, 96, 4), dtype=np.uint8)),
        "deep": png_bytes((rng.integers(0, 65535, (96, 96))).astype(np.uint16)),
        "gone": good,
    }
    for name, data in files.items():
        (d / f"{name}.png").write_bytes(data)
    lines = ["image_id,path,view_position,age"] + [f"{n},imgs/{n}.png,PA,50" for n in files] + ["nopath,,PA,50", ",imgs/x.png,AP,1"]
    (tmp_path / "site.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    args = ["--dataset", f"manifest:{tmp_path / 'site.csv'}", "--checkpoint", tiny_ckpt, "--arch", TINY_ARCH,
            "--out", str(out), "--shard-size", "4", "--batch-size", "3", "--cluster", "inprocess",
            "--max-failed-fraction", "1"]  # half the films are bad on purpose
    # a file that disappears after the manifest was written fails at read time, during scoring
    from pipeline.run import scoring

    real = scoring.build_manifest

    def build_then_delete(*a, **k):
        result = real(*a, **k)
        (d / "gone.png").unlink()
        return result

    scoring.build_manifest = build_then_delete
    try:
        assert main(args) == 0
    finally:
        scoring.build_manifest = real
    run_dir = next((out / "runs").iterdir())
    errors = pq.read_table(run_dir / "errors.parquet").to_pandas().set_index("image_id")
    assert errors.loc["trunc", "stage"] == "decode" and "truncated" in errors.loc["trunc", "message"]
    assert errors.loc["empty", "stage"] == "read" and "0 bytes" in errors.loc["empty", "message"]
    assert errors.loc["text", "stage"] == "decode" and errors.loc["text", "error_class"] == "UnidentifiedImageError"
    assert errors.loc["gone", "stage"] == "read" and errors.loc["gone", "error_class"] == "FileNotFoundError"
    assert sorted(errors.index) == ["empty", "gone", "text", "trunc"]
    preds = pq.read_table(sorted(run_dir.glob("predictions/*.parquet"))).to_pandas()
    assert sorted(preds.image_id) == ["deep", "good1", "good2", "rgba"]
    run = json.loads((run_dir / "run.json").read_text())
    assert run["counts"]["scored"] == 4 and run["counts"]["failed"] == 4
    assert run["counts"]["source_modes"]["RGBA"] == 1 and run["counts"]["source_modes"]["I;16"] == 1
    g = zarr.open_group(str(run_dir / "maps.zarr"), mode="r")
    failed_rows = errors.row.to_numpy()
    assert np.isnan(g["cam"].get_orthogonal_selection((np.sort(failed_rows),))).all()
    assert np.isfinite(g["cam"].get_orthogonal_selection((np.sort(preds.row.to_numpy()),))).all()
    issues = pq.read_table(out / "manifest_issues.parquet").to_pandas()
    assert sorted(issues.reason) == ["bad_row", "missing_file"]
