"""Reaching bytes wherever fsspec reaches: bounded, retried reads of inputs and fsspec path helpers.

Owns: bounded reads (``reads``: ``ReadLimits``, ``read_bytes``, ``source_info``, the transient-error
retry) and URL helpers (``fs``). May import: ``pipeline.core`` only; every layer that touches
files (sources, inference, store, worker) reads through here.
"""
