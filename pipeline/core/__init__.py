"""The vocabulary every layer shares: error types, the finding order, secret redaction.

Owns: ``errors`` (one exception type per failure, each saying what to do), ``findings`` (the
14 CheXNet findings and their order, which every output carries), ``redact`` (credentials never
reach a log or an output), ``registry`` (name -> implementation tables that list their names).
May import: nothing from ``pipeline`` (``schemas`` only).
"""
