"""cxr-audit library: every per-item step of the scoring job as a plain function."""

__version__ = "0.1.0"
