"""From a film's bytes to predictions and 7x7 maps: decoding, the network, the CAM head.

Owns: bounded reads and decoding (``images``, ``read_limits``), architectures and model loading
(``model``, ``tiny_net``), the architecture registry (``architectures``), safe checkpoints
(``checkpoint``), the CAM head and the log-ratio maps (``cam``), precision modes (``precision``) and
the float64 reference (``reference``). Add an architecture: one ``ARCHITECTURES.register`` line in
``architectures``. May import: ``pipeline.core`` only. Nothing here knows about shards,
runs or Dask.
"""
