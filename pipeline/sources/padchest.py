"""PadChest adapter: the label CSV (ImageID, ImageDir, PatientID, Projection, PatientSex_DICOM,
PatientBirth, StudyDate_DICOM, Labels). Its PNGs are 16-bit: see --high-bit-depth."""

from __future__ import annotations

import ast
import posixpath

import pandas as pd

from pipeline.sources.source_base import BASE, DatasetSpec, RawDataset, SourceOptions, _bad_line_issues, _read_csv, records
from pipeline.core.errors import DatasetError
from pipeline.sources.harmonise import PADCHEST_TO_MODEL
from pipeline.io.fs import to_url
from pipeline.store.storage import exists

PROJECTIONS = {"PA": "PA", "AP": "AP", "AP_HORIZONTAL": "AP", "L": "LATERAL", "COSTAL": None}
DEFAULT_CSV = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"


def parse_labels(text: str) -> list[str] | None:
    try:
        value = ast.literal_eval(str(text))  # a Python list literal, not code: literal_eval only
    except (ValueError, SyntaxError):
        return None
    return [str(v).strip().lower() for v in value] if isinstance(value, list) else None


def load_padchest(spec: DatasetSpec, findings: tuple[str, ...], options: SourceOptions = SourceOptions()) -> RawDataset:
    metadata = options.metadata
    root = spec.location.rstrip("/")
    fs, rootp = spec.root.fs, spec.root.path
    csv = metadata or next((spec.root.join(n) for n in (DEFAULT_CSV, DEFAULT_CSV + ".gz") if exists(spec.root.join(n), spec.root)), None)
    if csv is None:
        raise DatasetError(f"no {DEFAULT_CSV} under {root}; pass --metadata URL")
    df, bad = _read_csv(csv, spec.root.options)
    issues = _bad_line_issues(spec.name, bad)
    mapped = {v for v in PADCHEST_TO_MODEL.values() if v in findings}
    rows = []
    for rec in records(df):
        image_id = str(rec.get("ImageID", "")).strip()
        labels = parse_labels(rec.get("Labels", ""))
        lab = {f: None for f in findings}
        if labels is None:
            issues.append(dict(dataset=spec.name, image_id=image_id, path=None, reason="bad_row", detail=f"unparseable Labels {str(rec.get('Labels'))[:80]!r}", action="kept"))
        else:
            present = {PADCHEST_TO_MODEL[label] for label in labels if label in PADCHEST_TO_MODEL}
            for f in mapped:  # PadChest lists every finding it saw, so an absent mapped one is negative
                lab[f] = f in present
        try:
            age = str(int(str(rec.get("StudyDate_DICOM", ""))[:4]) - int(float(rec.get("PatientBirth", ""))))
        except ValueError:
            age = None
        proj = str(rec.get("Projection", "")).strip().upper()
        rows.append(dict(image_id=image_id, path=to_url(fs, posixpath.join(rootp, str(rec.get("ImageDir", "")).strip(), image_id)) if image_id else "",
                         patient_id=str(rec.get("PatientID", "")).strip() or None, site=spec.name,
                         view_position=PROJECTIONS.get(proj, proj or None), sex=str(rec.get("PatientSex_DICOM", "")).strip() or None,
                         age=age, split=None, extra=None, **lab))
    return RawDataset(pd.DataFrame(rows, columns=BASE + ["extra", *findings]), issues, None, roots=(root,))
