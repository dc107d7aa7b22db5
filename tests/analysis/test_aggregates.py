"""Issue 3: region statistics, finding summaries, metrics and localisation."""

import re
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.aggregate import main as aggregate_main
from jobs.score_dataset import main as score_main
from pipeline.analysis.aggregate import aggregate_run
from pipeline.analysis.localization import box_coverage, box_scores
from pipeline.analysis.metrics import auc_delong, ece, paired_auc_delta_delong
from pipeline.analysis.region_stats import RegionAccumulator, hist_quantiles
from pipeline.analysis.strata import StrataContext, strata_weights

from tests.conftest import png_bytes, roc_auc_score


README = Path(__file__).resolve().parents[2] / "README.md"
PLANTED = "tests.helpers:planted_net"
CELL = 32


def _planted_dataset(tmp_path: Path) -> Path:
    """80 films of 224x224, black but for one white 32x32 cell: Pneumonia-positive films (AP) at
    cell (2, 5), Effusion-positive films (PA) at the corner (0, 0), 20 normal films (PA) blank."""
    d = tmp_path / "imgs"
    d.mkdir()
    lines = ["image_id,path,patient_id,view_position,sex,age,Pneumonia,Effusion"]
    for i in range(80):
        img = np.zeros((224, 224), np.uint8)
        if i < 30:
            img[2 * CELL : 3 * CELL, 5 * CELL : 6 * CELL] = 255
            view, pneu, eff = "AP", 1, 0
        elif i < 60:
            img[0:CELL, 0:CELL] = 255
            view, pneu, eff = "PA", 0, 1
        else:
            view, pneu, eff = "PA", 0, 0
        (d / f"f{i:03d}.png").write_bytes(png_bytes(img))
        lines.append(f"f{i:03d},imgs/f{i:03d}.png,p{i},{view},{'MF'[i % 2]},{30 + i % 40},{pneu},{eff}")
    (tmp_path / "planted.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "planted.csv"


def _score(csv: Path, out: Path, shard_size: int = 16) -> Path:
    assert score_main(["--dataset", f"manifest:{csv}", "--checkpoint", "random:0", "--arch", PLANTED, "--out", str(out),
                       "--shard-size", str(shard_size), "--cluster", "inprocess"]) == 0
    return next((out / "runs").iterdir())


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("planted")
    csv = _planted_dataset(tmp)
    return csv, tmp / "out", _score(csv, tmp / "out")


def test_planted_cell_ranks_first_and_ring_shares_follow_the_construction(planted):
    _, _, run_dir = planted
    rs = pq.read_table(run_dir / "region_stats.parquet").to_pandas()
    pos = rs[(rs.finding == "Pneumonia") & (rs.stratum == "label") & (rs.stratum_value == "positive")]
    top = pos.sort_values("mean", ascending=False).iloc[0]
    assert (top.cell_row, top.cell_col) == (2, 5) and top.n == 30
    assert top.share_positive == 1.0 and (pos.drop(top.name).share_positive == 0).all()
    fs = pq.read_table(run_dir / "finding_summary.parquet").to_pandas().set_index(["finding", "stratum", "stratum_value"])
    assert fs.loc[("Pneumonia", "label", "positive"), "pos_share_inner"] == pytest.approx(1.0)
    assert fs.loc[("Pneumonia", "label", "positive"), "pos_share_ring"] == pytest.approx(0.0)
    assert fs.loc[("Pneumonia", "label", "positive"), "contrib_share_ring"] == pytest.approx(0.0)
    assert fs.loc[("Effusion", "label", "positive"), "pos_share_corners"] == pytest.approx(1.0)
    assert fs.loc[("Effusion", "label", "positive"), "pos_share_ring"] == pytest.approx(1.0)
    # over all films, each finding's positive evidence is half at (2,5) and half at the corner
    assert fs.loc[("Pneumonia", "all", "all"), "pos_share_corners"] == pytest.approx(0.5)
    # the network scores any bright cell alike: positives tie with the 30 Effusion films (1/2) and
    # beat the 20 blank ones (1), so AUC = (30 * 0.5 + 20 * 1) / 50 = 0.7
    m = pq.read_table(run_dir / "metrics.parquet").to_pandas().set_index(["finding", "stratum", "stratum_value"])
    assert m.loc[("Pneumonia", "all", "all"), "auc"] == pytest.approx(0.7) and m.loc[("Pneumonia", "all", "all"), "prevalence"] == pytest.approx(30 / 80)


def test_min_n_reports_n_without_statistics(planted):
    _, _, run_dir = planted
    rs = pq.read_table(run_dir / "region_stats.parquet").to_pandas()
    small = rs[rs.stratum.str.startswith("age_band") & (rs.n < 20)]
    big = rs[(rs.stratum == "all")]
    assert len(small) and small["mean"].isna().all() and small["p50"].isna().all() and (small.n > 0).all()
    assert big["mean"].notna().all()
    m = pq.read_table(run_dir / "metrics.parquet").to_pandas()
    assert m[m.n < 20].auc.isna().all() and m[m.n >= 20].prevalence.notna().all()


def test_aggregate_job_recomputes_identical_tables(planted):
    _, out, run_dir = planted
    before = {n: pq.read_table(run_dir / f"{n}.parquet") for n in ("region_stats", "finding_summary", "metrics")}
    assert aggregate_main(["--out", str(out)]) == 0
    for n, t in before.items():
        assert pq.read_table(run_dir / f"{n}.parquet").equals(t), n


def test_result_does_not_depend_on_shards(planted, tmp_path):
    csv, _, run_dir = planted
    other = _score(csv, tmp_path / "out8", shard_size=8)
    a = pq.read_table(run_dir / "region_stats.parquet").to_pandas()
    b = pq.read_table(other / "region_stats.parquet").to_pandas()
    assert a[["finding", "cell_row", "cell_col", "stratum", "stratum_value", "n"]].equals(b[["finding", "cell_row", "cell_col", "stratum", "stratum_value", "n"]])
    num = a.select_dtypes("float").columns
    np.testing.assert_allclose(a[num].to_numpy(float), b[num].to_numpy(float), rtol=1e-9, atol=1e-12)
    # and of how the chunks are split into partitions of the tree reduction (a run this small gets one)
    c = aggregate_run(str(other.parents[1]), other.name, n_parts=5, scheduler="sync")["region_stats"].to_pandas()
    assert a[["finding", "cell_row", "cell_col", "stratum", "stratum_value", "n"]].equals(c[["finding", "cell_row", "cell_col", "stratum", "stratum_value", "n"]])
    np.testing.assert_allclose(a[num].to_numpy(float), c[num].to_numpy(float), rtol=1e-9, atol=1e-12)


def test_readme_region_query_ap_versus_pa(planted):
    _, out, _ = planted
    sql = next(b for b in re.findall(r"```sql\n(.*?)```", README.read_text(), re.S) if "region_stats.parquet" in b)
    res = duckdb.sql(sql.replace("'out/", f"'{out}/")).df()
    best = res.sort_values("mean_positive_part", ascending=False).groupby("view").head(1).set_index("view")
    assert (best.loc["AP", "cell_row"], best.loc["AP", "cell_col"]) == (2, 5)
    assert (best.loc["PA", "cell_row"], best.loc["PA", "cell_col"]) == (0, 0)


# ----------------------------------------------------------------- statistics against numpy
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 60), seed=st.integers(0, 10_000), cuts=st.lists(st.integers(0, 60), max_size=4))
def test_accumulator_matches_numpy_for_any_shard_split(n, seed, cuts):
    rng = np.random.default_rng(seed)
    F, C = 2, 49
    cam = rng.normal(0, 3, (n, F, C)).astype(np.float32)
    contrib = rng.normal(0, 0.1, (n, F, C)).astype(np.float32)
    labels = rng.integers(-1, 2, (n, F)).astype(np.int8)
    ctx = StrataContext(np.arange(n), labels, rng.random((n, F)) < 0.2, {"view_position": rng.choice(np.array(["AP", "PA", None], dtype=object), n)})
    bounds = sorted({0, n, *[c for c in cuts if c < n]})
    total = RegionAccumulator(F, C)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        part = RegionAccumulator(F, C)
        sub = ctx.slice(lo, hi)
        for key, w in strata_weights(sub, F):
            part.update(key, w, cam[lo:hi], contrib[lo:hi])
        total = part + total  # order of merging does not matter either
    whole = RegionAccumulator(F, C)
    for key, w in strata_weights(ctx, F):
        whole.update(key, w, cam, contrib)
    assert set(total.stats) == set(whole.stats)
    for key, w in strata_weights(ctx, F):
        if not w.any():
            continue
        s, s1 = total.stats[key], whole.stats[key]
        np.testing.assert_array_equal(s.hist, s1.hist)
        q = hist_quantiles(s.hist)
        for f in range(F):
            v = cam[w[:, f], f].astype(np.float64)
            if len(v) == 0:
                assert s.count[f, 0] == 0
                continue
            assert s.count[f, 0] == len(v)
            np.testing.assert_allclose(s.total[f] / len(v), v.mean(0), atol=1e-9)
            np.testing.assert_allclose(s.vmin[f], v.min(0))
            np.testing.assert_allclose(s.n_pos[f], (v > 0).sum(0))
            np.testing.assert_allclose(s.contrib[f], contrib[w[:, f], f].astype(np.float64).sum(0), atol=1e-9)
            for k, qq in enumerate((0.05, 0.25, 0.5, 0.75, 0.95)):
                exact = np.quantile(v, qq, axis=0, method="inverted_cdf")
                inside = (exact > -16) & (exact < 8)
                assert np.all(np.abs(q[f, :, k] - exact)[inside] <= 0.01 + 1e-9)


def test_absorb_in_place_is_bit_identical_to_plus():
    """The partition fold merges in place (one accumulator per partition, not a copy per chunk):
    the same additions as ``+``, so the same bits, including keys only one side has."""
    rng = np.random.default_rng(3)
    F, C, n = 2, 49, 40
    cam = rng.normal(0, 3, (n, F, C))
    contrib = rng.normal(0, 0.1, (n, F, C))
    labels = rng.integers(-1, 2, (n, F)).astype(np.int8)
    views = np.array(["AP"] * 20 + ["PA"] * 20, dtype=object)  # keys only one side has, each way
    ctx = StrataContext(np.arange(n), labels, rng.random((n, F)) < 0.2, {"view_position": views})

    def part(lo, hi):
        acc = RegionAccumulator(F, C)
        for key, w in strata_weights(ctx.slice(lo, hi), F):
            acc.update(key, w, cam[lo:hi], contrib[lo:hi])
        return acc

    plus = part(0, 20) + part(20, 40)
    left = part(0, 20)
    assert left.absorb(part(20, 40)) is left
    assert set(left.stats) == set(plus.stats)
    for key, s in plus.stats.items():
        for name, value in vars(s).items():
            got = getattr(left.stats[key], name)
            assert got.dtype == value.dtype and got.tobytes() == value.tobytes(), (key, name)


# ----------------------------------------------------------------- boxes onto the grid
def test_box_projection_on_cell_edges_and_off_the_crop():
    cell_px = 1024 / 7
    cov = box_coverage((cell_px, cell_px, 2 * cell_px, cell_px), 1024, 1024)  # exactly cells (1,1) and (1,2)
    expected = np.zeros((7, 7))
    expected[1, 1:3] = 1
    np.testing.assert_allclose(cov, expected, atol=1e-9)
    half = box_coverage((0, 0, cell_px / 2, cell_px), 1024, 1024)
    assert half[0, 0] == pytest.approx(0.5) and half.sum() == pytest.approx(0.5)
    # portrait 1024x2048: Resize(224) -> 224x448, CenterCrop cuts 112 resized px (512 original) off the top
    assert box_coverage((0, 0, 1024, 500), 1024, 2048).sum() == 0.0  # entirely above the crop
    partly = box_coverage((0, 400, 1024, 224), 1024, 2048)  # 112 of its 224 original px are inside
    np.testing.assert_allclose(partly.sum(), 7 * (112 * 224 / 1024) / 32, rtol=1e-9)  # 24.5 of 32 px per column
    whole = box_coverage((-50, -50, 2000, 2000), 1024, 1024)
    np.testing.assert_allclose(whole, 1.0)


def test_box_scores_pointing_game():
    cam = -np.ones((7, 7))
    cam[3, 4] = 2.0
    cam[0, 0] = 1.0
    cov = np.zeros((7, 7))
    cov[3, 3:5] = 1
    share, hit, chance, chance_pt = box_scores(cam, cov)
    assert share == pytest.approx(2 / 3) and hit and chance == pytest.approx(2 / 49) and chance_pt == pytest.approx(2 / 49)


def test_localization_on_real_boxes(tmp_path):
    from tests.conftest import shared_or_skip

    root = shared_or_skip()
    out = tmp_path / "out"
    assert score_main(["--dataset", f"nih:{root}", "--checkpoint", "random:0", "--arch", "pipeline.inference.tiny_net:tiny_cam_net",
                       "--out", str(out), "--shard-size", "64", "--cluster", "inprocess", "--limit", "120"]) == 0
    assert aggregate_main(["--out", str(out), "--bbox", str(root / "BBox_List_2017.csv.gz")]) == 0
    run_dir = next((out / "runs").iterdir())
    boxes = pq.read_table(run_dir / "localization_boxes.parquet").to_pandas()
    # 7 of the shared films appear in BBox_List_2017 (shared/README.md says 6; the file says 7), one box each
    assert boxes.image_id.nunique() == 7 and len(boxes) == 7
    assert boxes.chance.between(0, 1).all() and boxes.inbox_share.dropna().between(0, 1).all()
    summary = pq.read_table(run_dir / "localization.parquet").to_pandas()
    assert summary.n.sum() == len(boxes)


# ----------------------------------------------------------------- metrics
def test_auc_equals_sklearn_with_ties_and_ci_contains_it():
    rng = np.random.default_rng(5)
    for _ in range(20):
        n = int(rng.integers(10, 300))
        y = rng.random(n) < rng.uniform(0.1, 0.9)
        if y.all() or not y.any():
            continue
        p = np.round(rng.random(n) + 0.3 * y, 1)  # coarse values: many ties
        auc, lo, hi = auc_delong(y, p)
        assert auc == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert lo <= auc <= hi
    assert np.isnan(auc_delong(np.ones(5, bool), np.arange(5.0))[0])


def test_midranks_equal_scipys_rankdata():
    from scipy.stats import rankdata

    from pipeline.analysis.metrics import _midranks

    rng = np.random.default_rng(2)
    for n in (1, 2, 7, 300):
        x = np.round(rng.random(n), 1)  # many ties
        np.testing.assert_array_equal(_midranks(x), rankdata(x))
    np.testing.assert_array_equal(_midranks(np.array([0.2, np.nan, 0.1])), rankdata(np.array([0.2, np.nan, 0.1])))  # all NaN


def test_paired_auc_delta_matches_a_paired_bootstrap_and_gains_from_pairing():
    rng = np.random.default_rng(11)
    n = 600
    y = rng.random(n) < 0.3
    a = rng.normal(size=n) + 0.8 * y
    b = a + rng.normal(scale=0.4, size=n) + 0.2 * y  # a close, better-informed second model
    delta, lo, hi = paired_auc_delta_delong(y, a, b)
    assert delta == pytest.approx(roc_auc_score(y, b) - roc_auc_score(y, a), abs=1e-12)
    boot = []
    for _ in range(2000):
        i = rng.integers(0, n, n)
        boot.append(auc_delong(y[i], b[i])[0] - auc_delong(y[i], a[i])[0])  # equal to sklearn's: test above
    se_boot, se = np.std(boot), (hi - lo) / (2 * 1.96)
    assert se == pytest.approx(se_boot, rel=0.15)
    # unpaired, the two AUCs' own CIs would add their variances: far wider than the paired one
    (_, lo_a, hi_a), (_, lo_b, hi_b) = auc_delong(y, a), auc_delong(y, b)
    assert hi - lo < 0.6 * np.hypot(hi_a - lo_a, hi_b - lo_b)
    assert paired_auc_delta_delong(y, a, a) == (0.0, 0.0, 0.0)
    assert all(np.isnan(paired_auc_delta_delong(np.ones(5, bool), a[:5], b[:5])))


def test_ece():
    assert ece(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0.0)
    assert ece(np.array([1, 1]), np.array([0.0, 0.0])) == pytest.approx(1.0)
