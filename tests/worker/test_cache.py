"""The preprocessed cache: hit on a rerun with a new model, missed after a source file changes."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq

from jobs.score_dataset import main

from tests.conftest import TINY_ARCH, png_bytes


def _run(data, out, ckpt, *extra):
    assert main(["--dataset", f"nih:{data}", "--checkpoint", ckpt, "--arch", TINY_ARCH, "--out", str(out),
                 "--shard-size", "16", "--cluster", "inprocess", *extra]) == 0
    latest = json.loads((out / "latest.json").read_text())["model_version"]
    run = json.loads((out / "runs" / latest / "run.json").read_text())
    preds = pq.read_table(sorted((out / "runs" / latest).glob("predictions/*.parquet"))).sort_by("row")
    return run["counts"]["cache_now"], preds


def test_cache_hits_on_new_model_and_misses_on_changed_source(tmp_path, tiny_nih, tiny_ckpt):
    data = tmp_path / "data"
    shutil.copytree(tiny_nih, data)
    out = tmp_path / "out"
    first, _ = _run(data, out, tiny_ckpt)
    assert first == {"hits": 0, "misses": 40}
    second, cached_preds = _run(data, out, "random:4")
    assert second == {"hits": 40, "misses": 0}
    _, uncached_preds = _run(data, tmp_path / "nocache", "random:4", "--cache", "none")
    assert cached_preds.equals(uncached_preds)  # cached pixels are exactly the decoded ones

    victim = sorted(data.glob("images_*/images/*.png"))[5]
    victim.write_bytes(png_bytes(np.full((128, 128), 200, np.uint8)))
    third, preds3 = _run(data, out, "random:6")
    assert third == {"hits": 39, "misses": 1}
    _, fresh3 = _run(data, tmp_path / "nocache3", "random:6", "--cache", "none")
    assert preds3.equals(fresh3)  # the changed film was decoded anew, not served stale

    fourth, _ = _run(data, out, "random:7", "--high-bit-depth", "rescale")
    assert fourth == {"hits": 0, "misses": 40}  # another preprocessing configuration, another cache
    assert len([p for p in (out / "cache").iterdir() if p.is_dir()]) == 2
