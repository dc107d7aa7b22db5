import json
import shutil

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.sources.adapters import DatasetSpec, SourceOptions
from pipeline.core.errors import ConfigError, DatasetError
from pipeline.core.findings import CHEXNET_FINDINGS
from pipeline.sources.manifest import build_manifest, parse_age
from pipeline.store.storage import write_parquet_atomic
from schemas.manifest import manifest_schema
from schemas.meta import read_metadata

from tests.conftest import png_bytes, shared_or_skip

HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"


def test_nih_adapter_on_real_metadata_and_films():
    root = shared_or_skip()
    r = build_manifest([DatasetSpec.parse(f"nih:{root}")], CHEXNET_FINDINGS)
    m = r.manifest.to_pandas()
    assert len(m) == 120
    assert m.view_position.value_counts().to_dict() == {"PA": 90, "AP": 30}
    assert m.row.tolist() == list(range(120)) and m.image_id.is_unique
    # every other image of the 112,120 listed is reported missing, not silently dropped
    assert r.issue_counts() == {"missing_file": 112120 - 120}
    assert set(m.sex) <= {"M", "F"} and m.age.between(0, 120).all()
    row = m.set_index("image_id").loc["00000075_000.png"]  # 'Cardiomegaly' per Data_Entry
    assert row.Cardiomegaly and not row.Effusion and row.patient_id == "75"


def _old_style_root(tmp_path):
    """Data_Entry_2017.csv (old release): trailing empty column, an impossible age, and bad rows."""
    root = tmp_path / "ChestX-ray14"
    (root / "images_001" / "images").mkdir(parents=True)
    (root / "images_002" / "images").mkdir(parents=True)
    img = png_bytes(__import__("numpy").full((32, 32), 90, dtype="uint8"))
    for i, folder in ((1, "images_001"), (2, "images_001"), (3, "images_002"), (4, "images_002"), (9, "images_002")):
        (root / folder / "images" / f"{i:08d}_000.png").write_bytes(img)
    lines = [
        HEADER + ",",
        "00000001_000.png,Cardiomegaly|Emphysema,0,1,058Y,M,PA,2682,2749,0.143,0.143,",
        "00000002_000.png,No Finding,0,2,414,F,AP,2500,2048,0.168,0.168,",
        "00000003_000.png,Pneumonia,0,3,33,X,ZZ,2500,2048,0.168,0.168,",
        "00000003_000.png,Pneumonia,1,3,34,F,AP,2500,2048,0.168,0.168,",
        "00000004_000.png,Infiltration|Nodule,0,4,abc,F,PA,2500,2048,0.168,0.168,",
        "garbage,line,with,far,too,many,fields,1,2,3,4,5,6,7,8,9",
        "00000005_000.png,Mass,0,5,40,M,PA,2500,2048,0.168,0.168,",
    ]
    (root / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    (root / "test_list.txt").write_text("00000001_000.png\n")
    return root


def test_old_release_variant_with_bad_rows(tmp_path):
    root = _old_style_root(tmp_path)
    r = build_manifest([DatasetSpec.parse(f"nih:{root}")], CHEXNET_FINDINGS)
    m = r.manifest.to_pandas().set_index("image_id")
    assert sorted(m.index) == ["00000001_000.png", "00000002_000.png", "00000003_000.png", "00000004_000.png"]
    assert m.loc["00000001_000.png", "age"] == 58 and m.loc["00000001_000.png", "split"] == "test"
    assert m.loc["00000001_000.png", "Emphysema"] and not m.loc["00000001_000.png", "Pneumonia"]
    assert m.age.isna()["00000002_000.png"] and m.age.isna()["00000004_000.png"]
    assert m.view_position.isna()["00000003_000.png"] and m.sex.isna()["00000003_000.png"]
    counts = r.issue_counts()
    assert counts == {"bad_age": 1, "bad_row": 1, "duplicate_id": 1, "impossible_age": 1, "missing_file": 1,
                      "unknown_sex": 1, "unknown_view": 1, "unlisted_file": 1}
    issues = r.issues.to_pandas()
    assert issues.loc[issues.reason == "unlisted_file", "image_id"].item() == "00000009_000.png"


def test_rows_stay_stable_when_the_dataset_grows(tmp_path):
    root = _old_style_root(tmp_path)
    first = build_manifest([DatasetSpec.parse(f"nih:{root}")], CHEXNET_FINDINGS)
    before = dict(zip(first.manifest.column("image_id").to_pylist(), first.manifest.column("row").to_pylist()))
    # a new image that sorts *first* must not renumber the others
    (root / "images_001" / "images" / "00000000_000.png").write_bytes((root / "images_001" / "images" / "00000001_000.png").read_bytes())
    with open(root / "Data_Entry_2017.csv", "a") as f:
        f.write("00000000_000.png,Edema,0,0,50,M,AP,1,1,0.1,0.1,\n")
    second = build_manifest([DatasetSpec.parse(f"nih:{root}")], CHEXNET_FINDINGS, previous=first.manifest)
    after = dict(zip(second.manifest.column("image_id").to_pylist(), second.manifest.column("row").to_pylist()))
    assert {k: after[k] for k in before} == before
    assert after["00000000_000.png"] == max(before.values()) + 1


def test_generic_manifest_csv_and_parquet(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for n in ("a", "b", "c"):
        (imgs / f"{n}.png").write_bytes(png_bytes(__import__("numpy").zeros((16, 16), "uint8")))
    csv = tmp_path / "hospital_b.csv"
    csv.write_text(
        "image_id,path,patient_id,site,view_position,sex,age,department,Pneumonia,Effusion\n"
        "a,imgs/a.png,p1,,AP,Female,71,ICU,1,0\n"
        "b,imgs/b.png,p2,ward9,pa,M,44,ED,,-1\n"
        "c,imgs/c.png,p3,,PA,M,150,ED,0,1\n"
        "d,imgs/d.png,p4,,PA,M,50,ED,0,1\n"
    )
    r = build_manifest([DatasetSpec.parse(f"manifest:{csv}")], CHEXNET_FINDINGS)
    m = r.manifest.to_pandas().set_index("image_id")
    assert list(m.index) == ["a", "b", "c"]
    assert m.loc["a", "site"] == "hospital_b" and m.loc["b", "site"] == "ward9"
    assert m.loc["b", "view_position"] == "PA" and m.loc["a", "sex"] == "F"
    assert m.loc["a", "Pneumonia"] and m.loc["a", "Effusion"] == False  # noqa: E712 - labels are nullable booleans
    assert m.loc["b", "Pneumonia"] is pd.NA and m.loc["b", "Effusion"] is pd.NA  # blank and uncertain: unlabelled
    assert m.loc["a", "Atelectasis"] is pd.NA  # a finding the source never labels is null, not negative
    assert json.loads(m.loc["a", "extra"]) == {"department": "ICU"}
    assert r.issue_counts() == {"impossible_age": 1, "missing_file": 1}
    pq.write_table(pa.Table.from_pandas(__import__("pandas").read_csv(csv, dtype=str, keep_default_na=False)), tmp_path / "site_c.parquet")
    r2 = build_manifest([DatasetSpec.parse(f"manifest:{tmp_path / 'site_c.parquet'}")], CHEXNET_FINDINGS)
    assert r2.manifest.column("image_id").to_pylist() == ["a", "b", "c"]


def test_pooled_datasets_and_dataset_flag_errors(tmp_path, tiny_nih):
    csv = tmp_path / "other.csv"
    csv.write_text(f"image_id,path\nx,{next(tiny_nih.glob('images_001/images/*.png'))}\n")
    specs = [DatasetSpec.parse(f"nih:{tiny_nih}"), DatasetSpec.parse(f"hospB=manifest:{csv}")]
    # an absolute path outside the manifest's folder needs --allow-root (issue 12)
    refused = build_manifest(specs, CHEXNET_FINDINGS)
    assert refused.issues.to_pandas().reason.tolist() == ["outside_root"]
    r = build_manifest(specs, CHEXNET_FINDINGS, options=SourceOptions(allow_roots=(str(tiny_nih),)))
    m = r.manifest.to_pandas()
    assert m.dataset.value_counts().to_dict() == {"nih": 40, "hospB": 1}
    assert m.row.is_unique
    with pytest.raises(ConfigError, match="ADAPTER:LOCATION"):
        DatasetSpec.parse("/data/nih")
    with pytest.raises(ConfigError, match="unknown"):
        DatasetSpec.parse("dicom:/data")
    with pytest.raises(DatasetError, match="does not exist"):
        build_manifest([DatasetSpec.parse(f"nih:{tmp_path / 'nope'}")], CHEXNET_FINDINGS)
    empty = tmp_path / "empty_root"
    shutil.copytree(tiny_nih, empty, ignore=shutil.ignore_patterns("*.csv"))
    with pytest.raises(DatasetError, match="--metadata"):
        build_manifest([DatasetSpec.parse(f"nih:{empty}")], CHEXNET_FINDINGS)


def test_manifest_schema_round_trip(tmp_path, tiny_nih):
    r = build_manifest([DatasetSpec.parse(f"nih:{tiny_nih}")], CHEXNET_FINDINGS)
    url = str(tmp_path / "manifest.parquet")
    write_parquet_atomic(r.manifest, url)
    back = pq.read_table(url)
    assert back.schema.equals(manifest_schema(CHEXNET_FINDINGS), check_metadata=True)
    meta = read_metadata(back.schema)
    assert meta["findings"] == list(CHEXNET_FINDINGS) and meta["schema"] == "manifest"
    assert back.equals(r.manifest)
    assert not list(tmp_path.glob("*.tmp-*"))


@pytest.mark.parametrize("text,age,why", [("57", 57, None), ("058Y", 58, None), ("6M", 0, None), ("414", None, "impossible_age"), ("-3", None, "bad_age"), ("", None, None)])
def test_parse_age(text, age, why):
    assert parse_age(text) == (age, why)
