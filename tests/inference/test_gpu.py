"""GPU checks (marker `gpu`, skipped without CUDA): the local-cuda profile scores the shared films
with strict fp32 and the same outputs as the CPU within the parity contract."""

import json

import pytest
import torch

from jobs.score_dataset import main

from tests.conftest import NIH_SHARED, shared_or_skip

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_local_cuda_profile_scores_the_shared_films(tmp_path):
    pytest.importorskip("dask_cuda", reason="the cuda extra (dask-cuda) is not installed")
    shared_or_skip()
    out = tmp_path / "out"
    args = ["--dataset", f"nih:{NIH_SHARED}", "--checkpoint", "random:0", "--out", str(out), "--cluster", "local-cuda",
            "--shard-size", "64", "--batch-size", "32", "--cache", "none"]
    assert main(args) == 0
    run_dir = next((out / "runs").iterdir())
    rec = json.loads(next((run_dir / "_shards").glob("*.json")).read_text())
    assert rec["device"] == "cuda" and rec["precision"] == "fp32" and rec["decode_workers"] >= 1
    cpu = tmp_path / "cpu"
    assert main(args[:5] + [str(cpu), "--cluster", "local", "--device", "cpu", "--shard-size", "64", "--batch-size", "32", "--cache", "none"]) == 0
    import pyarrow.parquet as pq

    a = pq.read_table(sorted(run_dir.glob("predictions/*.parquet"))).sort_by("row").to_pandas()
    b = pq.read_table(sorted((cpu / "runs" / run_dir.name).glob("predictions/*.parquet"))).sort_by("row").to_pandas()
    num = [c for c in a.columns if a[c].dtype.kind == "f"]
    assert (a[num] - b[num]).abs().max().max() <= 1e-4
