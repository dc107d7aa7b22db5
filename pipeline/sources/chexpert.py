"""CheXpert-v1.0 and -small (train.csv / valid.csv) and MIMIC-CXR-JPG adapters."""

from __future__ import annotations

import posixpath
import re

import pandas as pd

from pipeline.sources.source_base import BASE, DatasetSpec, RawDataset, SourceOptions, _bad_line_issues, _read_csv, records
from pipeline.core.errors import DatasetError
from pipeline.sources.harmonise import CHEXPERT_TO_MODEL, chexpert_value
from pipeline.io.fs import to_url
from pipeline.store.storage import exists

_PATIENT = re.compile(r"(patient\d+)")


def _first_existing(spec: DatasetSpec, names: tuple[str, ...]) -> str | None:
    for n in names:
        if exists(spec.root.join(n), spec.root):
            return spec.root.join(n)
    return None


def _labels(rec, findings, uncertain) -> dict:
    out = {f: None for f in findings}
    for src, dst in CHEXPERT_TO_MODEL.items():
        if dst in out and src in rec:
            out[dst] = chexpert_value(rec[src], uncertain)
    return out


def _text(df: pd.DataFrame, column: str) -> list[str]:
    """A column as stripped strings ('' where the column is absent), as ``str(value).strip()`` per row."""
    if column not in df.columns:
        return [""] * len(df)
    return df[column].astype(str).str.strip().tolist()


def _split_rows(df: pd.DataFrame, fs, rootp: str, name: str, split: str, findings, uncertain) -> dict[str, list]:
    """One CSV's rows as columns (column-wise: CheXpert's 223k rows in about a second, not five)."""
    rels = _text(df, "Path")
    # Paths start with the dataset folder ('CheXpert-v1.0-small/train/...'): resolve from ROOT's parent.
    parent, folder = posixpath.dirname(rootp), posixpath.basename(rootp)
    paths = [to_url(fs, posixpath.join(parent if r.split("/", 1)[0] == folder else rootp, r)) if r else "" for r in rels]
    patients = [m.group(1) if (m := _PATIENT.search(r)) else None for r in rels]
    lateral = [v.lower() == "lateral" for v in _text(df, "Frontal/Lateral")]
    views = ["LATERAL" if lat else (v or None) for lat, v in zip(lateral, _text(df, "AP/PA"))]
    cols = dict(image_id=rels, path=paths, patient_id=patients, site=[name] * len(rels), view_position=views,
                sex=[v or None for v in _text(df, "Sex")], age=[v or None for v in _text(df, "Age")], split=[split] * len(rels),
                extra=[None] * len(rels))
    for f in findings:
        cols[f] = [None] * len(rels)
    for src, dst in CHEXPERT_TO_MODEL.items():
        if dst in cols and src in df.columns:
            values = df[src].astype(str).tolist()
            of = {v: chexpert_value(v, uncertain) for v in set(values)}  # a handful of distinct codes
            cols[dst] = [of[v] for v in values]
    return cols


def load_chexpert(spec: DatasetSpec, findings: tuple[str, ...], options: SourceOptions = SourceOptions()) -> RawDataset:
    root = spec.location.rstrip("/")
    fs, rootp = spec.root.fs, spec.root.path
    parts, issues = [], []
    for split in ("train", "valid"):
        csv = _first_existing(spec, (f"{split}.csv", f"{split}.csv.gz"))
        if csv is None:
            continue
        df, bad = _read_csv(csv, spec.root.options)
        issues += _bad_line_issues(spec.name, bad)
        parts.append(pd.DataFrame(_split_rows(df, fs, rootp, spec.name, split, findings, options.uncertain), columns=BASE + ["extra", *findings]))
    if not parts:
        raise DatasetError(f"no train.csv or valid.csv under {root}; --dataset chexpert:ROOT must point at CheXpert-v1.0[-small]")
    # 223k images in ~190k study folders: listing them all is slower than letting a missing file
    # show up as a read error during scoring.
    return RawDataset(pd.concat(parts, ignore_index=True), issues, None, roots=(root,))


def load_mimic(spec: DatasetSpec, findings: tuple[str, ...], options: SourceOptions = SourceOptions()) -> RawDataset:
    uncertain = options.uncertain
    root = spec.location.rstrip("/")
    fs, rootp = spec.root.fs, spec.root.path
    meta_url = _first_existing(spec, ("mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-metadata.csv"))
    if meta_url is None:
        raise DatasetError(f"no mimic-cxr-2.0.0-metadata.csv.gz under {root}")
    meta, bad = _read_csv(meta_url, spec.root.options)
    issues = _bad_line_issues(spec.name, bad)
    lab_url = _first_existing(spec, ("mimic-cxr-2.0.0-chexpert.csv.gz", "mimic-cxr-2.0.0-chexpert.csv"))
    labels = _read_csv(lab_url, spec.root.options)[0].set_index(["subject_id", "study_id"]) if lab_url else None
    split_url = _first_existing(spec, ("mimic-cxr-2.0.0-split.csv.gz", "mimic-cxr-2.0.0-split.csv"))
    splits = dict(zip(*(_read_csv(split_url, spec.root.options)[0][c] for c in ("dicom_id", "split")))) if split_url else {}
    rows = []
    for rec in records(meta):
        sid, study, dicom = (str(rec.get(c, "")).strip() for c in ("subject_id", "study_id", "dicom_id"))
        path = posixpath.join(rootp, "files", f"p{sid[:2]}", f"p{sid}", f"s{study}", f"{dicom}.jpg")
        lab = labels.loc[(sid, study)].to_dict() if labels is not None and (sid, study) in labels.index else {}
        if isinstance(lab, dict) and lab and isinstance(next(iter(lab.values())), dict):
            lab = {}  # duplicated (subject, study) rows: ambiguous, leave unlabelled
        rows.append(dict(image_id=dicom, path=to_url(fs, path), patient_id=sid, site=spec.name,
                         view_position=str(rec.get("ViewPosition", "")).strip() or None, sex=None, age=None,
                         split=splits.get(dicom), extra=None, **_labels(lab, findings, uncertain)))
    return RawDataset(pd.DataFrame(rows, columns=BASE + ["extra", *findings]), issues, None, roots=(root,))
