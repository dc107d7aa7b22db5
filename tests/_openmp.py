"""Imported by conftest before torch: two test processes share two cores, each with torch's two
intra-op threads, and OpenMP's default spin-wait burns the core the other process needs. Measured on
this machine (test_precision + test_cam + test_checkpoint, -n 2, load ~4): 28-49 s -> 15.5 s wall,
44-51 s -> 22.5 s user CPU. Job subprocesses inherit it; a value the user set is kept."""

import os
import sys

if "torch" in sys.modules:  # too late to take effect: say so rather than measure the wrong thing
    raise RuntimeError("tests/_openmp.py must be imported before torch (first import in tests/conftest.py)")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
