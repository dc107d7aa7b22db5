"""From a film's bytes to predictions and maps on the model's grid (7x7, 16x16): decoding, the
network, the CAM head.

Owns: decoding (``images``, ``preprocess_config``; the preprocessing registry
``images.PREPROCESSING``, torchxrayvision's in ``xrv_preprocess``), architectures and model loading
(``model``, ``tiny_net``, torchxrayvision's networks in ``xrv_nets`` and their torch-free profiles in
``xrv_profiles``), the architecture registry (``architectures``), safe checkpoints (``checkpoint``),
the CAM head, the log-ratio maps and torchxrayvision's calibration (``cam``), precision modes
(``precision``) and the float64 reference (``reference``). Add an architecture: one
``register_arch`` line in ``architectures``. May import: ``pipeline.core`` and ``pipeline.io`` (bounded reads). Nothing here knows about shards,
runs or Dask.
"""
