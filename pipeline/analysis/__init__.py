"""What the outputs mean: region statistics, identifiability probes, drift, mergeable aggregates.

Owns: the dataset-level aggregates as a tree reduction (``aggregate``, ``aggregate_inputs``),
region statistics and their intervals (``region_stats``, ``strata``), hospital identifiability and
its statistics (``identifiability``, ``probe_stats``, ``site_confounding``), metrics, drift between
runs and expert-box localisation. May import: ``pipeline.core``, ``pipeline.store`` and ``schemas``;
never ``pipeline.run`` (analysis reads finished outputs, it does not run scoring).
"""
