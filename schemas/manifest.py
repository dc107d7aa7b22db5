"""OUT/manifest.parquet and OUT/manifest_issues.parquet."""

from __future__ import annotations

import pyarrow as pa

from .meta import pandas_dtypes, with_metadata

MANIFEST_SCHEMA_VERSION = "1.0"

MANIFEST_BASE_FIELDS = [
    pa.field("row", pa.int64(), nullable=False),  # stable across reruns; indexes maps.zarr
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("dataset", pa.string(), nullable=False),
    pa.field("site", pa.string(), nullable=False),
    pa.field("path", pa.string(), nullable=False),
    pa.field("patient_id", pa.string()),
    pa.field("view_position", pa.string()),  # 'AP', 'PA', 'LL', 'LATERAL', ... or null
    pa.field("sex", pa.string()),  # 'M', 'F' or null
    pa.field("age", pa.int16()),  # years; impossible values are nulled and reported
    pa.field("split", pa.string()),  # 'train_val', 'test', ... or null
]
EXTRA_FIELD = "extra"  # JSON of any further manifest columns (department, scanner, ward, ...)


def manifest_schema(findings: tuple[str, ...]) -> pa.Schema:
    fields = list(MANIFEST_BASE_FIELDS)
    fields.append(pa.field(EXTRA_FIELD, pa.string()))
    fields += [pa.field(f, pa.bool_()) for f in findings]  # null = not labelled
    schema = with_metadata(pa.schema(fields), schema="manifest", schema_version=MANIFEST_SCHEMA_VERSION, findings=list(findings))
    # pandas reads labels back as nullable 'boolean' and age as 'Int16' (not object / float)
    return pandas_dtypes(schema, {"row": "int64", "age": "Int16", **{f: "boolean" for f in findings}})


ISSUES_SCHEMA = pa.schema(
    [
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("image_id", pa.string()),
        pa.field("path", pa.string()),
        pa.field("reason", pa.string(), nullable=False),  # see pipeline.sources.manifest.ISSUE_REASONS
        pa.field("detail", pa.string()),
        pa.field("action", pa.string(), nullable=False),  # 'dropped', 'nulled', 'kept'
    ]
)


def issues_schema() -> pa.Schema:
    return with_metadata(ISSUES_SCHEMA, schema="manifest_issues", schema_version=MANIFEST_SCHEMA_VERSION)
