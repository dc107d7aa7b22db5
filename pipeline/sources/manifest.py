"""Build OUT/manifest.parquet from one or more datasets, with stable rows and recorded issues.

Problems in metadata never stop the job: each becomes a row of manifest_issues.parquet with a reason
and what was done (dropped the record, nulled the field, or kept it as is).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa

from schemas.manifest import EXTRA_FIELD, issues_schema, manifest_schema

from pipeline.sources.adapters import DatasetSpec, load_dataset, present_files
from pipeline.sources.source_base import SourceOptions
from pipeline.io.location import InputOptions
from pipeline.sources.paths import confined_all, links_outside
from pipeline.core.redact import redact

KNOWN_VIEWS = {"AP", "PA", "LL", "RL", "LATERAL", "LAT", "AP AXIAL", "AP LLD", "AP RLD", "PA LLD", "PA RLD", "LAO", "RAO", "LPO", "XTABLE LATERAL", "SWIMMERS"}
SEX_CODES = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F"}
MAX_AGE = 120
ISSUE_REASONS = {
    "bad_row": "the metadata line could not be parsed, or lacks an image id / path",
    "duplicate_id": "the same image id appears again in the same dataset; the first is kept",
    "impossible_age": f"age outside 0..{MAX_AGE} years (e.g. 414 in Data_Entry_2017.csv)",
    "bad_age": "age is not a number",
    "unknown_view": f"view position is not one of {sorted(KNOWN_VIEWS)}",
    "unknown_sex": "sex is not M/F",
    "unknown_label": "a label name is not one of the model's findings",
    "missing_file": "listed in the metadata but the image file is not there",
    "unlisted_file": "an image file is present but has no metadata row; it is not scored",
    "excluded_view": "a lateral (or otherwise unselected) view, left out by --views",
    "outside_root": "the path leaves the dataset's folder (.., an absolute path, a URL or a symbolic link elsewhere); allow more with --allow-root",
    "empty_dataset": "the metadata has a header but no rows",
    "bad_file_name": "an image file's name is not UTF-8, so no output can name it; it is not scored (rename it)",
}
LATERAL_VIEWS = {"LATERAL", "LAT", "LL", "RL", "XTABLE LATERAL"}
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([YMDW]?)\s*$", re.I)


@dataclass
class ManifestResult:
    manifest: pa.Table
    issues: pa.Table

    def issue_counts(self) -> dict[str, int]:
        if self.issues.num_rows == 0:
            return {}
        return self.issues.column("reason").to_pandas().value_counts().sort_index().to_dict()


def _issue(dataset, image_id, path, reason, detail, action):
    return dict(dataset=dataset, image_id=image_id, path=path, reason=reason, detail=detail, action=action)


def parse_age(text) -> tuple[int | None, str | None]:
    """'57' -> 57; '058Y' -> 58; '6M' -> 0. Returns (age, issue reason)."""
    if text is None or str(text).strip() in ("", "nan", "None"):
        return None, None
    m = _AGE.match(str(text))
    if not m:
        return None, "bad_age"
    value, unit = float(m.group(1)), m.group(2).upper()
    years = value / {"": 1, "Y": 1, "M": 12, "W": 52, "D": 365}[unit]
    if not (0 <= years <= MAX_AGE):
        return None, "impossible_age"
    return int(years), None


def _parse_view(v) -> tuple[str | None, str | None]:
    code = None if v is None else str(v).strip().upper()
    if code and code not in KNOWN_VIEWS:
        return None, "unknown_view"
    return code or None, None


def _parse_sex(v) -> tuple[str | None, str | None]:
    code = None if v is None else str(v).strip().upper()
    if code and code not in SEX_CODES:
        return None, "unknown_sex"
    return (SEX_CODES.get(code) if code else None), None


def _select_views(df: pd.DataFrame, ds_name: str, views: tuple[str, ...], issues: list) -> pd.DataFrame:
    """views: ('frontal',) drops lateral views; ('all',) keeps everything; else the listed codes."""
    if "all" in views:
        return df
    if "frontal" in views:
        keep = ~df["view_position"].isin(LATERAL_VIEWS)
    else:
        keep = df["view_position"].isin({v.upper() for v in views})
    for r in df[~keep].itertuples():
        issues.append(_issue(ds_name, r.image_id, r.path or None, "excluded_view", f"view {r.view_position}", "excluded"))
    return df[keep]


def _site_from(df: pd.DataFrame, column: str) -> pd.Series:
    if column in df.columns:
        values = df[column]
    else:
        values = df[EXTRA_FIELD].map(lambda e: json.loads(e).get(column) if isinstance(e, str) else None)
    return values.where(values.notna() & values.astype(str).str.len().gt(0), df["dataset"]).astype(str)


def _validate(ds_name: str, raw, findings, allow_roots: tuple[str, ...] = (), inputs: InputOptions | None = None,
              read_limits=None) -> tuple[pd.DataFrame, list[dict]]:
    """A dataset's records as the manifest keeps them, and an issue for each one dropped or changed."""
    df = raw.records.copy()
    issues = list(raw.issues)
    df["dataset"] = ds_name
    if df.empty and not issues:
        issues.append(_issue(ds_name, None, None, "empty_dataset", "no rows under the header", "ignored"))
    df = _drop_bad_ids(df, ds_name, issues)
    _parse_fields(df, ds_name, issues)
    roots = tuple(raw.roots) + tuple(allow_roots)
    if raw.roots:  # before anything looks at the file: a path elsewhere is never opened, listed or fetched
        df = _confine(df, ds_name, roots, issues)
    df = _drop_missing(df, ds_name, raw, inputs, read_limits, issues)
    if raw.lists_whole_dataset and raw.listed_files is not None:
        for p in sorted(raw.listed_files - set(df["path"])):
            issues.append(_issue(ds_name, p.rsplit("/", 1)[-1], p, "unlisted_file", "file has no metadata row", "ignored"))
    return df, issues


def _drop_bad_ids(df: pd.DataFrame, ds_name: str, issues: list) -> pd.DataFrame:
    """Records without an image id, and repeats of an id (the first is kept)."""
    ok = df["image_id"].fillna("").str.len().gt(0)
    for r in df[~ok].itertuples():
        issues.append(_issue(ds_name, None, r.path or None, "bad_row", "no image id", "dropped"))
    df = df[ok]
    dup = df.duplicated("image_id", keep="first")
    for r in df[dup].itertuples():
        issues.append(_issue(ds_name, r.image_id, r.path or None, "duplicate_id", "repeated image id", "dropped"))
    return df[~dup]


def _parse_fields(df: pd.DataFrame, ds_name: str, issues: list) -> None:
    """Age, view and sex in their coded forms, in place; a value that is not becomes null (an issue)."""
    # Each distinct value is parsed once (CheXpert's 223k rows hold a few hundred distinct ones).
    age_of, view_of, sex_of = (functools.lru_cache(maxsize=None)(f) for f in (parse_age, _parse_view, _parse_sex))
    ages, views, sexes = [], [], []
    for image_id, path, a, v, s in zip(*(df[c].tolist() for c in ("image_id", "path", "age", "view_position", "sex"))):
        age, why = age_of(a)
        if why:
            issues.append(_issue(ds_name, image_id, path, why, f"age {a!r}", "nulled"))
        ages.append(age)
        view, why = view_of(v)
        if why:
            issues.append(_issue(ds_name, image_id, path, why, f"view {v!r}", "nulled"))
        views.append(view)
        sex, why = sex_of(s)
        if why:
            issues.append(_issue(ds_name, image_id, path, why, f"sex {s!r}", "nulled"))
        sexes.append(sex)
    df["age"], df["view_position"], df["sex"] = ages, views, sexes


def _confine(df: pd.DataFrame, ds_name: str, roots: tuple[str, ...], issues: list) -> pd.DataFrame:
    """Records whose path leaves the dataset's roots, or resolves outside them, are dropped."""
    has_path = df["path"].fillna("").str.len().gt(0)
    outside = has_path & ~pd.Series(confined_all(map(str, df["path"].tolist()), roots), index=df.index, dtype=bool)
    for r in df[outside].itertuples():
        issues.append(_issue(ds_name, r.image_id, r.path, "outside_root",
                             f"not under {' or '.join(map(redact, roots))}; pass --allow-root to allow it", "dropped"))
    df = df[~outside]
    # where the path resolves: a symbolic link inside a root to a file elsewhere is outside too
    real = pd.Series(links_outside(map(str, df["path"].fillna("").tolist()), roots), index=df.index, dtype=object)
    linked = real.notna()
    for r, to in zip(df[linked].itertuples(), real[linked]):
        issues.append(_issue(ds_name, r.image_id, r.path, "outside_root",
                             f"a symbolic link to {redact(to)}, not under {' or '.join(map(redact, roots))}; "
                             "copy the file into the dataset or pass --allow-root to allow it", "dropped"))
    return df[~linked]


def _drop_missing(df: pd.DataFrame, ds_name: str, raw, inputs: "InputOptions | None", read_limits, issues: list) -> pd.DataFrame:
    """Records whose film is not there (not in the dataset's listing, or not found)."""
    no_path = df["path"].fillna("").str.len().eq(0)
    if raw.listed_files is not None:
        no_path |= ~df["path"].isin(raw.listed_files)
    elif raw.check_exists:
        present = present_files(df["path"][~no_path].tolist(), inputs, limits=read_limits)
        if present is not None:
            no_path |= ~df["path"].isin(present)
    for r in df[no_path].itertuples():
        issues.append(_issue(ds_name, r.image_id, r.path or None, "missing_file", "no such image file", "dropped"))
    return df[~no_path]


def build_manifest(specs: list[DatasetSpec], findings: tuple[str, ...], previous: pa.Table | None = None,
                   options: SourceOptions = SourceOptions(), inputs: InputOptions | None = None, read_limits=None) -> ManifestResult:
    """Pool datasets into one manifest. Rows of images already in ``previous`` keep their numbers;
    new images get numbers after the largest one ever used, so maps.zarr rows never move. Every
    dataset file is opened with its options from ``inputs`` (the input options, never the output's)."""
    frames, issues = [], []
    for spec in specs:
        spec = spec.with_inputs(inputs)
        raw = load_dataset(spec, findings, options)
        df, iss = _validate(spec.name, raw, findings, options.allow_roots, inputs, read_limits)
        df = _select_views(df, spec.name, options.views, iss)
        if options.site_column:
            df["site"] = _site_from(df, options.site_column)
        frames.append(df)
        issues += iss
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    df = df.sort_values(["dataset", "image_id"], kind="stable").reset_index(drop=True)

    rows = pd.Series(-1, index=df.index, dtype="int64")
    next_row = 0
    if previous is not None and previous.num_rows:
        old = previous.select(["dataset", "image_id", "row"]).to_pandas()
        key = dict(zip(zip(old["dataset"], old["image_id"]), old["row"]))
        rows = pd.Series([key.get(k, -1) for k in zip(df["dataset"], df["image_id"])], index=df.index, dtype="int64")
        next_row = int(old["row"].max()) + 1
    new = rows.eq(-1)
    rows[new] = range(next_row, next_row + int(new.sum()))
    df["row"] = rows
    df = df.sort_values("row").reset_index(drop=True)

    schema = manifest_schema(findings)
    manifest = pa.Table.from_pydict({field.name: _column(df[field.name], field.type) for field in schema}, schema=schema)
    issue_table = pa.Table.from_pylist(issues, schema=issues_schema())
    return ManifestResult(manifest, issue_table)


def _column(values: pd.Series, type_: pa.DataType) -> pa.Array:
    """One manifest column in its declared type; None, NaN and pd.NA are nulls. Arrow converts the
    plain case in one pass; anything else (e.g. 0/1 labels, ages as floats) goes value by value."""
    if not len(values):
        return pa.array([], type=type_)
    try:
        return pa.array(values, type=type_, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    if type_ == pa.bool_():
        return pa.array([None if pd.isna(v) else bool(v) for v in values.tolist()], type=type_)
    if type_ == pa.int16():
        return pa.array([None if v is None or pd.isna(v) else int(v) for v in values.tolist()], type=type_)
    return pa.array([None if v is None or (isinstance(v, float) and pd.isna(v)) else v for v in values.tolist()], type=type_)


def dataset_fingerprint(manifest: pa.Table) -> str:
    """Hash of what would be scored: rows, ids and paths (order-independent of how it was built)."""
    h = hashlib.sha256()
    for col in ("row", "dataset", "image_id", "path"):
        h.update(col.encode())
        h.update("\x1f".join(map(str, manifest.column(col).to_pylist())).encode())
    return h.hexdigest()[:16]
