"""Drift between two runs, checked on constructed models with a known difference."""

import json

import numpy as np
import pyarrow.parquet as pq
from safetensors.torch import load_file

from jobs.drift import main as drift_main
from jobs.score_dataset import main as score_main
from pipeline.analysis.aggregate import AggregateConfig, aggregate_run
from pipeline.inference.checkpoint import save_safetensors
from pipeline.core.findings import CHEXNET_FINDINGS

from tests.conftest import TINY_ARCH


def test_raising_one_bias_by_one_shifts_that_logit_by_one_and_nothing_else(tmp_path, tiny_nih, tiny_ckpt, capsys):
    state = load_file(tiny_ckpt)
    k = CHEXNET_FINDINGS.index("Pneumonia")
    state["classifier.bias"] = state["classifier.bias"].clone()
    state["classifier.bias"][k] += 1.0
    bumped = tmp_path / "bumped.safetensors"
    save_safetensors(state, str(bumped))
    out = tmp_path / "out"
    for ckpt in (tiny_ckpt, str(bumped)):
        assert score_main(["--dataset", f"nih:{tiny_nih}", "--checkpoint", ckpt, "--arch", TINY_ARCH, "--out", str(out),
                           "--shard-size", "16", "--cluster", "inprocess"]) == 0
    assert "drift " in capsys.readouterr().out  # the second run reported what moved by itself
    runs = [p.name for p in (out / "runs").iterdir()]
    assert not [r for r in runs if (out / "runs" / r / "report.html").exists()]  # tests/conftest.py skips the report step
    # identifiability of both runs for its drift; the per-cell probes (the 7x7 map: ~1,000 fits) are
    # not compared here (the job's --identifiability path is tested in test_identifiability.py)
    agg = AggregateConfig(identifiability=True, targets=("view_position",), cell_probes=False)
    for mv in runs:
        assert {"identifiability", "identifiability_map"} <= set(aggregate_run(str(out), mv, agg))
    assert pq.read_table(out / "runs" / runs[0] / "identifiability_map.parquet").num_rows == 0
    capsys.readouterr()
    assert drift_main(["--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "40 images compared" in text and "Pneumonia" in text.splitlines()[1]  # the largest move is listed first
    dest = next((out / "drift").iterdir())
    fd = pq.read_table(dest / "finding_drift.parquet").to_pandas().set_index("finding")
    assert abs(fd.loc["Pneumonia", "mean_logit_delta"] - 1.0) < 1e-4
    assert abs(fd.loc["Pneumonia", "max_abs_logit_delta"] - 1.0) < 1e-4
    others = fd.drop("Pneumonia")
    assert (others.max_abs_logit_delta < 1e-5).all() and (others.mean_prob_delta.abs() < 1e-6).all()
    assert (fd.rank_correlation > 0.999).all()  # a monotone shift keeps the ranking
    assert fd.loc["Pneumonia", "mean_prob_delta"] > 0
    # the share of films whose most probable finding changed, from the two runs' predictions: only to Pneumonia
    before, after = sorted((pq.read_table(sorted((out / "runs" / r).glob("predictions/*.parquet"))).to_pandas().sort_values("row")
                            for r in runs), key=lambda d: d["Pneumonia"].mean())
    top_before, top_after = (d[list(CHEXNET_FINDINGS)].to_numpy().argmax(1) for d in (before, after))
    changed = top_before != top_after
    assert json.loads((dest / "summary.json").read_text())["top_finding_changed_share"] == float(changed.mean())
    assert (top_after[changed] == k).all()
    idd = pq.read_table(dest / "identifiability_drift.parquet").to_pandas().set_index(["target", "features"])
    # a bias changes no feature: the embedding probes, and so their AUCs, are identical
    assert idd.loc[("view_position", "embedding"), "auc_delta"] == 0.0
    rd = pq.read_table(dest / "region_drift.parquet").to_pandas()
    pneu = rd[(rd.finding == "Pneumonia") & (rd.stratum == "all")]
    # the exact contributions (z - b) / 49 do not see a bias change; the ln-ratio map does, in every cell
    np.testing.assert_allclose(pneu.mean_contribution_delta, 0, atol=1e-6)
    assert (pneu.mean_delta > 0).all()
    other = rd[rd.finding != "Pneumonia"].mean_delta.dropna()  # strata below --min-n have no means
    assert len(other) and (other.abs() < 1e-5).all()
