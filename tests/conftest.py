from __future__ import annotations

import io
import os
from pathlib import Path

from . import _openmp  # noqa: F401 - first: OMP_WAIT_POLICY must be set before torch loads OpenMP

import numpy as np
import pytest
from PIL import Image

# torch and the pipeline are imported by the fixtures that need them, not here: xdist's controller
# process loads this file too but runs no test, and those imports cost it ~5 s before any worker starts.

# ../shared beside the repository; CXR_AUDIT_SHARED points elsewhere (e.g. from a git worktree)
SHARED = Path(os.environ.get("CXR_AUDIT_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")
NIH_SHARED = SHARED / "data" / "nih"
TINY_ARCH = "pipeline.inference.tiny_net:tiny_cam_net"


def shared_or_skip(path: Path = NIH_SHARED) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: the real NIH material lives in ../shared (read-only, not in the repo)")
    return path


def png_bytes(arr: np.ndarray, mode: str | None = None) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(b, "PNG") if mode else Image.fromarray(arr).save(b, "PNG")
    return b.getvalue()


def roc_auc_score(*args, **kwargs):
    """scikit-learn's, imported on first use: every test process collects every test file, and
    sklearn's import (~1.5 s) need not be paid by those that run none of its tests."""
    from sklearn.metrics import roc_auc_score as sklearn_auc

    return sklearn_auc(*args, **kwargs)


def _report_skipped_in_tests(store, info, agg=None, inputs=None) -> None:
    """Stands in for pipeline.run.lifecycle.report_step: records the step as `--no-report` does."""
    import logging

    from pipeline.run.lifecycle import record_step

    logging.getLogger("tests").info("report: skipped (the tests skip it unless they ask for report_after_run)")
    record_step(store, info, "report", "skipped")
    return None


@pytest.fixture(scope="session", autouse=True)
def _complete_runs_skip_their_report():
    """A complete run ends by writing its HTML report: matplotlib, seconds per run, the largest
    fixed cost of a tiny run. The step never fails a run (pipeline.reporting.hook swallows and logs
    any error), so a test that does not read the report asserts nothing about it: tests skip it
    unless they ask for the `report_after_run` fixture (tests/reporting/test_report.py tests the report
    itself), and run.json records the step as "skipped", as `--no-report` does (not "failed": a test
    can assert it). Jobs started as subprocesses still write theirs. Yields the real report step."""
    import pipeline.run.lifecycle as lifecycle

    real = lifecycle.report_step
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lifecycle, "report_step", _report_skipped_in_tests)
        yield real


@pytest.fixture
def report_after_run(monkeypatch, _complete_runs_skip_their_report):
    """The job writes its report at the end of a complete run, as it does outside the tests."""
    import pipeline.run.lifecycle as lifecycle

    monkeypatch.setattr(lifecycle, "report_step", _complete_runs_skip_their_report)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def films(tmp_path, rng):
    """24 small grayscale PNGs and a file that is not one: (paths, bad path), for the decode-process tests."""
    paths = []
    for i in range(24):
        p = tmp_path / f"f{i:02d}.png"
        p.write_bytes(png_bytes(rng.integers(0, 256, (64 + i, 80), dtype=np.uint8)))
        paths.append(str(p))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    return paths, str(tmp_path / "bad.png")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> str:
    import torch

    from pipeline.core.findings import CHEXNET_FINDINGS
    from pipeline.inference.checkpoint import save_safetensors
    from pipeline.inference.tiny_net import TinyCAMNet

    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    torch.manual_seed(7)
    net = TinyCAMNet(len(CHEXNET_FINDINGS))
    with torch.no_grad():  # non-trivial BatchNorm statistics so eval mode matters
        net.features[-1].running_mean.uniform_(-0.5, 0.5)
        net.features[-1].running_var.uniform_(0.5, 2.0)
    save_safetensors(net.state_dict(), str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_nih(tmp_path_factory) -> Path:
    """40 synthetic films in the ChestX-ray14 layout (two images_0XX folders)."""
    from pipeline.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("nih") / "ChestX-ray14", n=40, size=128, seed=3)


# Files that take longest, measured (per-test durations summed per file, from a full `--junitxml` run),
# first: `-n 2 --dist loadfile` hands whole files to the two workers in collection order
# (`--no-loadscope-reorder` in pyproject: by default xdist reorders files by their number of tests,
# which sent the one-test SLURM file and the two-test resume file to the end, where they ran alone).
# A long file left out of this list starts last and runs alone at the end (test_nightly, the longest,
# was missing: the suite ended with one worker idle).
LONGEST_FIRST = ("test_nightly", "test_lose_nothing", "test_no_shared_disk", "test_faults", "test_s3_faults", "test_xrv", "test_verdicts", "test_report", "test_aggregates",
                 "test_job", "test_s3_outputs", "test_identifiability_stats", "test_s3_inputs", "test_resume", "test_adapters", "test_manifest", "test_queries",
                 "test_runs", "test_checkpoint", "test_layout", "test_layers", "test_precision", "test_site_confounding",
                 "test_cli", "test_identifiability", "test_cache", "test_drift", "test_decode_pool", "test_hostile_inputs",
                 "test_lifecycle", "test_cell_fits", "test_slurm", "test_packaging")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: the order within a file is kept
