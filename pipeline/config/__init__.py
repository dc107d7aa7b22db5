"""The one configuration of a run: flags, ``--config`` YAML and their defaults, resolved once.

Owns: ``run_config`` (``ScoreConfig`` and its sections, the flag table, YAML in and out, resolving
a run's model and data into ``Resolved``). Every job reads its configuration here; the driver
resolves it once and hands the result down. May import: ``pipeline.core``, ``pipeline.io``,
``pipeline.store`` (the output folder), ``pipeline.sources`` and ``pipeline.inference`` (their option classes and registries) and
``pipeline.analysis`` (its settings).
"""
