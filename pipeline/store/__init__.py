"""The output layout and its storage: where every public file lives and how it is written.

Owns: the output folder as one object (``layout.OutputStore``: every public path, the storage
options, atomic writes, the exclusive lock create), fsspec access (``storage``), the Zarr map
store (``maps_store``), shard records (``bookkeeping``) and their verification against the files
(``shard_check``), the run index and ``latest.json`` (``run_index``), reading predictions back
(``predictions``) and the DuckDB views (``query_views``). May import: ``pipeline.core``,
``pipeline.io`` and ``schemas``; never the run, the model or the analysis.
"""
