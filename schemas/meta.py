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


# Every table a run writes carries its run's model version as a column (not only in the file's
# metadata), so that a query over runs/*/ can tell runs apart with WHERE model_version = ...
MODEL_VERSION_FIELD = pa.field("model_version", pa.string(), nullable=False)


def with_model_version_field(arrow_schema: pa.Schema) -> pa.Schema:
    """The schema as written: the declared columns, then model_version (unless declared already)."""
    if MODEL_VERSION_FIELD.name in arrow_schema.names:
        return arrow_schema
    return arrow_schema.append(MODEL_VERSION_FIELD)


def with_model_version(table: pa.Table, model_version: str) -> pa.Table:
    """Add the model_version column to a run's table before it is written."""
    if MODEL_VERSION_FIELD.name in table.column_names:
        return table
    return table.append_column(MODEL_VERSION_FIELD, pa.array([model_version] * table.num_rows, pa.string()))


def pandas_dtypes(arrow_schema: pa.Schema, dtypes: dict[str, str]) -> pa.Schema:
    """Record pandas dtypes in the file (the 'pandas' metadata pyarrow reads back), so that for
    example a nullable boolean column reads back as pandas' 'boolean' rather than object."""
    import pandas as pd

    frame = pd.DataFrame({f.name: pd.Series([], dtype=dtypes.get(f.name, "object")) for f in arrow_schema})
    md = dict(arrow_schema.metadata or {})
    md[b"pandas"] = pa.Schema.from_pandas(frame, preserve_index=False).metadata[b"pandas"]
    return arrow_schema.with_metadata(md)
