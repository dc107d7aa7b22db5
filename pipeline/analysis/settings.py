"""The settings of the dataset-level aggregates, importable without numpy, pandas or scikit-learn
(the run configuration, ``pipeline.config.run_config``, embeds ``AggregateConfig`` as its ``aggregate``
section and must validate in well under a second)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BY = ("view_position", "site", "sex", "age_band", "split")  # strata: alone and crossed with the label
DEFAULT_TARGETS = ("site", "view_position", "sex", "age_band")  # targets of the identifiability probes


@dataclass(frozen=True)
class AggregateConfig:
    """What ``aggregate_run`` computes (flags of jobs.aggregate; ``--identifiability`` of the scoring job).

    Two bootstraps, two counts, each written once: ``n_boot`` here (the localisation CIs) and
    ``ProbeConfig.n_boot`` (identifiability AUC CIs, pipeline.analysis.identifiability). Drift's
    paired AUC deltas need none: their CI is DeLong's closed form (pipeline.analysis.metrics)."""

    by: tuple[str, ...] = DEFAULT_BY
    min_n: int = 20
    anatomy_mask: tuple[tuple[int, ...], ...] | None = None  # grid x grid of 0/1 (7x7 for 224-px models, 16x16 for 512-px)
    bbox: str | None = None  # BBox_List_2017.csv URL; default: looked up beside each nih: dataset
    n_boot: int = 1000
    identifiability: bool = False
    targets: tuple[str, ...] = DEFAULT_TARGETS
    cell_probes: bool = True  # False: no per-cell probes (the 7x7 identifiability map), only embedding and maps
