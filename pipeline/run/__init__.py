"""One scoring run: configuration, shards, the Dask tasks, resume, locks, the cluster.

Owns: the one configuration of a run and its resolution (``config``), the shard spec derived from
it (``runspec``), shards (``shards``), the per-shard task (``score_shard``)
and its decode processes (``decode_pool``), scoring a dataset on a client (``scoring``), the
content-hash cache (``cache``), the lock (``run_lock``), run checks (``run_check``), cluster
profiles (``cluster``), progress events (``progress``) and early validation (``validate``).
May import every other layer of ``pipeline``; nothing outside ``jobs`` imports it.
"""
