"""Declared Arrow schemas and the Zarr layout of every output. Nothing is written with an inferred schema."""

from .manifest import MANIFEST_SCHEMA_VERSION, issues_schema, manifest_schema
from .outputs import (
    OUTPUT_SCHEMA_VERSION,
    ZARR_ARRAYS,
    errors_schema,
    predictions_schema,
)

__all__ = [
    "MANIFEST_SCHEMA_VERSION",
    "OUTPUT_SCHEMA_VERSION",
    "ZARR_ARRAYS",
    "errors_schema",
    "issues_schema",
    "manifest_schema",
    "predictions_schema",
]
