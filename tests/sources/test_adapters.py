"""More sources for pooling: CheXpert (real metadata), MIMIC-CXR-JPG and PadChest (synthetic layouts)."""

import gzip
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

from jobs.score_dataset import main
from pipeline.sources.adapters import DatasetSpec, SourceOptions
from pipeline.core.findings import CHEXNET_FINDINGS
from pipeline.sources.manifest import build_manifest

from tests.conftest import SHARED, TINY_ARCH, png_bytes, shared_or_skip


def test_chexpert_real_metadata_counts_views_and_harmonisation():
    root = shared_or_skip(SHARED / "data" / "chexpert")
    r = build_manifest([DatasetSpec.parse(f"chexpert:{root}")], CHEXNET_FINDINGS)
    m = r.manifest.to_pandas()
    # 223,414 rows: 32,387 lateral films plus 17 frontal films coded LL/RL are left out, and counted
    assert len(m) == 191_010 and r.issue_counts()["excluded_view"] == 32_404
    assert m.view_position.value_counts().to_dict() == {"AP": 161_590, "PA": 29_420}
    assert m.site.unique().tolist() == ["chexpert"] and m.patient_id.str.startswith("patient").all()
    # 'Pleural Effusion' -> Effusion; findings CheXpert never labels stay null, never negative
    assert m.Effusion.notna().sum() > 100_000
    for f in ("Infiltration", "Mass", "Nodule", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"):
        assert m[f].isna().all(), f


def test_chexpert_uncertain_policies_and_views(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    root.mkdir()
    (root / "train.csv").write_text(
        "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Atelectasis,Pleural Effusion\n"
        "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,,-1.0,1.0\n"
        "CheXpert-v1.0-small/train/patient00001/study1/view2_lateral.jpg,Female,68,Lateral,,,-1.0,1.0\n"
        "CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg,Unknown,0,Frontal,PA,1.0,,0.0\n"
    )
    spec = [DatasetSpec.parse(f"chexpert:{root}")]
    for policy, expected in (("zeros", False), ("ones", True), ("ignore", None)):
        m = build_manifest(spec, CHEXNET_FINDINGS, options=SourceOptions(uncertain=policy)).manifest.to_pandas()
        got = m.Atelectasis.tolist()[0]  # nullable boolean: <NA> = not labelled
        assert (pd.isna(got) if expected is None else got == expected) and len(m) == 2
    m = build_manifest(spec, CHEXNET_FINDINGS).manifest.to_pandas()
    assert m.path.iloc[0] == str(tmp_path / "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg")
    assert m.Atelectasis.iloc[1] is pd.NA and m.Effusion.tolist() == [True, False] and m.sex.isna().iloc[1]
    assert build_manifest(spec, CHEXNET_FINDINGS, options=SourceOptions(views=("all",))).manifest.num_rows == 3


def _gz_csv(path: Path, text: str):
    path.write_bytes(gzip.compress(text.encode()))


def _jpeg(arr) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, "JPEG", quality=90)
    return b.getvalue()


def test_mimic_and_padchest_layouts_pool_and_score(tmp_path, tiny_ckpt):
    rng = np.random.default_rng(2)
    mimic = tmp_path / "mimic-cxr-jpg"
    meta = ["dicom_id,subject_id,study_id,ViewPosition"]
    labels = ["subject_id,study_id,Atelectasis,Pleural Effusion,Pneumonia,Lung Opacity"]
    for i in range(6):
        sid, study, dicom = f"1{i:07d}", f"5{i:07d}", f"d{i:03d}"
        folder = mimic / "files" / f"p{sid[:2]}" / f"p{sid}" / f"s{study}"
        folder.mkdir(parents=True)
        (folder / f"{dicom}.jpg").write_bytes(_jpeg(rng.integers(0, 256, (96, 96), dtype=np.uint8)))
        meta.append(f"{dicom},{sid},{study},{'LATERAL' if i == 5 else 'AP'}")
        labels.append(f"{sid},{study},{1 if i % 2 else ''},-1.0,0,1")
    _gz_csv(mimic / "mimic-cxr-2.0.0-metadata.csv.gz", "\n".join(meta) + "\n")
    _gz_csv(mimic / "mimic-cxr-2.0.0-chexpert.csv.gz", "\n".join(labels) + "\n")

    pad = tmp_path / "padchest"
    (pad / "0").mkdir(parents=True)
    rows = ["ImageID,ImageDir,PatientID,Projection,PatientSex_DICOM,PatientBirth,StudyDate_DICOM,Labels"]
    for i, (proj, lab) in enumerate([("PA", "['normal']"), ("AP_horizontal", "['pneumonia', 'infiltrates']"),
                                     ("L", "['pleural effusion']"), ("PA", "not a list")]):
        (pad / "0" / f"p{i}.png").write_bytes(png_bytes(rng.integers(0, 65535, (96, 96)).astype(np.uint16)))
        rows.append(f'p{i}.png,0,pp{i},{proj},{"MF"[i % 2]},1950.0,2015{i:02d}01,"{lab}"')
    (pad / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv").write_text("\n".join(rows) + "\n")

    specs = [DatasetSpec.parse(f"mimic:{mimic}"), DatasetSpec.parse(f"padchest:{pad}")]
    r = build_manifest(specs, CHEXNET_FINDINGS)
    m = r.manifest.to_pandas().set_index("image_id")
    assert r.issue_counts()["excluded_view"] == 2  # one MIMIC lateral, one PadChest 'L'
    assert m.loc["d001", "Atelectasis"] and m.loc["d000", "Atelectasis"] is pd.NA  # blank stays unlabelled
    assert m.loc["d000", "Effusion"] == False  # noqa: E712 - uncertain -> zeros by default (not NA)
    assert m.loc["d000", "Pneumonia"] == False and m.loc["d000", "patient_id"] == "10000000"  # noqa: E712 - nullable boolean, not NA
    assert m.loc["p1.png", "Pneumonia"] and m.loc["p1.png", "Infiltration"] and m.loc["p1.png", "view_position"] == "AP"
    assert m.loc["p0.png", "Pneumonia"] == False and m.loc["p0.png", "age"] == 65  # noqa: E712 - 2015 - 1950; nullable boolean
    assert m.loc["p3.png", "Pneumonia"] is pd.NA and r.issue_counts()["bad_row"] == 1
    assert sorted(m.site.unique()) == ["mimic", "padchest"]

    out = tmp_path / "out"
    assert main(["--dataset", f"mimic:{mimic}", "--dataset", f"padchest:{pad}", "--checkpoint", tiny_ckpt, "--arch", TINY_ARCH,
                 "--out", str(out), "--shard-size", "4", "--cluster", "inprocess", "--high-bit-depth", "rescale"]) == 0
    run_dir = next((out / "runs").iterdir())
    assert pq.read_table(sorted(run_dir.glob("predictions/*.parquet"))).num_rows == 8  # 5 JPEGs + 3 16-bit PNGs
    assert pq.read_table(run_dir / "errors.parquet").num_rows == 0


def test_site_column_from_extra_manifest_columns(tmp_path):
    for n in ("a", "b"):
        (tmp_path / f"{n}.png").write_bytes(png_bytes(np.zeros((16, 16), np.uint8)))
    (tmp_path / "m.csv").write_text("image_id,path,department\na,a.png,ICU\nb,b.png,\n")
    m = build_manifest([DatasetSpec.parse(f"manifest:{tmp_path / 'm.csv'}")], CHEXNET_FINDINGS, options=SourceOptions(site_column="department")).manifest.to_pandas()
    assert m.set_index("image_id").site.to_dict() == {"a": "ICU", "b": "m"}
