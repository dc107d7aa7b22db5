"""Datasets in, one manifest out: adapters per dataset, label harmonisation, path confinement.

Owns: the adapter registry and what adapters share (``source_base``), the NIH/CSV adapters
(``adapters``), CheXpert/MIMIC (``chexpert``), PadChest (``padchest``), label mapping
(``harmonise``), the manifest and its validation (``manifest``) and where a dataset's files may be
(``paths``). Add a dataset here: one ``load_*(spec, findings, options)`` function and one
``ADAPTERS.register`` line in ``source_base``.
May import: ``pipeline.core``, ``pipeline.io`` (bounded reads, fsspec helpers), ``pipeline.store``
and ``schemas``; never ``pipeline.inference``.
"""
