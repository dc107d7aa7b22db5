"""The workers' preload imports the scoring code before the worker takes a task."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dask_setup_returns_with_the_scoring_code_imported():
    """A background import raced the first task's unpickling (a partially initialised fsspec killed
    the worker): the imports are done when dask_setup returns, in the worker's own thread."""
    code = ("import sys, threading; from pipeline.worker.preload import SCORING_IMPORTS, dask_setup; "
            "before = threading.active_count(); dask_setup(None); "
            "print(all(m in sys.modules for m in SCORING_IMPORTS + ('fsspec', 'torch')), threading.active_count() == before)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "True"]
