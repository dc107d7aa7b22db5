"""Dataset adapters: each maps one source's own layout and metadata to raw manifest records.

An adapter returns a DataFrame with the manifest's base columns (strings, not yet validated), one
nullable-boolean column per finding, an ``extra`` column, and a list of issues it found itself.
Validation common to every source lives in ``pipeline.sources.manifest``.
"""

from __future__ import annotations

import json
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor

from pipeline.core.errors import DatasetError
from pipeline.sources.paths import is_local, local_path
from pipeline.io.location import InputOptions, Location
from pipeline.io.fs import to_url

from pipeline.sources.source_base import ADAPTERS, BASE, IMAGE_EXTS, MAX_FIELD, DatasetSpec, RawDataset, SourceOptions, _bad_line_issues, _printable, _read_bytes, _read_csv, records  # noqa: F401 - re-exported

NIH_METADATA = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017_v2020.csv.gz", "Data_Entry_2017.csv", "Data_Entry_2017.csv.gz")


def utf8_name(name: str) -> bool:
    """Can this name be written to the outputs (Parquet strings are UTF-8)? A file name of bytes that
    are not UTF-8 comes back from the OS with surrogate escapes, which no output can hold."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def printable_name(name: str) -> str:
    """A name with surrogate-escaped bytes shown as \\xNN (for an issue row or a message)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _list_images(location: Location, patterns: list[str], bad_names: list[str] | None = None) -> dict[str, str]:
    """basename -> full URL of every image matching the patterns under the location. Names that are
    not UTF-8 are left out, and given (printable) in ``bad_names``."""
    fs, root = location.fs, location.path
    found: dict[str, str] = {}
    for pat in patterns:
        for p in sorted(fs.glob(posixpath.join(root, pat))):
            if not utf8_name(p):
                if bad_names is not None and p.lower().endswith(IMAGE_EXTS):
                    bad_names.append(printable_name(to_url(fs, p)))
                continue
            if p.lower().endswith(IMAGE_EXTS):
                found.setdefault(posixpath.basename(p), to_url(fs, p))
    return found


def nih_labels(labels: str, findings: tuple[str, ...]) -> tuple[dict[str, bool | None], list[str]]:
    names = [s.strip() for s in labels.split("|") if s.strip()]
    unknown = [n for n in names if n not in findings and n != "No Finding"]
    return {f: (f in names) for f in findings}, unknown


def load_nih(spec: DatasetSpec, findings: tuple[str, ...], options: SourceOptions = SourceOptions()) -> RawDataset:
    import pandas as pd  # here, not at import: see pipeline.sources.source_base

    metadata = options.metadata
    root = spec.location.rstrip("/")
    fs, rootp = spec.root.fs, spec.root.path
    if not fs.exists(rootp):
        raise DatasetError(f"NIH root {root} does not exist; --dataset nih:ROOT must point at the ChestX-ray14 folder")
    if metadata is None:
        for name in NIH_METADATA:
            if fs.exists(posixpath.join(rootp, name)):
                metadata = to_url(fs, posixpath.join(rootp, name))
                break
        else:
            raise DatasetError(f"no {NIH_METADATA[0]} or {NIH_METADATA[2]} under {root}; pass --metadata URL")
    df, bad = _read_csv(metadata, spec.root.options)
    issues = _bad_line_issues(spec.name, bad)
    need = ["Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise DatasetError(f"{metadata} lacks the NIH columns {missing}; is it Data_Entry_2017?")
    bad_names: list[str] = []
    images = _list_images(spec.root, ["images/*", "images_*/images/*"], bad_names)
    for name in bad_names:
        issues.append(dict(dataset=spec.name, image_id=None, path=name, reason="bad_file_name",
                           detail="the file name is not UTF-8 (shown with \\xNN escapes); rename it to score it", action="ignored"))
    if not images:
        raise DatasetError(f"no PNGs under {root}/images/ or {root}/images_0XX/images/")
    splits: dict[str, str] = {}
    for fname, split in (("train_val_list.txt", "train_val"), ("test_list.txt", "test")):
        p = posixpath.join(rootp, fname)
        if fs.exists(p):
            with fs.open(p, "rb") as f:  # ids are ASCII; other bytes cannot match an image, so need no error
                splits.update({line.strip(): split for line in f.read().decode("utf-8", "replace").splitlines() if line.strip()})

    rows = []
    for rec in df[need].itertuples(index=False):
        image_id, labels, pid, age, sex, view = (str(v).strip() for v in rec)
        lab, unknown = nih_labels(labels, findings)
        if unknown:
            issues.append(dict(dataset=spec.name, image_id=image_id, path=None, reason="unknown_label", detail=f"labels {unknown} are not findings of this model", action="kept"))
        # a film not on disk keeps the path it was looked for at, for its missing_file issue row
        rows.append(dict(image_id=image_id, path=images.get(image_id) or f"{root}/images/{image_id}", patient_id=pid, site=spec.name, view_position=view, sex=sex, age=age, split=splits.get(image_id), extra=None, **lab))
    frame = pd.DataFrame(rows, columns=BASE + ["extra", *findings])
    return RawDataset(frame, issues, set(images.values()), lists_whole_dataset=True, roots=(root,))


# ---------------------------------------------------------------- generic manifest
MANIFEST_OPTIONAL = ["patient_id", "site", "view_position", "sex", "age", "split"]


def _label_value(v) -> bool | None:
    s = str(v).strip().lower()
    if s in ("1", "1.0", "true", "t", "yes", "y"):
        return True
    if s in ("0", "0.0", "false", "f", "no", "n"):
        return False
    return None  # blank, -1 (uncertain) or anything else: not labelled, never silently negative


def load_manifest_file(spec: DatasetSpec, findings: tuple[str, ...], options: SourceOptions = SourceOptions()) -> RawDataset:
    import pandas as pd

    url = spec.location
    fs, p = spec.root.fs, spec.root.path
    if not fs.exists(p):
        raise DatasetError(f"manifest {url} does not exist")
    if p.endswith(".parquet"):
        try:
            with fs.open(p, "rb") as f:
                df = pd.read_parquet(f).astype(str).replace({"None": "", "nan": "", "<NA>": ""})
        except Exception as e:  # noqa: BLE001 - arrow raises several types for a broken file
            raise DatasetError(f"manifest {url} is not a readable Parquet file ({type(e).__name__}: {e}); write it again") from None
        bad: list[str] = []
    else:
        df, bad = _read_csv(url, spec.root.options)
    issues = _bad_line_issues(spec.name, bad)
    for col in ("image_id", "path"):
        if col not in df.columns:
            raise DatasetError(f"manifest {url} needs columns image_id and path; it has {list(df.columns)[:10]}")
    base_dir = posixpath.dirname(p)
    extra_cols = [c for c in df.columns if c not in ("image_id", "path", *MANIFEST_OPTIONAL, *findings)]
    rows = []
    for rec in records(df):
        path = str(rec["path"]).strip()
        if path.startswith("file://"):
            path = posixpath.normpath(local_path(path))  # a local file, named as the rest are
        elif path and "://" not in path and not path.startswith("/"):
            path = to_url(fs, posixpath.join(base_dir, path))  # relative to the manifest file
        extra = {c: rec[c] for c in extra_cols if str(rec[c]) != ""}
        row = dict(image_id=str(rec["image_id"]).strip(), path=path, extra=json.dumps(extra, sort_keys=True) if extra else None)
        for c in MANIFEST_OPTIONAL:
            row[c] = str(rec.get(c, "")).strip() or None
        row["site"] = row["site"] or spec.name
        for f in findings:
            row[f] = _label_value(rec[f]) if f in rec else None
        rows.append(row)
    frame = pd.DataFrame(rows, columns=BASE + ["extra", *findings])
    return RawDataset(frame, issues, None, roots=(to_url(fs, base_dir),), check_exists=True)


def present_files(paths: list[str], inputs: InputOptions | None = None, max_dirs: int = 2000, max_objects: int = 5000,
                  limits=None) -> set[str] | None:
    """Which of ``paths`` exist. Local files: by listing their folders (one call per folder). URLs:
    by asking for each object itself (HEAD / HeadObject, never a listing), each within the read
    timeout. None when there are too many folders/objects to check; missing files then fail at read
    time. A server that answers none of a first batch is not asked further: its objects are kept, and
    each fails (ReadTimeout) or is scored when read."""
    local = [q for q in paths if q and is_local(q)]
    remote = [q for q in paths if q and not is_local(q)]
    dirs = {posixpath.dirname(q) for q in local}
    if len(dirs) > max_dirs or len(remote) > max_objects:
        return None
    present: set[str] = set()
    for d in dirs:
        try:
            present.update(posixpath.join(d, name) for name in os.listdir(d) if utf8_name(name))  # no manifest names the others
        except OSError:
            continue
    if remote:
        from pipeline.io.reads import ReadLimits, ReadTimeout, source_info

        limits = limits or ReadLimits()
        options_for = (inputs or InputOptions()).options_for  # each film with its dataset's (or the input) options

        def check(q):
            try:
                return q if source_info(q, options_for(q), limits).get("type", "file") == "file" else None
            except ReadTimeout:
                return ReadTimeout
            except Exception:  # noqa: BLE001 - absent or refused: not present
                return None

        batch = 16
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="exists") as pool:
            for i in range(0, len(remote), batch):
                part = remote[i:i + batch]
                found = list(pool.map(check, part))
                if i == 0 and all(f is ReadTimeout for f in found):
                    present.update(remote)
                    break
                present.update(q for q, f in zip(part, found) if f is ReadTimeout or isinstance(f, str))
    return present



def load_dataset(spec: DatasetSpec, findings: tuple[str, ...], options: SourceOptions = SourceOptions()) -> RawDataset:
    """The raw records of one --dataset, by the loader its adapter name is registered to."""
    return ADAPTERS[spec.adapter](spec, findings, options)
