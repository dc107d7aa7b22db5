"""Aggregate tables under OUT/runs/<model_version>/. Shared column names so that they join:
finding, cell_row, cell_col (0-6, row 0 at the top of the film), stratum, stratum_value, n."""

from __future__ import annotations

import pyarrow as pa

from .meta import with_metadata

AGGREGATE_SCHEMA_VERSION = "1.0"
_KEYS = [
    pa.field("finding", pa.string(), nullable=False),
    pa.field("stratum", pa.string(), nullable=False),
    pa.field("stratum_value", pa.string(), nullable=False),
]
_F = pa.float64()


def _schema(name: str, fields: list[pa.Field], **meta) -> pa.Schema:
    return with_metadata(pa.schema(fields), schema=name, schema_version=AGGREGATE_SCHEMA_VERSION, **meta)


def region_stats_schema(**meta) -> pa.Schema:
    stats = ["mean", "std", "min", "max", "p05", "p25", "p50", "p75", "p95", "share_positive", "mean_positive_part",
             "mean_contribution", "mean_abs_contribution",
             # 95% CIs from the mergeable sums (pipeline/analysis/region_stats.py): the mean; the cell minus the mean of the
             # image's other cells (paired per image)
             "mean_lo", "mean_hi", "diff_rest", "diff_rest_lo", "diff_rest_hi"]
    return _schema("region_stats", [_KEYS[0], pa.field("cell_row", pa.int8(), nullable=False), pa.field("cell_col", pa.int8(), nullable=False),
                                    *_KEYS[1:], pa.field("n", pa.int64(), nullable=False)] + [pa.field(s, _F) for s in stats], **meta)


def region_contrasts_schema(**meta) -> pa.Schema:
    """A cell's mean map value in one stratum value minus another (AP - PA), with Welch's 95% CI."""
    return _schema("region_contrasts", [_KEYS[0], pa.field("cell_row", pa.int8(), nullable=False), pa.field("cell_col", pa.int8(), nullable=False),
                                        _KEYS[1], pa.field("value_a", pa.string(), nullable=False), pa.field("value_b", pa.string(), nullable=False),
                                        pa.field("n_a", pa.int64(), nullable=False), pa.field("n_b", pa.int64(), nullable=False),
                                        pa.field("diff", _F), pa.field("diff_lo", _F), pa.field("diff_hi", _F)], **meta)


FINDING_SUMMARY_SHARES = ["pos_share_ring", "pos_share_corners", "pos_share_inner", "pos_share_anatomy",
                          "contrib_share_ring", "contrib_share_corners", "contrib_share_inner", "contrib_share_anatomy"]


def finding_summary_schema(**meta) -> pa.Schema:
    return _schema("finding_summary", _KEYS + [pa.field("n", pa.int64(), nullable=False)] + [pa.field(s, _F) for s in FINDING_SUMMARY_SHARES], **meta)


def metrics_schema(**meta) -> pa.Schema:
    return _schema("metrics", _KEYS + [pa.field("n", pa.int64(), nullable=False)] + [pa.field(s, _F) for s in ("prevalence", "auc", "auc_lo", "auc_hi", "ece")], **meta)


def localization_schema(**meta) -> pa.Schema:
    cols = ["inbox_share", "inbox_share_lo", "inbox_share_hi", "pointing_hit_rate", "pointing_lo", "pointing_hi", "chance", "chance_pointing"]
    return _schema("localization", [_KEYS[0], pa.field("n", pa.int64(), nullable=False)] + [pa.field(s, _F) for s in cols], **meta)


def localization_boxes_schema(**meta) -> pa.Schema:
    return _schema("localization_boxes", [
        pa.field("row", pa.int64(), nullable=False), pa.field("image_id", pa.string(), nullable=False), _KEYS[0],
        pa.field("x", _F), pa.field("y", _F), pa.field("w", _F), pa.field("h", _F),
        pa.field("inbox_share", _F), pa.field("pointing_hit", pa.bool_()), pa.field("chance", _F), pa.field("chance_pointing", _F),
    ], **meta)


SCORECARD_SCHEMA_VERSION = "1.0"


def scorecard_schema(**meta) -> pa.Schema:
    """The scorecard's verdicts (pipeline/analysis/verdicts.py): one row per finding and rule.

    rule: ``location`` (best border cell's AUC minus the anatomy's), ``stratum:COL`` (pooled AUC minus
    the AUC within COL's values), ``pointing`` (hit rate minus chance), ``reads:COL`` (within-label AUC
    of the score for COL, described, never marked). ``p_value``: one-sided, in the direction of a
    shortcut; ``p_adjusted``: Holm over every marking row of the run that has a p-value (null for
    ``reads:`` rows and untested ones); ``mark``: p_adjusted <= alpha; ``reason``: what was compared,
    or why a rule was not tested."""
    fields = [_KEYS[0], pa.field("rule", pa.string(), nullable=False), pa.field("n", pa.int64(), nullable=False),
              pa.field("n_positive", pa.int64(), nullable=False)]
    fields += [pa.field(s, _F) for s in ("statistic", "ci_lo", "ci_hi", "p_value", "p_adjusted")]
    fields += [pa.field("mark", pa.bool_(), nullable=False), pa.field("reason", pa.string(), nullable=False)]
    return with_metadata(pa.schema(fields), schema="scorecard", schema_version=SCORECARD_SCHEMA_VERSION, **meta)


def cell_separation_schema(**meta) -> pa.Schema:
    """Per finding and cell: the AUC of the cell's logit for the finding's label over the labelled
    films (how well that cell alone separates positives from negatives), patient-clustered 95% CI."""
    return with_metadata(pa.schema([_KEYS[0], pa.field("cell_row", pa.int8(), nullable=False), pa.field("cell_col", pa.int8(), nullable=False),
                                    pa.field("n", pa.int64(), nullable=False), pa.field("n_positive", pa.int64(), nullable=False),
                                    pa.field("auc", _F), pa.field("auc_lo", _F), pa.field("auc_hi", _F)]),
                         schema="cell_separation", schema_version=SCORECARD_SCHEMA_VERSION, **meta)
