"""Key-value metadata carried in every Parquet file we write."""

from __future__ import annotations

import json

import pyarrow as pa


def with_metadata(arrow_schema: pa.Schema, **values) -> pa.Schema:
    md = dict(arrow_schema.metadata or {})
    for k, v in values.items():
        md[f"cxr_audit.{k}".encode()] = (v if isinstance(v, str) else json.dumps(v)).encode()
    return arrow_schema.with_metadata(md)


def read_metadata(schema: pa.Schema) -> dict:
    out = {}
    for k, v in (schema.metadata or {}).items():
        key = k.decode()
        if key.startswith("cxr_audit."):
            text = v.decode()
            try:
                out[key[len("cxr_audit."):]] = json.loads(text)
            except json.JSONDecodeError:
                out[key[len("cxr_audit."):]] = text
    return out
