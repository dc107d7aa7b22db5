"""The HTML audit report and the single-film PNG, from runs with and without labels, boxes, sites,
identifiability and a second run: each section is present, or left out with a sentence saying why."""

import csv
import io
import json
import re

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from jobs.aggregate import main as aggregate_main
from jobs.report import main as report_main
from jobs.score_dataset import main as score_main
from pipeline.inference.checkpoint import save_safetensors
from pipeline.demo import make_demo_model, make_demo_sites, marker_cells
from pipeline.core.findings import CHEXNET_FINDINGS

from tests.conftest import TINY_ARCH

FULL_SECTIONS = ("scorecard", "grids", "identifiability", "examples", "drift")


def _score(out, datasets, ckpt, *extra):
    args = [a for d in datasets for a in ("--dataset", d)]
    return score_main([*args, "--checkpoint", ckpt, "--arch", TINY_ARCH, "--out", str(out), "--shard-size", "16",
                       "--cluster", "inprocess", *extra])


def _sections(page: str) -> dict[str, str]:
    """Each numbered section's HTML, by its id."""
    parts = re.split(r"<h2 id='([a-z]+)'>", page)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _scorecard_rows(page: str) -> list[str]:
    table = page.split('<table id="scorecard-table">', 1)[1].split("</table>", 1)[0]
    return re.findall(r'<tr class="finding-row"><td>([^<]+)</td>', table)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """A demo-like output: two sites (one with a laterality marker), labels, expert boxes,
    identifiability, then a second model (one bias raised) so that drift exists."""
    base = tmp_path_factory.mktemp("report")
    sites = make_demo_sites(base / "data", n=60, size=128)
    roots = [s.split(":", 1)[1] for s in sites]
    ckpt = make_demo_model(base / "model.safetensors", data_root=roots, epochs=2)
    out = base / "out"
    assert _score(out, sites, ckpt) == 0
    first = next((out / "runs").iterdir()).name
    state = load_file(ckpt)
    state["classifier.bias"] = state["classifier.bias"].clone()
    state["classifier.bias"][CHEXNET_FINDINGS.index("Pneumonia")] += 1.0
    save_safetensors(state, str(base / "bumped.safetensors"))
    assert _score(out, sites, str(base / "bumped.safetensors")) == 0  # its drift is written by the job
    second = next(p.name for p in (out / "runs").iterdir() if p.name != first)
    # expert boxes for three films of the first site; identifiability of the site (the costly probes, once)
    with open(f"{roots[0]}/Data_Entry_2017_v2020.csv") as f:
        ids = [r["Image Index"] for r in csv.DictReader(f)][:3]
    bbox = base / "BBox_List_2017.csv"
    bbox.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n" + "".join(f"{i},Pneumonia,20,30,40,50\n" for i in ids))
    assert aggregate_main(["--out", str(out), "--run", second, "--bbox", str(bbox), "--identifiability", "--confounder", "site"]) == 0
    assert report_main(["--out", str(out)]) == 0
    return out, first, second


def test_full_report_has_every_section(full_run, capsys):
    import pandas as pd

    out, first, second = full_run
    page = (out / "runs" / second / "report.html").read_text()
    sec = _sections(page)
    assert list(sec) == list(FULL_SECTIONS)  # in the order
    manifest = pd.read_parquet(out / "manifest.parquet")
    positive = [f for f in CHEXNET_FINDINGS if manifest[f].fillna(False).astype(bool).any()]
    assert _scorecard_rows(page) == positive  # the never-positive findings are folded into one line
    folded = re.search(r"no positive film, so nothing to examine: ([^.<]+)\.", sec["scorecard"]).group(1).split(", ")
    assert folded == [f for f in CHEXNET_FINDINGS if f not in positive]
    assert "a test that rejected its null" in sec["scorecard"] and "Holm" in sec["scorecard"]
    card = pd.read_parquet(out / "runs" / second / "scorecard.parquet")
    assert sec["scorecard"].count('class="mark"') == int(card.mark.sum())  # every mark is a rejected test, nothing else
    assert all(f"where {f} positives and negatives differ" in sec["grids"] for f in positive)
    assert "What the film tells besides disease" in sec["scorecard"] and "Left out" not in page
    assert all(g in sec["grids"] for g in ("hospA (n=30)", "hospB (n=30)", "AP (n=", "PA (n=", "negative (n="))
    assert "pointing vs chance" in sec["scorecard"] and re.search(r"n=3</td>", sec["scorecard"])  # the three boxes
    assert f"From {first} to {second}" in sec["drift"] and "Pneumonia" in sec["drift"]
    # self-contained: every image inline, nothing fetched from the network
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(imgs) >= 2 * len(positive) + 3  # per finding with positives: where it discriminates, its mean maps
    for b64 in imgs[:3]:
        import base64

        assert Image.open(io.BytesIO(base64.b64decode(b64))).size[0] > 100
    assert f"<code>{second}</code>" in page.split("<footer>", 1)[1]


def test_identifiability_marks_only_significant_cells_or_says_why(full_run, tmp_path):
    import pyarrow.parquet as pq

    out, _, second = full_run
    page = (out / "runs" / second / "report.html").read_text()
    imap = pq.read_table(out / "runs" / second / "identifiability_map.parquet").to_pandas()
    if "significant" in imap.columns:
        assert "framed in red" in _sections(page)["identifiability"]
    else:
        assert "No cell is marked" in _sections(page)["identifiability"]


def test_label_from_site_is_the_stored_site_ordering_auc_not_the_out_of_fold_one(full_run):
    import pandas as pd

    from pipeline.reporting.data import load_run
    from pipeline.reporting.scorecard import label_ties

    out, _, second = full_run
    pc = pd.read_parquet(out / "runs" / second / "prevalence_confounding.parquet")
    ties = label_ties(load_run(str(out), second))
    compared = 0
    for r in pc[pc.stratum == "all"].itertuples():
        if pd.notna(r.auc_site_prevalence) and (r.finding, "site") in ties:
            assert ties[(r.finding, "site")] == pytest.approx(r.auc_site_prevalence, abs=1e-12), r.finding
            compared += 1
    assert compared >= 1  # the demo's two sites tie at least Pneumonia to the site


def test_the_job_writes_the_report_at_the_end_of_a_run_without_labels_sites_boxes(tmp_path, tiny_nih, tiny_ckpt, capsys, report_after_run):
    # a generic manifest with paths only: no labels, no view, one site
    import shutil

    (tmp_path / "films").mkdir()
    paths = sorted(tiny_nih.glob("images_*/images/*.png"))[:24]
    for p in paths:
        shutil.copy(p, tmp_path / "films" / p.name)
    manifest = tmp_path / "films.csv"  # paths relative to the manifest's folder
    manifest.write_text("image_id,path\n" + "".join(f"{p.name},films/{p.name}\n" for p in paths))
    out = tmp_path / "out"
    assert _score(out, [f"manifest:{manifest}"], tiny_ckpt) == 0
    mv = next((out / "runs").iterdir()).name
    report = out / "runs" / mv / "report.html"
    assert f"report: {report}" in capsys.readouterr().out
    assert json.loads((out / "runs" / mv / "run.json").read_text())["steps"]["report"] == "done"
    page = report.read_text()
    sec = _sections(page)
    assert list(sec) == list(FULL_SECTIONS)
    assert _scorecard_rows(page) == list(CHEXNET_FINDINGS)
    assert "No finding is labelled" in sec["scorecard"]
    assert "No expert boxes" in sec["scorecard"]
    assert "no identifiability tables" in sec["scorecard"]
    assert "Positives vs negatives are left out" in sec["grids"] and "Per-site grids are left out" in sec["grids"]
    assert "Left out: this run has no identifiability tables" in sec["identifiability"]
    assert "most confident predictions (no labels)" in sec["examples"]
    assert "first complete run" in sec["drift"]


def test_report_without_region_tables_or_drift_tables(full_run, tmp_path, capsys):
    """Both left out of one report (each report takes seconds to draw): the second run's region
    tables and the drift between the runs moved away."""
    out, first, second = full_run
    moved = [(out / "runs" / second / "region_stats.parquet", tmp_path / "rs.parquet"), (next((out / "drift").iterdir()), tmp_path / "drift")]
    for src, dst in moved:
        src.rename(dst)
    try:
        dest = tmp_path / "second.html"
        assert report_main(["--out", str(out), "--run", second, "--html", str(dest)]) == 0
        sec = _sections(dest.read_text())
        assert "Left out: this run has no region_stats.parquet" in sec["grids"]
        assert "no drift tables" in sec["drift"]
    finally:
        for src, dst in moved:
            dst.rename(src)


def test_single_film_png(full_run, tmp_path, capsys):
    import pandas as pd

    out, _, second = full_run
    image_id = pd.read_parquet(out / "manifest.parquet").image_id.iloc[0]
    stem = image_id.rsplit(".", 1)[0]
    all_png, one_png = out / "runs" / second / "films" / (stem + ".png"), tmp_path / "one.png"
    assert report_main(["--out", str(out), "--film", image_id]) == 0  # every finding, default path under the run
    assert report_main(["--out", str(out), "--film", image_id, "--finding", "Pneumonia", "--png", str(one_png)]) == 0
    big, small = Image.open(all_png), Image.open(one_png)
    assert big.size[0] > small.size[0] and big.size[1] > small.size[1]  # 14 maps against 1
    px = np.asarray(small.convert("L"), float)
    assert px.std() > 10  # a drawn film, not an empty canvas
    assert report_main(["--out", str(out), "--film", image_id, "--finding", "Pneumonia"]) == 0  # default path, one finding
    assert (out / "runs" / second / "films" / (stem + "-Pneumonia.png")).exists()
    capsys.readouterr()
    assert report_main(["--out", str(out), "--film", "nope.png"]) == 2
    assert "no such image_id" in capsys.readouterr().err
    assert report_main(["--out", str(out), "--film", image_id, "--finding", "Flu"]) == 2


def test_demo_markers_sit_in_the_top_corner_cells():
    cells = marker_cells()
    assert set(cells["PORTABLE"]) <= {(0, 0), (0, 1), (0, 2)} and (0, 0) in cells["PORTABLE"]
    assert cells["L"] == ((0, 6),)


# ------------------------------------------------------------------ a real browser (Debian's chromium)
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || (e.target && e.target.src || '').slice(0, 40))), true);
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const out = {images: imgs.length, undecoded: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length,
               rows: document.querySelectorAll('#scorecard-table tbody tr').length,
               height: document.documentElement.scrollHeight, errors: window.__errors};
  const pre = document.createElement('pre'); pre.id = 'probe-result'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _chromium() -> str:
    import os
    import shutil

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("chromium is not installed but CI is set: .ci/run installs Debian's chromium for this test")
        pytest.skip("chromium is absent (apt-get install chromium); under CI=true this is a failure")
    return exe


def _run_browser(exe: str, tmp_path, *args) -> tuple[str, str]:
    import subprocess

    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars", "--enable-logging=stderr", "--v=0",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout, p.stderr


def test_demo_report_in_a_real_browser(full_run, tmp_path):
    import json

    exe = _chromium()
    out, _, second = full_run
    page = (out / "runs" / second / "report.html").read_text()
    assert "<script" not in page  # the report itself runs nothing
    probed = tmp_path / "probed.html"  # a copy with a probe that writes its findings into the DOM
    probed.write_text(page.replace("<head>", "<head>" + PROBE, 1))
    dom, err = _run_browser(exe, tmp_path, "--dump-dom", probed.as_uri())
    result = json.loads(re.search(r'<pre id="probe-result">(.*?)</pre>', dom).group(1))
    assert result["errors"] == []
    console = [line for line in err.splitlines() if "CONSOLE" in line]
    assert console == []  # nothing written to the console (errors included) by the page
    assert result["images"] >= 2 * len(_scorecard_rows(page)) + 3 and result["undecoded"] == 0  # every image decoded
    assert result["rows"] == len(_scorecard_rows(page)) >= 1  # one scorecard row per finding with a positive film
    # the unmodified report, full page: the window as tall as the document
    shot = tmp_path / "report.png"
    _run_browser(exe, tmp_path, f"--screenshot={shot}", f"--window-size=1400,{min(result['height'], 16000)}", (out / "runs" / second / "report.html").as_uri())
    px = np.asarray(Image.open(shot).convert("L"), float)
    assert px.shape[0] >= min(result["height"], 16000) - 1
    assert (px < 200).mean() > 0.05 and px.std() > 20  # not blank: text, tables and films drawn


def test_demo_story_is_read_off_the_tables(full_run):
    import pandas as pd

    from pipeline.reporting.story import story

    out, _, second = full_run
    lines = story(str(out), marker_cells(size=128))
    assert len(lines) == 5 and [line[:2] for line in lines] == ["1.", "2.", "3.", "4.", "5."]
    met = pd.read_parquet(out / "runs" / second / "metrics.parquet")
    pooled = met[(met.finding == "Pneumonia") & (met.stratum == "all")].auc.iloc[0]
    assert f"Pneumonia AUC pooled {pooled:.2f}" in lines[0] and "hospA" in lines[0] and "AP" in lines[0]
    rs = pd.read_parquet(out / "runs" / second / "region_stats.parquet")
    g = rs[(rs.finding == "Pneumonia") & (rs.stratum == "label")].set_index(["stratum_value", "cell_row", "cell_col"]).mean_contribution
    diff = g["positive"] - g["negative"]  # what separates positives from negatives, cell by cell
    if diff.sum() > 0:
        assert f"{diff.loc[(0, 6)] / diff.sum():.0%} on the L cells (0, 6)" in lines[1]
    else:  # a model trained for two epochs may not separate them at all: then the line says so
        assert "does not separate Pneumonia positives from negatives" in lines[1]
    card = pd.read_parquet(out / "runs" / second / "scorecard.parquet").set_index(["finding", "rule"])
    lean = card.loc[("Pneumonia", "stratum:view_position")]
    if pd.notna(lean.p_value):
        assert f"Holm p={lean.p_adjusted:.2g}" in lines[0] and ("marked" in lines[0]) == bool(lean.mark)
    ident = pd.read_parquet(out / "runs" / second / "identifiability.parquet")
    site_auc = ident[(ident.target == "site") & (ident.features == "embedding")].auc.iloc[0]
    assert f"site is read from the film at AUC {site_auc:.2f}" in lines[3]


def test_the_reports_gc_freeze_is_undone_and_keeps_a_callers_own():
    import gc

    from pipeline.reporting.html import _heap_frozen

    assert gc.get_freeze_count() == 0
    with _heap_frozen():
        assert gc.get_freeze_count() > 0  # drawing: the heap before it is out of the collector's walks
    assert gc.get_freeze_count() == 0
    gc.freeze()  # a caller's own freeze (a preforking server) survives the report
    try:
        with _heap_frozen():
            pass
        assert gc.get_freeze_count() > 0  # still frozen (objects that died meanwhile leave the count)
    finally:
        gc.unfreeze()
