"""Per-run outputs under OUT/runs/<model_version>/: predictions parts, errors, maps.zarr."""

from __future__ import annotations

import pyarrow as pa

from .meta import with_metadata

# What maps.zarr/cell_features holds (written into the store's attributes).
CELL_FEATURES = "relu(features) of each grid cell, full width, float16"
OUTPUT_SCHEMA_VERSION = "1.0"


def predictions_schema(findings: tuple[str, ...], model_version: str) -> pa.Schema:
    fields = [
        pa.field("row", pa.int64(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
    ] + [pa.field(f, pa.float32(), nullable=False) for f in findings]
    return with_metadata(
        pa.schema(fields),
        schema="predictions",
        schema_version=OUTPUT_SCHEMA_VERSION,
        findings=list(findings),
        model_version=model_version,
    )


def errors_schema(model_version: str) -> pa.Schema:
    return with_metadata(
        pa.schema(
            [
                pa.field("row", pa.int64(), nullable=False),
                pa.field("image_id", pa.string(), nullable=False),
                pa.field("path", pa.string(), nullable=False),
                pa.field("stage", pa.string(), nullable=False),  # read, decode, preprocess, infer
                pa.field("error_class", pa.string(), nullable=False),
                pa.field("message", pa.string(), nullable=False),
            ]
        ),
        schema="errors",
        schema_version=OUTPUT_SCHEMA_VERSION,
        model_version=model_version,
    )


# Dimension names of each kind of array (Zarr v3 dimension_names, what xarray reads).
ZARR_DIMS = {
    "FHW": ("image", "finding", "cell_row", "cell_col"),
    "D": ("image", "embedding_dim"),
    "CK": ("image", "cell", "cell_feature"),
    "": ("image",),
}
# Coordinate arrays written once by the driver: image (= manifest row), finding names, cell indices.
ZARR_COORDS = ("image", "finding", "cell_row", "cell_col", "cell")

# maps.zarr: arrays indexed by manifest row; chunk length along rows == shard size.
# name -> (dtype, trailing shape kind, fill value). Rows that failed stay at the fill value.
ZARR_ARRAYS = {
    "cam": ("float32", "FHW", float("nan")),  # ln(sigmoid(z) / p_baseline)
    "cell_logit": ("float32", "FHW", float("nan")),  # z = W_k . relu(F)[:, i, j] + b_k
    "embedding": ("float16", "D", float("nan")),  # mean_ij relu(F)
    "cell_features": ("float16", "CK", float("nan")),  # (H*W, D): each cell's full relu(features), for the per-cell probes
    "image_id": ("str", "", ""),
}
