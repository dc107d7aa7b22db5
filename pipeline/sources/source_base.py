"""What every dataset adapter shares: the adapter registry, the base columns, the dataset spec, the
read options, the raw result and the bounded CSV reader (so source modules import this, never
pipeline.sources.adapters: no cycle)."""

from __future__ import annotations

import codecs
import csv
import io
import posixpath
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal, get_args

import fsspec

if TYPE_CHECKING:
    import pandas as pd  # imported where a table is read: the job's driver starts its cluster before it needs pandas (~0.6 s)

from pipeline.core.errors import ConfigError, DatasetError
from pipeline.core.redact import MaskedOptions
from pipeline.core.registry import Registry
from pipeline.io.location import InputOptions, Location

# name -> loader(spec: DatasetSpec, findings: tuple[str, ...], options: SourceOptions) -> RawDataset.
# Add a dataset: write its loader in a module of pipeline.sources and register it here (or call
# ADAPTERS.register from your own module before the job parses --dataset).
ADAPTERS = Registry("dataset adapter", "--dataset")
ADAPTERS.register("nih", "pipeline.sources.adapters:load_nih", help="ChestX-ray14 layout (ROOT/images*/..., Data_Entry_2017*.csv)")
ADAPTERS.register("chexpert", "pipeline.sources.chexpert:load_chexpert", help="CheXpert (ROOT/train.csv, valid.csv)")
ADAPTERS.register("mimic", "pipeline.sources.chexpert:load_mimic", help="MIMIC-CXR-JPG")
ADAPTERS.register("padchest", "pipeline.sources.padchest:load_padchest", help="PadChest")
ADAPTERS.register("manifest", "pipeline.sources.adapters:load_manifest_file",
                  help="a CSV/Parquet with image_id, path and optional base/finding columns")
FILE_ADAPTERS = {"manifest"}  # adapters whose location is a file (their files lie in its folder), not a folder
BASE = ["image_id", "path", "patient_id", "site", "view_position", "sex", "age", "split"]
IMAGE_EXTS = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class DatasetSpec:
    """One --dataset flag: [NAME=]ADAPTER:LOCATION, and the storage options its files open with
    (``with_inputs``: the dataset's own, else the run's input options; never the output's)."""

    adapter: str
    location: str
    name: str
    storage_options: MaskedOptions = MaskedOptions()

    @property
    def folder(self) -> str:
        """Where its files lie: the location, or the folder of a manifest file."""
        return posixpath.dirname(self.location.rstrip("/")) if self.adapter in FILE_ADAPTERS else self.location.rstrip("/")

    @property
    def root(self) -> Location:
        """The dataset's location as a rooted filesystem, with its options."""
        return Location(self.location, self.storage_options)

    def with_inputs(self, inputs: InputOptions | None) -> "DatasetSpec":
        """This dataset with the options its files open with."""
        return replace(self, storage_options=inputs.options_of(self.folder)) if inputs is not None else self

    @classmethod
    def parse(cls, text: str) -> "DatasetSpec":
        name = None
        if "=" in text.split(":", 1)[0]:
            name, text = text.split("=", 1)
        if ":" not in text:
            raise ConfigError(f"--dataset {text!r} must look like ADAPTER:LOCATION, e.g. nih:/data/ChestX-ray14")
        adapter, location = text.split(":", 1)
        if adapter not in ADAPTERS:
            raise ConfigError(f"--dataset adapter {adapter!r} is unknown; registered adapters: {', '.join(ADAPTERS)}")
        if not name:
            name = adapter if adapter != "manifest" else posixpath.basename(location).split(".")[0]
        return cls(adapter, location, name)


Uncertain = Literal["zeros", "ones", "ignore"]  # CheXpert/MIMIC -1 labels: negative, positive, unlabelled
UNCERTAIN_MODES: tuple[str, ...] = get_args(Uncertain)
VIEW_CHOICES = ("frontal", "all")  # or a list of view codes (AP, PA, LL, ...)


@dataclass(frozen=True)
class SourceOptions:
    """How every adapter reads its dataset (the --metadata, --views, --site-column, --uncertain and
    --allow-root flags). The defaults here are the job's defaults."""

    metadata: str | None = None  # NIH/PadChest metadata CSV, if not the one found under ROOT
    views: tuple[str, ...] = ("frontal",)
    site_column: str | None = None  # take 'site' from this column (default: the dataset's name)
    uncertain: Uncertain = "zeros"
    allow_roots: tuple[str, ...] = ()  # further places manifest paths may point into


@dataclass
class RawDataset:
    records: pd.DataFrame
    issues: list[dict]
    listed_files: set[str] | None  # image files present where the metadata points (None: not listed)
    lists_whole_dataset: bool = False  # True when listed_files is the whole dataset (unlisted files are news)
    roots: tuple[str, ...] = ()  # every path must lie under one of these (or an --allow-root)
    check_exists: bool = False  # True: look each path up (after confinement) instead of listed_files


MAX_FIELD = 131_072  # Python's csv default limit: longer fields are bad rows, reported, not lost silently
# Bytes that are not UTF-8 are decoded to private-use marks (plane 16): pandas can carry them, and
# the rows holding them are then found and reported. The file's own characters are never touched.
_MARK = 0x10FF00
_NOT_UTF8 = re.compile(f"[{chr(_MARK)}-{chr(_MARK + 255)}]")


def _mark_bytes(err: UnicodeDecodeError):
    return "".join(chr(_MARK + b) for b in err.object[err.start:err.end]), err.end


codecs.register_error("cxr-audit-mark", _mark_bytes)


def _printable(text: str) -> str:
    return _NOT_UTF8.sub(lambda m: f"\\x{ord(m.group()) - _MARK:02x}", text)


def _read_bytes(url: str, storage_options=None) -> bytes:
    try:
        with fsspec.open(url, "rb", compression="infer", **(storage_options or {})) as f:
            return f.read()
    except FileNotFoundError:
        raise DatasetError(f"metadata file {url} does not exist") from None
    except Exception as e:  # noqa: BLE001 - gzip/bz2/xz/zip errors have no common base
        raise DatasetError(f"metadata file {url} cannot be read ({type(e).__name__}: {e}); a compressed file may be truncated: "
                           "download it again, or pass the uncompressed CSV") from None


def _read_csv(url: str, storage_options=None) -> tuple[pd.DataFrame, list[str]]:
    """A metadata CSV as strings, opened with the dataset's ``storage_options``. Lines that cannot be parsed, hold bytes that are not UTF-8 or a
    field over MAX_FIELD characters come back as details in the second value (each one a bad_row)."""
    import pandas as pd

    bad: list[str] = []

    def on_bad(line):  # keep a note of each malformed line rather than failing the whole file
        bad.append("malformed CSV line: " + _printable(",".join(line))[:200])
        return None

    data = _read_bytes(url, storage_options)
    text = data.decode("utf-8-sig" if data.startswith(b"\xef\xbb\xbf") else "utf-8", "cxr-audit-mark")
    if not text.strip():
        raise DatasetError(f"metadata file {url} is empty (0 bytes); it needs a header line and one line per image")
    old_limit = csv.field_size_limit()
    csv.field_size_limit(max(old_limit, len(text) + 1))  # long fields are found below, not dropped silently
    try:
        try:  # the C parser is ~10x faster; only the Python one can hand us each malformed line
            df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, engine="c", on_bad_lines="error")
        except pd.errors.ParserError:
            df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, engine="python", on_bad_lines=on_bad)
    except pd.errors.EmptyDataError:
        raise DatasetError(f"metadata file {url} has no header line; it needs one (e.g. image_id,path)") from None
    except (pd.errors.ParserError, csv.Error, ValueError) as e:
        raise DatasetError(f"metadata file {url} is not a CSV file that can be parsed: {_printable(str(e))[:300]}") from None
    finally:
        csv.field_size_limit(old_limit)
    if any(_NOT_UTF8.search(str(c)) for c in df.columns):
        raise DatasetError(f"the header of {url} is not UTF-8 ({_printable(','.join(map(str, df.columns)))[:200]}); save the file as UTF-8")
    marked = _NOT_UTF8.search(text) is not None
    suspect = pd.Series(False, index=df.index)
    if len(text) > MAX_FIELD or marked:  # column-wise first: only the rows that may be bad are walked
        for col in df.columns:
            values = df[col]
            long = values.str.len().gt(MAX_FIELD).fillna(False)
            suspect |= long | (values.map(lambda v: isinstance(v, str) and bool(_NOT_UTF8.search(v))) if marked else False)
    if suspect.any():
        dropped = []
        for i, rec in zip(df.index[suspect], df[suspect].itertuples(index=False)):
            why = None
            for col, v in zip(df.columns, rec):
                if isinstance(v, str) and len(v) > MAX_FIELD:
                    why = f"field {col!r} has {len(v)} characters (limit {MAX_FIELD})"
                elif isinstance(v, str) and _NOT_UTF8.search(v):
                    why = f"bytes that are not UTF-8 in {col!r}: {_printable(v)[:120]}"
                if why:
                    break
            if why:
                bad.append(f"data row {i + 1}: {why}")
                dropped.append(i)
        df = df.drop(index=dropped).reset_index(drop=True)
    return df, bad


def records(df: pd.DataFrame) -> list[dict]:
    """``df.to_dict("records")`` at a fraction of the cost (pandas boxes every cell on its way)."""
    cols = list(df.columns)
    return [dict(zip(cols, vals)) for vals in zip(*(df[c].tolist() for c in cols))]


def _bad_line_issues(dataset: str, bad: list[str]) -> list[dict]:
    return [dict(dataset=dataset, image_id=None, path=None, reason="bad_row", detail=b[:300], action="dropped") for b in bad]


# ---------------------------------------------------------------- NIH ChestX-ray14
