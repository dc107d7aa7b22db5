"""cxr-audit library: every per-item step of the scoring job as a plain function.

Layers (each subpackage's docstring says what it owns and may import; ``tests/test_layers.py``
checks it): ``core`` (errors, finding order, redaction) <- ``store`` (output layout) and
``inference`` (decode, network, maps) <- ``sources`` (datasets, manifest) <- ``analysis``
(statistics over finished outputs) <- ``reporting`` (the HTML report) <- ``run`` (one scoring
run on a Dask client). ``demo`` builds the embedded default dataset and model. ``jobs`` imports
``pipeline``; ``pipeline`` imports ``schemas``; never the other way.
"""

__version__ = "0.1.0"
