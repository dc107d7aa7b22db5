"""Code that runs inside a Dask worker process: the shard task and what it needs there.

Owns: the shard work unit (``shards``), the spec a task receives (``runspec``), the per-shard task
(``score_shard``), its decode processes (``decode_pool``), the content-hash cache (``cache``),
worker log files (``logs``) and the import warm-up of a fresh worker (``preload``). May import:
``pipeline.core``, ``pipeline.io``, ``pipeline.store``, ``pipeline.inference``, ``pipeline.sources``
and ``pipeline.config``; never the driver (``pipeline.run``): a worker receives what it needs.
"""
