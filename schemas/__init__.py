"""Declared Arrow schemas and the Zarr layout of every output, and the JSON records beside them
(run.json, shard records). Nothing is written with an inferred schema."""

from .manifest import MANIFEST_SCHEMA_VERSION, issues_schema, manifest_schema
from .outputs import (
    OUTPUT_SCHEMA_VERSION,
    ZARR_ARRAYS,
    errors_schema,
    predictions_schema,
)
from .records import RUN_RECORD_VERSION, SHARD_RECORD_VERSION, RunRecord, ShardRecord

__all__ = [
    "MANIFEST_SCHEMA_VERSION",
    "OUTPUT_SCHEMA_VERSION",
    "RUN_RECORD_VERSION",
    "SHARD_RECORD_VERSION",
    "RunRecord",
    "ShardRecord",
    "ZARR_ARRAYS",
    "errors_schema",
    "issues_schema",
    "manifest_schema",
    "predictions_schema",
]
