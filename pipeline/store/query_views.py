"""OUT/cxr_audit.sql: DuckDB views over an output folder, so that queries need no run version.

Rewritten (atomically) each time latest.json moves. In a shell: `duckdb -init OUT/cxr_audit.sql`;
in Python: `con.execute(open("OUT/cxr_audit.sql").read())`. Views:

* `manifest`: OUT/manifest.parquet.
* `predictions`, `region_stats`, `metrics`, ...: the latest complete run's tables (whatever it has).
* `all_predictions`: every run's predictions, told apart by their `model_version` column.
* `scored`: the latest run's predictions joined to the manifest on `row`, one row per scored film,
  with every finding twice and unambiguously: `label_<finding>` (manifest; null = not labelled)
  and `p_<finding>` (predicted probability).
"""

from __future__ import annotations

from schemas.manifest import EXTRA_FIELD, MANIFEST_BASE_FIELDS

from pipeline.store.layout import OutputStore
from pipeline.store.run_index import read_run
RUN_TABLES = ("region_stats", "finding_summary", "metrics", "localization", "localization_boxes", "identifiability",
              "identifiability_map", "identifiability_scores", "prevalence_confounding", "scorecard", "cell_separation", "errors")


def _lit(url: str) -> str:
    return "'" + url.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def views_sql(out, storage_options: dict | None = None) -> str | None:
    """The SQL text for OUT's latest run, or None when there is no complete run yet."""
    store = OutputStore.of(out, storage_options)
    latest = store.read_json(store.latest)
    if not latest:
        return None
    mv = latest["model_version"]
    root = store.absolute()  # absolute: the file works from any folder
    run, _ = read_run(store, mv)
    findings = run.identity.get("findings", []) if run is not None else []
    lines = [
        f"-- DuckDB views over {root.url}; latest run {mv} (written by cxr-audit, rewritten after each complete run)",
        f"-- shell: duckdb -init {root.views}    python: con.execute(open(path).read())",
        f"CREATE OR REPLACE VIEW manifest AS SELECT * FROM read_parquet({_lit(root.manifest)});",
        f"CREATE OR REPLACE VIEW predictions AS SELECT * FROM read_parquet({_lit(root.parts_glob(mv))});",
        f"CREATE OR REPLACE VIEW all_predictions AS SELECT * FROM read_parquet({_lit(root.parts_glob('*'))}, union_by_name = true);",
    ]
    for name in RUN_TABLES:
        if store.exists(store.table(mv, name)):  # errors.parquet is named like the aggregates
            lines.append(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet({_lit(root.table(mv, name))});")
    base = ", ".join(f"m.{_ident(name)}" for name in [f.name for f in MANIFEST_BASE_FIELDS] + [EXTRA_FIELD])
    labels = "".join(f", m.{_ident(f)} AS {_ident('label_' + f)}" for f in findings)
    probs = "".join(f", p.{_ident(f)} AS {_ident('p_' + f)}" for f in findings)
    lines.append(f"CREATE OR REPLACE VIEW scored AS SELECT {base}, p.model_version{labels}{probs} "
                 "FROM predictions AS p JOIN manifest AS m USING (row);")
    return "\n".join(lines) + "\n"


def write_views(out, storage_options: dict | None = None) -> str | None:
    store = OutputStore.of(out, storage_options)
    text = views_sql(store)
    if text is None:
        return None
    store.write_bytes(store.views, text.encode())
    return store.views
