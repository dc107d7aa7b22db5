"""OUT/drift/<from>__<to>/ tables."""

from __future__ import annotations

import pyarrow as pa

from .meta import with_metadata

DRIFT_SCHEMA_VERSION = "1.0"
_F = pa.float64()


def finding_drift_schema(**meta) -> pa.Schema:
    stats = ["mean_prob_delta", "p05_prob_delta", "p50_prob_delta", "p95_prob_delta", "mean_logit_delta", "max_abs_logit_delta",
             "rank_correlation", "auc_from", "auc_to", "auc_delta", "auc_delta_lo", "auc_delta_hi"]
    return with_metadata(pa.schema([pa.field("finding", pa.string(), nullable=False), pa.field("n", pa.int64(), nullable=False),
                                    pa.field("n_labelled", pa.int64(), nullable=False)] + [pa.field(s, _F) for s in stats]),
                         schema="finding_drift", schema_version=DRIFT_SCHEMA_VERSION, **meta)


def region_drift_schema(**meta) -> pa.Schema:
    return with_metadata(pa.schema([
        pa.field("finding", pa.string(), nullable=False), pa.field("cell_row", pa.int8(), nullable=False), pa.field("cell_col", pa.int8(), nullable=False),
        pa.field("stratum", pa.string(), nullable=False), pa.field("stratum_value", pa.string(), nullable=False),
        pa.field("n", pa.int64()), pa.field("mean_from", _F), pa.field("mean_to", _F), pa.field("mean_delta", _F),
        pa.field("mean_contribution_from", _F), pa.field("mean_contribution_to", _F), pa.field("mean_contribution_delta", _F),
        pa.field("rank", pa.int32(), nullable=False),
    ]), schema="region_drift", schema_version=DRIFT_SCHEMA_VERSION, **meta)


def with_versions(table: pa.Table, from_mv: str, to_mv: str) -> pa.Table:
    """Every drift table names its two runs as columns, so that a query over drift/*/ can select a pair."""
    for name, value in (("from_version", from_mv), ("to_version", to_mv)):
        if name not in table.column_names:
            table = table.append_column(pa.field(name, pa.string(), nullable=False), pa.array([value] * table.num_rows, pa.string()))
    return table
