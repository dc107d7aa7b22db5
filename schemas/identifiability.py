"""Identifiability tables under OUT/runs/<model_version>/."""

from __future__ import annotations

import pyarrow as pa

from .meta import with_metadata

IDENT_SCHEMA_VERSION = "1.3"  # 1.2: identifiability_map.probe; 1.3: AUCs within folds (0.5 at chance), identifiability.p_value
_F = pa.float64()
_METRICS = [pa.field(s, _F) for s in ("auc", "auc_lo", "auc_hi", "balanced_accuracy", "chance")]


def identifiability_schema(**meta) -> pa.Schema:
    return with_metadata(pa.schema([pa.field("target", pa.string(), nullable=False), pa.field("features", pa.string(), nullable=False),
                                    pa.field("n", pa.int64(), nullable=False), pa.field("n_per_class", pa.string())] + _METRICS
                                   # within-fold permutation test, one-sided (above chance)
                                   + [pa.field("p_value", _F), pa.field("notes", pa.string())]), schema="identifiability", schema_version=IDENT_SCHEMA_VERSION, **meta)


def identifiability_map_schema(**meta) -> pa.Schema:
    return with_metadata(pa.schema([pa.field("target", pa.string(), nullable=False), pa.field("cell_row", pa.int8(), nullable=False),
                                    pa.field("cell_col", pa.int8(), nullable=False), pa.field("n", pa.int64(), nullable=False)] + _METRICS
                                   # within-fold permutation z and one-sided p (above chance); Holm over the target's cells
                                   + [pa.field("z", _F), pa.field("p_value", _F), pa.field("p_holm", _F),
                                      pa.field("significant", pa.bool_(), nullable=False),
                                      pa.field("probe", pa.string())]),  # the per-cell estimator, e.g. "ridge(lam=4)"
                         schema="identifiability_map", schema_version=IDENT_SCHEMA_VERSION, **meta)


def identifiability_scores_schema(**meta) -> pa.Schema:
    return with_metadata(pa.schema([pa.field("row", pa.int64(), nullable=False), pa.field("image_id", pa.string(), nullable=False),
                                    pa.field("target", pa.string(), nullable=False), pa.field("score", _F, nullable=False),
                                    pa.field("predicted", pa.string(), nullable=False)]),
                         schema="identifiability_scores", schema_version=IDENT_SCHEMA_VERSION, **meta)


# each with _lo/_hi: percentile CIs of a bootstrap over patients (pipeline/analysis/site_confounding.py)
PREVALENCE_CONFOUNDING_AUCS = [f"{c}{s}" for c in ("auc_site_prevalence", "auc_model", "auc_gap", "auc_model_within_site") for s in ("", "_lo", "_hi")]
PREVALENCE_CONFOUNDING_AUCS.insert(3, "auc_site_prevalence_oof")


def prevalence_confounding_schema(**meta) -> pa.Schema:
    return with_metadata(pa.schema([pa.field("finding", pa.string(), nullable=False), pa.field("stratum", pa.string(), nullable=False),
                                    pa.field("stratum_value", pa.string(), nullable=False), pa.field("n", pa.int64(), nullable=False),
                                    pa.field("prevalence", _F), pa.field("n_sites", pa.int64())]
                                   + [pa.field(c, _F) for c in PREVALENCE_CONFOUNDING_AUCS]),
                         schema="prevalence_confounding", schema_version=IDENT_SCHEMA_VERSION, **meta)
