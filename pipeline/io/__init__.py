"""Reaching bytes wherever fsspec reaches: bounded, retried reads of inputs, rooted filesystems and
fsspec path helpers.

Owns: bounded reads (``reads``: ``ReadLimits``, ``read_bytes``, ``source_info``, the transient-error
retry), the rooted filesystem (``location``: ``Location``, a URL with the options that open it, and
``InputOptions``, the options each input is opened with, never the output's) and URL helpers
(``fs``). May import: ``pipeline.core`` only; every layer that touches files (sources, inference,
store, worker) reads through here.
"""
